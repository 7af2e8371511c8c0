"""Shared pieces: JWT helpers, serving, run_fakes, the pattern, ISSUED."""

from __future__ import annotations

import base64
import hashlib
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.fakes import (
    ISSUED,
    TOKEN_FAILURE_MODES,
    FakeState,
    jwt_decode,
    jwt_encode,
    jwt_unverified_claims,
    ms_date,
    pattern_chunks,
    pattern_sha256,
    paymo_time,
    run_fakes,
    serve,
)

from .helpers import basic, bearer


def test_jwt_round_trip_and_rejections() -> None:
    key = b"k" * 32
    token = jwt_encode({"sub": "me", "exp": 123, "scope": "a b"}, key)
    assert jwt_decode(token, key) == {"sub": "me", "exp": 123, "scope": "a b"}
    assert jwt_unverified_claims(token) == {"sub": "me", "exp": 123, "scope": "a b"}
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert "=" not in token
    assert jwt_decode(token, b"other key") is None
    h, p, s = token.split(".")
    assert jwt_decode(f"{h}.{p}x.{s}", key) is None
    none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    assert jwt_decode(f"{none_header}.{p}.", key) is None
    assert jwt_decode("not-a-jwt", key) is None
    assert jwt_decode("a.b.c", key) is None
    assert jwt_unverified_claims("a.!!.c") is None


def test_known_jwt_vector() -> None:
    # The well-known jwt.io example, signed with "your-256-bit-secret".
    token = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ."
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    )
    claims = jwt_decode(token, b"your-256-bit-secret")
    assert claims == {"sub": "1234567890", "name": "John Doe", "iat": 1516239022}


def test_pattern() -> None:
    n = 200_000
    chunks = list(pattern_chunks(n))
    assert sum(map(len, chunks)) == n
    assert max(map(len, chunks)) <= 64 * 1024
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == pattern_sha256(n)
    assert list(pattern_chunks(0)) == []


def test_time_formats() -> None:
    assert paymo_time(1424094881.9) == "2015-02-16T13:54:41Z"
    assert ms_date(1393858439151) == "/Date(1393858439151)/"


def test_state_revocation() -> None:
    st = FakeState(lifetime=10)
    st.issue("t1", 2e9)
    st.issue("t2", 2e9)
    st.issue("old", 1.0)
    assert {"t1", "t2", "old"} <= ISSUED
    assert st.is_valid("t1")
    assert not st.is_valid("old")
    assert not st.is_valid("never-issued")
    assert not st.is_valid(None)
    st.revoke("t1")
    assert not st.is_valid("t1")
    assert st.is_valid("t2")
    st.revoke_all()
    assert not st.is_valid("t2")
    st.issue("t3", 2e9)
    assert st.is_valid("t3")


def test_failure_modes_listed() -> None:
    assert {"500", "429", "503", "html", "nonjson", "missing_field", "huge", "hang"} <= (
        TOKEN_FAILURE_MODES
    )
    assert {"past_expiry", "nonsense_expiry", "invalid_client", "reset"} <= TOKEN_FAILURE_MODES


async def test_serve_and_close_release_port(session: aiohttp.ClientSession) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    running = await serve(app)
    assert running.port > 0
    assert running.url == f"http://127.0.0.1:{running.port}"
    async with session.get(running.url + "/") as r:
        assert await r.text() == "hi"
    await running.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(running.url + "/"):
            pass


async def test_run_fakes_starts_all_four(session: aiohttp.ClientSession) -> None:
    async with run_fakes(lifetime=30) as fakes:
        assert fakes.paymo.url.endswith("/api")
        assert fakes.primaerp.url.endswith("/v1")
        assert fakes.didomi.url.endswith("/v1")
        assert fakes.getpaid.url.endswith("/api")
        assert fakes.getpaid.token_url.endswith("/oauth/token")
        assert fakes.getpaid.state.token_url == fakes.getpaid.token_url
        assert len({f.server.port for f in fakes.all()}) == 4
        assert all(f.state.lifetime == 30 for f in fakes.all())

        p = fakes.paymo.state
        async with session.post(fakes.paymo.token_url, headers=basic(p.email, p.password)) as r:
            sid = (await r.json())["sessions"][0]["id"]
        e = fakes.primaerp.state
        async with session.get(
            fakes.primaerp.token_url,
            params={"apikey": e.apikey},
            headers=basic(e.secret_key, ""),
        ) as r:
            pair = await r.json()
        d = fakes.didomi.state
        body = {"type": "api-key", "key": d.key, "secret": d.secret}
        async with session.post(fakes.didomi.token_url, json=body) as r:
            jwt = (await r.json())["access_token"]
        g = fakes.getpaid.state
        grant = {
            "client_id": g.client_id,
            "client_secret": g.client_secret,
            "audience": g.audience,
            "grant_type": "client_credentials",
            "scope": g.allowed_scopes,
        }
        async with session.post(fakes.getpaid.token_url, json=grant) as r:
            access = (await r.json())["access_token"]
        assert {sid, pair["token"], pair["refreshToken"], jwt, access} <= ISSUED

        checks = [
            (fakes.paymo.url + "/clients", {"headers": {"X-Session": sid}}),
            (fakes.primaerp.url + "/time/projects", {"params": {"token": pair["token"]}}),
            (fakes.didomi.url + "/properties", {"headers": bearer(jwt)}),
            (fakes.getpaid.url + "/invoices", {"headers": bearer(access)}),
        ]
        for url, kwargs in checks:
            async with session.get(url, **kwargs) as r:  # type: ignore[arg-type]
                assert r.status == 200, url
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(fakes.paymo.url + "/clients"):
            pass

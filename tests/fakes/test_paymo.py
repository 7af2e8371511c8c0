"""The Paymo fake behaves as seeds/paymo-authentication.md describes."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from proxy.fakes import ISSUED, PaymoState, SeedFake, pattern_sha256, start_paymo

from .helpers import basic, sleep_until

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

Paymo = SeedFake[PaymoState]


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


async def login(session: aiohttp.ClientSession, fake: Paymo) -> dict[str, Any]:
    async with session.post(fake.url + "/sessions", headers=basic(fake.state.api_key, "x")) as r:
        assert r.status == 200
        data = await r.json()
    first: dict[str, Any] = data["sessions"][0]
    return first


async def test_url_has_api_base_path(paymo: Paymo) -> None:
    assert paymo.url == f"http://127.0.0.1:{paymo.server.port}/api"
    assert paymo.token_url == paymo.url + "/sessions"


async def test_basic_with_email_and_password(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    st = paymo.state
    async with session.get(paymo.url + "/clients", headers=basic(st.email, st.password)) as r:
        assert r.status == 200
        data = await r.json()
    assert data["clients"] == []
    assert data["echo"]["method"] == "GET"
    assert data["echo"]["raw_path"] == "/api/clients"
    assert st.resource_requests == 1
    assert st.token_requests == 0


async def test_api_key_as_username_with_any_password(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    for password in ("SOME_RANDOM_TEXT", "", "x"):
        headers = basic(paymo.state.api_key, password)
        async with session.get(paymo.url + "/me", headers=headers) as r:
            assert r.status == 200


async def test_bad_or_missing_credentials_are_401(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    st = paymo.state
    for headers in (
        {},
        basic(st.email, "wrong"),
        basic("nobody@example.com", st.password),
        basic("not-the-key", "x"),
        {"Authorization": "Basic !!!notbase64"},
        {"X-Session": "0123456789abcdef0123456789abcdef"},
    ):
        async with session.get(paymo.url + "/clients", headers=headers) as r:
            assert r.status == 401, headers
    assert st.resource_requests == 6  # rejected requests are counted and recorded
    assert len(st.requests) == 6


async def test_create_session_shape(session: aiohttp.ClientSession) -> None:
    async with await start_paymo(PaymoState(lifetime=30)) as paymo:
        before = time.time()
        s = await login(session, paymo)
    assert set(s) == {"id", "ip", "expires_on", "created_on", "updated_on", "user_id"}
    assert isinstance(s["id"], str)
    assert re.fullmatch(r"[0-9a-f]{32}", s["id"])
    assert s["id"] in ISSUED
    assert s["ip"] == "127.0.0.1"
    assert s["user_id"] == 1234
    for key in ("expires_on", "created_on", "updated_on"):
        assert ISO_Z.match(s[key]), s[key]
    # Rounded up: the session lives at least `lifetime`, and not much more.
    assert before + 30 <= parse_iso(s["expires_on"]) <= before + 32
    assert paymo.state.token_requests == 1
    assert paymo.state.token_calls[0].method == "POST"
    assert paymo.state.requests == []


async def test_create_session_with_email_password(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    st = paymo.state
    async with session.post(paymo.url + "/sessions", headers=basic(st.email, st.password)) as r:
        assert r.status == 200


async def test_create_session_needs_credentials(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    async with session.post(paymo.url + "/sessions") as r:
        assert r.status == 401
    async with session.post(paymo.url + "/sessions", headers=basic("bad", "creds")) as r:
        assert r.status == 401
    assert paymo.state.token_requests == 2  # failures count too


async def test_x_session_authenticates(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    s = await login(session, paymo)
    async with session.get(paymo.url + "/projects", headers={"X-Session": str(s["id"])}) as r:
        assert r.status == 200
        data = await r.json()
    assert ["X-Session", s["id"]] in data["echo"]["headers"]


async def test_session_expires_at_expires_on(session: aiohttp.ClientSession) -> None:
    async with await start_paymo(PaymoState(lifetime=0.2)) as paymo:
        s = await login(session, paymo)
        headers = {"X-Session": str(s["id"])}
        async with session.get(paymo.url + "/clients", headers=headers) as r:
            assert r.status == 200
        await sleep_until(parse_iso(str(s["expires_on"])))
        async with session.get(paymo.url + "/clients", headers=headers) as r:
            assert r.status == 401
        # Basic auth keeps working: only the session ended.
        async with session.get(
            paymo.url + "/clients", headers=basic("demo-paymo-api-key", "")
        ) as r:
            assert r.status == 200


async def test_delete_session_ends_it(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    s = await login(session, paymo)
    sid = str(s["id"])
    headers = {"X-Session": sid}
    async with session.delete(f"{paymo.url}/sessions/{sid}", headers=headers) as r:
        assert r.status in (200, 204)
    async with session.get(paymo.url + "/clients", headers=headers) as r:
        assert r.status == 401
    assert paymo.state.deleted_sessions == [sid]
    assert paymo.state.logout_requests == 1
    assert paymo.state.token_requests == 1


async def test_delete_session_with_basic_and_errors(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    sid = str((await login(session, paymo))["id"])
    async with session.delete(f"{paymo.url}/sessions/{sid}") as r:
        assert r.status == 401  # unauthenticated
    async with session.delete(
        f"{paymo.url}/sessions/{'0' * 32}", headers=basic("demo-paymo-api-key", "")
    ) as r:
        assert r.status == 404
    async with session.delete(
        f"{paymo.url}/sessions/{sid}", headers=basic("demo-paymo-api-key", "")
    ) as r:
        assert r.status == 200
    assert paymo.state.logout_requests == 3
    assert paymo.state.deleted_sessions == [sid]


async def test_sessions_path_is_not_a_resource(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    async with session.get(paymo.url + "/sessions", headers=basic("demo-paymo-api-key", "")) as r:
        assert r.status == 405
    assert paymo.state.resource_requests == 0


async def test_always_401_and_revoke(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    s1 = str((await login(session, paymo))["id"])
    s2 = str((await login(session, paymo))["id"])
    assert s1 != s2
    paymo.state.revoke(s1)
    async with session.get(paymo.url + "/clients", headers={"X-Session": s1}) as r:
        assert r.status == 401
    async with session.get(paymo.url + "/clients", headers={"X-Session": s2}) as r:
        assert r.status == 200
    paymo.state.revoke_all()
    async with session.get(paymo.url + "/clients", headers={"X-Session": s2}) as r:
        assert r.status == 401
    s3 = str((await login(session, paymo))["id"])
    async with session.get(paymo.url + "/clients", headers={"X-Session": s3}) as r:
        assert r.status == 200
    paymo.state.always_401 = True
    async with session.get(paymo.url + "/clients", headers={"X-Session": s3}) as r:
        assert r.status == 401
    async with session.get(paymo.url + "/clients", headers=basic("demo-paymo-api-key", "")) as r:
        assert r.status == 401


async def test_any_method_and_body_recorded(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    auth = basic("demo-paymo-api-key", "x")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        body = f'{{"m": "{method}"}}'.encode()
        async with session.request(method, paymo.url + "/tasks/7", data=body, headers=auth) as r:
            assert r.status == 200
            data = await r.json()
        assert data["echo"]["method"] == method
        assert data["echo"]["body_len"] == len(body)
        assert paymo.state.requests[-1].body == body
        assert paymo.state.requests[-1].method == method


async def test_raw_path_and_headers_as_received(
    session: aiohttp.ClientSession, paymo: Paymo
) -> None:
    url = URL(paymo.url + "/clients/a%2Fb%20c?where=name%3D%22x%22&x=1&x=2", encoded=True)
    headers = [("X-Dup", "1"), ("X-Dup", "2"), *basic("demo-paymo-api-key", "").items()]
    async with session.get(url, headers=headers) as r:
        assert r.status == 200
        data = await r.json()
    assert data["echo"]["raw_path"] == "/api/clients/a%2Fb%20c?where=name%3D%22x%22&x=1&x=2"
    rec = paymo.state.requests[-1]
    assert rec.raw_path == data["echo"]["raw_path"]
    assert rec.header_values("x-dup") == ["1", "2"]
    names = [k for k, _ in rec.headers]
    assert names.index("X-Dup") < names.index("Authorization")


async def test_stream_endpoint(session: aiohttp.ClientSession, paymo: Paymo) -> None:
    n = 3 * 64 * 1024 + 17
    async with session.get(f"{paymo.url}/stream/{n}", headers=basic("demo-paymo-api-key", "")) as r:
        assert r.status == 200
        assert r.content_length == n
        digest = hashlib.sha256()
        async for chunk in r.content.iter_chunked(65536):
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(n)
    async with session.get(f"{paymo.url}/stream/{n}") as r:
        assert r.status == 401

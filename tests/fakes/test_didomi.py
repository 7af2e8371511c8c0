"""The Didomi fake behaves as seeds/didomi-authentication.md describes."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from proxy.fakes import ISSUED, DidomiState, SeedFake, jwt_decode, jwt_encode, start_didomi

from .helpers import bearer, sleep_until

Didomi = SeedFake[DidomiState]


def creds(fake: Didomi, **override: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "api-key", "key": fake.state.key, "secret": fake.state.secret}
    body.update(override)
    return body


async def login(session: aiohttp.ClientSession, fake: Didomi) -> str:
    async with session.post(fake.url + "/sessions", json=creds(fake)) as r:
        assert r.status == 200
        data = await r.json()
    assert set(data) == {"access_token"}
    token = data["access_token"]
    assert isinstance(token, str)
    return token


async def get_properties(
    session: aiohttp.ClientSession, fake: Didomi, headers: dict[str, str]
) -> int:
    async with session.get(fake.url + "/properties", headers=headers) as r:
        return r.status


async def test_url_has_v1_base_path(didomi: Didomi) -> None:
    assert didomi.url.endswith("/v1")
    assert didomi.token_url == didomi.url + "/sessions"


async def test_session_returns_signed_jwt_with_exp(
    session: aiohttp.ClientSession, didomi: Didomi
) -> None:
    before = time.time()
    token = await login(session, didomi)
    assert token in ISSUED
    claims = jwt_decode(token, didomi.state.jwt_key)
    assert claims is not None
    assert isinstance(claims["exp"], int)
    assert isinstance(claims["iat"], int)
    assert claims["sub"]
    assert before + 60 <= claims["exp"] <= time.time() + 61
    assert didomi.state.token_requests == 1
    call = didomi.state.token_calls[0]
    assert call.method == "POST"
    assert call.header("Content-Type") == "application/json"


async def test_two_sessions_give_distinct_tokens(
    session: aiohttp.ClientSession, didomi: Didomi
) -> None:
    assert await login(session, didomi) != await login(session, didomi)


async def test_bad_login_is_400_not_401(session: aiohttp.ClientSession, didomi: Didomi) -> None:
    bodies: list[Any] = [
        creds(didomi, secret="wrong"),
        creds(didomi, key="wrong"),
        creds(didomi, type="password"),
        {"type": "api-key", "key": didomi.state.key},
        {},
        [],
    ]
    for body in bodies:
        async with session.post(didomi.url + "/sessions", json=body) as r:
            assert r.status == 400, body
            data = await r.json()
            assert data["code"] == 400
    async with session.post(didomi.url + "/sessions", data=b"{not json") as r:
        assert r.status == 400
    assert didomi.state.token_requests == len(bodies) + 1


async def test_bearer_authenticates(session: aiohttp.ClientSession, didomi: Didomi) -> None:
    token = await login(session, didomi)
    async with session.get(didomi.url + "/properties?limit=5", headers=bearer(token)) as r:
        assert r.status == 200
        data = await r.json()
    assert data["echo"]["raw_path"] == "/v1/properties?limit=5"
    assert ["Authorization", "Bearer " + token] in data["echo"]["headers"]


async def test_missing_or_invalid_token_is_401(
    session: aiohttp.ClientSession, didomi: Didomi
) -> None:
    token = await login(session, didomi)
    header, payload, sig = token.split(".")
    # Change the signature's first character: all six of its bits count (the last
    # one's low bits are padding a lenient decoder ignores, so "…AA" could decode to
    # the very same signature about once in a thousand runs).
    tampered = f"{header}.{payload}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}"
    forged = jwt_encode({"sub": "x", "exp": int(time.time()) + 600}, b"another key")
    for headers in (
        {},
        bearer("garbage"),
        bearer(tampered),
        bearer(forged),
        {"Authorization": "Basic " + token},
        {"Authorization": token},
    ):
        assert await get_properties(session, didomi, headers) == 401, headers
    assert didomi.state.resource_requests == 6


async def test_token_expires_at_exp(session: aiohttp.ClientSession) -> None:
    async with await start_didomi(DidomiState(lifetime=0.2)) as fake:
        token = await login(session, fake)
        assert await get_properties(session, fake, bearer(token)) == 200
        claims = jwt_decode(token, fake.state.jwt_key)
        assert claims is not None
        await sleep_until(float(claims["exp"]))
        assert await get_properties(session, fake, bearer(token)) == 401


async def test_revoke_and_always_401(session: aiohttp.ClientSession, didomi: Didomi) -> None:
    token = await login(session, didomi)
    didomi.state.revoke(token)
    assert await get_properties(session, didomi, bearer(token)) == 401
    other = await login(session, didomi)
    assert await get_properties(session, didomi, bearer(other)) == 200
    didomi.state.always_401 = True
    assert await get_properties(session, didomi, bearer(other)) == 401

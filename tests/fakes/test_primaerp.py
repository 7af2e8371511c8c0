"""The primaERP fake behaves as seeds/primaerp-authentication.md describes."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import aiohttp

from proxy.fakes import ISSUED, PrimaerpState, SeedFake, start_primaerp

from .helpers import basic, sleep_until

Primaerp = SeedFake[PrimaerpState]
DATE = re.compile(r"^/Date\((\d+)\)/$")


def date_ms(text: str) -> int:
    m = DATE.match(text)
    assert m, text
    return int(m.group(1))


async def login(
    session: aiohttp.ClientSession,
    fake: Primaerp,
    *,
    apikey: str | None = None,
    headers: dict[str, str] | None = None,
    expect: int = 200,
) -> dict[str, Any]:
    st = fake.state
    params = {"apikey": st.apikey if apikey is None else apikey}
    hdrs = basic(st.username, st.password) if headers is None else headers
    async with session.get(fake.url + "/auth/login", params=params, headers=hdrs) as r:
        assert r.status == expect
        data: dict[str, Any] = await r.json()
    return data


async def refresh(
    session: aiohttp.ClientSession, fake: Primaerp, token: str, *, apikey: str | None = None
) -> tuple[int, dict[str, Any]]:
    params = {"apikey": fake.state.apikey if apikey is None else apikey, "refresh_token": token}
    async with session.get(fake.url + "/auth/refreshtoken", params=params) as r:
        return r.status, await r.json()


async def get_projects(session: aiohttp.ClientSession, fake: Primaerp, token: str | None) -> int:
    params = {} if token is None else {"token": token}
    async with session.get(fake.url + "/time/projects", params=params) as r:
        return r.status


def assert_pair(data: dict[str, Any], before: float, lifetime: float, refresh: float) -> None:
    assert set(data) == {"token", "expiration", "refreshToken", "refreshExpiration"}
    assert uuid.UUID(data["token"]).version == 4
    assert uuid.UUID(data["refreshToken"]).version == 4
    assert data["token"] in ISSUED
    assert data["refreshToken"] in ISSUED
    now_ms = time.time() * 1000
    assert (
        before * 1000 + lifetime * 1000
        <= date_ms(data["expiration"])
        <= now_ms + lifetime * 1000 + 1
    )
    assert date_ms(data["refreshExpiration"]) >= before * 1000 + refresh * 1000


async def test_url_has_v1_base_path(primaerp: Primaerp) -> None:
    assert primaerp.url.endswith("/v1")
    assert primaerp.token_url == primaerp.url + "/auth/login"


async def test_login_with_user_credentials(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    before = time.time()
    data = await login(session, primaerp)
    assert_pair(data, before, 60, 7 * 24 * 3600)
    assert primaerp.state.token_requests == 1
    call = primaerp.state.token_calls[0]
    assert call.method == "GET"
    assert call.raw_path.startswith("/v1/auth/login?apikey=")


async def test_login_with_secret_key_and_no_password(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    data = await login(session, primaerp, headers=basic(primaerp.state.secret_key, ""))
    assert await get_projects(session, primaerp, data["token"]) == 200


async def test_login_rejections(session: aiohttp.ClientSession, primaerp: Primaerp) -> None:
    st = primaerp.state
    await login(session, primaerp, apikey="wrong", expect=401)
    await login(session, primaerp, headers={}, expect=401)
    await login(session, primaerp, headers=basic(st.username, "wrong"), expect=401)
    await login(session, primaerp, headers=basic("someone", ""), expect=401)
    async with session.get(
        primaerp.url + "/auth/login", headers=basic(st.username, st.password)
    ) as r:
        assert r.status == 401  # no apikey at all
    assert st.token_requests == 5


async def test_token_query_authenticates(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    data = await login(session, primaerp)
    async with session.get(
        primaerp.url + "/time/projects", params={"token": data["token"], "page": "2"}
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["echo"]["raw_path"] == f"/v1/time/projects?token={data['token']}&page=2"
    assert await get_projects(session, primaerp, None) == 401
    assert await get_projects(session, primaerp, str(uuid.uuid4())) == 401
    # A refresh token is not an access token.
    assert await get_projects(session, primaerp, data["refreshToken"]) == 401
    # Basic auth does not authenticate resources: only the token does.
    headers = basic(primaerp.state.username, primaerp.state.password)
    async with session.get(primaerp.url + "/time/projects", headers=headers) as r:
        assert r.status == 401


async def test_token_expires_at_expiration(session: aiohttp.ClientSession) -> None:
    async with await start_primaerp(PrimaerpState(lifetime=0.3)) as fake:
        data = await login(session, fake)
        assert await get_projects(session, fake, data["token"]) == 200
        await sleep_until(date_ms(data["expiration"]) / 1000)
        assert await get_projects(session, fake, data["token"]) == 401


async def test_refresh_gives_new_pair_and_is_single_use(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    first = await login(session, primaerp)
    before = time.time()
    status, second = await refresh(session, primaerp, first["refreshToken"])
    assert status == 200
    assert_pair(second, before, 60, 7 * 24 * 3600)
    assert second["token"] != first["token"]
    assert second["refreshToken"] != first["refreshToken"]
    assert await get_projects(session, primaerp, second["token"]) == 200
    status, _ = await refresh(session, primaerp, first["refreshToken"])
    assert status == 401  # used once already
    status, third = await refresh(session, primaerp, second["refreshToken"])
    assert status == 200
    assert primaerp.state.refresh_requests == 3
    assert primaerp.state.token_requests == 1
    assert first["refreshToken"] in primaerp.state.used_refresh_tokens
    assert await get_projects(session, primaerp, third["token"]) == 200


async def test_refresh_rejections(session: aiohttp.ClientSession, primaerp: Primaerp) -> None:
    data = await login(session, primaerp)
    status, _ = await refresh(session, primaerp, data["refreshToken"], apikey="wrong")
    assert status == 401
    status, _ = await refresh(session, primaerp, "not-a-refresh-token")
    assert status == 401
    status, _ = await refresh(session, primaerp, data["token"])  # an access token
    assert status == 401
    # A rejected apikey did not consume the refresh token.
    status, _ = await refresh(session, primaerp, data["refreshToken"])
    assert status == 200


async def test_refresh_token_expires(session: aiohttp.ClientSession) -> None:
    async with await start_primaerp(PrimaerpState(lifetime=60, refresh_lifetime=0.3)) as fake:
        data = await login(session, fake)
        await sleep_until(date_ms(data["refreshExpiration"]) / 1000)
        status, _ = await refresh(session, fake, data["refreshToken"])
        assert status == 401


async def test_fail_refresh_keeps_login_working(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    primaerp.state.fail_refresh = True
    data = await login(session, primaerp)
    status, _ = await refresh(session, primaerp, data["refreshToken"])
    assert status == 401
    again = await login(session, primaerp)
    assert await get_projects(session, primaerp, again["token"]) == 200
    assert primaerp.state.refresh_requests == 1
    assert primaerp.state.token_requests == 2


async def test_revoke_all_covers_refresh_tokens(
    session: aiohttp.ClientSession, primaerp: Primaerp
) -> None:
    data = await login(session, primaerp)
    primaerp.state.revoke_all()
    assert await get_projects(session, primaerp, data["token"]) == 401
    status, _ = await refresh(session, primaerp, data["refreshToken"])
    assert status == 401
    fresh = await login(session, primaerp)
    assert await get_projects(session, primaerp, fresh["token"]) == 200

"""Every fake's token endpoint can fail in each documented ``token_failure`` mode."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from proxy.fakes import (
    ISSUED,
    DidomiState,
    FakeState,
    GetpaidState,
    PaymoState,
    PrimaerpState,
    SeedFake,
    jwt_unverified_claims,
    start_didomi,
    start_getpaid,
    start_paymo,
    start_primaerp,
)

from .helpers import basic, bearer


@dataclass
class Api:
    """How to talk to one fake's token endpoint and resources."""

    name: str
    start: Callable[[], Awaitable[SeedFake[Any]]]
    login: Callable[
        [aiohttp.ClientSession, SeedFake[Any], float | None], Awaitable[aiohttp.ClientResponse]
    ]
    token_of: Callable[[dict[str, Any]], str]
    auth: Callable[[str], dict[str, Any]]
    bad_credentials_status: int


def _timeout(total: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=10 if total is None else total)


async def paymo_login(
    s: aiohttp.ClientSession, f: SeedFake[Any], t: float | None
) -> aiohttp.ClientResponse:
    return await s.post(
        f.url + "/sessions", headers=basic(f.state.api_key, ""), timeout=_timeout(t)
    )


async def primaerp_login(
    s: aiohttp.ClientSession, f: SeedFake[Any], t: float | None
) -> aiohttp.ClientResponse:
    return await s.get(
        f.url + "/auth/login",
        params={"apikey": f.state.apikey},
        headers=basic(f.state.username, f.state.password),
        timeout=_timeout(t),
    )


async def didomi_login(
    s: aiohttp.ClientSession, f: SeedFake[Any], t: float | None
) -> aiohttp.ClientResponse:
    body = {"type": "api-key", "key": f.state.key, "secret": f.state.secret}
    return await s.post(f.url + "/sessions", json=body, timeout=_timeout(t))


async def getpaid_login(
    s: aiohttp.ClientSession, f: SeedFake[Any], t: float | None
) -> aiohttp.ClientResponse:
    st = f.state
    body = {
        "client_id": st.client_id,
        "client_secret": st.client_secret,
        "audience": st.audience,
        "grant_type": "client_credentials",
    }
    return await s.post(f.token_url, json=body, timeout=_timeout(t))


APIS = [
    Api(
        "paymo",
        lambda: start_paymo(PaymoState(lifetime=60)),
        paymo_login,
        lambda d: str(d["sessions"][0]["id"]),
        lambda t: {"headers": {"X-Session": t}},
        401,
    ),
    Api(
        "primaerp",
        lambda: start_primaerp(PrimaerpState(lifetime=60)),
        primaerp_login,
        lambda d: str(d["token"]),
        lambda t: {"params": {"token": t}},
        401,
    ),
    Api(
        "didomi",
        lambda: start_didomi(DidomiState(lifetime=60)),
        didomi_login,
        lambda d: str(d["access_token"]),
        lambda t: {"headers": bearer(t)},
        400,
    ),
    Api(
        "getpaid",
        lambda: start_getpaid(GetpaidState(lifetime=60)),
        getpaid_login,
        lambda d: str(d["access_token"]),
        lambda t: {"headers": bearer(t)},
        401,
    ),
]


@pytest.fixture(params=APIS, ids=[a.name for a in APIS])
def api(request: pytest.FixtureRequest) -> Api:
    result: Api = request.param
    return result


@pytest.fixture
async def fake(api: Api) -> AsyncIterator[SeedFake[Any]]:
    async with await api.start() as running:
        yield running


def state_of(fake: SeedFake[Any]) -> FakeState:
    st: FakeState = fake.state
    return st


async def resource_status(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any], token: str
) -> int:
    async with session.get(fake.url + "/things", **api.auth(token)) as r:
        return r.status


async def test_no_failure_works(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        token = api.token_of(await r.json())
    assert token in ISSUED
    assert await resource_status(session, api, fake, token) == 200


@pytest.mark.parametrize("mode", ["500", "429", "503"])
async def test_error_statuses(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any], mode: str
) -> None:
    state_of(fake).token_failure = mode
    state_of(fake).retry_after = 7
    async with await api.login(session, fake, None) as r:
        assert r.status == int(mode)
        assert r.content_type == "application/json"
        await r.json()
        if mode != "500":
            assert r.headers["Retry-After"] == "7"
    assert state_of(fake).token_requests == 1


async def test_html(session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]) -> None:
    state_of(fake).token_failure = "html"
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        text = await r.text()
    assert text.startswith("<html>")
    assert text.endswith("</html>")


async def test_nonjson(session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]) -> None:
    state_of(fake).token_failure = "nonjson"
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        body = await r.read()
    with pytest.raises(ValueError):
        json.loads(body)


async def test_missing_field(session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]) -> None:
    state_of(fake).token_failure = "missing_field"
    issued_before = set(state_of(fake).tokens)
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        data = await r.json()
    with pytest.raises((KeyError, IndexError)):
        api.token_of(data)
    assert set(state_of(fake).tokens) == issued_before


async def test_huge_is_streamed(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "huge"
    total = 0
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        assert r.content_length is None  # chunked: the size is not announced
        async for chunk in r.content.iter_chunked(1 << 20):
            total += len(chunk)
    assert total > 10 * 1024 * 1024


async def test_huge_client_may_stop_reading(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "huge"
    async with await api.login(session, fake, None) as r:
        await r.content.read(1000)
        r.close()  # a careful client gives up; the fake must cope
    state_of(fake).token_failure = None
    async with await api.login(session, fake, None) as r:
        assert r.status == 200


async def test_hang_needs_client_timeout(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "hang"
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with await api.login(session, fake, 0.15):
            pass
    assert time.monotonic() - started < 2
    assert state_of(fake).token_requests == 1


async def test_reset(session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]) -> None:
    state_of(fake).token_failure = "reset"
    with pytest.raises(aiohttp.ClientConnectionError):
        async with await api.login(session, fake, None):
            pass


async def test_past_expiry_token_still_works(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "past_expiry"
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        data = await r.json()
    token = api.token_of(data)
    now = time.time()
    if api.name == "paymo":
        expires_on = data["sessions"][0]["expires_on"]
        expiry = datetime.strptime(expires_on, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert expiry.timestamp() < now - 3000
    elif api.name == "primaerp":
        ms = int(data["expiration"][len("/Date(") : -len(")/")])
        assert ms / 1000 < now - 3000
    else:
        claims = jwt_unverified_claims(token)
        assert claims is not None
        assert claims["exp"] < now - 3000
        if api.name == "getpaid":
            assert data["expires_in"] < 0
    assert await resource_status(session, api, fake, token) == 200


async def test_nonsense_expiry(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "nonsense_expiry"
    async with await api.login(session, fake, None) as r:
        assert r.status == 200
        data = await r.json()
    token = api.token_of(data)
    text = json.dumps(data)
    claims = jwt_unverified_claims(token) or {}
    assert "banana" in text or claims.get("exp") == "banana"
    assert await resource_status(session, api, fake, token) == 200


async def test_invalid_client(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "invalid_client"
    async with await api.login(session, fake, None) as r:
        assert r.status == api.bad_credentials_status
        data = await r.json()
    if api.name == "getpaid":
        assert data["error"] == "invalid_client"
        assert data["error_description"]


async def test_unknown_mode_is_a_500(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_failure = "no-such-mode"
    async with await api.login(session, fake, None) as r:
        assert r.status == 500


async def test_token_delay_and_concurrency(
    session: aiohttp.ClientSession, api: Api, fake: SeedFake[Any]
) -> None:
    state_of(fake).token_delay = 0.2

    async def one() -> int:
        async with await api.login(session, fake, None) as r:
            return r.status

    started = time.monotonic()
    statuses = await asyncio.gather(*(one() for _ in range(5)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 5
    assert 0.2 <= elapsed < 1.0  # they waited together, not one after another
    assert state_of(fake).token_requests == 5


async def test_primaerp_refresh_fails_too(session: aiohttp.ClientSession) -> None:
    async with await start_primaerp(PrimaerpState()) as fake:
        async with await primaerp_login(session, fake, None) as r:
            data = await r.json()
        fake.state.token_failure = "503"
        params = {"apikey": fake.state.apikey, "refresh_token": data["refreshToken"]}
        async with session.get(fake.url + "/auth/refreshtoken", params=params) as r:
            assert r.status == 503
        assert fake.state.refresh_requests == 1
        fake.state.token_failure = None
        async with session.get(fake.url + "/auth/refreshtoken", params=params) as r:
            assert r.status == 200  # the failed call did not consume the refresh token

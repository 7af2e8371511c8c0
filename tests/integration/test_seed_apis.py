"""The four seed APIs through the real proxy: presets and the general `login` type.

Each case starts one fake seed API (SPEC §7) with a short token lifetime and the
real proxy in front of it, then checks the token lifecycle promises of SPEC §3:
one login shared by many requests, the right credential at the upstream and no
client-sent one, a new token after expiry (primaERP through its refresh token),
and the Paymo session ended at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from proxy.fakes import (
    DidomiState,
    FakeState,
    GetpaidState,
    PaymoState,
    PrimaerpState,
    RecordedRequest,
    SeedFake,
    start_didomi,
    start_getpaid,
    start_paymo,
    start_primaerp,
)
from tests.conftest import RunningProxy, StartProxy, log_lines
from tests.support import wait_until

LIFETIME = 1.0  # seconds a fake token lives: the proxy renews it after about half
JUNK = "client-junk-credential"  # what a client sends as its own credential
RESOURCE = {
    "paymo": "/clients",
    "primaerp": "/time/projects",
    "didomi": "/properties",
    "getpaid": "/accounts",
}
STARTERS: dict[str, Callable[..., Awaitable[SeedFake[Any]]]] = {
    "paymo": start_paymo,
    "primaerp": start_primaerp,
    "didomi": start_didomi,
    "getpaid": start_getpaid,
}
STATES: dict[str, type[FakeState]] = {
    "paymo": PaymoState,
    "primaerp": PrimaerpState,
    "didomi": DidomiState,
    "getpaid": GetpaidState,
}


# -- configs -------------------------------------------------------------------------


def auth_config(case: str, fake: SeedFake[Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The `auth` block for one case (secrets as ${VAR}) and the environment it needs."""
    s = fake.state
    match case:
        case "paymo-api_key":
            return {"type": "paymo_session", "api_key": "${PAYMO_KEY}"}, {"PAYMO_KEY": s.api_key}
        case "paymo-email":
            return (
                {"type": "paymo_session", "email": s.email, "password": "${PAYMO_PASSWORD}"},
                {"PAYMO_PASSWORD": s.password},
            )
        case "primaerp-password":
            return (
                {
                    "type": "primaerp",
                    "api_key": "${PRIMAERP_KEY}",
                    "username": s.username,
                    "password": "${PRIMAERP_PASSWORD}",
                },
                {"PRIMAERP_KEY": s.apikey, "PRIMAERP_PASSWORD": s.password},
            )
        case "primaerp-secret_key":
            return (
                {"type": "primaerp", "api_key": "${PRIMAERP_KEY}", "secret_key": "${PRIMAERP_SK}"},
                {"PRIMAERP_KEY": s.apikey, "PRIMAERP_SK": s.secret_key},
            )
        case "didomi":
            return (
                {"type": "didomi", "key": "${DIDOMI_KEY}", "secret": "${DIDOMI_SECRET}"},
                {"DIDOMI_KEY": s.key, "DIDOMI_SECRET": s.secret},
            )
        case "getpaid-json":
            return (
                {
                    "type": "oauth2_client_credentials",
                    "token_url": fake.token_url,
                    "client_id": s.client_id,
                    "client_secret": "${GETPAID_SECRET}",
                    "audience": s.audience,
                    "scope": s.allowed_scopes,
                    "body_format": "json",
                },
                {"GETPAID_SECRET": s.client_secret},
            )
        case "getpaid-basic-form":
            return (
                {
                    "type": "oauth2_client_credentials",
                    "token_url": fake.token_url,
                    "client_id": s.client_id,
                    "client_secret": "${GETPAID_SECRET}",
                    "audience": s.audience,
                    "scope": s.allowed_scopes,
                    "client_auth": "basic",
                    "body_format": "form",
                },
                {"GETPAID_SECRET": s.client_secret},
            )
        case "paymo-login":
            return (
                {
                    "type": "login",
                    "request": {
                        "method": "POST",
                        "url": fake.url + "/sessions",
                        "basic": {"username": "${PAYMO_KEY}", "password": "any"},
                    },
                    "token": "sessions.0.id",
                    "expires_at": "sessions.0.expires_on",
                    "logout": {"method": "DELETE", "url": fake.url + "/sessions/{token}"},
                    "inject": {"header": "X-Session", "value": "{token}"},
                },
                {"PAYMO_KEY": s.api_key},
            )
        case "primaerp-login":
            return (
                {
                    "type": "login",
                    "request": {
                        "method": "GET",
                        "url": fake.url + "/auth/login",
                        "basic": {"username": s.username, "password": "${PRIMAERP_PASSWORD}"},
                        "query": {"apikey": "${PRIMAERP_KEY}"},
                    },
                    "token": "token",
                    "expires_at": "expiration",
                    "refresh": {
                        "token": "refreshToken",
                        "request": {
                            "method": "GET",
                            "url": fake.url + "/auth/refreshtoken",
                            "query": {
                                "apikey": "${PRIMAERP_KEY}",
                                "refresh_token": "{refresh_token}",
                            },
                        },
                    },
                    "inject": {"query": "token"},
                },
                {"PRIMAERP_KEY": s.apikey, "PRIMAERP_PASSWORD": s.password},
            )
        case "didomi-login":
            return (
                {
                    "type": "login",
                    "request": {
                        "url": fake.url + "/sessions",
                        "json": {
                            "type": "api-key",
                            "key": "${DIDOMI_KEY}",
                            "secret": "${DIDOMI_SECRET}",
                        },
                    },
                    "token": "access_token",
                    "inject": {"header": "Authorization", "value": "Bearer {token}"},
                },
                {"DIDOMI_KEY": s.key, "DIDOMI_SECRET": s.secret},
            )
        case "getpaid-login":
            return (
                {
                    "type": "login",
                    "request": {
                        "method": "POST",
                        "url": fake.token_url,
                        "headers": {"X-Client": "authproxy-tests"},
                        "json": {
                            "client_id": s.client_id,
                            "client_secret": "${GETPAID_SECRET}",
                            "audience": s.audience,
                            "grant_type": "client_credentials",
                            "scope": s.allowed_scopes,
                        },
                    },
                    "token": "access_token",
                    "expires_in": "expires_in",
                    "inject": {"header": "Authorization", "value": "Bearer {token}"},
                },
                {"GETPAID_SECRET": s.client_secret},
            )
    raise AssertionError(f"unknown case {case}")


def api_of(case: str) -> str:
    return case.split("-", 1)[0]


@dataclass
class Setup:
    api: str
    fake: SeedFake[Any]
    proxy: RunningProxy

    @property
    def state(self) -> Any:
        return self.fake.state

    def url(self, suffix: str = "") -> str:
        return f"{self.proxy.url}/{self.api}{RESOURCE[self.api]}{suffix}"


SetupFactory = Callable[..., Awaitable[Setup]]


@pytest.fixture
async def seed(start_proxy: StartProxy) -> AsyncIterator[SetupFactory]:
    """Start one fake seed API and the proxy in front of it, for a named case."""
    started: list[Setup] = []

    async def make(
        case: str, *, lifetime: float = LIFETIME, prefetch: bool = False, **state: Any
    ) -> Setup:
        api = api_of(case)
        fake = await STARTERS[api](STATES[api](lifetime=lifetime, **state))
        auth, env = auth_config(case, fake)
        if prefetch:
            auth["prefetch"] = True
        try:
            proxy = await start_proxy(
                {"upstreams": {api: {"url": fake.url, "auth": auth}}}, env=env
            )
        except BaseException:
            await fake.close()
            raise
        started.append(Setup(api, fake, proxy))
        return started[-1]

    yield make
    for setup in started:
        await setup.proxy.stop()  # logouts reach the fake before it goes away
        await setup.fake.close()


# -- what reached the fake -------------------------------------------------------------


def sent_credential(api: str, rec: RecordedRequest) -> str:
    """The one credential a resource request carried, in the API's own way."""
    if api == "paymo":
        sessions = rec.header_values("X-Session")
        assert len(sessions) == 1, sessions
        assert rec.header_values("Authorization") == []
        return sessions[0]
    if api == "primaerp":
        tokens = parse_qs(urlsplit(rec.raw_path).query).get("token", [])
        assert len(tokens) == 1, "exactly one ?token= must reach primaERP"
        assert rec.header_values("Authorization") == []
        return tokens[0]
    values = rec.header_values("Authorization")
    assert len(values) == 1, "exactly one Authorization header must reach the API"
    scheme, _, token = values[0].partition(" ")
    assert scheme == "Bearer"
    return token


def client_junk(api: str) -> tuple[dict[str, str], str]:
    """Credentials a client might carry (headers, query): none may reach the upstream."""
    headers = {
        "Authorization": f"Bearer {JUNK}",
        "Proxy-Authorization": f"Basic {JUNK}",
        "Cookie": f"sid={JUNK}",
    }
    query = "?keep=1"
    if api == "paymo":
        headers["X-Session"] = JUNK
    if api == "primaerp":
        query = f"?token={JUNK}&keep=1"
    return headers, query


def assert_no_client_credential(rec: RecordedRequest) -> None:
    assert JUNK not in rec.raw_path
    assert all(JUNK not in value for _, value in rec.headers), rec.headers
    assert rec.header("Cookie") is None
    assert rec.header("Proxy-Authorization") is None
    assert "keep=1" in rec.raw_path


async def get_ok(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> dict[str, Any]:
    async with client.get(url, **kwargs) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
    document: dict[str, Any] = json.loads(body)
    return document


def basic_pair(rec: RecordedRequest) -> tuple[str, str]:
    header = rec.header("Authorization")
    assert header is not None and header.startswith("Basic ")
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


async def poll_for_new_credential(
    client: aiohttp.ClientSession, setup: Setup, old: str, deadline_s: float = 6.0
) -> str:
    """Send requests (each must succeed) until the fake sees a credential other than `old`."""
    deadline = time.monotonic() + deadline_s
    while True:
        await get_ok(client, setup.url())
        current = sent_credential(setup.api, setup.state.requests[-1])
        if current != old:
            return current
        assert time.monotonic() < deadline, "the proxy never renewed the token"
        await asyncio.sleep(0.05)


# -- the lifecycle, per case ----------------------------------------------------------------

CASES = [
    "paymo-api_key",
    "paymo-email",
    "primaerp-password",
    "primaerp-secret_key",
    "didomi",
    "getpaid-json",
    "getpaid-basic-form",
    "paymo-login",
    "primaerp-login",
    "didomi-login",
    "getpaid-login",
]


@pytest.mark.parametrize("case", CASES)
async def test_token_lifecycle(
    case: str,
    seed: SetupFactory,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup = await seed(case)
    api, state = setup.api, setup.state
    junk_headers, query = client_junk(api)

    # First request: one login, then the resource with the proxy's credential only.
    await get_ok(client, setup.url(query), headers=junk_headers)
    assert state.token_requests == 1
    assert state.refresh_requests == 0
    assert len(state.tokens) == 1
    first = next(iter(state.tokens))
    assert sent_credential(api, state.requests[-1]) == first
    assert_no_client_credential(state.requests[-1])

    # Twenty more reuse it.
    for _ in range(20):
        await get_ok(client, setup.url(query), headers=junk_headers)
    assert state.token_requests == 1
    assert state.resource_requests == 21
    for rec in state.requests:
        assert sent_credential(api, rec) == first
        assert_no_client_credential(rec)

    # Near expiry the proxy renews the token; no request fails meanwhile.
    second = await poll_for_new_credential(client, setup, first)
    assert second in state.tokens
    assert second != first
    if api == "primaerp":
        # primaERP renews through its single-use refresh token, not a new login.
        assert (state.token_requests, state.refresh_requests) == (1, 1)
        (first_refresh,) = state.used_refresh_tokens
        refresh_call = state.token_calls[-1]
        assert parse_qs(urlsplit(refresh_call.raw_path).query)["refresh_token"] == [first_refresh]
    else:
        assert (state.token_requests, state.refresh_requests) == (2, 0)

    records = log_lines(capsys.readouterr().out)
    acquired = [r for r in records if r["event"] == "token_acquired"]
    refreshed = [r for r in records if r["event"] == "token_refreshed"]
    assert len(acquired) == 1
    assert acquired[0]["upstream"] == api
    assert 0 < acquired[0]["lifetime_s"] <= LIFETIME + 1
    assert [r["reason"] for r in refreshed] == ["expiry"]
    assert not [r for r in records if r["event"] == "request_finished" and r["retried"]]

    if api == "paymo":
        # The session in use is ended at shutdown, with a DELETE that names it.
        await setup.proxy.stop()
        assert state.logout_requests == 1
        assert state.deleted_sessions == [second]
        logout = state.token_calls[-1]
        assert logout.method == "DELETE"
        assert logout.raw_path == f"/api/sessions/{second}"
        logged = log_lines(capsys.readouterr().out)
        assert [r["endpoint_status"] for r in logged if r["event"] == "token_logout"] == [200]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("paymo-api_key", ("demo-paymo-api-key", None)),
        ("paymo-email", ("demo@example.com", "demo-password")),
        ("primaerp-password", ("demo", "demo-password")),
        ("primaerp-secret_key", ("demo-primaerp-secret-key", "")),
        ("getpaid-basic-form", ("demo-getpaid-client", "demo-getpaid-secret")),
    ],
)
async def test_login_basic_credentials(
    case: str,
    expected: tuple[str, str | None],
    seed: SetupFactory,
    client: aiohttp.ClientSession,
) -> None:
    """The login request carries the configured Basic credentials, as each API documents."""
    setup = await seed(case)
    await get_ok(client, setup.url())
    (login,) = setup.state.token_calls
    user, password = basic_pair(login)
    assert user == expected[0]
    if expected[1] is not None:
        assert password == expected[1]
    if setup.api == "primaerp":
        assert login.method == "GET"
        assert parse_qs(urlsplit(login.raw_path).query)["apikey"] == [setup.state.apikey]
    if setup.api == "paymo":
        assert (login.method, login.raw_path) == ("POST", "/api/sessions")
    if case == "getpaid-basic-form":
        assert login.header("Content-Type") == "application/x-www-form-urlencoded"
        fields = parse_qs(login.body.decode())
        assert fields == {
            "grant_type": ["client_credentials"],
            "audience": [setup.state.audience],
            "scope": [setup.state.allowed_scopes],
        }


@pytest.mark.parametrize("case", ["getpaid-json", "getpaid-login", "didomi", "didomi-login"])
async def test_login_json_body(
    case: str, seed: SetupFactory, client: aiohttp.ClientSession
) -> None:
    """JSON token requests: getpaid's documented body, Didomi's api-key body."""
    setup = await seed(case)
    await get_ok(client, setup.url())
    (login,) = setup.state.token_calls
    assert login.method == "POST"
    assert login.header("Content-Type") == "application/json"
    assert login.header("Authorization") is None
    s = setup.state
    if setup.api == "getpaid":
        assert json.loads(login.body) == {
            "client_id": s.client_id,
            "client_secret": s.client_secret,
            "audience": s.audience,
            "grant_type": "client_credentials",
            "scope": s.allowed_scopes,
        }
    else:
        assert json.loads(login.body) == {"type": "api-key", "key": s.key, "secret": s.secret}
    if case == "getpaid-login":
        assert login.header("X-Client") == "authproxy-tests"


# -- primaERP refresh tokens -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["primaerp-password", "primaerp-login"])
async def test_primaerp_refresh_tokens_are_used_once(
    case: str, seed: SetupFactory, client: aiohttp.ClientSession
) -> None:
    """Two renewals: each uses the refresh token of the answer before, never an old one."""
    setup = await seed(case, lifetime=1.0)
    state: PrimaerpState = setup.state
    await get_ok(client, setup.url())
    token1 = sent_credential("primaerp", state.requests[-1])
    (refresh1,) = state.refresh_tokens
    token2 = await poll_for_new_credential(client, setup, token1)
    (refresh2,) = state.refresh_tokens
    token3 = await poll_for_new_credential(client, setup, token2)
    assert len({token1, token2, token3}) == 3
    assert (state.token_requests, state.refresh_requests) == (1, 2)
    refresh_calls = [c for c in state.token_calls if "/auth/refreshtoken" in c.raw_path]
    used = [parse_qs(urlsplit(c.raw_path).query)["refresh_token"][0] for c in refresh_calls]
    assert used == [refresh1, refresh2]
    assert state.used_refresh_tokens == {refresh1, refresh2}


@pytest.mark.parametrize("how", ["fail_refresh", "expired_refresh_token"])
async def test_primaerp_failed_refresh_falls_back_to_login(
    how: str,
    seed: SetupFactory,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra: dict[str, Any] = {"refresh_lifetime": 0.3} if how == "expired_refresh_token" else {}
    setup = await seed("primaerp-password", lifetime=1.0, **extra)
    state: PrimaerpState = setup.state
    await get_ok(client, setup.url())
    token1 = sent_credential("primaerp", state.requests[-1])
    if how == "fail_refresh":
        state.fail_refresh = True
    token2 = await poll_for_new_credential(client, setup, token1)
    assert token2 != token1
    # One refresh attempt (refused), then one full login: no client request failed.
    assert (state.refresh_requests, state.token_requests) == (1, 2)
    assert state.used_refresh_tokens == set()
    records = log_lines(capsys.readouterr().out)
    assert len([r for r in records if r["event"] == "token_refresh_failed"]) == 1
    refreshed = [r for r in records if r["event"] == "token_refreshed"]
    assert [(r["reason"], r["via"]) for r in refreshed] == [("expiry", "login")]


# -- scopes, prefetch, status ------------------------------------------------------------------


async def test_getpaid_missing_scope_is_403_without_refresh(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with await start_getpaid(GetpaidState()) as fake:
        s = fake.state
        proxy = await start_proxy(
            {
                "upstreams": {
                    "getpaid": {
                        "url": fake.url,
                        "auth": {
                            "type": "oauth2_client_credentials",
                            "token_url": fake.token_url,
                            "client_id": s.client_id,
                            "client_secret": "${SECRET}",
                            "audience": s.audience,
                            "scope": "invoices:read_write",
                            "body_format": "json",
                        },
                    }
                }
            },
            env={"SECRET": s.client_secret},
        )
        async with client.get(proxy.url + "/getpaid/accounts") as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "insufficient_scope"
        assert (s.token_requests, s.resource_requests) == (1, 1)
        await get_ok(client, proxy.url + "/getpaid/invoices")
        assert (s.token_requests, s.resource_requests) == (1, 2)
    records = log_lines(capsys.readouterr().out)
    access = [r for r in records if r["event"] == "request_finished"]
    assert [(r["status"], r["retried"]) for r in access] == [(403, False), (200, False)]
    assert not [r for r in records if r["event"] == "token_refreshed"]


@pytest.mark.parametrize("case", ["paymo-api_key", "primaerp-secret_key", "didomi", "getpaid-json"])
async def test_prefetch_fetches_at_start(
    case: str, seed: SetupFactory, client: aiohttp.ClientSession
) -> None:
    setup = await seed(case, lifetime=3600.0, prefetch=True)
    # In the background once the port is open, before any client request.
    await wait_until(lambda: setup.state.token_requests == 1, 5, what="the prefetch")
    assert setup.state.resource_requests == 0
    async with client.get(setup.proxy.url + "/-/status") as resp:
        assert resp.status == 200
        text = await resp.text()
    upstream = json.loads(text)["upstreams"][setup.api]
    assert upstream["prefix"] == f"/{setup.api}"
    assert upstream["auth"] == setup.proxy.config.upstreams[setup.api].auth.type
    assert upstream["token"]["state"] == "valid"
    assert 3500 < upstream["token"]["expires_in"] <= 3601
    assert upstream["last_error"] is None
    for token in setup.state.tokens:
        assert token not in text
    await get_ok(client, setup.url())
    assert setup.state.token_requests == 1
    assert sent_credential(setup.api, setup.state.requests[-1]) == next(iter(setup.state.tokens))


async def test_status_before_first_use(seed: SetupFactory, client: aiohttp.ClientSession) -> None:
    setup = await seed("didomi")
    async with client.get(setup.proxy.url + "/-/status") as resp:
        token = (await resp.json())["upstreams"]["didomi"]["token"]
    assert token == {"state": "none", "expires_in": None}
    assert setup.state.token_requests == 0

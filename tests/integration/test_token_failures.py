"""When the token endpoint fails (SPEC §3 promise 5).

The client gets 502 `auth_failed` naming the upstream and the endpoint's status,
never a secret and at most 300 characters of what the endpoint said; then the
proxy backs off (1 s doubling, at least a 429/503 `Retry-After`) and answers
503 `auth_backoff` without calling the endpoint; once the window is over and the
endpoint works again, requests succeed. Other upstreams are unaffected.

Most cases use the fake getpaid OAuth server (`token_failure` switch); a tiny
hand-made token endpoint covers error bodies the fakes do not produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.fakes import (
    DidomiState,
    FakeState,
    GetpaidState,
    PaymoState,
    PrimaerpState,
    SeedFake,
    serve,
    start_didomi,
    start_getpaid,
    start_paymo,
    start_primaerp,
)
from tests.conftest import RunningProxy, StartProxy
from tests.support import log_lines, wait_until

GETPAID_SECRET = "demo-getpaid-secret"


@dataclass
class Setup:
    fake: SeedFake[GetpaidState]
    proxy: RunningProxy

    @property
    def state(self) -> GetpaidState:
        return self.fake.state

    @property
    def url(self) -> str:
        return self.proxy.url + "/getpaid/accounts"


def getpaid_upstream(fake: SeedFake[GetpaidState]) -> dict[str, Any]:
    s = fake.state
    return {
        "url": fake.url,
        # Token requests use these too, with read capped at 30 s: `hang` fails in 1 s.
        "timeout": {"connect": 1, "read": 1},
        "auth": {
            "type": "oauth2_client_credentials",
            "token_url": fake.token_url,
            "client_id": s.client_id,
            "client_secret": "${GETPAID_SECRET}",
            "audience": s.audience,
            "scope": s.allowed_scopes,
            "body_format": "json",
        },
    }


@pytest.fixture
async def getpaid(start_proxy: StartProxy) -> AsyncIterator[Setup]:
    async with await start_getpaid(GetpaidState(retry_after=1)) as fake:
        proxy = await start_proxy(
            {"upstreams": {"getpaid": getpaid_upstream(fake)}},
            env={"GETPAID_SECRET": GETPAID_SECRET},
        )
        yield Setup(fake, proxy)
        await proxy.stop()


async def answer(client: aiohttp.ClientSession, url: str) -> tuple[int, CIMultiDictProxy[str], Any]:
    async with client.get(url) as resp:
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return resp.status, resp.headers, body


async def token_state(client: aiohttp.ClientSession, proxy: RunningProxy, name: str) -> Any:
    async with client.get(proxy.url + "/-/status") as resp:
        assert resp.status == 200
        return (await resp.json())["upstreams"][name]


async def wait_out_backoff(
    client: aiohttp.ClientSession, proxy: RunningProxy, name: str, deadline_s: float = 3.0
) -> None:
    """Poll /-/status until the upstream's backoff window is over."""

    async def over() -> bool:
        return bool((await token_state(client, proxy, name))["token"]["state"] != "backoff")

    await wait_until(over, deadline_s, what="the backoff to end", interval=0.05)


def events(out: str, name: str) -> list[dict[str, Any]]:
    return [r for r in log_lines(out) if r["event"] == name]


def assert_auth_failed(body: Any, upstream: str, endpoint_status: int | None) -> str:
    assert isinstance(body, dict), body
    error = body["error"]
    assert error["code"] == "auth_failed"
    assert error["upstream"] == upstream
    message: str = error["message"]
    assert upstream in message
    if endpoint_status is not None:
        assert str(endpoint_status) in message
    assert len(message) <= 300 + 200  # our own words plus at most 300 of the endpoint's
    return message


# mode -> the status the endpoint answered (None: no HTTP answer at all)
MODES: dict[str, int | None] = {
    "500": 500,
    "429": 429,
    "503": 503,
    "html": 200,
    "nonjson": 200,
    "missing_field": 200,
    "huge": 200,
    "hang": None,
    "past_expiry": 200,
    "nonsense_expiry": 200,
    "invalid_client": 401,
    "reset": None,
}


async def fail_then_back_off(
    client: aiohttp.ClientSession, proxy: RunningProxy, name: str, state: FakeState, mode: str
) -> None:
    """Steps 1 and 2 of every failure: 502 at first, then 503 without a token request."""
    state.token_failure = mode
    url = f"{proxy.url}/{name}/accounts"
    # 1. The first request: 502 naming the upstream and the endpoint's status.
    status, _, body = await answer(client, url)
    assert status == 502, body
    message = assert_auth_failed(body, name, MODES[mode])
    assert GETPAID_SECRET not in message
    assert state.token_requests == 1
    assert state.resource_requests == 0
    # 2. Straight after: 503 with Retry-After, and the endpoint is left alone.
    status, headers, body = await answer(client, url)
    assert status == 503, body
    assert body["error"]["code"] == "auth_backoff"
    assert body["error"]["upstream"] == name
    assert headers["Retry-After"] == "1"
    assert state.token_requests == 1
    upstream = await token_state(client, proxy, name)
    assert upstream["token"]["state"] == "backoff"
    assert upstream["last_error"]


async def recover(
    client: aiohttp.ClientSession, proxy: RunningProxy, name: str, state: FakeState
) -> None:
    """Step 3: once the window is over and the endpoint is healthy, requests succeed."""
    state.token_failure = None
    await wait_out_backoff(client, proxy, name)
    status, _, body = await answer(client, f"{proxy.url}/{name}/accounts")
    assert status == 200, body
    assert state.token_requests == 2
    upstream = await token_state(client, proxy, name)
    assert upstream["token"]["state"] == "valid"
    assert upstream["last_error"] is None


@pytest.mark.parametrize("mode", list(MODES))
async def test_token_endpoint_failure(
    mode: str,
    getpaid: Setup,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fail_then_back_off(client, getpaid.proxy, "getpaid", getpaid.state, mode)
    out = capsys.readouterr().out
    (failed,) = events(out, "token_failed")
    assert failed["upstream"] == "getpaid"
    assert failed["endpoint_status"] == MODES[mode]
    assert failed["backoff_s"] == 1
    assert GETPAID_SECRET not in failed["error"]
    problems = events(out, "token_config_problem")
    if mode == "invalid_client":
        assert [(p["error_code"], p["endpoint_status"]) for p in problems] == [
            ("invalid_client", 401)
        ]
    else:
        assert problems == []


async def test_every_failure_recovers_after_the_window(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """All modes at once (one getpaid fake each, one proxy): 502, 503, then success."""
    async with contextlib.AsyncExitStack() as stack:
        fakes = {
            f"gp-{mode}": await stack.enter_async_context(
                await start_getpaid(GetpaidState(retry_after=1))
            )
            for mode in MODES
        }
        proxy = await start_proxy(
            {"upstreams": {name: getpaid_upstream(fake) for name, fake in fakes.items()}},
            env={"GETPAID_SECRET": GETPAID_SECRET},
        )

        async def scenario(mode: str) -> None:
            name = f"gp-{mode}"
            await fail_then_back_off(client, proxy, name, fakes[name].state, mode)
            await recover(client, proxy, name, fakes[name].state)

        outcomes = await asyncio.gather(*(scenario(m) for m in MODES), return_exceptions=True)
        failures = {m: repr(o) for m, o in zip(MODES, outcomes, strict=True) if o is not None}
        assert failures == {}
        await proxy.stop()


async def test_backoff_doubles(
    getpaid: Setup, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    getpaid.state.token_failure = "500"
    for attempt in range(3):
        if attempt:
            await wait_out_backoff(client, getpaid.proxy, "getpaid")
        status, _, _ = await answer(client, getpaid.url)
        assert status == 502
    status, headers, _ = await answer(client, getpaid.url)
    assert status == 503
    assert headers["Retry-After"] == "4"
    assert getpaid.state.token_requests == 3
    backoffs = [r["backoff_s"] for r in events(capsys.readouterr().out, "token_failed")]
    assert backoffs == [1, 2, 4]


@pytest.mark.parametrize("mode", ["429", "503"])
async def test_retry_after_sets_a_longer_backoff(
    mode: str, getpaid: Setup, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    getpaid.state.token_failure = mode
    getpaid.state.retry_after = 7
    status, _, _ = await answer(client, getpaid.url)
    assert status == 502
    status, headers, _ = await answer(client, getpaid.url)
    assert status == 503
    assert headers["Retry-After"] == "7"
    (failed,) = events(capsys.readouterr().out, "token_failed")
    assert failed["backoff_s"] == 7
    assert getpaid.state.token_requests == 1


async def test_other_upstreams_keep_serving(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A token endpoint that hangs or fails holds up nobody but its own upstream."""
    async with (
        await start_getpaid(GetpaidState(token_failure="hang")) as getpaid,
        await start_didomi(DidomiState()) as didomi,
    ):
        proxy = await start_proxy(
            {
                "upstreams": {
                    "getpaid": getpaid_upstream(getpaid),
                    "didomi": {
                        "url": didomi.url,
                        "auth": {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"},
                    },
                }
            },
            env={
                "GETPAID_SECRET": GETPAID_SECRET,
                "KEY": didomi.state.key,
                "SECRET": didomi.state.secret,
            },
        )
        hanging = asyncio.ensure_future(answer(client, proxy.url + "/getpaid/accounts"))
        # The token request is now hanging.
        await wait_until(lambda: getpaid.state.token_requests, 2, what="the token request")
        statuses = []
        for i in range(200):
            status, _, _ = await answer(client, proxy.url + "/didomi/properties")
            statuses.append(status)
            if i == 20:
                assert not hanging.done()  # served while the other token request hangs
        assert statuses == [200] * 200
        assert getpaid.state.token_requests == 1
        status, _, _ = await hanging  # the getpaid token request times out after 1 s
        assert status == 502
        # While getpaid backs off, didomi still serves.
        status, _, _ = await answer(client, proxy.url + "/getpaid/accounts")
        assert status == 503
        for _ in range(20):
            status, _, _ = await answer(client, proxy.url + "/didomi/properties")
            assert status == 200
        assert didomi.state.token_requests == 1
        await proxy.stop()


async def test_failed_background_refresh_keeps_the_valid_token_serving(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refresh ahead of expiry that fails does not take the still-valid token away."""
    async with await start_didomi(DidomiState(lifetime=2.0)) as didomi:
        proxy = await start_proxy(
            {
                "upstreams": {
                    "didomi": {
                        "url": didomi.url,
                        "auth": {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"},
                    }
                }
            },
            env={"KEY": didomi.state.key, "SECRET": didomi.state.secret},
        )
        url = proxy.url + "/didomi/properties"
        status, _, _ = await answer(client, url)
        assert status == 200
        (token,) = didomi.state.tokens
        expires_in = (await token_state(client, proxy, "didomi"))["token"]["expires_in"]
        await asyncio.sleep(expires_in / 2 + 0.05)  # stale now, valid for ~1 s more
        didomi.state.token_failure = "500"
        status, _, _ = await answer(client, url)  # starts the refresh in the background
        assert status == 200

        async def backing_off() -> bool:
            return bool((await token_state(client, proxy, "didomi"))["token"]["state"] == "backoff")

        await wait_until(backing_off, 2, what="the background refresh to fail")
        for _ in range(10):
            status, _, _ = await answer(client, url)
            assert status == 200
        assert didomi.state.token_requests == 2  # one failed refresh, no retries in backoff
        assert didomi.state.resource_requests == 12
        assert {r.header("Authorization") for r in didomi.state.requests} == {f"Bearer {token}"}
        await proxy.stop()
    (failed,) = events(capsys.readouterr().out, "token_failed")
    assert failed["endpoint_status"] == 500


# -- the other fakes' expiry formats ------------------------------------------------------


SEEDS: dict[str, Any] = {
    "paymo": (start_paymo, PaymoState, "/clients"),
    "primaerp": (start_primaerp, PrimaerpState, "/time/projects"),
    "didomi": (start_didomi, DidomiState, "/properties"),
}


def seed_auth(api: str, state: Any) -> dict[str, Any]:
    if api == "paymo":
        return {"type": "paymo_session", "api_key": state.api_key}
    if api == "primaerp":
        return {
            "type": "primaerp",
            "api_key": state.apikey,
            "username": state.username,
            "password": state.password,
        }
    return {"type": "didomi", "key": state.key, "secret": state.secret}


def seed_cases() -> list[Any]:
    cases = []
    for api in SEEDS:
        for mode in ("past_expiry", "nonsense_expiry", "missing_field", "html"):
            cases.append(pytest.param(api, mode, id=f"{api}-{mode}"))
    return cases


@pytest.mark.parametrize(("api", "mode"), seed_cases())
async def test_bad_token_answers_of_each_seed_api(
    api: str,
    mode: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start, state_type, resource = SEEDS[api]
    state: FakeState = state_type(token_failure=mode)
    async with await start(state) as fake:
        proxy = await start_proxy(
            {"upstreams": {api: {"url": fake.url, "auth": seed_auth(api, state)}}}
        )
        status, _, body = await answer(client, f"{proxy.url}/{api}{resource}")
        assert status == 502
        assert_auth_failed(body, api, 200)
        status, headers, _ = await answer(client, f"{proxy.url}/{api}{resource}")
        assert (status, headers["Retry-After"]) == (503, "1")
        assert state.token_requests == 1
        assert state.resource_requests == 0
        await proxy.stop()
    (failed,) = events(capsys.readouterr().out, "token_failed")
    assert failed["endpoint_status"] == 200


# -- error bodies the fakes do not produce ---------------------------------------------------


@dataclass
class Scripted:
    """A token endpoint answering whatever the test sets, echoing what it received."""

    status: int = 500
    body: bytes = b""
    content_type: str = "text/plain"
    calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        received = await request.text()
        body = self.body.replace(b"{received}", received.encode())
        return web.Response(status=self.status, body=body, content_type=self.content_type)


@contextlib.asynccontextmanager
async def scripted_proxy(start_proxy: StartProxy, scripted: Scripted) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/token", scripted.handle)
    async with await serve(app) as server:
        proxy = await start_proxy(
            {
                "upstreams": {
                    "api": {
                        "url": server.url + "/api",
                        "auth": {
                            "type": "oauth2_client_credentials",
                            "token_url": server.url + "/token",
                            "client_id": "client-one",
                            "client_secret": "${CLIENT_SECRET}",
                        },
                    }
                }
            },
            env={"CLIENT_SECRET": "scripted-client-secret-value"},
        )
        yield proxy.url + "/api/things"
        await proxy.stop()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"x" * 5000),
        (
            "application/json",
            json.dumps({"error": "server_error", "error_description": "y" * 5000}).encode(),
        ),
    ],
)
async def test_long_error_body_is_cut_to_300_characters(
    content_type: str,
    body: bytes,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scripted = Scripted(500, body, content_type)
    async with scripted_proxy(start_proxy, scripted) as url:
        status, _, answer_body = await answer(client, url)
        assert status == 502
        message = assert_auth_failed(answer_body, "api", 500)
        # At most 300 characters of what the endpoint said, and not nothing.
        filler = "x" if content_type == "text/plain" else "y"
        assert 250 <= message.count(filler) <= 300
    (failed,) = events(capsys.readouterr().out, "token_failed")
    assert failed["error"].count(filler) <= 300


async def test_secret_echoed_by_the_endpoint_is_not_repeated(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Some servers quote the request in their error; the proxy must not pass that on."""
    scripted = Scripted(400, b"bad request: {received}", "text/plain")
    async with scripted_proxy(start_proxy, scripted) as url:
        status, _, body = await answer(client, url)
        assert status == 502
        message = assert_auth_failed(body, "api", 400)
        assert "scripted-client-secret-value" not in message
        assert "client-one" in message  # the rest of what it said is kept
        status, _, body = await answer(client, url)
        assert status == 503
        assert "scripted-client-secret-value" not in json.dumps(body)
        assert scripted.calls == 1
    out = capsys.readouterr().out
    assert "scripted-client-secret-value" not in out


# -- refresh failures (SPEC §3 primaERP): only a refused refresh falls back to a login --


@pytest.fixture
async def primaerp_proxy(
    start_proxy: StartProxy,
) -> AsyncIterator[tuple[SeedFake[PrimaerpState], RunningProxy]]:
    async with await start_primaerp(PrimaerpState(lifetime=1.0)) as fake:
        s = fake.state
        proxy = await start_proxy(
            {
                "upstreams": {
                    "primaerp": {
                        "url": fake.url,
                        "timeout": {"connect": 0.5, "read": 1},  # token timeout: 1.5 s
                        "auth": {
                            "type": "primaerp",
                            "api_key": "${KEY}",
                            "secret_key": "${SECRET}",
                        },
                    }
                }
            },
            env={"KEY": s.apikey, "SECRET": s.secret_key},
        )
        yield fake, proxy


@pytest.mark.parametrize("failure", ["hang", "500"])
async def test_a_refresh_that_fails_is_not_followed_by_a_login(
    primaerp_proxy: tuple[SeedFake[PrimaerpState], RunningProxy],
    client: aiohttp.ClientSession,
    failure: str,
) -> None:
    fake, proxy = primaerp_proxy

    async def expired_then_failing() -> None:
        auth = proxy.state.routes["/primaerp"].auth
        await wait_until(lambda: auth.status()["state"] != "valid", 3, what="expiry")
        fake.state.token_failure = failure

    url = proxy.url + "/primaerp/me"
    async with client.get(url) as resp:
        assert resp.status == 200
    await expired_then_failing()
    before = fake.state.token_requests + fake.state.refresh_requests
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(url) as resp:
        status, body = resp.status, await resp.json()
    waited = loop.time() - started
    assert status == 502 and body["error"]["code"] == "auth_failed", body
    assert "refresh endpoint" in body["error"]["message"]
    calls = fake.state.token_requests + fake.state.refresh_requests - before
    assert calls == 1  # the refresh only: no login after it
    assert waited < 1.5 + 1.0, waited  # one token timeout, not two
    async with client.get(url) as resp:  # the failure started the backoff
        assert resp.status == 503


async def test_a_refused_refresh_falls_back_to_a_login_at_once(
    primaerp_proxy: tuple[SeedFake[PrimaerpState], RunningProxy],
    client: aiohttp.ClientSession,
) -> None:
    fake, proxy = primaerp_proxy
    url = proxy.url + "/primaerp/me"
    async with client.get(url) as resp:
        assert resp.status == 200
    auth = proxy.state.routes["/primaerp"].auth
    await wait_until(lambda: auth.status()["state"] != "valid", 3, what="expiry")
    fake.state.fail_refresh = True  # 401 "Invalid refresh token"
    before = fake.state.token_requests + fake.state.refresh_requests
    async with client.get(url) as resp:
        assert resp.status == 200
    calls = fake.state.token_requests + fake.state.refresh_requests - before
    assert calls == 2  # the refused refresh, then a login


async def test_a_trickling_token_endpoint_gets_one_total_deadline(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A byte every 0.2 s never trips a silence timeout: only the total deadline
    (connect + read = 1.5 s here) ends the token request."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                await resp.write(b" ")
                await asyncio.sleep(0.2)
        return resp

    app = web.Application()
    app.router.add_post("/token", trickle)
    async with await serve(app) as endpoint:
        proxy = await start_proxy(
            {
                "upstreams": {
                    "t": {
                        "url": endpoint.url,
                        "timeout": {"connect": 0.5, "read": 1},
                        "auth": {
                            "type": "oauth2_client_credentials",
                            "token_url": endpoint.url + "/token",
                            "client_id": "me",
                            "client_secret": "${S}",
                        },
                    }
                }
            },
            env={"S": "trickle-secret-1"},
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with client.get(proxy.url + "/t/x") as resp:
            assert resp.status == 502
            assert "timed out" in (await resp.json())["error"]["message"]
        assert 1.4 < loop.time() - started < 2.5


@pytest.mark.parametrize(
    ("limits", "total"),
    [({}, 30.0), ({"connect": 2, "read": 5}, 7.0), ({"connect": 40, "read": 1}, 30.0)],
)
async def test_the_token_timeout_is_connect_plus_read_at_most_30_s(
    limits: dict[str, float], total: float
) -> None:
    from proxy.auth import build_authenticator
    from proxy.config import parse_config

    config = parse_config(
        {
            "upstreams": {
                "t": {
                    "url": "http://127.0.0.1:9",
                    "timeout": limits,
                    "auth": {"type": "paymo_session", "api_key": "${K}"},
                }
            }
        },
        env={"K": "paymo-key-77"},
    )
    async with aiohttp.ClientSession() as session:
        auth: Any = build_authenticator("t", config.upstreams["t"], session, True, frozenset())
        assert auth.flow.http.timeout.total == total

"""SPEC §3 promises 2 and 3 under load: one token request per upstream at a time.

The upstream is the fake Didomi API. A small gate in front of its handler holds
requests marked `X-Hold` until the test opens it, so "every request has already
reached the upstream with token T" is a fact the test waits for, not a timing
hope.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from proxy.auth.login import TokenAuth
from proxy.fakes import DIDOMI_BASE, DidomiState, create_didomi_app, serve
from tests.conftest import RunningProxy, StartProxy, _tracing
from tests.support import access_lines, bearer_of, log_lines, wait_until

HOLD = "X-Hold"


@dataclass
class Gate:
    """Holds every request carrying `X-Hold` until `open` is set."""

    open: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if HOLD in request.headers and not self.open.is_set():
            self.waiting += 1
            try:
                await self.open.wait()
            finally:
                self.waiting -= 1
        return await handler(request)

    async def until_waiting(self, n: int, deadline_s: float = 10.0) -> None:
        await wait_until(
            lambda: self.waiting >= n, deadline_s, what=f"{n} requests at the gate", interval=0.01
        )


@dataclass
class Setup:
    state: DidomiState
    gate: Gate
    proxy: RunningProxy

    @property
    def url(self) -> str:
        return self.proxy.url + "/didomi/properties"


@pytest.fixture
async def didomi(start_proxy: StartProxy) -> AsyncIterator[Setup]:
    state = DidomiState()
    gate = Gate()
    app = create_didomi_app(state)
    app.middlewares.append(gate.middleware)
    async with await serve(app) as running:
        proxy = await start_proxy(
            {
                "upstreams": {
                    "didomi": {
                        "url": running.url + DIDOMI_BASE,
                        "auth": {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"},
                    }
                }
            },
            env={"KEY": state.key, "SECRET": state.secret},
        )
        yield Setup(state, gate, proxy)
        gate.open.set()
        await proxy.stop()


@pytest.fixture
async def wide_client() -> AsyncIterator[aiohttp.ClientSession]:
    """Like `client`, without a connection limit; its answers feed the same leak check."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trace_configs=[_tracing()],
    ) as session:
        yield session


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> int:
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_500_concurrent_requests_share_one_token_request(
    didomi: Setup,
    wide_client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    didomi.state.token_delay = 0.2
    statuses = await asyncio.gather(*(fetch(wide_client, didomi.url) for _ in range(500)))
    assert statuses == [200] * 500
    assert didomi.state.token_requests == 1
    assert didomi.state.resource_requests == 500
    (token,) = didomi.state.tokens
    assert {bearer_of(rec) for rec in didomi.state.requests} == {token}
    records = log_lines(capsys.readouterr().out)
    assert len([r for r in records if r["event"] == "token_acquired"]) == 1
    access = [r for r in records if r["event"] == "request_finished"]
    assert len(access) == 500
    assert all(r["status"] == 200 and not r["retried"] for r in access)


async def test_200_concurrent_401s_share_one_new_token(
    didomi: Setup,
    wide_client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = didomi.state
    assert await fetch(wide_client, didomi.url) == 200
    (old,) = state.tokens
    capsys.readouterr()

    # All 200 reach the upstream carrying the old token, then it is revoked.
    requests = asyncio.gather(*(fetch(wide_client, didomi.url, {HOLD: "1"}) for _ in range(200)))
    await didomi.gate.until_waiting(200)
    state.revoke_all()
    didomi.gate.open.set()
    statuses = await requests

    assert statuses == [200] * 200
    assert state.token_requests == 2  # the first login and exactly one more
    new = next(t for t in state.tokens if t != old)
    sent = [bearer_of(rec) for rec in state.requests[1:]]
    assert sent.count(old) == 200  # every first attempt...
    assert sent.count(new) == 200  # ...and every replay
    records = log_lines(capsys.readouterr().out)
    access = [r for r in records if r["event"] == "request_finished"]
    assert len(access) == 200
    assert all(r["status"] == 200 and r["retried"] is True for r in access)
    refreshed = [r for r in records if r["event"] == "token_refreshed"]
    assert [r["reason"] for r in refreshed] == ["status 401"]


async def test_late_401_reuses_the_token_another_request_fetched(
    didomi: Setup,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 401 for T that arrives after T2 was fetched reuses T2 instead of fetching T3."""
    state = didomi.state
    assert await fetch(client, didomi.url) == 200
    (t1,) = state.tokens

    # A reaches the upstream with T1 and is held there.
    late = asyncio.ensure_future(fetch(client, didomi.url, {HOLD: "1"}))
    await didomi.gate.until_waiting(1)
    # T1 is revoked; B gets 401 for it, so the proxy fetches T2 and B succeeds.
    state.revoke(t1)
    assert await fetch(client, didomi.url) == 200
    assert state.token_requests == 2
    (t2,) = (t for t in state.tokens if t != t1)
    # Now A is let through: 401 for T1, and the proxy already holds T2.
    didomi.gate.open.set()
    assert await late == 200
    assert state.token_requests == 2  # no third token
    held = [rec for rec in state.requests if rec.header(HOLD)]
    assert [bearer_of(rec) for rec in held] == [t1, t2]
    access = access_lines(capsys.readouterr().out)
    assert [r["retried"] for r in access] == [False, True, True]


async def test_stale_token_is_renewed_once_under_load(
    start_proxy: StartProxy,
    wide_client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Many concurrent requests after refresh time: one refresh, nobody waits for it."""
    state = DidomiState(lifetime=2.0)
    async with await serve(create_didomi_app(state)) as running:
        proxy = await start_proxy(
            {
                "upstreams": {
                    "didomi": {
                        "url": running.url + DIDOMI_BASE,
                        "auth": {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"},
                    }
                }
            },
            env={"KEY": state.key, "SECRET": state.secret},
        )
        url = proxy.url + "/didomi/properties"
        assert await fetch(wide_client, url) == 200
        auth = proxy.state.routes["/didomi"].auth
        assert isinstance(auth, TokenAuth)
        token = auth.status()
        assert token["state"] == "valid"
        # Before half the lifetime (refresh_before 60 s is capped at 1 s here): no refresh,
        # not even in the background. Let any background refresh finish before counting.
        statuses = await asyncio.gather(*(fetch(wide_client, url) for _ in range(20)))
        assert statuses == [200] * 20
        await auth.manager.wait_idle()
        assert state.token_requests == 1
        # Past half the lifetime but before expiry: the token is stale, still valid.
        await asyncio.sleep(token["expires_in"] / 2 + 0.05)
        state.token_delay = 0.2
        state.lifetime = 3600.0  # the renewed token stays fresh however slow the burst is
        statuses = await asyncio.gather(*(fetch(wide_client, url) for _ in range(200)))
        assert statuses == [200] * 200
        assert state.token_requests == 2
        await proxy.stop()
    records = log_lines(capsys.readouterr().out)
    assert [r["reason"] for r in records if r["event"] == "token_refreshed"] == ["expiry"]
    assert not [r for r in records if r["event"] == "request_finished" and r["retried"]]

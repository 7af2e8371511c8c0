"""The one retry (SPEC §2 `retry_statuses`/`max_replay_body`, §3 promises 3 and 4).

A token upstream answering a status in `retry_statuses` gets the request again,
once, with a new token, when the body was kept; the second answer goes to the
client whatever it is. Bodies over `max_replay_body` are streamed and never
replayed. 403 is not a reason to refresh, and static auth types never retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.fakes import DidomiState, SeedFake, start_didomi
from tests.conftest import Echo, RunningProxy, StartProxy
from tests.support import access_lines, bearer_of

# Each case takes well under a second: a replay that waits on a body already streamed
# away must fail here in seconds, not at the suite's 120 s timeout.
pytestmark = pytest.mark.timeout(10)

DIDOMI_AUTH = {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"}


@dataclass
class Setup:
    fake: SeedFake[DidomiState]
    proxy: RunningProxy

    @property
    def state(self) -> DidomiState:
        return self.fake.state

    @property
    def url(self) -> str:
        return self.proxy.url + "/didomi/properties"


@pytest.fixture
async def didomi_fake() -> AsyncIterator[SeedFake[DidomiState]]:
    async with await start_didomi(DidomiState()) as fake:
        yield fake


def env_for(fake: SeedFake[DidomiState]) -> dict[str, str]:
    return {"KEY": fake.state.key, "SECRET": fake.state.secret}


@pytest.fixture
async def didomi(didomi_fake: SeedFake[DidomiState], start_proxy: StartProxy) -> Setup:
    proxy = await start_proxy(
        {
            "upstreams": {
                "didomi": {"url": didomi_fake.url, "auth": DIDOMI_AUTH, "max_replay_body": 1024}
            }
        },
        env=env_for(didomi_fake),
    )
    return Setup(didomi_fake, proxy)


async def status_of(resp: aiohttp.ClientResponse) -> int:
    await resp.read()
    return resp.status


async def warm_up(client: aiohttp.ClientSession, setup: Setup) -> str:
    """One request to obtain a token; returns it."""
    async with client.get(setup.url) as resp:
        assert await status_of(resp) == 200
    (token,) = setup.state.tokens
    return token


async def chunks(data: bytes, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_post_answered_401_is_replayed_with_identical_body(
    framing: str,
    didomi: Setup,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = await warm_up(client, didomi)
    didomi.state.revoke(old)
    body = json.dumps({"name": "Web site", "tags": ["a", "ü"], "n": list(range(50))}).encode()
    data: bytes | AsyncIterator[bytes] = body if framing == "content-length" else chunks(body)
    async with client.post(
        didomi.url, data=data, headers={"Content-Type": "application/json; charset=utf-8"}
    ) as resp:
        assert resp.status == 200
        echoed = (await resp.json())["echo"]
    assert echoed["body_len"] == len(body)
    first, second = didomi.state.requests[-2:]
    assert (first.method, second.method) == ("POST", "POST")
    assert first.body == second.body == body
    assert first.raw_path == second.raw_path
    for name in ("Content-Type", "Content-Length", "Transfer-Encoding"):
        assert first.header(name) == second.header(name)
    assert bearer_of(first) == old
    assert bearer_of(second) != old
    assert didomi.state.token_requests == 2
    access = access_lines(capsys.readouterr().out)
    assert [(r["status"], r["retried"]) for r in access] == [(200, False), (200, True)]


async def test_always_401_is_tried_twice_and_the_401_reaches_the_client(
    didomi: Setup, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    await warm_up(client, didomi)
    didomi.state.always_401 = True
    async with client.get(didomi.url) as resp:
        assert resp.status == 401
        assert (await resp.json())["name"] == "NotAuthenticated"  # the upstream's own answer
    assert didomi.state.resource_requests == 1 + 2
    assert didomi.state.token_requests == 2  # one forced refresh, not a loop
    first, second = didomi.state.requests[-2:]
    assert bearer_of(first) != bearer_of(second)
    access = access_lines(capsys.readouterr().out)
    assert (access[-1]["status"], access[-1]["retried"]) == (401, True)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_replay_body_is_streamed_not_replayed(
    framing: str,
    didomi: Setup,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = await warm_up(client, didomi)
    didomi.state.revoke(old)
    body = bytes(range(256)) * 16  # 4096 bytes > max_replay_body (1024)
    data: bytes | AsyncIterator[bytes] = body if framing == "content-length" else chunks(body)
    async with client.post(
        didomi.url, data=data, headers={"Content-Type": "application/octet-stream"}
    ) as resp:
        assert resp.status == 401
        await resp.read()
    assert didomi.state.resource_requests == 2  # warm-up + exactly one attempt
    assert hashlib.sha256(didomi.state.requests[-1].body).digest() == hashlib.sha256(body).digest()
    assert didomi.state.token_requests == 1  # nothing fetched for a request it cannot replay
    # The refused token was dropped: the next request logs in again and succeeds.
    async with client.get(didomi.url) as resp:
        assert await status_of(resp) == 200
    assert didomi.state.token_requests == 2
    assert bearer_of(didomi.state.requests[-1]) != old
    access = access_lines(capsys.readouterr().out)
    assert [(r["status"], r["retried"]) for r in access] == [
        (200, False),
        (401, False),
        (200, False),
    ]


async def test_body_at_max_replay_body_is_replayed(
    didomi: Setup, client: aiohttp.ClientSession
) -> None:
    old = await warm_up(client, didomi)
    didomi.state.revoke(old)
    body = b"x" * 1024
    async with client.put(didomi.url, data=body) as resp:
        assert await status_of(resp) == 200
    first, second = didomi.state.requests[-2:]
    assert first.body == second.body == body


# -- which statuses retry ----------------------------------------------------------------


async def echo_behind_didomi_login(
    start_proxy: StartProxy,
    echo: Echo,
    fake: SeedFake[DidomiState],
    **upstream: Any,
) -> RunningProxy:
    """The echo upstream behind a general `login` auth that gets tokens from Didomi."""
    auth = {
        "type": "login",
        "request": {
            "url": fake.url + "/sessions",
            "json": {"type": "api-key", "key": "${KEY}", "secret": "${SECRET}"},
        },
        "token": "access_token",
        "inject": {"header": "Authorization", "value": "Bearer {token}"},
    }
    return await start_proxy(
        {"upstreams": {"e": {"url": echo.url + "/base", "auth": auth, **upstream}}},
        env=env_for(fake),
    )


@pytest.mark.parametrize(
    ("retry_statuses", "status", "retried"),
    [
        (None, 401, True),
        (None, 419, False),
        (None, 403, False),  # promise 4: a 403 means a missing scope, not an old token
        ([401, 419], 419, True),
        ([401, 419], 401, True),
        ([401, 419], 403, False),
        ([419], 401, False),
        ([401, 403], 403, True),
    ],
)
async def test_retry_statuses(
    retry_statuses: list[int] | None,
    status: int,
    retried: bool,
    start_proxy: StartProxy,
    echo: Echo,
    didomi_fake: SeedFake[DidomiState],
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra = {} if retry_statuses is None else {"retry_statuses": retry_statuses}
    proxy = await echo_behind_didomi_login(start_proxy, echo, didomi_fake, **extra)
    async with client.get(f"{proxy.url}/e/status/{status}") as resp:
        assert await status_of(resp) == status  # the second answer too goes to the client
    attempts = 2 if retried else 1
    assert len(echo.state.requests) == attempts
    assert didomi_fake.state.token_requests == attempts
    tokens = {rec.header("Authorization") for rec in echo.state.requests}
    assert len(tokens) == attempts
    access = access_lines(capsys.readouterr().out)
    assert [(r["status"], r["retried"]) for r in access] == [(status, retried)]


async def test_retry_gets_the_second_answer(
    start_proxy: StartProxy,
    echo: Echo,
    didomi_fake: SeedFake[DidomiState],
    client: aiohttp.ClientSession,
) -> None:
    """A 401 that goes away on the retry: the client only sees the success."""
    proxy = await echo_behind_didomi_login(start_proxy, echo, didomi_fake)
    async with client.get(proxy.url + "/e/status-401-once", headers={"X-Test-Key": "k1"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True, "key": "k1"}
    assert len(echo.state.requests) == 2


# -- static auth types -----------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "none"},
        {"type": "header", "name": "X-Api-Key", "value": "${STATIC_SECRET}"},
        {"type": "basic", "username": "user", "password": "${STATIC_SECRET}"},
        {"type": "query", "param": "api_key", "value": "${STATIC_SECRET}"},
    ],
    ids=lambda auth: auth["type"],
)
@pytest.mark.parametrize("status", [401, 419])
async def test_static_auth_never_retries(
    auth: dict[str, Any],
    status: int,
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "e": {"url": echo.url + "/base", "auth": auth, "retry_statuses": [401, 419]}
            }
        },
        env={"STATIC_SECRET": "static-secret-value"},
    )
    async with client.post(f"{proxy.url}/e/status/{status}", data=b"payload") as resp:
        assert await status_of(resp) == status
    assert len(echo.state.requests) == 1
    assert echo.state.requests[0].body_len == len(b"payload")
    access = access_lines(capsys.readouterr().out)
    assert [(r["status"], r["retried"]) for r in access] == [(status, False)]

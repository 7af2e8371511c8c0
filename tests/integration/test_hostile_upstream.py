"""Hostile upstreams against the real proxy (issue 14, findings 1, 2 and 6).

Each upstream is a `ScriptedPeer`: scripted bytes per connection, then normal
answers (the request target as the body), so a later request that gets anything
but its own target was handed another request's answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartProxy
from tests.integration.scripted_peer import HOLD, READ, Script, scripted_peer

OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


async def proxy_for(start_proxy: StartProxy, *routes: tuple[str, str, dict[str, Any]], **top: Any):
    upstreams = {name: {"url": url, **extra} for name, url, extra in routes}
    return await start_proxy({**top, "upstreams": upstreams})


async def answer(
    client: aiohttp.ClientSession, url: str, method: str = "GET"
) -> tuple[int, bytes, dict[str, Any] | None]:
    async with client.request(method, url) as resp:
        body = await resp.read()
        error = None
        if resp.content_type == "application/json" and body.startswith(b'{"error"'):
            error = (await resp.json())["error"]
        return resp.status, body, error


async def eventually(check: Any, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


# -- finding 1: an answer left on a connection never reaches another request ------


async def test_a_late_body_after_head_never_becomes_the_next_answer(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    late = OK5 + b"WRONG"
    async with scripted_peer([READ, OK5, 0.05, late]) as peer:
        proxy = await proxy_for(start_proxy, ("h", peer.url + "/base", {}))
        assert (await answer(client, proxy.url + "/h/head", "HEAD"))[0] == 200
        assert await answer(client, proxy.url + "/h/next") == (200, b"/base/next", None)
        assert peer.connections == 2


async def test_stray_bytes_on_one_route_never_reach_another_routes_request(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """Two routes to one host with different credentials: A's upstream sends a second
    answer after its first; B's request, sent at once, must not receive it."""
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!"
    async with scripted_peer([READ, OK5 + b"first", 0.1, stray]) as peer:
        proxy = await proxy_for(
            start_proxy,
            ("a", peer.url + "/a", {"auth": {"type": "header", "name": "X-K", "value": "ka"}}),
            ("b", peer.url + "/b", {"auth": {"type": "header", "name": "X-K", "value": "kb"}}),
        )
        assert await answer(client, proxy.url + "/a/1") == (200, b"first", None)
        assert await answer(client, proxy.url + "/b/2") == (200, b"/b/2", None)


async def test_bytes_after_a_complete_answer_close_the_connection(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!"
    scripts: list[Script] = [[READ, OK5 + b"first" + stray], [READ, OK5 + b"first", 0.02, stray]]
    for script in scripts:
        async with scripted_peer(script) as peer:
            proxy = await proxy_for(start_proxy, ("h", peer.url, {}))
            assert await answer(client, proxy.url + "/h/1") == (200, b"first", None)
            await eventually(lambda: peer.finished == 1, "the stray bytes are sent")
            pools = proxy.state.client._pools
            await eventually(lambda: not pools[0], "the connection dropped")  # noqa: B023
            assert await answer(client, proxy.url + "/h/2") == (200, b"/2", None)
            assert peer.connections == 2


async def test_an_unexpected_101_is_a_502_and_the_connection_is_closed(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    async with scripted_peer([READ, switch + OK5 + b"WRONG", HOLD], []) as peer:
        proxy = await proxy_for(start_proxy, ("h", peer.url, {}))
        status, _, error = await answer(client, proxy.url + "/h/1")
        assert status == 502 and error is not None and "101" in error["message"]
        assert await answer(client, proxy.url + "/h/2") == (200, b"/2", None)


# -- finding 2: limits on what an upstream's head may hold ------------------------

BIG = 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("head", "limit"),
    [
        pytest.param(b"HTTP/1.1 200 " + b"O" * 9000 + b"\r\n", "status line", id="reason-9000"),
        pytest.param(b"HTTP/1.1 200 " + b"O" * BIG + b"\r\n", "over", id="reason-8MiB"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 9000 + b"\r\n", "header line", id="field"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * BIG + b"\r\n", "over", id="field-8MiB"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)),
            "more than 100 headers",
            id="101-headers",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(400_000)),
            "more than 100 headers",
            id="400k-headers",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(10)),
            "head over 65536 bytes",
            id="total-80KiB",
        ),
        pytest.param(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 5000,
            "head over 65536 bytes",
            id="1xx-flood",
        ),
    ],
)
async def test_an_oversized_head_is_a_502_naming_the_limit(
    start_proxy: StartProxy, client: aiohttp.ClientSession, head: bytes, limit: str
) -> None:
    async with scripted_peer([READ, head + b"\r\n" + OK5 + b"WRONG", HOLD], []) as peer:
        proxy = await proxy_for(start_proxy, ("h", peer.url, {}))
        started = time.monotonic()
        status, _, error = await answer(client, proxy.url + "/h/1")
        assert time.monotonic() - started < 2.0
        assert status == 502 and error is not None
        assert error["code"] == "upstream_unreachable"
        assert limit in error["message"], error["message"]
        assert await answer(client, proxy.url + "/h/2") == (200, b"/2", None)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            [READ, b"HTTP/1.1 200 OK\r\n", *[s for _ in range(60) for s in (b"X: y\r\n", 0.05)]],
            id="trickle",
        ),
        pytest.param(
            [READ, *[s for _ in range(200) for s in (b"HTTP/1.1 103 Early Hints\r\n\r\n", 0.02)]],
            id="1xx-every-20ms",
        ),
    ],
)
async def test_the_whole_head_is_due_within_timeout_read(
    start_proxy: StartProxy, client: aiohttp.ClientSession, script: Script
) -> None:
    async with scripted_peer([*script, HOLD], []) as peer:
        proxy = await proxy_for(start_proxy, ("h", peer.url, {"timeout": {"read": 0.4}}))
        started = time.monotonic()
        status, _, error = await answer(client, proxy.url + "/h/1")
        elapsed = time.monotonic() - started
        assert status == 504 and error is not None and error["code"] == "upstream_timeout"
        assert 0.35 < elapsed < 2.0
        assert await answer(client, proxy.url + "/h/2") == (200, b"/2", None)

"""Hostile upstreams against the real proxy (issue 14, findings 1, 2 and 6).

Each upstream is a `ScriptedPeer`: scripted bytes per connection, then normal
answers (the request target as the body), so a later request that gets anything
but its own target was handed another request's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
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


# -- finding 6: nothing a client or an upstream does pins the pool --------------


async def raw_request(port: int, data: bytes, within: float = 5.0) -> tuple[bytes, float]:
    """Write `data`, read one answer (head and Content-Length body): (answer, seconds)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = b""
    try:
        async with asyncio.timeout(within):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n")[0])
            answer = head + await reader.readexactly(length)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, IndexError):
        pass
    writer.close()
    return answer, time.monotonic() - started


STALLED_UPLOAD = (
    b"POST /a/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10
)


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param({}, id="streamed-to-the-upstream"),
        pytest.param(
            {"auth": {"type": "login", "request": {"url": "{token_url}"}, "token": "t"}},
            id="buffered-for-a-replay",
        ),
    ],
)
async def test_stalled_uploads_get_408_and_never_starve_another_upstream(
    start_proxy: StartProxy, client: aiohttp.ClientSession, auth: dict[str, Any]
) -> None:
    token = b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"t": "tok1"}'
    async with scripted_peer() as a, scripted_peer() as b, scripted_peer(*[[READ, token]] * 3) as t:
        if auth:
            auth = {"auth": {**auth["auth"], "request": {"url": t.url + "/token"}, "lifetime": 60}}
        proxy = await proxy_for(
            start_proxy,
            ("a", a.url, {"timeout": {"body": 0.5}, **auth}),
            ("b", b.url, {}),
            pool_size=2,  # one connection each
        )
        stalls = [raw_request(proxy.port, STALLED_UPLOAD) for _ in range(3)]
        others = [answer(client, proxy.url + f"/b/{i}") for i in range(5)]
        results = await asyncio.gather(*stalls, *others)
        for raw, seconds in results[:3]:
            assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
            assert b'"request_timeout"' in raw
            assert 0.4 < seconds < 3.0
        assert results[3:] == [(200, f"/{i}".encode(), None) for i in range(5)]


async def test_a_wait_for_a_pooled_connection_is_bounded_by_timeout_connect(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with scripted_peer([READ, HOLD]) as peer:
        proxy = await proxy_for(
            start_proxy,
            ("a", peer.url, {"pool_size": 1, "timeout": {"connect": 0.3, "read": 5}}),
        )
        hung = asyncio.ensure_future(answer(client, proxy.url + "/a/hangs"))
        await eventually(lambda: peer.connections == 1, "the first request holds the pool")
        started = time.monotonic()
        status, _, error = await answer(client, proxy.url + "/a/waits")
        assert status == 504 and error is not None and error["code"] == "upstream_timeout"
        assert 0.25 < time.monotonic() - started < 2.0
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await hung


async def test_a_client_that_stops_reading_is_cut_after_timeout_send(
    start_proxy: StartProxy,
) -> None:
    chunk = b"x" * 65536
    endless = [
        READ,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        *[b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 2000,  # 128 MiB, far past any buffer
    ]
    async with scripted_peer(endless) as peer:
        proxy = await proxy_for(start_proxy, ("a", peer.url, {"timeout": {"send": 0.5}}))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /a/big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await reader.read(100)  # the head arrives; then this client reads no more
        pools = proxy.state.client._pools
        opened = proxy.state.client
        await eventually(lambda: opened._open == 0, "the upstream connection closed", 5.0)
        assert not any(pools)
        writer.close()

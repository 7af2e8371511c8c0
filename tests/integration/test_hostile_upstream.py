"""Hostile upstreams against the real proxy (issue 14, findings 1, 2 and 6).

Each upstream is a `ScriptedPeer`: scripted bytes per connection, then normal
answers (the request target as the body), so a later request that gets anything
but its own target was handed another request's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import StartProxy
from tests.integration.scripted_peer import CLOSE, HOLD, READ, Script, own_answer, scripted_peer

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
    token_script: Script = [READ, token]
    async with scripted_peer() as a, scripted_peer() as b, scripted_peer(*[token_script] * 3) as t:
        if auth:
            auth = {"auth": {**auth["auth"], "request": {"url": t.url + "/token"}, "lifetime": 60}}
        proxy = await proxy_for(
            start_proxy,
            ("a", a.url, {"timeout": {"body": 0.5}, **auth}),
            ("b", b.url, {}),
            pool_size=2,  # one connection each
        )
        stalls = asyncio.gather(*(raw_request(proxy.port, STALLED_UPLOAD) for _ in range(3)))
        others = asyncio.gather(*(answer(client, proxy.url + f"/b/{i}") for i in range(5)))
        stalled, served = await asyncio.gather(stalls, others)
        for raw, seconds in stalled:
            assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
            assert b'"request_timeout"' in raw
            assert 0.4 < seconds < 3.0
        assert served == [(200, f"/{i}".encode(), None) for i in range(5)]


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
    endless: Script = [
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


# -- the property: whatever an upstream answers, later requests get their own ------

STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY"


@dataclass(frozen=True)
class Hostile:
    """One upstream answer, drawn by Hypothesis: framing, head sizes, stray bytes, delays."""

    framing: str
    reason_len: int
    headers: int
    header_len: int
    body_len: int
    extra: str  # "none" | "same-write" | "delayed"
    delay: float  # between the pieces of the answer

    @property
    def method(self) -> str:
        return "HEAD" if self.framing == "head-declared" else "GET"

    @property
    def over_limit(self) -> bool:
        """Does the head break one of aiohttp's limits (so the client must get a 502)?"""
        if self.framing in ("101", "garbage"):
            return False
        fields = sum(len(b"X-%d" % i) + self.header_len + 4 for i in range(self.headers))
        return (
            self.reason_len > 8190
            or (self.headers > 0 and self.header_len + 4 > 8190)
            or self.headers > 100
            or fields > 64 * 1024
        )

    def steps(self) -> list[bytes | float | str]:
        body = b"b" * self.body_len
        head = b"HTTP/1.1 200 " + b"R" * self.reason_len + b"\r\n"
        head += b"".join(b"X-%d: %s\r\n" % (i, b"v" * self.header_len) for i in range(self.headers))
        tail: bytes
        close = False
        match self.framing:
            case "length" | "head-declared":
                tail = b"Content-Length: %d\r\n\r\n" % len(body)
                tail += body if self.framing == "length" else b""
            case "chunked":
                tail = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                    len(body),
                    body,
                )
            case "bad-chunk":
                tail = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body
                close = True
            case "close-delimited":
                tail, close = b"\r\n" + body, True
            case "short":
                tail, close = b"Content-Length: %d\r\n\r\n%s" % (len(body) + 10, body), True
            case "1xx":
                head = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 3 + head
                tail = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            case "101":
                head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                tail = b"Connection: upgrade\r\n\r\n" + STRAY
            case _:  # garbage
                head, tail, close = b"HTTP/1.1 2OO OK\r\n", b"\r\n" + body, True
        answer = head + tail
        if self.extra == "same-write":
            answer += STRAY
        third = max(1, len(answer) // 3)
        steps: list[bytes | float | str] = []
        for start in range(0, len(answer), third):
            steps += [answer[start : start + third], self.delay]
        if self.extra == "delayed":
            steps += [0.02, STRAY]
        if self.extra != "none" and self.framing == "head-declared":
            steps += [0.02, body + STRAY]
        if close:
            steps.append(CLOSE)
        return steps


HOSTILE = st.builds(
    Hostile,
    framing=st.sampled_from(
        [
            "length",
            "head-declared",
            "chunked",
            "bad-chunk",
            "close-delimited",
            "short",
            "1xx",
            "101",
            "garbage",
        ]
    ),
    reason_len=st.sampled_from([2, 100, 8000, 9000]),
    headers=st.sampled_from([0, 1, 20, 99, 101, 150]),
    header_len=st.sampled_from([1, 100, 3000, 8100, 9000]),
    body_len=st.sampled_from([0, 5, 70_000]),
    extra=st.sampled_from(["none", "same-write", "delayed"]),
    delay=st.sampled_from([0.0, 0.0, 0.01, 0.03]),
)


def draw_hostile(count: int) -> list[Hostile]:
    drawn: list[Hostile] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(HOSTILE)
    @example(Hostile("head-declared", 2, 1, 10, 5, "delayed", 0.0))
    @example(Hostile("length", 2, 1, 10, 5, "delayed", 0.0))
    @example(Hostile("length", 2, 1, 10, 5, "same-write", 0.0))
    @example(Hostile("101", 2, 0, 1, 0, "none", 0.0))
    @example(Hostile("1xx", 2, 150, 9000, 0, "none", 0.01))
    @example(Hostile("length", 9000, 0, 1, 0, "none", 0.0))
    def collect(case: Hostile) -> None:
        drawn.append(case)

    collect()
    return drawn


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_property_hostile_answers_never_shift_later_responses(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    cases = draw_hostile(80)
    done = [asyncio.Event() for _ in cases]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                if not target.startswith("/h/"):
                    writer.write(own_answer(target))
                    continue
                index = int(target.split("/")[2])
                try:
                    for step in cases[index].steps():
                        if step == CLOSE:
                            return
                        if isinstance(step, bytes):
                            writer.write(step)
                            await writer.drain()
                        else:
                            await asyncio.sleep(float(step))
                finally:
                    done[index].set()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await proxy_for(
            start_proxy, ("p", f"http://127.0.0.1:{port}", {"timeout": {"read": 1}})
        )
        assert (await answer(client, proxy.url + "/p/warm"))[0] == 200
        gc.collect()
        before = rss_bytes()
        statuses: list[int | str] = []
        for index, case in enumerate(cases):
            try:
                async with client.request(case.method, proxy.url + f"/p/h/{index}") as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append("cut")  # the proxy cut a response it had begun
            if case.over_limit:
                assert statuses[-1] == 502, case
            if case.framing != "head-declared" or case.body_len == 0:
                # Stray bytes that come later than the answer can only be seen if they
                # arrive before the next request goes out (an HTTP/1.1 race every client
                # has): wait for them. A HEAD answer declaring a body (Content-Length > 0)
                # is the case a client can know in advance: no waiting, no reuse.
                await asyncio.wait_for(done[index].wait(), 5)
            for n in range(3):  # then normal requests on the same pool
                target = f"/n/{index}/{n}"
                assert await answer(client, proxy.url + "/p" + target) == (
                    200,
                    target.encode(),
                    None,
                ), (case, statuses[-1])
        assert 500 not in statuses
        gc.collect()
        grown = rss_bytes() - before
        assert grown < 20 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
    finally:
        server.close()


@pytest.mark.parametrize(
    "after_head",
    [
        pytest.param(b"2\r\nok\r\n0\r\nX-Trailer: " + b"t" * BIG + b"\r\n\r\n", id="8MiB-trailer"),
        pytest.param(b"2;" + b"e" * BIG + b"\r\nok\r\n0\r\n\r\n", id="8MiB-chunk-extension"),
    ],
)
async def test_trailers_and_chunk_framing_are_held_to_the_head_limit(
    start_proxy: StartProxy, client: aiohttp.ClientSession, after_head: bytes
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with scripted_peer([READ, head + after_head, HOLD]) as peer:
        proxy = await proxy_for(start_proxy, ("h", peer.url, {}))
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):  # the head went out: a cut body
            async with client.get(proxy.url + "/h/1") as resp:
                await resp.read()
        assert time.monotonic() - started < 2.0
        assert await answer(client, proxy.url + "/h/2") == (200, b"/2", None)

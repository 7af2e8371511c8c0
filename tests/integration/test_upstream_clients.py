"""Conformance of both upstream clients to the `UpstreamClient` contract.

Every test runs against aiohttp's client (the reference, defined here: it no longer
forwards) and the lean httptools client (the one that does), talking to real servers
on 127.0.0.1: raw `asyncio.start_server` handlers written here, so the bytes on
the wire are exactly the test's, and an aiohttp app where a real server is the point.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.leanclient import LeanUpstreamClient
from proxy.upstream import Body, Endpoint, UpstreamClient, UpstreamResponse
from tests.support import free_port

MiB = 1024 * 1024

# --- the reference: aiohttp's client behind the same interface ----------------------


class _AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = list(resp.headers.items())

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    def complete_body(self) -> bytes | None:
        return None  # not known without waiting: the forwarder streams

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AiohttpUpstreamClient:
    """aiohttp's ClientSession as an `UpstreamClient`: what the lean one is compared to."""

    def __init__(self, pool_size: int) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> UpstreamResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=endpoint.connect_timeout, sock_read=endpoint.read_timeout
        )
        try:
            resp = await self.session.request(
                method,
                URL(endpoint.base + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                ssl=endpoint.ssl,
            )
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            raise ConnectionError(type(exc).__name__) from None
        return _AiohttpResponse(resp)

    async def close(self) -> None:
        await self.session.close()


# --- servers -----------------------------------------------------------------------


@dataclass
class Request:
    head: bytes  # request line and headers, raw, with the blank line
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    raw_body: bytes  # as framed on the wire
    body_size: int = 0  # bytes of a Content-Length body received (kept or not)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def read_request(reader: asyncio.StreamReader, keep_body: bool = True) -> Request | None:
    """One request off the wire, or None at a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if line]
    req = Request(head, method, target, headers, b"", b"")  # type: ignore[arg-type]
    length = req.header("content-length")
    if req.header("transfer-encoding") == "chunked":
        raw, body = bytearray(), bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            raw += size_line + data
            if keep_body:
                body += data[:-2]
            if size == 0:
                break
        req.raw_body, req.body = bytes(raw), bytes(body)
    elif length is not None:
        remaining = int(length)
        parts = []
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                break
            remaining -= len(data)
            if keep_body:
                parts.append(data)
        req.body = req.raw_body = b"".join(parts)
        req.body_size = int(length) - remaining
    return req


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


@dataclass
class RawServer:
    """A server whose every byte the test writes; counts connections."""

    handler: Handler
    port: int = 0
    connections: int = 0
    active: int = 0
    max_active: int = 0
    requests: list[Request] = field(default_factory=list)
    closed_by_peer: int = 0  # connections the client closed (EOF or reset seen)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, tls: ssl.SSLContext | None = None) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(reader, writer, self)
            # drain() only waits for the buffer to drop below the high-water mark;
            # deliver every byte the handler wrote before the abort below.
            writer.transport.set_write_buffer_limits(high=0)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.transport.abort()
            self._tasks.discard(task)

    async def requests_on(self, reader: asyncio.StreamReader) -> AsyncIterator[Request]:
        while (req := await read_request(reader)) is not None:
            self.requests.append(req)
            yield req
        self.closed_by_peer += 1

    def endpoint(self, read_timeout: float = 5.0, connect_timeout: float = 5.0) -> Endpoint:
        return endpoint_for(self.port, read_timeout, connect_timeout)

    def tls_endpoint(self, verify: ssl.SSLContext | bool) -> Endpoint:
        return Endpoint(
            scheme="https",
            host="127.0.0.1",
            port=self.port,
            host_header=f"127.0.0.1:{self.port}",
            base=f"https://127.0.0.1:{self.port}",
            ssl=verify,
            connect_timeout=5.0,
            read_timeout=5.0,
        )

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def endpoint_for(port: int, read_timeout: float = 5.0, connect_timeout: float = 5.0) -> Endpoint:
    return Endpoint(
        scheme="http",
        host="127.0.0.1",
        port=port,
        host_header=f"127.0.0.1:{port}",
        base=f"http://127.0.0.1:{port}",
        ssl=False,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def respond(status: str = "200 OK", body: bytes = b"", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def answering(*responses: bytes) -> Handler:
    """Answer each request on a connection with the next response (the last repeats)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer):
        n = 0
        async for _ in srv.requests_on(reader):
            writer.write(responses[min(n, len(responses) - 1)])
            n += 1
            await writer.drain()

    return handler


# --- clients -----------------------------------------------------------------------

KINDS: dict[str, Callable[[int], UpstreamClient]] = {
    "aiohttp": AiohttpUpstreamClient,
    "lean": LeanUpstreamClient,
}


@pytest.fixture(params=list(KINDS))
async def client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamClient]:
    made = KINDS[request.param](8)
    yield made
    await made.close()


@pytest.fixture
async def lean() -> AsyncIterator[UpstreamClient]:
    """The forwarding client alone, for behaviour the reference client does not share."""
    made = LeanUpstreamClient(8)
    yield made
    await made.close()


def is_lean(client: UpstreamClient) -> bool:
    return isinstance(client, LeanUpstreamClient)


async def read_all(resp: UpstreamResponse) -> bytes:
    body = b"".join([chunk async for chunk in resp.iter_chunks()])
    resp.release()
    return body


async def get(
    client: UpstreamClient, ep: Endpoint, target: str = "/", method: str = "GET"
) -> tuple[UpstreamResponse, bytes]:
    resp = await client.send(ep, method, target, [], None)
    return resp, await read_all(resp)


async def read_into(resp: UpstreamResponse, got: bytearray) -> None:
    """Read the body into `got`, so a test can see what came before a failure."""
    async for chunk in resp.iter_chunks():
        got += chunk


async def gen(*chunks: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if pause:
            await asyncio.sleep(pause)
        yield chunk


def names(req: Request) -> list[str]:
    return [k.lower() for k, _ in req.headers]


# --- requests ----------------------------------------------------------------------


async def test_simple_get_sends_exactly_the_given_headers(client, serve):
    srv = await serve(answering(respond("200 OK", b"hello", "X-Up: 1", "X-Up: 2")))
    ep = srv.endpoint()
    given = [("X-One", "1"), ("Accept", "text/plain"), ("X-Two", "two words")]
    resp = await client.send(ep, "GET", "/p/a%2Fb?q=1&r", given, None)
    assert (resp.status, resp.reason) == (200, "OK")
    assert resp.headers == [("X-Up", "1"), ("X-Up", "2"), ("Content-Length", "5")]
    assert await read_all(resp) == b"hello"
    req = srv.requests[0]
    assert (req.method, req.target) == ("GET", "/p/a%2Fb?q=1&r")
    assert sorted(names(req)) == ["accept", "host", "x-one", "x-two"]
    assert req.header("host") == f"127.0.0.1:{srv.port}"
    if is_lean(client):
        assert (
            req.head
            == (
                f"GET /p/a%2Fb?q=1&r HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                "X-One: 1\r\nAccept: text/plain\r\nX-Two: two words\r\n\r\n"
            ).encode()
        )


async def test_a_fragment_is_never_sent(client, serve):
    srv = await serve(answering(respond()))
    await read_all(await client.send(srv.endpoint(), "GET", "/p?q=1#frag", [], None))
    assert srv.requests[0].target == "/p?q=1"


async def test_utf8_header_values_round_trip_identically(client, serve):
    raw = "café ✓".encode()
    srv = await serve(
        answering(b"HTTP/1.1 200 OK\r\nX-Name: " + raw + b"\r\nContent-Length: 0\r\n\r\n")
    )
    resp = await client.send(srv.endpoint(), "GET", "/", [("X-Sent", "café ✓")], None)
    await read_all(resp)
    assert resp.headers[0] == ("X-Name", "café ✓")
    assert raw in srv.requests[0].head


async def test_header_injection_is_refused(client, serve):
    srv = await serve(answering(respond()))
    with pytest.raises(ValueError, match=r"(?i)forbidden"):
        await client.send(srv.endpoint(), "GET", "/", [("X-A", "1\r\nX-Evil: 1")], None)


async def test_bytes_body_gets_content_length(client, serve):
    srv = await serve(answering(respond("201 Created", b"")))
    resp = await client.send(srv.endpoint(), "POST", "/up", [("Content-Type", "a/b")], b"payload")
    await read_all(resp)
    req = srv.requests[0]
    assert resp.status == 201
    assert (req.body, req.header("content-length")) == (b"payload", "7")
    assert req.header("transfer-encoding") is None
    assert sorted(names(req)) == ["content-length", "content-type", "host"]


async def test_stream_without_length_is_sent_chunked(client, serve):
    srv = await serve(answering(respond()))
    resp = await client.send(srv.endpoint(), "PUT", "/", [], gen(b"abc", b"", b"defgh", pause=0.01))
    await read_all(resp)
    req = srv.requests[0]
    assert req.header("transfer-encoding") == "chunked"
    assert req.header("content-length") is None
    assert req.body == b"abcdefgh"
    if is_lean(client):
        assert req.raw_body == b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"


async def test_stream_with_given_length_is_not_chunked(client, serve):
    srv = await serve(answering(respond()))
    headers = [("Content-Length", "8")]
    resp = await client.send(srv.endpoint(), "PUT", "/", headers, gen(b"abc", b"defgh", pause=0.01))
    await read_all(resp)
    req = srv.requests[0]
    assert req.header("transfer-encoding") is None
    assert (req.header("content-length"), req.raw_body) == ("8", b"abcdefgh")


# --- responses -----------------------------------------------------------------------


async def test_content_length_response(client, serve):
    srv = await serve(answering(respond("404 Not Found", b"x" * 1000)))
    resp, body = await get(client, srv.endpoint())
    assert (resp.status, resp.reason, body) == (404, "Not Found", b"x" * 1000)


async def test_chunked_response(client, serve):
    async def handler(reader, writer, srv):
        async for _ in srv.requests_on(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"5\r\npedia\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    srv = await serve(handler)
    ep = srv.endpoint()
    resp, body = await get(client, ep)
    assert body == b"wikipedia"
    assert ("Transfer-Encoding", "chunked") in resp.headers
    await get(client, ep)
    assert srv.connections == 1


async def test_chunked_response_trailers_are_not_headers(client, serve):
    srv = await serve(
        answering(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-Sum: 42\r\n\r\n"
        )
    )
    resp, body = await get(client, srv.endpoint())
    assert body == b"ok"
    assert [k for k, _ in resp.headers] == ["Transfer-Encoding", "Trailer"]
    await get(client, srv.endpoint())
    assert srv.connections == 1


async def test_close_delimited_response(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nuntil")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b" the end")
        writer.close()

    srv = await serve(handler)
    ep = srv.endpoint()
    assert (await get(client, ep))[1] == b"until the end"
    assert (await get(client, ep))[1] == b"until the end"
    assert srv.connections == 2


async def test_head_without_a_declared_length_reuses_the_connection(serve, client):
    srv = await serve(
        answering(respond("200 OK", b"", "Content-Length: 0"), respond("200 OK", b"after"))
    )
    ep = srv.endpoint()
    resp, body = await get(client, ep, method="HEAD")
    assert (resp.status, body) == (200, b"")
    assert (await get(client, ep))[1] == b"after"
    assert srv.connections == 1


async def test_head_with_a_declared_length_is_not_reused(serve, lean):
    """Its body may come anyway, late, where the next answer belongs (finding 1).

    The lean client only: aiohttp's connector reuses it, the reason it no longer forwards."""
    client = lean

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer):
        async for req in srv.requests_on(reader):
            if req.method == "HEAD":
                writer.write(respond("200 OK", b"", "Content-Length: 1000"))
            else:
                writer.write(respond("200 OK", b"after"))

    srv = await serve(handler)
    ep = srv.endpoint()
    resp, body = await get(client, ep, method="HEAD")
    assert (resp.status, body) == (200, b"")
    assert ("Content-Length", "1000") in resp.headers
    assert (await get(client, ep))[1] == b"after"
    assert srv.connections == 2


async def test_head_against_aiohttp_server(client):
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        ep = endpoint_for(port)
        for _ in range(2):
            resp, body = await get(client, ep, method="HEAD")
            assert (resp.status, body) == (200, b"")
            assert ("Content-Length", "5000") in resp.headers
            assert (await get(client, ep))[1] == b"x" * 5000
    finally:
        await runner.cleanup()


async def test_informational_responses_are_skipped(client, serve):
    async def handler(reader, writer, srv):
        async for _ in srv.requests_on(reader):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 2"
            )
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"00 Fine\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok")

    srv = await serve(handler)
    ep = srv.endpoint()
    resp, body = await get(client, ep)
    assert (resp.status, resp.reason, body) == (200, "Fine", b"ok")
    assert resp.headers == [("X-Final", "yes"), ("Content-Length", "2")]
    await get(client, ep)
    assert srv.connections == 1


async def test_204_and_304_have_no_body(client, serve):
    srv = await serve(
        answering(
            respond("204 No Content", b"", "X-A: 1"),
            respond("304 Not Modified", b"", "Content-Length: 10", 'ETag: "e"'),
            respond("200 OK", b"third"),
        )
    )
    ep = srv.endpoint()
    resp, body = await get(client, ep)
    assert (resp.status, body) == (204, b"")
    resp, body = await get(client, ep)
    assert (resp.status, body) == (304, b"")
    assert (await get(client, ep))[1] == b"third"
    assert srv.connections == 1


async def test_connection_close_response_is_not_reused(client, serve):
    srv = await serve(answering(respond("200 OK", b"bye", "Connection: close")))
    ep = srv.endpoint()
    assert (await get(client, ep))[1] == b"bye"
    assert (await get(client, ep))[1] == b"bye"
    assert srv.connections == 2


async def test_http10_without_keep_alive_is_not_reused(client, serve):
    srv = await serve(answering(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold"))
    ep = srv.endpoint()
    assert (await get(client, ep))[1] == b"old"
    assert (await get(client, ep))[1] == b"old"
    assert srv.connections == 2


# --- keep-alive and the pool -----------------------------------------------------------


async def test_keep_alive_reuses_one_connection(client, serve):
    srv = await serve(answering(respond("200 OK", b"a"), respond("200 OK", b"b")))
    ep = srv.endpoint()
    assert [(await get(client, ep))[1] for _ in range(3)] == [b"a", b"b", b"b"]
    assert srv.connections == 1


async def test_reuse_after_a_large_body_read_whole(client, serve):
    big = bytes(range(256)) * 4096  # 1 MiB: arrives in many reads
    srv = await serve(answering(respond("200 OK", big)))
    ep = srv.endpoint()
    assert (await get(client, ep))[1] == big
    assert (await get(client, ep))[1] == big
    assert srv.connections == 1


@pytest.mark.parametrize("how", ["release", "close"])
async def test_no_reuse_after_a_partially_read_body(client, serve, how):
    srv = await serve(answering(respond("200 OK", b"z" * (16 * MiB))))
    ep = srv.endpoint()
    resp = await client.send(ep, "GET", "/", [], None)
    async for _ in resp.iter_chunks():
        break
    getattr(resp, how)()
    assert (await get(client, ep))[1] == b"z" * (16 * MiB)
    assert srv.connections == 2


async def test_unread_complete_response_frees_its_connection(client, serve):
    """The forwarder's 401 replay: release() an unread small answer, send again."""
    srv = await serve(answering(respond("401 Unauthorized", b"no"), respond("200 OK", b"yes")))
    ep = srv.endpoint()
    resp = await client.send(ep, "GET", "/", [], None)
    assert resp.status == 401
    await asyncio.sleep(0.02)  # the body has arrived
    resp.release()
    assert (await get(client, ep))[1] == b"yes"
    assert srv.connections == 1


async def test_idle_connection_closed_by_server_is_not_used(client, serve):
    async def handler(reader, writer, srv):
        req = await read_request(reader)
        assert req is not None
        writer.write(respond("200 OK", b"once"))  # keep-alive, then a keep-alive timeout
        await writer.drain()
        writer.close()

    srv = await serve(handler)
    ep = srv.endpoint()
    assert (await get(client, ep))[1] == b"once"
    await asyncio.sleep(0.05)
    assert (await get(client, ep))[1] == b"once"
    assert srv.connections == 2


async def test_reused_connection_dying_unanswered_is_retried(client, serve):
    """The race the pool cannot see: the server closes just as the request goes out."""

    async def handler(reader, writer, srv):
        first = srv.connections == 1
        async for req in srv.requests_on(reader):
            if first and len(srv.requests) > 1:
                return  # read the second request, then hang up without a byte
            writer.write(respond("200 OK", req.target.encode()))

    srv = await serve(handler)
    ep = srv.endpoint()
    assert (await get(client, ep, "/1"))[1] == b"/1"
    assert (await get(client, ep, "/2"))[1] == b"/2"
    assert srv.connections == 2
    assert [r.target for r in srv.requests] == ["/1", "/2", "/2"]


async def test_non_idempotent_stream_is_not_retried(client, serve):
    async def handler(reader, writer, srv):
        first = srv.connections == 1
        async for _ in srv.requests_on(reader):
            if first and len(srv.requests) > 1:
                return
            writer.write(respond("200 OK", b"ok"))

    srv = await serve(handler)
    ep = srv.endpoint()
    await get(client, ep)
    with pytest.raises(ConnectionError):
        await client.send(ep, "POST", "/", [], gen(b"once"))
    assert srv.connections == 1


async def test_pool_limit_bounds_open_connections(client, serve):
    async def handler(reader, writer, srv):
        async for _ in srv.requests_on(reader):
            await asyncio.sleep(0.05)
            writer.write(respond("200 OK", b"slow"))

    srv = await serve(handler)
    ep = srv.endpoint()
    small = type(client)(2)
    try:
        bodies = await asyncio.gather(*(get(small, ep) for _ in range(5)))
    finally:
        await small.close()
    assert [b for _, b in bodies] == [b"slow"] * 5
    assert srv.max_active <= 2
    assert srv.connections == 2


async def test_pool_wait_is_bounded_by_the_connect_timeout(serve):
    """The lean client only: the reference client sets only sock_connect, which bounds
    no pool wait."""
    srv = await serve(answering(respond("200 OK", b"x" * (16 * MiB))))
    ep = srv.endpoint(connect_timeout=0.2)
    small = LeanUpstreamClient(1)
    try:
        held = await small.send(ep, "GET", "/", [], None)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await small.send(ep, "GET", "/", [], None)
        assert 0.15 < time.monotonic() - started < 0.6
        held.close()
        assert (await get(small, ep))[1] == b"x" * (16 * MiB)
    finally:
        await small.close()


async def test_pool_serves_several_upstreams_within_the_limit(client, serve):
    one = await serve(answering(respond("200 OK", b"one")))
    two = await serve(answering(respond("200 OK", b"two")))
    small = type(client)(1)
    try:
        for _ in range(2):
            assert (await get(small, one.endpoint()))[1] == b"one"
            assert (await get(small, two.endpoint()))[1] == b"two"
    finally:
        await small.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("verify", ["off", "ca"])
async def test_tls_upstream(client, serve, certificate, verify):
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = await RawServer(answering(respond("200 OK", b"secret"))).start(tls=server_ctx)
    try:
        ep = srv.tls_endpoint(False if verify == "off" else ssl.create_default_context(cafile=cert))
        assert (await get(client, ep))[1] == b"secret"
        assert (await get(client, ep))[1] == b"secret"
        assert srv.connections == 1
        with pytest.raises(ConnectionError):  # a CA that did not sign it
            await client.send(srv.tls_endpoint(True), "GET", "/", [], None)
    finally:
        await client.close()
        await srv.stop()


# --- failures ------------------------------------------------------------------------


async def test_reset_mid_body_fails_the_body(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"p" * 1000)
        await writer.drain()
        await asyncio.sleep(0.02)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    srv = await serve(handler)
    resp = await client.send(srv.endpoint(), "GET", "/", [], None)
    got = bytearray()
    with pytest.raises(ConnectionError):
        await read_into(resp, got)
    resp.close()
    assert got == b"p" * 1000


async def test_eof_mid_body_fails_the_body(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.close()

    srv = await serve(handler)
    resp = await client.send(srv.endpoint(), "GET", "/", [], None)
    with pytest.raises(ConnectionError):
        await read_into(resp, bytearray())
    resp.close()


async def test_eof_before_headers_is_a_connection_error(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 O")

    srv = await serve(handler)
    with pytest.raises(ConnectionError):
        await client.send(srv.endpoint(), "GET", "/", [], None)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
    ],
)
async def test_malformed_response_is_a_connection_error(client, serve, answer):
    srv = await serve(answering(answer))
    with pytest.raises(ConnectionError):
        await client.send(srv.endpoint(), "GET", "/", [], None)


async def test_connection_refused(client):
    with pytest.raises(ConnectionError):
        await client.send(endpoint_for(free_port()), "GET", "/", [], None)


async def test_read_timeout_waiting_for_headers(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        await asyncio.sleep(5)

    srv = await serve(handler)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.send(srv.endpoint(read_timeout=0.3), "GET", "/", [], None)
    assert 0.25 < time.monotonic() - started < 0.8


async def test_read_timeout_between_body_chunks(client, serve):
    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(5)

    srv = await serve(handler)
    resp = await client.send(srv.endpoint(read_timeout=0.3), "GET", "/", [], None)
    started = time.monotonic()
    got = bytearray()
    # aiohttp's sock_read timeout is a ClientError too, so its wrapper turns it into a
    # ConnectionError mid-body; the forwarder treats both alike (an OSError).
    expected = TimeoutError if is_lean(client) else (TimeoutError, ConnectionError)
    with pytest.raises(expected):
        await read_into(resp, got)
    resp.close()
    assert got == b"12345"
    assert time.monotonic() - started < 0.8


async def test_read_timeout_is_the_requests_own(client, serve):
    """Two routes to one host keep their own read timeouts; the lean client does not
    even share their connections (a stray answer could reach the other's request)."""

    async def handler(reader, writer, srv):
        async for req in srv.requests_on(reader):
            if req.target == "/slow":
                await asyncio.sleep(5)
            writer.write(respond("200 OK", b"fast"))

    srv = await serve(handler)
    assert (await get(client, srv.endpoint(read_timeout=30)))[1] == b"fast"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.send(srv.endpoint(read_timeout=0.3), "GET", "/slow", [], None)
    assert time.monotonic() - started < 0.8
    assert srv.connections == (2 if is_lean(client) else 1)


async def test_slow_but_steady_body_does_not_time_out(client, serve):
    async def handler(reader, writer, srv):
        async for _ in srv.requests_on(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
            for byte in b"steady":
                await asyncio.sleep(0.08)
                writer.write(bytes([byte]))

    srv = await serve(handler)
    assert (await get(client, srv.endpoint(read_timeout=0.3)))[1] == b"steady"


async def test_close_closes_idle_and_busy_connections(client, serve):
    srv = await serve(answering(respond("200 OK", b"q" * (16 * MiB))))
    ep = srv.endpoint()
    idle = await client.send(ep, "GET", "/", [], None)
    busy = await client.send(ep, "GET", "/", [], None)
    await read_all(idle)
    assert srv.active == 2
    await client.close()
    for _ in range(50):
        if srv.active == 0:
            break
        await asyncio.sleep(0.01)
    assert srv.active == 0
    busy.close()


async def test_cancelled_send_frees_its_connection(client, serve):
    async def handler(reader, writer, srv):
        async for req in srv.requests_on(reader):
            if req.target == "/stuck":
                await asyncio.sleep(5)
            writer.write(respond("200 OK", b"free"))

    srv = await serve(handler)
    ep = srv.endpoint()
    small = type(client)(1)
    try:
        stuck = asyncio.ensure_future(small.send(ep, "GET", "/stuck", [], None))
        await asyncio.sleep(0.05)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert (await asyncio.wait_for(get(small, ep), 1))[1] == b"free"
    finally:
        await small.close()


async def test_failing_upload_source_is_a_connection_error(client, serve):
    srv = await serve(answering(respond()))

    async def source() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(0.01)
        raise ConnectionResetError("the client went away")

    async def exchange() -> bytes:
        return await read_all(await client.send(srv.endpoint(), "POST", "/", [], source()))

    with pytest.raises(ConnectionError):
        await exchange()


# --- large bodies: streamed, memory flat ---------------------------------------------------


async def test_large_download_is_streamed_with_flat_memory(client, serve):
    size = 64 * MiB
    block = b"d" * MiB

    async def handler(reader, writer, srv):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    srv = await serve(handler)
    resp = await client.send(srv.endpoint(), "GET", "/", [], None)
    tracemalloc.start()
    try:
        received, n, most_queued = 0, 0, 0
        async for chunk in resp.iter_chunks():
            received += len(chunk)
            n += 1
            if n % 16 == 0:
                await asyncio.sleep(0.002)  # a slow consumer: the queue must not grow
            most_queued = max(most_queued, getattr(resp, "_queued", 0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    resp.release()
    assert received == size
    assert peak < 4 * MiB
    assert most_queued <= MiB


async def test_large_upload_is_streamed_with_flat_memory(client, serve):
    size = 64 * MiB
    block = b"u" * (256 * 1024)

    async def handler(reader, writer, srv):
        req = await read_request(reader, keep_body=False)
        assert req is not None
        srv.requests.append(req)
        writer.write(respond("200 OK", b"got it"))

    async def source() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    srv = await serve(handler)
    headers = [("Content-Length", str(size))]
    tracemalloc.start()
    try:
        resp = await client.send(srv.endpoint(), "PUT", "/", headers, source())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert await read_all(resp) == b"got it"
    assert srv.requests[0].body_size == size
    assert peak < 4 * MiB

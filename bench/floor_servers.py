"""Reference servers for `bench/floor.py`: how fast can any asyncio proxy be here?

    python bench/floor_servers.py relay|aiohttp-fixed|aiohttp-hop|aiohttp-lean PORT UPSTREAM_PORT

* ``relay``: a byte relay on raw asyncio protocols, one upstream connection per
  client connection, no HTTP parsing at all: the floor for a proxy on asyncio.
* ``aiohttp-fixed``: aiohttp's low-level ``web.Server`` answering every request
  with the upstream's small.json bytes, no upstream hop: aiohttp's server alone.
* ``aiohttp-hop``: ``web.Server`` whose handler writes one fixed request to the
  upstream on a raw keep-alive asyncio connection, awaits the answer (taken whole
  by its Content-Length, no HTTP parser) and returns its body: an aiohttp handler
  that waits for an upstream, with no HTTP client and no header work at all.
* ``aiohttp-lean``: ``web.Server`` plus authproxy's ``LeanUpstreamClient``, with
  nothing else (no guards, routing, stripping, logs or metrics): the least an
  aiohttp-based authenticating proxy can do per request.

Each runs on the event loop authproxy runs on (uvloop when installed) until SIGINT
or SIGTERM, and then exits 0 (so callgrind writes its counts).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.request
from typing import cast

from aiohttp import web

from proxy.leanclient import LeanUpstreamClient
from proxy.server import run
from proxy.upstream import Endpoint

MODES = ("relay", "aiohttp-fixed", "aiohttp-hop", "aiohttp-lean")
AUTHORIZATION = ("Authorization", "Bearer static-bench-token")


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _ClientSide(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(
            lambda: _UpstreamSide(self.transport), "127.0.0.1", self.upstream_port
        )
        self.upstream = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class _RawHop(asyncio.Protocol):
    """One keep-alive upstream connection, one request at a time. The answer is
    taken whole by its Content-Length (the bench's upstream always sends one)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        start = head.lower().find(b"\r\ncontent-length:")
        if start < 0:
            self._fail(ConnectionError("upstream answer without Content-Length"))
            return
        end = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : end if end >= 0 else len(head)])
        if len(body) < length:
            return
        self.buffer = b""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(body[:length])

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("upstream closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as answer:
        return bytes(answer.read())


async def serve(mode: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = LeanUpstreamClient(64)
    if mode == "relay":
        server = await loop.create_server(lambda: _ClientSide(upstream_port), "127.0.0.1", port)
    else:
        small = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{upstream_port}/small.json")
        endpoint = Endpoint(
            scheme="http",
            host="127.0.0.1",
            port=upstream_port,
            host_header=f"127.0.0.1:{upstream_port}",
            base=f"http://127.0.0.1:{upstream_port}",
            ssl=True,
            connect_timeout=5.0,
            read_timeout=30.0,
        )

        async def fixed(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=small, content_type="application/json")

        async def lean(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path.partition("/up")[2] or "/"
            resp = await client.send(endpoint, request.method, path, [AUTHORIZATION], None)
            body = b"".join([chunk async for chunk in resp.iter_chunks()])
            resp.release()
            return web.Response(status=resp.status, body=body, headers=resp.headers)

        idle: list[_RawHop] = []
        host_line = f" HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\n"
        auth_line = f"{AUTHORIZATION[0]}: {AUTHORIZATION[1]}\r\n\r\n"

        async def hop(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path.partition("/up")[2] or "/"
            conn = idle.pop() if idle else None
            if conn is None or conn.transport is None or conn.transport.is_closing():
                _, conn = await loop.create_connection(_RawHop, "127.0.0.1", upstream_port)
            assert conn.transport is not None
            conn.waiter = answer = loop.create_future()
            conn.transport.write(f"GET {path}{host_line}{auth_line}".encode())
            body = await answer
            idle.append(conn)
            return web.Response(body=body, content_type="application/json")

        handler = {"aiohttp-fixed": fixed, "aiohttp-hop": hop, "aiohttp-lean": lean}[mode]
        server = await loop.create_server(web.Server(handler, access_log=None), "127.0.0.1", port)
    await stop.wait()
    server.close()
    await client.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in MODES:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    run(serve(argv[0], int(argv[1]), int(argv[2])))  # authproxy's loop: uvloop if installed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Reference servers for `bench/floor.py`: how fast can any asyncio proxy be here?

    python bench/floor_servers.py relay|aiohttp-fixed|aiohttp-lean PORT UPSTREAM_PORT

* ``relay``: a byte relay on raw asyncio protocols, one upstream connection per
  client connection, no HTTP parsing at all: the floor for a proxy on asyncio.
* ``aiohttp-fixed``: aiohttp's low-level ``web.Server`` answering every request
  with the upstream's small.json bytes, no upstream hop: aiohttp's server alone.
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

MODES = ("relay", "aiohttp-fixed", "aiohttp-lean")
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

        handler = fixed if mode == "aiohttp-fixed" else lean
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

"""`LeanUpstreamClient.upgrade`: what the WebSocket relay relies on, at the client level.

A raw-socket server stands for the upstream, so every byte it sends is chosen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.leanclient import LeanUpstreamClient, UpstreamConnectionError
from proxy.upstream import Endpoint
from tests.support import wait_until

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UPGRADE = [("Upgrade", "websocket"), ("Connection", "upgrade")]

Answer = Callable[[bytes], bytes]  # request head -> what to send back


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Answer], Awaitable[Endpoint]]]:
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(answer: Answer) -> Endpoint:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    writer.write(answer(head))
                    if b"upgrade" in head.lower():  # after a switch: echo whatever comes
                        while data := await reader.read(65536):
                            writer.write(data)
                        return
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return Endpoint("http", "127.0.0.1", port, f"127.0.0.1:{port}", "", False, 1.0, 5.0)

    yield start
    for writer in writers:
        writer.transport.abort()
    for server in servers:
        server.close()
        await server.wait_closed()


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def test_a_101_hands_over_the_connection_with_its_tail_and_frees_the_slot(
    upstream: Callable[[Answer], Awaitable[Endpoint]],
) -> None:
    endpoint = await upstream(lambda head: SWITCH + b"early" if b"Upgrade" in head else OK)
    client = LeanUpstreamClient(pool_size=1)
    try:
        resp = await client.upgrade(endpoint, "/ws", UPGRADE)
        assert resp.status == 101
        assert ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in resp.headers
        upgraded = resp.upgraded
        assert upgraded is not None and upgraded.tail == b"early"
        # Out of the pool: with pool_size 1 a plain request gets a connection at once.
        async with asyncio.timeout(0.5):  # less than connect_timeout (1 s)
            plain = await client.send(endpoint, "GET", "/", [], None)
        assert plain.status == 200
        assert b"".join([c async for c in plain.iter_chunks()]) == b"ok"
        plain.release()
        # The raw connection is ours: paused until a new protocol takes it.
        sink = Sink()
        upgraded.transport.set_protocol(sink)
        upgraded.transport.resume_reading()
        upgraded.transport.write(b"echo me")
        await wait_until(lambda: sink.data == b"echo me", 5, what="the echo")
    finally:
        await client.close()
    # Closing the client leaves a handed-over connection alone.
    assert not upgraded.transport.is_closing()
    upgraded.transport.close()
    await asyncio.wait_for(sink.lost, 5)


async def test_any_other_answer_to_an_upgrade_is_an_ordinary_response(
    upstream: Callable[[Answer], Awaitable[Endpoint]],
) -> None:
    endpoint = await upstream(
        lambda _: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope"
    )
    client = LeanUpstreamClient(pool_size=1)
    try:
        resp = await client.upgrade(endpoint, "/ws", UPGRADE)
        assert (resp.status, resp.upgraded) == (401, None)
        assert b"".join([c async for c in resp.iter_chunks()]) == b"nope"
        resp.release()
    finally:
        await client.close()


async def test_a_101_nobody_asked_for_is_an_error(
    upstream: Callable[[Answer], Awaitable[Endpoint]],
) -> None:
    endpoint = await upstream(lambda _: SWITCH)
    client = LeanUpstreamClient(pool_size=1)
    try:
        with pytest.raises(UpstreamConnectionError, match="101"):
            await client.send(endpoint, "GET", "/", [], None)
    finally:
        await client.close()

"""WebSockets through the proxy (SPEC §4 Stripping exception and WebSockets, §5 `bytes_up`).

The upstream is the Didomi fake's `/ws` echo, behind its token route, or a small
WebSocket server written here when a test needs to watch the upstream's side of
the TCP connection. Clients are aiohttp's `ws_connect` or a raw socket that
speaks the handshake itself (to close without a close frame, or to read EOF).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from proxy.demo import demo_config
from proxy.fakes import DidomiState, SeedFake, run_fakes, serve, start_didomi
from tests.conftest import Echo, RunningProxy, StartProxy
from tests.support import access_lines, bearer_of, error_of, log_lines, wait_until

DIDOMI_AUTH = {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"}


@dataclass
class Setup:
    fake: SeedFake[DidomiState]
    proxy: RunningProxy

    @property
    def state(self) -> DidomiState:
        return self.fake.state

    @property
    def ws_url(self) -> str:
        return self.proxy.url + "/didomi/ws"


@contextlib.asynccontextmanager
async def didomi_behind_proxy(
    start_proxy: StartProxy, top: dict[str, Any] | None = None, **upstream: Any
) -> AsyncIterator[Setup]:
    async with await start_didomi(DidomiState()) as fake:
        proxy = await start_proxy(
            {
                **(top or {}),
                "upstreams": {"didomi": {"url": fake.url, "auth": DIDOMI_AUTH, **upstream}},
            },
            env={"KEY": fake.state.key, "SECRET": fake.state.secret},
        )
        yield Setup(fake, proxy)


@pytest.fixture
async def didomi(start_proxy: StartProxy) -> AsyncIterator[Setup]:
    async with didomi_behind_proxy(start_proxy) as setup:
        yield setup


async def wait_for(check: Callable[[], object], what: str) -> None:
    await wait_until(check, 5.0, what=what)


async def relay_line(
    capsys: pytest.CaptureFixture[str], path: str, out: list[str] | None = None
) -> dict[str, Any]:
    """The access line of the one relay on `path`, once it has been written (at its
    end); `out` collects what was captured meanwhile."""
    out = [] if out is None else out

    def lines() -> list[dict[str, Any]]:
        out.append(capsys.readouterr().out)
        return [r for r in access_lines("".join(out)) if r["path"] == path]

    await wait_for(lines, f"the access line of {path}")
    (line,) = lines()
    return line


# -- a raw-socket client and an upstream that reports its side -------------------------


async def raw_handshake(
    url: str, path: str, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a WebSocket by hand; returns the streams and the response head."""
    host, port = re.match(r"http://([^:]+):(\d+)", url).groups()  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


@dataclass
class WatchedUpstream:
    """A WebSocket upstream (no auth) that says when its side of a connection ended."""

    url: str = ""
    opened: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    hang_up: bool = False  # close the TCP connection right after the handshake
    delay: float = 0.0  # seconds before answering the upgrade
    asked: asyncio.Event = field(default_factory=asyncio.Event)  # an upgrade arrived


@pytest.fixture
async def watched() -> AsyncIterator[WatchedUpstream]:
    upstream = WatchedUpstream()

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        upstream.asked.set()
        await asyncio.sleep(upstream.delay)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        upstream.opened += 1
        if upstream.hang_up:
            assert request.transport is not None
            request.transport.close()  # no close frame: the TCP connection just ends
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
        finally:
            upstream.ended.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    async with await serve(app) as running:
        upstream.url = running.url
        yield upstream


# -- the acceptance --------------------------------------------------------------------


async def test_frames_pass_with_the_credential_injected_and_the_clients_stripped(
    didomi: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = bytes(range(256)) * 4096  # 1 MiB in one frame
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(
            didomi.ws_url,
            headers={
                "Authorization": "Bearer the-clients-own",
                "Cookie": "session=the-clients-own",
                # What Firefox sends, plus a header Connection names (hop-by-hop).
                "Connection": "keep-alive, Upgrade, X-Hop",
                "X-Hop": "1",
            },
        ) as ws,
    ):
        assert ws._response.status == 101
        assert ws._response.headers["Upgrade"] == "websocket"
        assert ws._response.headers["Connection"] == "upgrade"
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=5)).data == "héllo"
        await ws.send_bytes(b"\x00\xff")
        reply = await ws.receive(timeout=5)
        assert (reply.type, reply.data) == (WSMsgType.BINARY, b"\x00\xff")
        await ws.send_bytes(binary)
        assert (await ws.receive(timeout=5)).data == binary
    (rec,) = [r for r in didomi.state.requests if r.raw_path.endswith("/ws")]
    (token,) = didomi.state.tokens
    assert bearer_of(rec) == token
    assert rec.header_values("Cookie") == []
    assert rec.header_values("Upgrade") == ["websocket"]
    assert rec.header_values("Connection") == ["upgrade"]
    assert rec.header_values("X-Hop") == []
    assert rec.header("Sec-WebSocket-Key")
    out: list[str] = []
    line = await relay_line(capsys, "/didomi/ws", out)
    assert len(didomi.proxy.state.relays) == 0
    (debug,) = [r for r in log_lines("".join(out)) if r["event"] == "request_debug"]
    assert debug["request_id"] == line["request_id"]
    assert (debug["route"], debug["status"], debug["auth"]) == ("didomi", 101, "didomi")
    assert {"Authorization", "Cookie", "X-Hop"} <= set(debug["stripped"])
    assert line["status"] == 101
    assert line["upstream"] == "didomi"
    assert line["retried"] is False
    # Frames to the client are unmasked (2-byte header, 10 for the big one); the
    # client's are masked (+4 bytes each) and include the close frames.
    sent_payload = len("héllo".encode()) + 2 + len(binary)
    assert sent_payload < line["bytes"] < sent_payload + 64
    assert sent_payload + 12 < line["bytes_up"] < sent_payload + 64


async def test_401_on_the_upgrade_is_refreshed_and_retried(
    didomi: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(didomi.proxy.url + "/didomi/properties") as resp:
            assert resp.status == 200
        (old,) = didomi.state.tokens
        didomi.state.revoke_all()
        async with client.ws_connect(didomi.ws_url) as ws:
            await ws.send_str("after refresh")
            assert (await ws.receive(timeout=5)).data == "after refresh"
    upgrades = [r for r in didomi.state.requests if r.raw_path.endswith("/ws")]
    first, second = (bearer_of(r) for r in upgrades)
    assert first == old
    assert second != old
    assert didomi.state.token_requests == 2
    line = await relay_line(capsys, "/didomi/ws")
    assert (line["status"], line["retried"]) == (101, True)


async def test_a_refused_upgrade_reaches_the_client_as_an_ordinary_answer(
    didomi: Setup,
) -> None:
    didomi.state.always_401 = True
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(didomi.ws_url)
    assert refused.value.status == 401
    assert len([r for r in didomi.state.requests if r.raw_path.endswith("/ws")]) == 2
    # The client's connection is still good for plain HTTP after the refusal.
    reader, writer, head = await raw_handshake(didomi.proxy.url, "/didomi/ws")
    try:
        assert head.startswith(b"HTTP/1.1 401 ")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        writer.write(b"GET /-/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200 "
        )
    finally:
        writer.close()


async def test_the_client_closing_closes_the_upstream(
    watched: WatchedUpstream, start_proxy: StartProxy
) -> None:
    # A read-only route relays WebSockets too (the upgrade is a GET).
    proxy = await start_proxy({"upstreams": {"w": {"url": watched.url, "allow_methods": ["GET"]}}})
    reader, writer, head = await raw_handshake(proxy.url, "/w/ws")
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(masked_text_frame("ping?"))
    assert (await asyncio.wait_for(reader.readexactly(7), 5)) == b"\x81\x05ping?"
    writer.transport.abort()  # no close frame, no FIN handshake: just gone
    await asyncio.wait_for(watched.ended.wait(), 5)
    await wait_for(lambda: len(proxy.state.relays) == 0, "the relay to end")


async def test_a_client_gone_before_the_101_leaves_nothing_open(
    watched: WatchedUpstream, start_proxy: StartProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    watched.delay = 0.3
    proxy = await start_proxy({"upstreams": {"w": {"url": watched.url}}})
    host, port = proxy.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /w/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await asyncio.wait_for(watched.asked.wait(), 5)
    writer.transport.abort()  # gone while the upstream takes its time
    await asyncio.wait_for(watched.ended.wait(), 5)  # the proxy hung up on the upstream
    assert len(proxy.state.relays) == 0
    out: list[str] = []
    line = await relay_line(capsys, "/w/ws", out)
    assert "bytes_up" not in line and "error" not in line, line
    assert (line["status"], line["bytes"]) == (499, 0)
    assert not [r for r in log_lines("".join(out)) if r["event"] == "request_failed"]


async def test_the_upstream_closing_closes_the_client(
    watched: WatchedUpstream, start_proxy: StartProxy
) -> None:
    watched.hang_up = True
    proxy = await start_proxy({"upstreams": {"w": {"url": watched.url}}})
    reader, writer, head = await raw_handshake(proxy.url, "/w/ws")
    try:
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # EOF from the proxy
    finally:
        writer.close()
    await wait_for(lambda: len(proxy.state.relays) == 0, "the relay to end")


async def test_the_upstream_closing_handshake_reaches_the_client(didomi: Setup) -> None:
    async with aiohttp.ClientSession() as client, client.ws_connect(didomi.ws_url) as ws:
        await ws.send_str("close")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert ws.close_code == 1000
    await wait_for(lambda: len(didomi.proxy.state.relays) == 0, "the relay to end")


async def test_an_idle_relay_is_closed_after_timeout_read(
    start_proxy: StartProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    async with didomi_behind_proxy(start_proxy, timeout={"read": 1}) as setup:
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(setup.ws_url, autoping=False) as ws,
        ):
            # Traffic one way only keeps it open past timeout.read ...
            await ws.send_str("push 5 0.3")
            for i in range(5):
                assert (await ws.receive(timeout=5)).data == f"push {i}"
            # ... silence both ways closes it.
            quiet_since = time.monotonic()
            msg = await ws.receive(timeout=5)
            idle = time.monotonic() - quiet_since
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        assert 0.9 < idle < 3.0, idle
        await wait_for(lambda: len(setup.proxy.state.relays) == 0, "the relay to end")
        cut = [r for r in log_lines(capsys.readouterr().out) if r["event"] == "websocket_cut"]
        assert [(r["upstream"], r["reason"]) for r in cut] == [("didomi", "idle")]


async def test_upgraded_connections_are_outside_pool_size_and_counted_in_metrics(
    start_proxy: StartProxy,
) -> None:
    async with didomi_behind_proxy(
        start_proxy, top={"pool_size": 1}, timeout={"connect": 1}
    ) as setup:
        async with aiohttp.ClientSession() as client:
            async with (
                client.ws_connect(setup.ws_url) as one,
                client.ws_connect(setup.ws_url) as two,
            ):
                for ws in (one, two):
                    await ws.send_str("open")
                    assert (await ws.receive(timeout=5)).data == "open"
                # A wait for a pool slot would end in a 504 after timeout.connect.
                async with client.get(setup.proxy.url + "/didomi/properties") as resp:
                    assert resp.status == 200
                async with client.get(setup.proxy.url + "/-/metrics") as resp:
                    metrics = await resp.text()
                assert 'authproxy_websocket_relays_open{upstream="didomi"} 2.0' in metrics
                assert relayed(metrics, "up") > 0  # counted while the relays are open
                assert relayed(metrics, "down") >= 2 * len(b"\x81\x04open")
            await wait_for(lambda: len(setup.proxy.state.relays) == 0, "the relays to end")
            async with client.get(setup.proxy.url + "/-/metrics") as resp:
                metrics = await resp.text()
        assert 'authproxy_websocket_relays_open{upstream="didomi"} 0.0' in metrics
        assert relayed(metrics, "up") > 0


def relayed(metrics: str, direction: str) -> float:
    sample = f'authproxy_websocket_relayed_bytes_total{{direction="{direction}",upstream="didomi"}}'
    found = re.search(re.escape(sample) + r" (\S+)", metrics)
    assert found, metrics
    return float(found.group(1))


@pytest.mark.parametrize(
    "headers",
    [
        {
            "Upgrade": "h2c",
            "Connection": "Upgrade, HTTP2-Settings",
            "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
        },
        {"Upgrade": "websocket"},  # without Connection: upgrade it asks for nothing
    ],
    ids=["h2c", "websocket-without-connection-upgrade"],
)
async def test_an_h2c_upgrade_is_forwarded_as_a_plain_request(
    echo: Echo, start_proxy: StartProxy, headers: dict[str, str]
) -> None:
    proxy = await start_proxy({"upstreams": {"e": {"url": echo.url}}})
    async with aiohttp.ClientSession() as client:
        for _ in range(2):  # and the connection stays a plain HTTP one
            async with client.get(proxy.url + "/e/echo", headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
    assert len(echo.state.requests) == 2
    for rec in echo.state.requests:
        names = {k.lower() for k, _ in rec.headers}
        assert not names & {"upgrade", "connection", "http2-settings"}, rec.headers


async def test_a_websocket_upgrade_on_a_post_is_forwarded_plain(
    echo: Echo, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"upstreams": {"e": {"url": echo.url}}})
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            proxy.url + "/e/echo",
            data=b"body",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        ) as resp,
    ):
        assert resp.status == 200
    (rec,) = echo.state.requests
    assert rec.header("Upgrade") is None and rec.header("Connection") is None


async def test_every_seed_api_relays_with_its_own_credential(start_proxy: StartProxy) -> None:
    """Session header, `?token=`, JWT and OAuth2 bearer: each is injected into the
    upgrade, and none of the client's own credentials gets through."""
    junk = "client-junk-credential"
    async with run_fakes() as fakes:
        proxy = await start_proxy(demo_config(fakes))
        async with aiohttp.ClientSession() as client:
            for fake in fakes.all():
                headers = {"Authorization": f"Bearer {junk}", "Cookie": f"sid={junk}"}
                query = "keep=1"
                if fake.name == "paymo":
                    headers["X-Session"] = junk
                if fake.name == "primaerp":
                    query = f"token={junk}&keep=1"
                async with client.ws_connect(
                    f"{proxy.url}/{fake.name}/ws?{query}", headers=headers
                ) as ws:
                    await ws.send_str(f"hello {fake.name}")
                    assert (await ws.receive(timeout=5)).data == f"hello {fake.name}"
                (rec,) = [r for r in fake.state.requests if "/ws" in r.raw_path]
                assert junk not in rec.raw_path and "keep=1" in rec.raw_path
                assert all(junk not in value for _, value in rec.headers), rec.headers
                assert rec.header_values("Upgrade") == ["websocket"]
                (token,) = fake.state.tokens
                assert token in rec.raw_path or any(token in v for _, v in rec.headers)
        await proxy.stop()  # logouts while the fakes still answer


# -- hostile or unusual upstreams (raw sockets) ------------------------------------------


@dataclass
class RawWsUpstream:
    """Answers every upgrade with `answer`, then reads `expect` bytes into `received`."""

    answer: bytes
    expect: int = 0
    url: str = ""
    heads: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)


@pytest.fixture
async def raw_ws() -> AsyncIterator[Callable[[bytes, int], Awaitable[RawWsUpstream]]]:
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(answer: bytes, expect: int = 0) -> RawWsUpstream:
        upstream = RawWsUpstream(answer, expect)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                upstream.heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(upstream.answer)
                if upstream.expect:
                    upstream.received.append(await reader.readexactly(upstream.expect))
                await reader.read()  # until the proxy hangs up
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return upstream

    yield start
    for writer in writers:
        writer.transport.abort()
    for server in servers:
        server.close()
        await server.wait_closed()


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        SWITCHING + b"Upgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        SWITCHING + b"Upgrade: websocket\r\n\r\n",
    ],
    ids=["switched-to-another-protocol", "no-connection-upgrade"],
)
async def test_a_101_that_is_not_a_websocket_one_is_a_502(
    raw_ws: Callable[[bytes, int], Awaitable[RawWsUpstream]],
    start_proxy: StartProxy,
    echo: Echo,
    answer: bytes,
) -> None:
    bad = await raw_ws(answer, 0)
    proxy = await start_proxy({"upstreams": {"bad": {"url": bad.url}, "e": {"url": echo.url}}})
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(proxy.url + "/bad/ws")
        assert refused.value.status == 502
        async with client.get(
            proxy.url + "/bad/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        ) as resp:
            error = await error_of(resp)
        assert resp.status == 502 and error["code"] == "upstream_unreachable"
        async with client.get(proxy.url + "/e/echo") as resp:  # everyone else is served
            assert resp.status == 200
    assert len(proxy.state.relays) == 0


async def test_bytes_that_ride_with_the_handshakes_are_relayed(
    raw_ws: Callable[[bytes, int], Awaitable[RawWsUpstream]], start_proxy: StartProxy
) -> None:
    """The upstream's first frame in the 101's packet, the client's in its request's."""
    frame = masked_text_frame("ping?")
    upstream = await raw_ws(
        SWITCHING + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello", len(frame)
    )
    proxy = await start_proxy({"upstreams": {"r": {"url": upstream.url}}})
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET /r/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" + frame  # one write: one packet
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"\x81\x05hello"
        await wait_for(lambda: upstream.received, "the client's early frame upstream")
        assert upstream.received == [frame]
    finally:
        writer.close()

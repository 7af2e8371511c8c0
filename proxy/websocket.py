"""WebSockets through the proxy: forward the upgrade, then relay bytes (SPEC §4).

The handshake is a request like any other on its route: inbound credentials
stripped, the credential injected, a status in `retry_statuses` refreshed and
retried once (a GET has no body, so it always replays). It keeps
`Upgrade: websocket` and `Connection: upgrade` — written fresh, so a browser's
`Connection: keep-alive, Upgrade` is normalised and whatever else `Connection`
named is still dropped — and goes out through `LeanUpstreamClient.upgrade`. Any
answer but a 101 goes back as an ordinary response. After a 101 the proxy is a
byte pipe: it never parses a frame.

Taking the client's connection from aiohttp: aiohttp 3.14's server switches its
parser off for `Upgrade: websocket` (and only for that), so after our 101 its
protocol would hand further bytes to whatever `set_parser` installed — the hook
`WebSocketResponse` itself uses, and the one that delivers the bytes the client
sent before our 101 went out. We use it for those, then take the transport over
with `set_protocol`: during a graceful stop aiohttp's protocol silently drops
every byte it receives (`RequestHandler.close()` sets `_close`), which would
starve a relay that is meant to run until the drain deadline. Our protocol
forwards the transport's `connection_lost` to aiohttp's, so its bookkeeping
(open connections, shutdown) stays right. The handler stays in `Relay.run` for
the relay's life, as `WebSocketResponse`'s does, and the response is
`force_close()`d so the connection ends with the relay.

Flow control is the transports' own: when one side's write buffer passes its
high-water mark the other side's reading pauses, and resumes when it drains, so
memory stays flat whatever the volume. `timeout.read` is the idle timeout: a
relay that carried no byte either way for that long is closed (one timer,
pushed forward lazily). `Relays.cut` ends every relay at once; the shutdown
calls it at the drain deadline. One access line per relay, when it ends
(status 101, `bytes` to the client, `bytes_up` from it).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, cast

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.errors import UpstreamUnreachable
from proxy.forwarding import CLIENT_CLOSED, Progress, Route, exchange, stream_back
from proxy.headers import add_defaults, connection_named, filter_response, strip_inbound
from proxy.leanclient import LeanUpstreamClient, Upgraded
from proxy.metrics import Metrics
from proxy.routing import strip_query_params
from proxy.upstream import Body, Endpoint, UpstreamClient, UpstreamResponse

log = structlog.get_logger("authproxy.websocket")

# Written fresh on the upgrade request and on the 101 (SPEC §4's stripping exception).
UPGRADE_HEADERS: Final = (("Upgrade", "websocket"), ("Connection", "upgrade"))


def wants_websocket(request: web.BaseRequest) -> bool:
    """`GET` with `Upgrade: websocket` and `Connection: upgrade` over HTTP/1.1 — the
    requests aiohttp's server switches protocol for. Any other `Upgrade` (h2c, …)
    is forwarded as a plain request, its hop-by-hop headers stripped."""
    headers = request.headers
    upgrade = headers.get("Upgrade")
    if upgrade is None or not upgrade.isascii() or upgrade.strip().lower() != "websocket":
        return False
    if request.method != "GET" or request.version != HttpVersion11 or request.body_exists:
        return False
    return "upgrade" in connection_named(",".join(headers.getall("Connection", ())))


class Relays:
    """The open relays of one proxy, so a shutdown can cut them; their metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._open: set[Relay] = set()
        self._metrics = metrics
        metrics.live_relays = self._carried
        self.closed = False  # after `cut`: a relay that starts is cut at once

    def __len__(self) -> int:
        return len(self._open)

    def add(self, relay: Relay) -> None:
        self._open.add(relay)
        self._metrics.relay_opened(relay.upstream)
        if self.closed:
            relay.cut("shutdown")

    def discard(self, relay: Relay) -> None:
        if relay in self._open:
            self._open.discard(relay)
            self._metrics.relay_closed(relay.upstream, relay.bytes_down, relay.bytes_up)

    def _carried(self) -> list[tuple[str, int, int]]:
        return [(r.upstream, r.bytes_down, r.bytes_up) for r in self._open]

    def cut(self) -> None:
        """The drain deadline: end every relay now."""
        self.closed = True
        for relay in list(self._open):
            relay.cut("shutdown")


async def forward_websocket(
    client: UpstreamClient,
    request: web.BaseRequest,
    route: Route,
    remainder: str,
    query: str,
    request_id: str,
    progress: Progress,
    relays: Relays,
) -> web.StreamResponse:
    """The upgrade through `route`; on a 101, the relay until it ends."""
    if not isinstance(client, LeanUpstreamClient):
        raise UpstreamUnreachable("WebSockets need the lean upstream client", route.name)
    upgrading = _Upgrading(client)
    incoming = request.headers
    headers = strip_inbound(
        incoming.items(), route.drop_headers, ",".join(incoming.getall("Connection", ()))
    )
    add_defaults(headers, route.defaults)
    headers.append(("X-Request-ID", request_id))
    headers.extend(UPGRADE_HEADERS)
    client_query = query
    query = strip_query_params(query, route.strip_query)

    resp = await exchange(
        upgrading,
        request,
        route,
        remainder,
        query,
        client_query,
        headers,
        None,
        request_id,
        progress,
    )
    upgraded = upgrading.upgraded
    if upgraded is None:  # refused, or not a WebSocket server: an ordinary answer
        return await stream_back(request, resp, route, request_id, progress)

    out_headers = []
    has_id = False
    for key, lower, value in filter_response(resp.headers):
        has_id = has_id or lower == "x-request-id"
        out_headers.append((key, value))
    if not has_id:
        out_headers.append(("X-Request-ID", request_id))
    out_headers.extend(UPGRADE_HEADERS)
    out = web.StreamResponse(status=101, reason=resp.reason, headers=out_headers)
    out.force_close()
    relay = Relay(route.name, route.endpoint.read_timeout)
    try:
        upstream_said = _last(resp.headers, "upgrade")
        if upstream_said.strip().lower() != "websocket":
            raise UpstreamUnreachable(
                f"upstream {route.name} switched to {upstream_said[:40]!r}, not websocket",
                route.name,
            )
        await out.prepare(request)
        progress.status = 101
        relay.start(request, upgraded)
    except ConnectionError:
        # A side left before the relay began (the client while the upstream
        # answered, say): nothing to relay; `force_close` ends the client's side.
        upgraded.transport.abort()
        if not progress.status:  # our 101 never went out
            progress.status = CLIENT_CLOSED
        return out
    except BaseException:
        upgraded.transport.abort()
        raise
    relays.add(relay)
    try:
        await relay.run()
    finally:
        relays.discard(relay)
        progress.sent, progress.sent_up = relay.bytes_down, relay.bytes_up
    return out


class _Upgrading:
    """The client `forwarding.exchange` sends the handshake through — the same target,
    credential and error mapping as any request — asking the lean client to upgrade;
    it keeps the connection a 101 hands over."""

    __slots__ = ("_client", "upgraded")

    def __init__(self, client: LeanUpstreamClient) -> None:
        self._client = client
        self.upgraded: Upgraded | None = None

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> UpstreamResponse:
        resp = await self._client.upgrade(endpoint, target, headers)
        self.upgraded = resp.upgraded
        return resp

    async def close(self) -> None:
        """Nothing of its own: the lean client is the app's."""


def _last(headers: list[tuple[str, str]], lower_name: str) -> str:
    value = ""
    for k, v in headers:
        if k.lower() == lower_name:
            value = v
    return value


class Relay:
    """Bytes both ways between the client's transport and the upstream's."""

    __slots__ = (
        "_client",
        "_done",
        "_handler",
        "_idle",
        "_last",
        "_loop",
        "_timer",
        "_upstream",
        "bytes_down",
        "bytes_up",
        "ended",
        "upstream",
    )

    def __init__(self, upstream: str, idle_timeout: float) -> None:
        self.upstream = upstream
        self.bytes_down = 0  # to the client
        self.bytes_up = 0  # from the client
        self.ended: str | None = None  # why: client_closed, upstream_closed, idle, shutdown
        self._idle = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._handler: asyncio.BaseProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0

    def start(self, request: web.BaseRequest, upgraded: Upgraded) -> None:
        """Take both transports over. Synchronous: no byte can slip in between."""
        handler = request.protocol
        client = request.transport
        upstream = upgraded.transport
        if client is None or client.is_closing() or upstream.is_closing():
            raise ConnectionResetError("connection lost before the relay started")
        self._client, self._upstream, self._handler = client, upstream, handler
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + self._idle, self._on_timer)
        upstream.set_protocol(_UpstreamSide(self))
        if upgraded.tail:
            self.to_client(upgraded.tail)
        handler.keep_alive(False)
        # Hands over what the client sent after its request (before our 101) ...
        handler.set_parser(cast(Any, _EarlyBytes(self)))
        # ... then the transport itself: see the module docstring.
        client.set_protocol(_ClientSide(self, handler))
        upstream.resume_reading()

    async def run(self) -> None:
        """Until the relay ends; a cancelled handler cuts it."""
        try:
            await self._done
        except asyncio.CancelledError:
            self.cut("cancelled")
            raise

    # --- bytes ---------------------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        client = self._client
        if client is None or self.ended is not None:
            return
        client.write(data)
        self.bytes_down += len(data)
        self._last = self._loop.time()

    def to_upstream(self, data: bytes) -> None:
        upstream = self._upstream
        if upstream is None or self.ended is not None:
            return
        upstream.write(data)
        self.bytes_up += len(data)
        self._last = self._loop.time()

    def hold(self, side: str, held: bool) -> None:
        """The other side's write buffer passed its high-water mark (`held`) or
        drained: stop or resume reading from `side` ("client" or "upstream")."""
        transport = self._client if side == "client" else self._upstream
        if transport is None or transport.is_closing():
            return
        if held:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # --- the end -----------------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        if self.ended is not None:
            return
        deadline = self._last + self._idle
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._end("idle", abort=False)

    def side_closed(self, side: str) -> None:
        """One side closed (or broke): flush what is queued for the other, close it."""
        self._end(f"{side}_closed", abort=False)

    def cut(self, reason: str) -> None:
        """End now, discarding anything queued either way."""
        self._end(reason, abort=True)

    def _end(self, reason: str, abort: bool) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        for transport in (self._client, self._upstream):
            if transport is None:
                continue
            if abort:
                transport.abort()
                continue
            pending = transport.get_write_buffer_size()
            transport.close()  # flushes what is queued first ...
            if pending:  # ... but a peer that never reads it is cut after the idle timeout
                self._loop.call_later(self._idle, transport.abort)
        if reason in ("idle", "shutdown"):
            log.info("websocket_cut", upstream=self.upstream, reason=reason)
        if not self._done.done():
            self._done.set_result(None)


class _ClientSide(asyncio.Protocol):
    """The client's transport after the 101; its end is reported to aiohttp too."""

    __slots__ = ("_handler", "_relay")

    def __init__(self, relay: Relay, handler: asyncio.BaseProtocol) -> None:
        self._relay = relay
        self._handler = handler

    def data_received(self, data: bytes) -> None:
        self._relay.to_upstream(data)

    def eof_received(self) -> bool | None:
        return None  # close: a relay ends when either side does

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.side_closed("client")
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._relay.hold("upstream", True)

    def resume_writing(self) -> None:
        self._relay.hold("upstream", False)


class _UpstreamSide(asyncio.Protocol):
    __slots__ = ("_relay",)

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.to_client(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.side_closed("upstream")

    def pause_writing(self) -> None:
        self._relay.hold("client", True)

    def resume_writing(self) -> None:
        self._relay.hold("client", False)


class _EarlyBytes:
    """What `set_parser` wants: the client's bytes that arrived before the relay
    took the transport (and, via aiohttp's `connection_lost`, the end)."""

    __slots__ = ("_relay",)

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._relay.to_upstream(data)
        return False, b""

    def feed_eof(self) -> None:
        self._relay.side_closed("client")

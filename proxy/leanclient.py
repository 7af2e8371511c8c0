"""A lean HTTP/1.1 upstream client on asyncio + httptools.

Why it exists: on this project's 2-core reference machine aiohttp's ClientSession
spends ~130 µs of CPU per proxied request, more than the proxy's whole budget
(~110 µs). A keep-alive client that does only what a reverse proxy needs costs a
fraction of that. It implements `proxy.upstream.UpstreamClient` and is the only
forwarding client; the conformance tests (test_upstream_clients.py) compare it
with aiohttp's client as the reference.

What it does, and the choices that differ from a general-purpose client:

* One asyncio `Protocol` per connection, a fresh `httptools.HttpResponseParser`
  per response (a parser is never reused across responses: httptools cannot be
  told that a HEAD response has no body, so a HEAD response is declared complete
  at its headers and its parser dropped).
* Egress proxy (SPEC §10, `proxy.connector`): an HTTPS upstream is reached through
  the proxy's `CONNECT` and TLS inside the tunnel (the upstream's name verified and
  sent as SNI); a plain-HTTP one by absolute-form requests to the proxy, with its
  Proxy-Authorization in the head (the proxy consumes it). A 407 from the proxy is
  an `EgressError`, never handed on as the upstream's answer.
* Pooling: idle keep-alive connections per Endpoint (one per route, naming it and
  its egress proxy: never shared with another route to the same host), taken LIFO
  (the warmest socket first); at most the endpoint's `pool_size` open to it, and
  `pool_size` in total across all upstreams. At the total limit, an idle
  connection of another upstream is closed to make room, or else `send` waits
  for one to be freed, at most the endpoint's connect timeout (then
  `TimeoutError`). Idle connections the server closes are dropped at once (the
  transport reports it); idle ones older than `KEEPALIVE_IDLE` seconds are
  closed instead of reused.
* A connection goes back to the pool as soon as its response has been received
  whole, as aiohttp's does, even if the caller has not read the body yet (it is
  already buffered): the forwarder's 401 replay then reuses it. `release()` or
  `close()` on a response whose body has not all arrived closes the connection;
  it is never drained (a slow or large remainder would hold a pool slot for an
  answer nobody reads).
* Retry: a request that fails on a *reused* connection before any response byte
  arrived (the server closed the idle connection as we sent) is sent once more on
  a new connection, only when the body is replayable (bytes or None) and the
  method idempotent — aiohttp's rule (RFC 9112 §9.3.1.1).
* Request bytes, in one `transport.write` with a body up to `SMALL_BODY` (larger
  ones follow in slices that wait for the socket to drain): the request line
  (the target as given, less any `#fragment`, which is never sent), `Host`, the
  caller's headers as given, and only the framing the body needs
  (`Content-Length` for bytes when the caller gave none, `Transfer-Encoding:
  chunked` for a stream of unknown length). No User-Agent, Accept-Encoding or
  anything else is invented. Header text is encoded UTF-8 with surrogateescape,
  so values aiohttp's server decoded from raw bytes go out byte for byte. A CR or
  LF inside the request line or a header is refused (ValueError, as aiohttp
  does), so no header can be split or smuggled; other control characters are not
  looked for (0.5 µs a request): the inbound parser already refused them.
* Response headers are decoded UTF-8 with surrogateescape, exactly as aiohttp's
  client does, so both clients hand the forwarder the same strings and valid
  UTF-8 values survive the trip through aiohttp's server unchanged (latin-1 would
  double-encode them there).
* Flow control both ways: uploads wait for the transport to drain, downloads
  pause reading once more than `HIGH_WATER` bytes wait for the consumer, so
  memory stays flat for bodies of any size.
* Upgrades (`upgrade()`, for WebSockets): a 101 is a final answer only when the
  request asked for it; the connection then leaves the pool at once (its slot
  freed) and is handed over raw, reading paused, with the bytes that came after
  the 101 (`Upgraded`). The relay in `proxy.websocket` takes it from there.
* Read timeout: `read_timeout` seconds in which the upstream sent nothing while
  we waited for it (headers or the next body chunk; time spent waiting for the
  caller's upload source or for a slow consumer does not count). One
  `loop.call_at` timer per connection, pushed forward lazily, instead of a
  per-request `asyncio.wait_for` or a timer re-armed on every packet.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools  # type: ignore[import-untyped, unused-ignore]  # stubs since 0.7

from proxy.connector import (
    EgressError,
    OutboundError,
    client_certificate_demanded,
    open_tunnel,
    proxy_reply_error,
    proxy_unreachable,
)
from proxy.failures import explain
from proxy.upstream import Body, Endpoint

__all__ = ["LeanUpstreamClient", "Upgraded", "UpstreamConnectionError"]

HIGH_WATER: Final = 256 * 1024  # queued body bytes before reading pauses
LOW_WATER: Final = 64 * 1024  # ... and resumes
KEEPALIVE_IDLE: Final = 15.0  # seconds an idle connection may wait for reuse (aiohttp's default)
SMALL_BODY: Final = 64 * 1024  # bytes bodies up to this go out in the same write as the head
STREAM_SLICE: Final = 256 * 1024  # larger bytes bodies are written in slices of this size
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CRLF: Final = "\r\n"
# What an upstream's response head may hold: aiohttp's client limits for a line and
# a field, its server's for the count, and a total, so a hostile upstream costs at
# most this much memory (plus one read) before its request fails with a 502.
MAX_LINE: Final = 8190  # the status line's reason phrase
MAX_FIELD: Final = 8190  # one header line, name and value
MAX_HEADERS: Final = 100
MAX_HEAD: Final = 64 * 1024  # status lines and headers until the final ones, 1xx included


class UpstreamConnectionError(ConnectionError):
    """The exchange with the upstream broke: refused, reset, closed early, malformed."""


class MalformedResponse(UpstreamConnectionError, OutboundError):
    """The upstream's answer broke a rule or a limit; the message (ours) says which,
    and the client's 502 shows it."""


class ConnectionFailed(UpstreamConnectionError, OutboundError):
    """Refused, reset, a DNS or TLS failure, closed without an answer: the message
    (proxy.failures) says which, and the client's 502 shows it."""


class _StaleConnection(UpstreamConnectionError):
    """A reused connection died before any response byte: safe to retry elsewhere."""


@dataclass(frozen=True, slots=True)
class Upgraded:
    """A connection the upstream switched to another protocol (a `101`): no longer
    the pool's, reading paused. `tail` holds the bytes that came with the `101`."""

    transport: asyncio.Transport
    tail: bytes


class _Parser(Protocol):
    """The part of httptools.HttpResponseParser used here, typed whether or not the
    installed httptools ships stubs (0.6 does not)."""

    def feed_data(self, data: bytes) -> None: ...
    def should_keep_alive(self) -> bool: ...
    def get_http_version(self) -> str: ...
    def get_status_code(self) -> int: ...


_new_parser = cast("Callable[[_Conn], _Parser]", httptools.HttpResponseParser)
_PARSER_ERRORS = cast(
    "tuple[type[Exception], ...]", (httptools.HttpParserError, httptools.HttpParserUpgrade)
)


class _Dest:
    """Everything per Endpoint that does not change between requests."""

    __slots__ = (
        "absolute",
        "connect_timeout",
        "egress",
        "head_lines",
        "host",
        "host_line",
        "idle",
        "limit",
        "open",
        "port",
        "sni",
        "ssl",
        "tunnel",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        ssl_ctx: ssl.SSLContext | None,
        tunnel: bool = False,
    ):
        self.host = endpoint.host
        self.port = endpoint.port
        self.ssl = ssl_ctx
        self.sni = endpoint.host if ssl_ctx is not None else None
        self.host_line = f" HTTP/1.1\r\nHost: {endpoint.host_header}\r\n"
        self.head_lines = 3  # request line, Host, the blank line
        # Idle connections are this Endpoint's (one route's) alone, never shared with
        # another route to the same host: a stray answer left on a connection can then
        # never reach a request made with other credentials.
        self.idle: list[_Conn] = []
        self.limit = endpoint.pool_size or 1 << 30  # connections open at once, this route
        self.open = 0
        self.connect_timeout = endpoint.connect_timeout
        self.egress = egress = endpoint.egress
        # CONNECT (then TLS for HTTPS): always for HTTPS, for plain HTTP when asked
        # (a WebSocket upgrade: forward proxies relay upgrades only inside a tunnel).
        self.tunnel = egress is not None and (ssl_ctx is not None or tunnel)
        self.absolute = ""  # prefix of an absolute-form target (plain HTTP via a proxy)
        if egress is not None and not self.tunnel:
            self.absolute = endpoint.base
            if egress.authorization:
                self.host_line += f"Proxy-Authorization: {egress.authorization}\r\n"
                self.head_lines = 4


class _LeanResponse:
    """One response. It owns its body queue, so the connection can go back to the
    pool the moment the body has arrived, before the caller has read it."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_queued",
        "_waiter",
        "connect_seconds",
        "headers",
        "reason",
        "status",
        "upgraded",
    )

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.upgraded: Upgraded | None = None  # set on a 101 to `upgrade()`
        self._conn: _Conn | None = conn  # while the body is still arriving
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._done = False
        self.connect_seconds = 0.0  # waiting for a pooled or new connection

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> _LeanResponse:
        return self

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._exc is not None:
                raise self._exc
            conn = self._conn
            if self._done or conn is None:
                raise StopAsyncIteration
            self._waiter = waiter = conn.loop.create_future()
            await waiter
        chunk = chunks.popleft()
        self._queued -= len(chunk)
        conn = self._conn
        if conn is not None and conn.reading_paused and self._queued <= LOW_WATER:
            conn.resume()
        return chunk

    def complete_body(self) -> bytes | None:
        """The whole body if all of it has arrived already (nothing to wait for), else None."""
        if not self._done or self._exc is not None:
            return None
        return b"".join(self._chunks)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        """Body complete: the connection is already pooled. Otherwise close it."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort(None)

    close = release


class _Conn(asyncio.Protocol):
    """One upstream connection, one exchange at a time."""

    def __init__(self, client: LeanUpstreamClient, dest: _Dest, loop: asyncio.AbstractEventLoop):
        self.client = client
        self.dest = dest
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.registered = False  # counted in the client's pool
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.reading_paused = False
        self._lost: asyncio.Future[None] | None = None
        self._lost_seen = False
        # the exchange in progress
        self._parser: _Parser | None = None
        self._resp: _LeanResponse | None = None
        self._fut: asyncio.Future[_LeanResponse] | None = None  # until the final headers
        self._reason = b""
        self._head_bytes = 0  # raw bytes fed while the head is incomplete
        self._head_fields = 0  # bytes of the header fields parsed (a head in one read)
        self._framing = 0  # bytes after the head that were not body (chunking, trailers)
        self._over: str | None = None  # which head limit the upstream broke
        self._head_deadline = 0.0  # status line + headers due by then (0: not yet armed)
        self._is_head = False
        self._informational = False
        self._complete = False
        self._keep_alive = False
        self._got_bytes = False
        self._request_done = True
        self._upgrade = False  # this exchange may switch protocols
        self._switching = False  # ... and the upstream said 101
        self._writer: asyncio.Task[None] | None = None
        self._awaiting_source = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # read timeout: one timer, pushed forward lazily from `_last`
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._read_timeout = 0.0  # the current request's

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_seen = True
        self._mark_closed()
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_exception(UpstreamConnectionError("connection lost while sending"))
        resp = self._resp
        if resp is not None:
            if self._fut is None and self._eof_delimited():
                # The body ran to the connection's end: that *is* its end.
                self._resp = self._parser = None
                resp._conn = None
                resp._done = True
                resp._wake()
            elif (demanded := client_certificate_demanded(exc, self.dest.host)) is not None:
                self._error(demanded)
            elif not self._got_bytes and self.reused:
                self._error(_StaleConnection("reused connection closed before any response"))
            else:
                dest = self.dest
                where = "before its answer" if self._fut is not None else "mid-body"
                why = explain(exc, dest.host, dest.port) if exc is not None else None
                self._error(
                    ConnectionFailed(
                        f"{why} {where}"
                        if why
                        else f"{dest.host}:{dest.port} closed the connection {where}"
                    )
                )
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what the EOF meant

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection is unusable
            self.abort(None)
            return
        self._got_bytes = True
        self._last = self.loop.time()
        in_head = self._fut is not None
        try:
            parser.feed_data(data)
        except _PARSER_ERRORS as exc:
            if self._switching:
                self._switch(data, exc)
                return
            if self._complete:  # garbage after a complete response
                self._keep_alive = False
            else:
                self._error(MalformedResponse(f"malformed answer ({exc})"))
                return
        if in_head:
            if self._over is None and self._fut is not None:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._over = f"response head over {MAX_HEAD} bytes"
            if self._over is not None:
                self._error(MalformedResponse(f"malformed answer ({self._over})"))
                return
        else:
            # Bytes that are not body: chunk framing, extensions, trailers (which
            # httptools buffers whole before it reports them) — held to the head's limit.
            self._framing += len(data)
            if self._framing > MAX_HEAD:
                self._error(MalformedResponse(f"malformed answer (trailers over {MAX_HEAD} bytes)"))
                return
        if self._complete:
            self._finish()

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: the server is confused
            self._keep_alive = False

    def on_status(self, status: bytes) -> None:
        if len(self._reason) + len(status) > MAX_LINE:
            self._over = f"status line over {MAX_LINE} bytes"
            return
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self._resp
        if self._fut is None or resp is None:  # trailers, or after a HEAD response
            return
        # Nothing else here: the few facts the headers decide that httptools does not
        # report (framing, Connection) are looked up in the rare cases that need them.
        if len(name) + len(value) > MAX_FIELD:
            self._over = f"a header line over {MAX_FIELD} bytes"
            return
        if len(resp.headers) >= MAX_HEADERS:
            self._over = f"more than {MAX_HEADERS} headers"
            return
        self._head_fields += len(name) + len(value) + 4
        if self._head_fields > MAX_HEAD:
            self._over = f"response head over {MAX_HEAD} bytes"
            return
        resp.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        resp, fut, parser = self._resp, self._fut, self._parser
        if self._over is not None:  # a limit broken: data_received fails the exchange
            return
        if resp is None or fut is None or parser is None or self._complete:
            self._keep_alive = False
            return
        status = parser.get_status_code()
        if status < 200:
            if status == 101 and self._upgrade:  # handed over in _switch
                resp.status = status
                resp.reason = self._reason.decode("utf-8", "surrogateescape")
                self._switching = True
                return
            if status == 101:  # we did not ask to upgrade: nothing sane can follow
                self._keep_alive = False
                self._complete = True
                self._fut = None
                if not fut.done():
                    fut.set_exception(MalformedResponse("unexpected 101 from upstream"))
                return
            self._informational = True  # 100 Continue, 103 Early Hints: skipped
            return
        resp.status = status
        resp.reason = self._reason.decode("utf-8", "surrogateescape")
        self._fut = None
        if self._is_head:
            # No body whatever the headers say; llhttp would wait for one. A declared
            # length leaves doubt (a server may send that body anyway, late, where the
            # next response belongs): such a connection is not reused.
            if _declares_body(resp.headers):
                self._keep_alive = False
            elif parser.should_keep_alive():
                self._keep_alive = True
            else:  # llhttp also says no for a body-less HEAD answer without length
                conn = _header(resp.headers, "connection").lower()
                if parser.get_http_version() == "1.1":
                    self._keep_alive = "close" not in conn
                else:
                    self._keep_alive = "keep-alive" in conn
            self._complete = True
            resp._done = True
        else:
            self._keep_alive = parser.should_keep_alive()
        if not fut.done():
            fut.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        if self._complete or resp is None:  # a body after a HEAD answer, or after the end
            self._keep_alive = False
            return
        self._framing -= len(body) + 32  # the body, and room for its chunk's size line
        resp._chunks.append(body)
        resp._queued += len(body)
        resp._wake()
        if resp._queued > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            resp = self._resp
            if resp is not None:
                resp.headers = []
            self._reason = b""
            return
        if self._complete:
            return
        self._complete = True
        resp = self._resp
        if resp is not None:
            resp._done = True

    # --- the exchange ----------------------------------------------------------------

    def start(
        self, head: bytes, method: str, read_timeout: float, upgrade: bool = False
    ) -> asyncio.Future[_LeanResponse]:
        """Write the request head (and a small body already joined to it); the
        returned future gets the response once its final headers have arrived
        (with `upgrade`, a 101 counts as final: see `_switch`)."""
        transport = self.transport
        if transport is None or self.closed:
            raise UpstreamConnectionError("connection closed")
        self._parser = _new_parser(self)
        self._resp = _LeanResponse(self)
        self._fut = fut = self.loop.create_future()
        self._reason = b""
        self._head_bytes = self._head_fields = self._framing = 0
        self._over = None
        self._is_head = method == "HEAD"
        self._informational = self._complete = self._keep_alive = self._got_bytes = False
        self._request_done = True
        self._upgrade = upgrade
        self._switching = False
        transport.write(head)
        # The timeout is the request's: connections are shared by every Endpoint with
        # the same pool key, whose read timeouts may differ.
        self._read_timeout = read_timeout
        self._last = now = self.loop.time()
        # Once the request is sent, its answer's head is due within read_timeout in
        # all, however the upstream trickles it (or floods us with 1xx answers).
        self._head_deadline = now + read_timeout
        timer = self._timer
        if timer is None:
            self._timer = self.loop.call_at(now + read_timeout, self._on_timer)
        elif timer.when() > now + read_timeout:  # left by a request with a longer timeout
            timer.cancel()
            self._timer = self.loop.call_at(now + read_timeout, self._on_timer)
        return fut

    def stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Send the rest of the body from a task, so the answer can be read meanwhile."""
        self._request_done = False
        self._head_deadline = 0.0  # armed when the body has gone
        self._writer = self.loop.create_task(self._write_body(body, chunked))

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        loop = self.loop
        try:
            while True:
                self._awaiting_source = True
                try:
                    chunk = await anext(body)
                except StopAsyncIteration:
                    break
                finally:
                    self._awaiting_source = False
                if not chunk:
                    continue  # an empty chunk would end a chunked body
                if self.closed:
                    return
                if chunked:
                    size = len(chunk)
                    if size <= SMALL_BODY:
                        transport.write(b"%x\r\n%b\r\n" % (size, chunk))
                    else:
                        transport.write(b"%x\r\n" % size)
                        transport.write(chunk)
                        transport.write(b"\r\n")
                else:
                    transport.write(chunk)
                self._last = loop.time()
                if self._write_paused:
                    self._drain = drain = loop.create_future()
                    await drain
                    self._last = loop.time()
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._writer = None
            if not self.closed:
                self._error(UpstreamConnectionError(f"request body failed ({type(exc).__name__})"))
            return
        self._writer = None
        self._request_done = True
        self._last = loop.time()
        self._head_deadline = self._last + self._read_timeout

    def _switch(self, data: bytes, exc: Exception) -> None:
        """The upstream said 101: the rest of the connection is the new protocol's.
        Leave the pool (the slot is freed at once), pause reading, hand it over."""
        fut, resp, transport = self._fut, self._resp, self.transport
        if not isinstance(exc, httptools.HttpParserUpgrade) or fut is None or resp is None:
            # llhttp gives no offset for a 101 without `Connection: upgrade`.
            self._error(UpstreamConnectionError("malformed 101: no Connection: upgrade"))
            return
        assert transport is not None
        offset = cast(int, exc.args[0])
        self._fut = self._resp = self._parser = None
        self.transport = None  # no longer ours to close
        self._mark_closed()
        transport.pause_reading()
        resp._conn = None
        resp._done = True
        resp.upgraded = Upgraded(transport, data[offset:])
        if not fut.done():
            fut.set_result(resp)

    def _eof_delimited(self) -> bool:
        """Does the response body end where the connection does (no length, not chunked)?"""
        resp = self._resp
        if resp is None or self._complete or self._is_head:
            return False
        if _header(resp.headers, "content-length"):
            return False
        return not _header(resp.headers, "transfer-encoding").lower().rstrip().endswith("chunked")

    def _finish(self) -> None:
        """The response has arrived whole: hand the connection back or close it."""
        if self._fut is not None:  # a message ended but no final headers came
            self._error(UpstreamConnectionError("response ended before its final headers"))
            return
        resp = self._resp
        self._resp = None
        self._parser = None
        if resp is not None:
            resp._conn = None
            resp._wake()
        if self._keep_alive and self._request_done and not self.closed:
            if self.reading_paused and self.transport is not None:
                self.reading_paused = False
                self.transport.resume_reading()
            self.client._put_idle(self)
        elif self._request_done:
            self.close_clean()
        else:
            self.abort(None)  # the server answered before taking the whole body

    def resume(self) -> None:
        """The consumer caught up: read again, and start the silence clock anew."""
        self.reading_paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._last = now = self.loop.time()
        if self._timer is None and self._resp is not None:
            self._timer = self.loop.call_at(now + self._read_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._resp is None or self.closed or self.reading_paused:
            return  # idle, gone, or our consumer is the slow one (re-armed on resume)
        now = self.loop.time()
        if self._awaiting_source:
            self._last = now  # waiting for the caller's upload, not for the upstream
        deadline = self._last + self._read_timeout
        head_due = self._head_deadline if self._fut is not None else 0.0
        if head_due and head_due < deadline:
            deadline = head_due
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        if deadline == head_due:
            self._error(
                TimeoutError(f"upstream sent no complete response head in {self._read_timeout:g}s")
            )
            return
        self._error(TimeoutError(f"upstream sent nothing for {self._read_timeout:g}s"))

    def _error(self, exc: BaseException) -> None:
        """The exchange failed: tell whoever waits (send or the body reader), then close."""
        fut = self._fut
        resp = self._resp
        self._fut = None
        self._resp = None
        self._parser = None
        if fut is not None:
            if not fut.done():
                fut.set_exception(exc)
        elif resp is not None and not resp._done:
            resp._exc = exc
            resp._conn = None
            resp._wake()
        self.abort(None)

    # --- closing -----------------------------------------------------------------------

    def abort(self, exc: BaseException | None) -> None:
        """Close now, discarding unsent data; fail the exchange in progress with `exc`."""
        if exc is not None and (self._fut is not None or self._resp is not None):
            self._error(exc)  # calls abort(None) again
            return
        self._resp = None
        self._parser = None
        self._fut = None
        self._mark_closed()
        if self.transport is not None:
            self.transport.abort()

    def close_clean(self) -> None:
        """Close after a complete exchange (flushes what is buffered)."""
        self._mark_closed()
        if self.transport is not None:
            self.transport.close()

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.cancel()
        if self.registered:
            self.client._forget(self)

    def wait_lost(self) -> asyncio.Future[None] | None:
        """A future that is done once asyncio has closed the socket (None if it has)."""
        if self._lost_seen or self.transport is None:
            return None
        if self._lost is None:
            self._lost = self.loop.create_future()
        return self._lost


class LeanUpstreamClient:
    """The `UpstreamClient` on asyncio + httptools; see the module docstring."""

    def __init__(self, pool_size: int) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._limit = pool_size
        self._open = 0  # connections open or being opened, all upstreams
        self._conns: set[_Conn] = set()
        self._pools: list[list[_Conn]] = []  # every route's idle list
        self._by_value: dict[Endpoint, _Dest] = {}  # equal Endpoints share one pool
        self._dests: dict[int, tuple[Endpoint, _Dest]] = {}
        self._tunnel_dests: dict[int, tuple[Endpoint, _Dest]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._insecure: ssl.SSLContext | None = None
        self._default_ssl: ssl.SSLContext | None = None

    # --- per-endpoint preparation ------------------------------------------------------

    def _dest(self, endpoint: Endpoint) -> _Dest:
        entry = self._dests.get(id(endpoint))
        if entry is not None and entry[0] is endpoint:
            return entry[1]
        dest = self._by_value.get(endpoint)
        if dest is None:
            dest = self._by_value[endpoint] = _Dest(endpoint, self._ssl_context(endpoint))
            self._pools.append(dest.idle)
        # Keyed by identity (the entry keeps the Endpoint alive, so its id stays its
        # own): hashing a frozen dataclass on every request costs more than the rest.
        self._dests[id(endpoint)] = (endpoint, dest)
        return dest

    def _tunnel_dest(self, endpoint: Endpoint) -> _Dest:
        """A plain-HTTP endpoint reached through a CONNECT tunnel (for upgrades)."""
        entry = self._tunnel_dests.get(id(endpoint))
        if entry is not None and entry[0] is endpoint:
            return entry[1]
        dest = _Dest(endpoint, None, tunnel=True)
        self._pools.append(dest.idle)
        self._tunnel_dests[id(endpoint)] = (endpoint, dest)
        return dest

    def _ssl_context(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        """One context per kind, made once: asyncio would load the CA store per connection."""
        if endpoint.scheme != "https":
            return None
        if isinstance(endpoint.ssl, ssl.SSLContext):
            return endpoint.ssl
        if endpoint.ssl:
            if self._default_ssl is None:
                self._default_ssl = ssl.create_default_context()
            return self._default_ssl
        if self._insecure is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._insecure = ctx
        return self._insecure

    # --- sending ---------------------------------------------------------------------------

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> _LeanResponse:
        if self._closed:
            raise UpstreamConnectionError("client is closed")
        dest = self._dest(endpoint)
        if "#" in target:  # a fragment is never sent (aiohttp's URL drops it too)
            target = target.partition("#")[0]
        if dest.absolute:  # to an egress proxy: the absolute form names the upstream
            target = dest.absolute + target
        stream: AsyncIterator[bytes] | None = None
        large: bytes | None = None  # a bytes body too big to join to the head
        chunked = False
        if body is None:
            head = _encode_head(method, target, dest, headers, "")
        elif isinstance(body, bytes):
            extra = ""
            if not _has_header(headers, "content-length"):
                extra = f"Content-Length: {len(body)}\r\n"
            head = _encode_head(method, target, dest, headers, extra)
            if len(body) <= SMALL_BODY:
                head += body
            else:
                large = body
        else:
            stream = body
            extra = ""
            if _has_header(headers, "transfer-encoding"):
                chunked = True
            elif not _has_header(headers, "content-length"):
                chunked = True
                extra = "Transfer-Encoding: chunked\r\n"
            head = _encode_head(method, target, dest, headers, extra)
        fresh = False
        while True:
            started = time.perf_counter()
            conn = None if fresh else self._take_idle(dest)
            if conn is None:
                conn = await self._acquire(dest, fresh)
            connect_seconds = time.perf_counter() - started
            fut = conn.start(head, method, endpoint.read_timeout)
            if large is not None:
                conn.stream(_slices(large), False)
            elif stream is not None:
                conn.stream(stream, chunked)
            try:
                resp = await fut
                if resp.status == 407 and dest.absolute:
                    resp.close()
                    assert dest.egress is not None
                    raise proxy_reply_error(dest.egress, 407, resp.reason, endpoint.host_header)
            except _StaleConnection:
                # Once, on a new connection, and only what can be sent again safely.
                if (
                    fresh
                    or method not in IDEMPOTENT
                    or not (body is None or isinstance(body, bytes))
                ):
                    raise
                fresh = True
                continue
            except asyncio.CancelledError:
                conn.abort(None)
                raise
            resp.connect_seconds = connect_seconds
            return resp

    async def upgrade(
        self, endpoint: Endpoint, target: str, headers: list[tuple[str, str]]
    ) -> _LeanResponse:
        """A GET that asks to switch protocols (`headers` carry `Upgrade` and
        `Connection: upgrade`). On a 101 the response's `upgraded` holds the raw
        connection, out of the pool and no longer counted against `pool_size`;
        any other answer is an ordinary response."""
        if self._closed:
            raise UpstreamConnectionError("client is closed")
        dest = self._dest(endpoint)
        if dest.absolute:  # plain HTTP via an egress proxy: upgrade inside a CONNECT tunnel
            dest = self._tunnel_dest(endpoint)
        head = _encode_head("GET", target.partition("#")[0], dest, headers, "")
        fresh = False
        while True:
            conn = None if fresh else self._take_idle(dest)
            if conn is None:
                conn = await self._acquire(dest, fresh)
            fut = conn.start(head, "GET", endpoint.read_timeout, upgrade=True)
            try:
                return await fut
            except _StaleConnection:
                if fresh:
                    raise
                fresh = True  # once, on a new connection, as `send` does
            except asyncio.CancelledError:
                conn.abort(None)
                raise

    # --- the pool ------------------------------------------------------------------------------

    def _take_idle(self, dest: _Dest) -> _Conn | None:
        idle = dest.idle
        if not idle:
            return None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > KEEPALIVE_IDLE or conn.closed:
                conn.close_clean()
                continue
            return conn
        return None

    async def _acquire(self, dest: _Dest, fresh: bool) -> _Conn:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = 0.0
        while True:
            if self._closed:
                raise UpstreamConnectionError("client is closed")
            if not fresh:
                conn = self._take_idle(dest)
                if conn is not None:
                    return conn
            if dest.open < dest.limit:
                if self._open < self._limit:
                    return await self._connect(dest, loop)
                if self._evict_idle():
                    continue
            elif fresh and dest.idle:  # a retry needs a new connection: make room
                dest.idle[0].close_clean()
                continue
            if not deadline:
                deadline = loop.time() + dest.connect_timeout
            await self._wait_for_slot(loop, deadline)

    async def _connect(self, dest: _Dest, loop: asyncio.AbstractEventLoop) -> _Conn:
        self._open += 1
        dest.open += 1
        conn = _Conn(self, dest, loop)
        try:
            async with asyncio.timeout(dest.connect_timeout):
                if dest.tunnel:
                    await _connect_tunnel(loop, conn, dest)
                elif dest.egress is not None:  # plain HTTP: absolute-form to the proxy
                    proxy = dest.egress
                    await loop.create_connection(lambda: conn, proxy.host, proxy.port)
                else:
                    await loop.create_connection(
                        lambda: conn, dest.host, dest.port, ssl=dest.ssl, server_hostname=dest.sni
                    )
        except BaseException as exc:
            self._open -= 1
            dest.open -= 1
            self._wake_one()
            if conn.transport is not None:
                conn.transport.abort()
            if isinstance(exc, EgressError):
                raise
            if isinstance(exc, OSError) and dest.egress is not None and not dest.tunnel:
                raise proxy_unreachable(dest.egress, exc.strerror or type(exc).__name__) from None
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"connect to {dest.host}:{dest.port} timed out") from None
            if isinstance(exc, OSError):
                why = explain(exc, dest.host, dest.port)
                if why is None:
                    reason = exc.strerror or type(exc).__name__
                    why = f"cannot connect to {dest.host}:{dest.port} ({reason})"
                raise ConnectionFailed(why) from None
            raise
        if conn.closed or self._closed or conn.transport is None:
            # Closed while the handshake finished (server hung up, or client.close()).
            self._open -= 1
            dest.open -= 1
            self._wake_one()
            conn.abort(None)
            raise ConnectionFailed(f"{dest.host}:{dest.port} closed the connection at once")
        conn.registered = True
        self._conns.add(conn)
        return conn

    def _evict_idle(self) -> bool:
        """At the limit: close the longest-idle connection of any upstream to make room."""
        oldest: _Conn | None = None
        for idle in self._pools:
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        oldest.close_clean()
        return True

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:  # expired or cancelled: woken ones were popped
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        """A slot or an idle connection came free: every waiter looks again (limits are
        per route as well as in all, so the one woken might not be able to use it)."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _put_idle(self, conn: _Conn) -> None:
        loop = self._loop
        assert loop is not None
        conn.reused = True
        conn.idle_since = loop.time()
        conn.dest.idle.append(conn)
        if self._waiters:
            self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        """A registered connection closed: free its slot."""
        conn.registered = False
        self._conns.discard(conn)
        self._open -= 1
        conn.dest.open -= 1
        idle = conn.dest.idle
        if idle and conn in idle:
            idle.remove(conn)
        if self._waiters:
            self._wake_one()

    async def close(self) -> None:
        """Close every connection, idle or in use, and fail whoever waits for one."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectionError("client is closed"))
        pending: list[asyncio.Future[None]] = []
        for conn in list(self._conns):
            lost = conn.wait_lost()
            if lost is not None:
                pending.append(lost)
            conn.abort(UpstreamConnectionError("client is closed"))
        if pending:
            await asyncio.wait(pending, timeout=1.0)


async def _connect_tunnel(loop: asyncio.AbstractEventLoop, conn: _Conn, dest: _Dest) -> None:
    """CONNECT through the egress proxy, then TLS to the upstream inside the tunnel."""
    assert dest.egress is not None
    raw = await open_tunnel(loop, dest.egress, dest.host, dest.port)
    if dest.ssl is None:  # plain HTTP in the tunnel
        raw.set_protocol(conn)
        conn.connection_made(raw)
        return
    try:
        tls = await loop.start_tls(raw, conn, dest.ssl, server_hostname=dest.sni)
    except BaseException:
        raw.abort()
        raise
    if tls is None:  # only when the loop cannot do TLS at all
        raw.abort()
        raise UpstreamConnectionError("this event loop cannot start TLS in a tunnel")
    conn.connection_made(tls)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no pooled connection free within timeout.connect"))


def _header(headers: list[tuple[str, str]], lower_name: str) -> str:
    """The last value of a header (rarely needed: only off the hot path)."""
    value = ""
    for k, v in headers:
        if k.lower() == lower_name:
            value = v
    return value


def _declares_body(headers: list[tuple[str, str]]) -> bool:
    """A non-zero Content-Length or any Transfer-Encoding (only looked at for HEAD)."""
    for k, v in headers:
        lower = k.lower()
        if lower == "transfer-encoding" or (lower == "content-length" and v.strip() != "0"):
            return True
    return False


def _has_header(headers: list[tuple[str, str]], lower_name: str) -> bool:
    size = len(lower_name)
    return any(len(k) == size and k.lower() == lower_name for k, _ in headers)


def _encode_head(
    method: str, target: str, dest: _Dest, headers: list[tuple[str, str]], extra: str
) -> bytes:
    """The request head in one string, checked for header splitting by counting its
    line breaks (two C-level scans) instead of looking at every header in Python."""
    if headers:
        text = (
            f"{method} {target}{dest.host_line}{CRLF.join(map(': '.join, headers))}\r\n{extra}\r\n"
        )
        lines = len(headers) + dest.head_lines
    else:
        text = f"{method} {target}{dest.host_line}{extra}\r\n"
        lines = dest.head_lines
    if extra:
        lines += 1
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("Forbidden control character (CR or LF) in request head: injection?")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates not from surrogateescape (aiohttp drops them)
        return text.encode("utf-8", "replace")


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    """A large bytes body as a stream, so its writes wait for the socket to drain."""
    view = memoryview(body)
    for start in range(0, len(body), STREAM_SLICE):
        yield cast(bytes, view[start : start + STREAM_SLICE])


if TYPE_CHECKING:  # the structural check that the client fits the interface
    from proxy.upstream import UpstreamClient, UpstreamResponse

    _client: UpstreamClient = LeanUpstreamClient(1)
    _response: UpstreamResponse = cast(_LeanResponse, None)

"""The request path: strip, inject, send, the one retry, stream back.

Everything a route needs per request is computed once in `build_route`;
`forward` does only the per-request work.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from proxy.auth import Authenticator, Credential, build_authenticator
from proxy.browsers import with_cors
from proxy.config import Config, Upstream
from proxy.connector import OutboundError
from proxy.errors import (
    BadRequest,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import add_defaults, filter_response, inbound_drop_set, strip_inbound
from proxy.logs import ACCESS, REDACTOR, fingerprint
from proxy.routing import (
    Target,
    build_upstream_target,
    redact_query,
    rewrite_location,
    strip_query_params,
)
from proxy.tokens import TokenStore
from proxy.upstream import Body, Endpoint, UpstreamClient, UpstreamResponse

log = structlog.get_logger("authproxy.forwarding")

# Where the guards leave a listed browser origin, for the response's CORS headers.
CORS_ORIGIN = web.RequestKey("cors_origin", str)

# Bodies up to this size that arrived whole with the headers go out in the same write.
SMALL_BODY = 64 * 1024
NO_BODY = frozenset({204, 304})


@dataclass(slots=True)
class Usage:
    """Requests using one token manager right now; shared by the routes of successive
    configurations that kept it, so a replaced one is logged out only once idle."""

    in_flight: int = 0


@dataclass(slots=True)
class Route:
    name: str
    prefix: str
    target: Target
    endpoint: Endpoint
    auth: Authenticator
    drop_headers: frozenset[str]
    strip_query: frozenset[str]
    defaults: tuple[tuple[str, str], ...]
    allow_methods: frozenset[str] | None
    retry_statuses: frozenset[int]
    max_replay_body: int
    url: str
    body_timeout: float = 60.0  # nginx's client_body_timeout: between reads
    send_timeout: float = 60.0  # nginx's send_timeout: between writes the client takes
    usage: Usage = field(default_factory=Usage)
    tls: tuple[object, ...] = ()  # TLS settings + CA file digest the endpoint was built from


def ssl_context_for(upstream: Upstream) -> ssl.SSLContext | bool:
    """Trust and client certificate, shared by the upstream and its token endpoints."""
    return upstream.tls.context()


def _tls_key(upstream: Upstream) -> tuple[object, ...]:
    """The TLS settings and the contents of the files they name: equal keys, one context
    (a rotated CA or client certificate makes a new one on reload)."""
    tls = upstream.tls
    digests: list[bytes | None] = []
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name, None)
        try:
            digests.append(hashlib.sha256(Path(path).read_bytes()).digest() if path else None)
        except OSError:
            digests.append(None)
    return (tls, *digests)  # pydantic equality compares secret values too


def build_route(
    name: str,
    upstream: Upstream,
    config: Config,
    session: aiohttp.ClientSession,
    store: TokenStore | None = None,
    previous: Route | None = None,
    keep_token: bool = False,
    endpoints: dict[Endpoint, Endpoint] | None = None,
) -> Route:
    """`previous`: this upstream's route in the configuration being replaced (a reload);
    its TLS context is reused when unchanged, and with `keep_token` its token manager
    too (the caller has compared the auth identities). `endpoints` interns Endpoints
    across reloads: the upstream client keeps its pools and per-Endpoint state by them."""
    tls = _tls_key(upstream)
    if previous is not None and previous.tls == tls:
        ssl_ctx = previous.endpoint.ssl  # a context loads its CA file once
    else:
        ssl_ctx = ssl_context_for(upstream)
    kept = previous.auth if previous is not None and keep_token else None
    egress = config.egress_for(name)
    auth = build_authenticator(
        name, upstream, session, ssl_ctx, config.secrets, store, kept, egress=egress
    )
    strip_query = set(upstream.strip_query)
    if auth.injected_query:
        strip_query.add(auth.injected_query)
    target = Target.from_url(upstream.url)
    endpoint = Endpoint(
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        host_header=target.origin.split("://", 1)[1],
        base=target.origin,
        ssl=ssl_ctx,
        connect_timeout=upstream.timeout.connect,
        read_timeout=upstream.timeout.read,
        egress=egress.proxy_for(target.scheme, target.host),
        pool_size=upstream.pool_size or math.ceil(config.pool_size / len(config.upstreams)),
        route=name,
    )
    if endpoints is not None:
        endpoint = endpoints.setdefault(endpoint, endpoint)
    return Route(
        name=name,
        prefix=config.prefix_of(name),
        target=target,
        endpoint=endpoint,
        auth=auth,
        drop_headers=inbound_drop_set(auth.injected_header, upstream.strip_headers),
        strip_query=frozenset(strip_query),
        defaults=tuple(upstream.headers.items()),
        allow_methods=frozenset(upstream.allow_methods) if upstream.allow_methods else None,
        retry_statuses=frozenset(upstream.retry_statuses),
        max_replay_body=upstream.max_replay_body,
        body_timeout=upstream.timeout.body,
        send_timeout=upstream.timeout.send,
        url=upstream.url,
        usage=previous.usage if kept is not None and previous is not None else Usage(),
        tls=tls,
    )


def new_token_session() -> aiohttp.ClientSession:
    """The session token, refresh and logout requests go through (not the hot path)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


# The access line's status for a request cut before any answer went out: nginx's 499.
CLIENT_CLOSED = 499


@dataclass(slots=True)
class Progress:
    """What the client has been sent so far, kept up to date while a response
    streams, so the access line says what the client really received even when the
    request is cut (client gone, drain deadline) halfway through."""

    status: int = 0  # 0 until the response's head went out
    sent: int = 0  # body bytes written to the client
    aborted: bool = False  # the response was cut mid-body
    retried: bool = False
    upstream_seconds: float | None = None  # until the (last) upstream response's headers
    sent_up: int | None = None  # a WebSocket relay's bytes from the client


class _ClientBody:
    """The client's request body, each read bounded by `timeout.body` (nginx's
    client_body_timeout), so a stalled upload cannot hold a pool slot for ever.
    `stalled` tells the forwarder, whatever error the upstream client made of it."""

    __slots__ = ("content", "stalled", "timeout")

    def __init__(self, request: web.BaseRequest, timeout: float) -> None:
        self.content = request.content
        self.timeout = timeout
        self.stalled = False

    async def read(self) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.content.readany()
        except TimeoutError:
            self.stalled = True
            raise RequestTimeout(
                f"the request body stalled for more than {self.timeout:g}s (timeout.body)"
            ) from None

    async def stream(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


async def _read_replayable(source: _ClientBody, length: int | None, limit: int) -> Body:
    """Keep bodies up to `limit` bytes so a 401 can be replayed; stream larger ones."""
    if length is not None and length > limit:
        return source.stream()
    buffered = bytearray()
    while len(buffered) <= limit:
        chunk = await source.read()
        if not chunk:
            if length is not None and len(buffered) < length:
                raise BadRequest("request body ended before its Content-Length")
            return bytes(buffered)
        buffered += chunk
    return _prepend(bytes(buffered), source.stream())


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest:
        yield chunk


async def exchange(
    client: UpstreamClient,
    request: web.BaseRequest,
    route: Route,
    remainder: str,
    query: str,
    client_query: str,
    headers: list[tuple[str, str]],
    body: Body,
    request_id: str,
    progress: Progress,
) -> UpstreamResponse:
    """Send with the current credential; on a status in `retry_statuses`, refresh it
    (shared by all who saw the same token rejected) and send once more when the body
    can be replayed (SPEC §3 promise 3). The one driver for plain requests and
    WebSocket handshakes alike; at debug level it also writes `request_debug`."""
    cred = await route.auth.credential()
    sent_at = time.perf_counter()
    resp = await _send(client, request.method, route, remainder, query, headers, body, cred)
    replay: str | None = None
    if resp.status in route.retry_statuses and route.auth.refreshable:
        if body is None or isinstance(body, bytes):
            resp.release()
            replay = f"status {resp.status}"
            cred = await route.auth.rejected(cred, resp.status)
            sent_at = time.perf_counter()
            resp = await _send(client, request.method, route, remainder, query, headers, body, cred)
            progress.retried = True
        else:
            route.auth.invalidate(cred)
    progress.upstream_seconds = time.perf_counter() - sent_at
    if ACCESS.debug:
        _log_debug(
            request,
            route,
            remainder,
            query,
            client_query,
            headers,
            cred,
            resp,
            replay,
            request_id,
            progress.upstream_seconds,
        )
    return resp


async def forward(
    client: UpstreamClient,
    request: web.BaseRequest,
    route: Route,
    remainder: str,
    query: str,
    request_id: str,
    progress: Progress,
) -> web.StreamResponse:
    incoming = request.headers
    connection = ",".join(incoming.getall("Connection")) if "Connection" in incoming else None
    headers = strip_inbound(incoming.items(), route.drop_headers, connection)
    add_defaults(headers, route.defaults)
    headers.append(("X-Request-ID", request_id))
    client_query = query
    query = strip_query_params(query, route.strip_query)

    body: Body = None
    source: _ClientBody | None = None
    if request.body_exists:
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # The guards have passed: now invite the body (aiohttp's web.Application
            # would do this for us; the low-level server leaves it to the handler).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        source = _ClientBody(request, route.body_timeout)
        if route.auth.refreshable:
            body = await _read_replayable(source, request.content_length, route.max_replay_body)
        else:
            body = source.stream()
    try:
        resp = await exchange(
            client,
            request,
            route,
            remainder,
            query,
            client_query,
            headers,
            body,
            request_id,
            progress,
        )
    except ProxyError:
        if source is not None and source.stalled:  # the client's fault, not the upstream's
            raise RequestTimeout(
                f"the request body stalled for more than {route.body_timeout:g}s (timeout.body)",
                route.name,
            ) from None
        raise
    return await stream_back(request, resp, route, request_id, progress)


def _log_debug(
    request: web.BaseRequest,
    route: Route,
    remainder: str,
    query: str,
    client_query: str,
    headers: list[tuple[str, str]],
    cred: Credential,
    resp: UpstreamResponse,
    replay: str | None,
    request_id: str,
    first_byte_seconds: float,
) -> None:
    """`request_debug` (SPEC §5, log.level debug only): what was sent where, with
    which credential (a fingerprint, never the value), and how long it took."""
    kept_headers = {k.lower() for k, _ in headers}
    stripped = sorted({k for k in request.headers if k.lower() not in kept_headers} - {"Host"})
    kept_params = {p.partition("=")[0] for p in query.split("&")} if query else set()
    stripped += sorted(
        {f"?{p.partition('=')[0]}" for p in client_query.split("&") if p}
        - {f"?{k}" for k in kept_params}
    )
    if cred.query:
        query = f"{query}&{cred.query}" if query else cred.query
    target = build_upstream_target(route.target.base_path, remainder, query)
    value = cred.query or "\n".join(v for _, v in cred.headers)
    token = cred.token
    now = time.monotonic()
    connect = getattr(resp, "connect_seconds", None)
    log.debug(
        "request_debug",
        request_id=request_id,
        route=route.name,
        upstream_url=redact_query(route.endpoint.base + target),
        auth=route.auth.type_name,
        credential=fingerprint(value) if value else None,
        token_age_s=None if token is None else round(now - token.obtained_at, 3),
        token_ttl_s=(
            None if token is None or token.expires_at is None else round(token.expires_at - now, 3)
        ),
        replay=replay,
        connect_ms=None if connect is None else round(connect * 1000, 3),
        first_byte_ms=round(first_byte_seconds * 1000, 3),
        status=resp.status,
        stripped=stripped,
    )


async def _send(
    client: UpstreamClient,
    method: str,
    route: Route,
    remainder: str,
    query: str,
    headers: list[tuple[str, str]],
    body: Body,
    cred: Credential,
) -> UpstreamResponse:
    if cred.query:
        query = f"{query}&{cred.query}" if query else cred.query
    target = build_upstream_target(route.target.base_path, remainder, query)
    if cred.headers:
        headers = headers + list(cred.headers)
    try:
        return await client.send(route.endpoint, method, target, headers, body)
    except TimeoutError:
        raise UpstreamTimeout(f"upstream {route.name} did not answer in time", route.name) from None
    except OSError as exc:  # ConnectionError and friends
        if isinstance(exc, OutboundError):  # its message is written for a person
            message = f"upstream {route.name}: {exc}"
        else:
            message = f"upstream {route.name} unreachable ({type(exc).__name__})"
        log.warning("upstream_unreachable", upstream=route.name, error=message)
        raise UpstreamUnreachable(message, route.name) from None


async def stream_back(
    request: web.BaseRequest,
    resp: UpstreamResponse,
    route: Route,
    request_id: str,
    progress: Progress,
) -> web.StreamResponse:
    out_headers: list[tuple[str, str]] = []
    length = -1
    has_id = has_type = False
    for key, lower, value in filter_response(resp.headers):
        if lower == "location":
            # Never a secret in a Location, rewritten or not (SPEC §4, finding 3).
            value = REDACTOR.scrub(
                rewrite_location(value, route.target, route.prefix, route.strip_query)
            )
        elif lower == "content-length":
            if value.isdigit():
                length = int(value)
        elif lower == "content-type":
            has_type = True
        elif lower == "x-request-id":
            has_id = True
        out_headers.append((key, value))
    if not has_id:
        out_headers.append(("X-Request-ID", request_id))
    cors = request.get(CORS_ORIGIN)
    if cors is not None:
        out_headers = with_cors(out_headers, cors)
    if 0 <= length <= SMALL_BODY and request.method != "HEAD" and resp.status not in NO_BODY:
        whole = resp.complete_body()
        if whole is not None:  # it came with the headers: head and body in one write
            return _whole(resp, out_headers, has_type, whole)
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out_headers)
    loop = asyncio.get_running_loop()
    send = route.send_timeout
    try:
        # One deadline, armed only while a write waits for the client (nginx's
        # send_timeout): a client that stops reading cannot hold the upstream for ever.
        async with asyncio.timeout(None) as deadline:
            deadline.reschedule(loop.time() + send)
            await out.prepare(request)
            progress.status = resp.status
            deadline.reschedule(None)
            async for chunk in resp.iter_chunks():
                deadline.reschedule(loop.time() + send)
                await out.write(chunk)
                deadline.reschedule(None)
                progress.sent += len(chunk)
            deadline.reschedule(loop.time() + send)
            await out.write_eof()
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        # Headers are gone already: the only honest signal left is a cut connection.
        resp.close()
        log.warning(
            "response_aborted",
            upstream=route.name,
            request_id=request_id,
            error=type(exc).__name__,
            bytes=progress.sent,
        )
        progress.aborted = True
        if request.transport is not None:
            request.transport.abort()
        return out
    resp.release()
    return out


def _whole(
    resp: UpstreamResponse, headers: list[tuple[str, str]], has_type: bool, body: bytes
) -> web.StreamResponse:
    """A small body that has all arrived: sent with the headers in one write. Anything
    else streams (SPEC §4: the head goes out as soon as it is here, no body waits)."""
    resp.release()
    out = web.Response(status=resp.status, reason=resp.reason, headers=headers, body=body)
    if not has_type:  # aiohttp would label it application/octet-stream; pass it as sent
        out.headers.popall("Content-Type", None)
    return out


def describe(route: Route) -> dict[str, Any]:
    return {
        "prefix": route.prefix,
        "url": route.url,
        "auth": route.auth.type_name,
        "token": route.auth.status(),
        "last_error": route.auth.last_error,
    }

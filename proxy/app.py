"""`create_app(config)` and `handle`: the guards, the admin endpoints, the route table,
the lifecycle.

One handler runs an explicit pipeline, cheapest checks first:

    Host allow-list → browser (Origin / Sec-Fetch-Site) → inbound token
    → request-target form → admin (/-/...) or route → method → path safety
    → forward (strip, inject, send, one retry, stream back)
    → answer, and only then account (metrics, access line)

The app owns every resource: the upstream client, the token session and the
authenticators are created in `cleanup_ctx` and closed there, logouts first.
Requests are served by a low-level `web.Server` calling `handle` directly
(see `proxy.server.ProxyRunner`): the proxy does its own routing, and
aiohttp's router and middleware chain cost ~15 µs per request for nothing —
they also answered `CONNECT host:443` with a plain-text 404 of their own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import structlog
from aiohttp import web

from proxy.browsers import (
    allowed_origin,
    overridden_method,
    preflight_headers,
    with_cors,
)
from proxy.config import Config
from proxy.errors import (
    HostNotAllowed,
    MethodNotAllowed,
    NoRoute,
    ProxyAuthRequired,
    ProxyError,
    ShuttingDown,
)
from proxy.forwarding import (
    CLIENT_CLOSED,
    CORS_ORIGIN,
    Progress,
    Route,
    build_route,
    describe,
    forward,
    new_token_session,
)
from proxy.httpserver import MAX_FIELD, MAX_HEADERS, MAX_LINE, ProxyServer, new_request_id
from proxy.leanclient import LeanUpstreamClient
from proxy.logs import ACCESS, REDACTOR
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.metrics import Metrics
from proxy.routing import check_remainder, match_prefix, redact_query, sort_prefixes, split_target
from proxy.tokens import TokenStore, build_store
from proxy.upstream import Endpoint, UpstreamClient
from proxy.websocket import Relays, forward_websocket, wants_websocket

log = structlog.get_logger("authproxy")

# Logouts at shutdown, all of them together, take at most this long (SPEC §1).
LOGOUT_TIMEOUT = 5.0

ADMIN_PREFIX = "/-/"
# CONNECT asks for a tunnel (aiohttp's client would send it in host:port form,
# dropping the base path); TRACE would echo the injected credential back.
NEVER_FORWARDED = frozenset({"CONNECT", "TRACE"})
FORWARDABLE = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Probes carry no secrets and these answers reveal none: no inbound token needed.
UNGUARDED_ADMIN = frozenset({"/-/health", "/-/ready"})
MAX_REQUEST_ID = 128


@dataclass(slots=True)
class Proxy:
    """One configuration, built once: everything the handler needs. A reload builds a
    new one and swaps it in (`ProxyState.current`); each request captures the current
    one when it arrives and keeps it to its end, as nginx's old workers do."""

    config: Config
    client: UpstreamClient
    routes: dict[str, Route]
    prefixes: list[str]
    allowed_hosts: frozenset[str] | None  # None: any host
    allowed_origins: frozenset[str]
    require_token: bytes | None
    metrics: Metrics
    state: ProxyState
    loaded_at: float = 0.0  # wall clock

    @property
    def shutting_down(self) -> bool:
        return self.state.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.state.shutting_down = value

    @property
    def relays(self) -> Relays:
        return self.state.relays


@dataclass(slots=True)
class ProxyState:
    """What outlives a reload: the resources every configuration shares, the current
    configuration, and the authenticators a reload replaced that still await logout."""

    client: UpstreamClient
    token_session: aiohttp.ClientSession
    store: TokenStore
    metrics: Metrics
    current: Proxy | None = None
    shutting_down: bool = False
    closing: bool = False  # the drain is over: replaced tokens log out without waiting
    last_reload_error: str | None = None
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    # Every Endpoint built so far, by value: a reload reuses the equal one, so the
    # upstream client's pools and per-Endpoint entries do not grow with each reload.
    endpoints: dict[Endpoint, Endpoint] = field(default_factory=dict)
    relays: Relays = field(init=False)  # open WebSocket relays, for the shutdown to cut

    def __post_init__(self) -> None:
        self.relays = Relays(self.metrics)


STATE = web.AppKey("proxy_state", ProxyState)
CONFIG = web.AppKey("config", Config)
STORE: web.AppKey[TokenStore] = web.AppKey("token_store")


def current_proxy(app: web.Application) -> Proxy:
    """The configuration serving new requests now."""
    proxy = app[STATE].current
    assert proxy is not None, "the app has not started"
    return proxy


def _host_of(host_header: str) -> str:
    """The host part of a Host header, lower-cased; "" when it is not well-formed."""
    host, port = host_header, ""
    if host_header.startswith("["):
        end = host_header.find("]")
        host, rest = host_header[1:end], host_header[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return ""
        port = rest[1:]
    elif host_header.count(":") == 1:
        host, port = host_header.split(":")
    if port and not port.isdigit():
        return ""
    return host.lower()


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


def _error_response(exc: ProxyError, request_id: str) -> web.Response:
    headers = exc.headers()
    headers["X-Request-ID"] = request_id
    return web.Response(
        status=exc.status, body=exc.body(), content_type="application/json", headers=headers
    )


def _check_guards(proxy: Proxy, request: web.BaseRequest) -> None:
    headers = request.headers
    if proxy.allowed_hosts is not None:
        host = headers.get("Host")
        if host is None or _host_of(host) not in proxy.allowed_hosts:
            raise HostNotAllowed("Host header is not in allowed_hosts")
    if "Origin" in headers or "Sec-Fetch-Site" in headers:
        origin = allowed_origin(headers, proxy.allowed_origins)
        if origin is not None:
            request[CORS_ORIGIN] = origin


def _check_inbound_token(proxy: Proxy, request: web.BaseRequest) -> None:
    expected = proxy.require_token
    if expected is None:
        return
    scheme, _, presented = request.headers.get("Proxy-Authorization", "").partition(" ")
    # surrogateescape: a header with non-UTF-8 bytes is simply a wrong token.
    offered = presented.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered, expected):
        raise ProxyAuthRequired("this proxy requires Proxy-Authorization: Bearer <token>")


async def handle(proxy: Proxy, request: web.BaseRequest) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = request.headers.get("X-Request-ID", "")
    if not request_id or len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        request_id = new_request_id()
    raw_target = request.raw_path
    route: Route | None = None
    progress = Progress()
    error: str | None = None
    metrics = proxy.metrics
    metrics.in_flight += 1
    try:
        try:
            _check_guards(proxy, request)
            path, query = split_target(raw_target)
            preflight = _preflight(proxy, request, path) if CORS_ORIGIN in request else None
            if preflight is not None:
                response: web.StreamResponse = preflight
            elif path.startswith(ADMIN_PREFIX):
                if path not in UNGUARDED_ADMIN:
                    _check_inbound_token(proxy, request)
                response = _admin(proxy, request, path)
            else:
                _check_inbound_token(proxy, request)
                matched = match_prefix(proxy.prefixes, path)
                if matched is None:
                    raise NoRoute(
                        "no upstream for this path; configured prefixes: "
                        + ", ".join(sorted(proxy.prefixes))
                    )
                route = proxy.routes[matched[0]]
                remainder = matched[1]
                if route.allow_methods is not None:
                    _check_method(route, request, query)
                if request.method in NEVER_FORWARDED:
                    raise MethodNotAllowed(
                        f"{request.method} is never forwarded", route.name, FORWARDABLE
                    )
                check_remainder(remainder)
                route.usage.in_flight += 1  # a reload logs a replaced token out once idle
                try:
                    if "Upgrade" in request.headers and wants_websocket(request):
                        response = await forward_websocket(
                            proxy.client,
                            request,
                            route,
                            remainder,
                            query,
                            request_id,
                            progress,
                            proxy.relays,
                        )
                    else:
                        response = await forward(
                            proxy.client, request, route, remainder, query, request_id, progress
                        )
                finally:
                    route.usage.in_flight -= 1
        except ProxyError as exc:
            if route is None:
                route = _route_of(proxy, raw_target)
            if exc.upstream is None and route is not None:
                exc.upstream = route.name
            error = exc.code
            response = _error_response(exc, request_id)
            if exc.status == 408:  # the rest of the body is still on its way: hang up
                response.force_close()
        except Exception:
            # A bug of ours: say so in JSON, keep serving; the traceback has no locals.
            log.exception("request_failed", request_id=request_id)
            internal = ProxyError(
                "internal error; see the proxy log", route.name if route else None
            )
            error = internal.code
            response = _error_response(internal, request_id)
        except asyncio.CancelledError:
            # The drain deadline passed while this request still waited for its
            # upstream (or its token): answer it rather than cut it.
            task = asyncio.current_task()
            if not proxy.shutting_down or progress.status or task is None:
                raise
            task.uncancel()
            refused = ShuttingDown(
                "the proxy is shutting down; the upstream did not answer in time",
                route.name if route else None,
            )
            error = refused.code
            response = _error_response(refused, request_id)
            response.force_close()
        cors = request.get(CORS_ORIGIN)
        # Our own answers to a listed origin are readable by its page too.
        if cors and not response.prepared and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.extend(with_cors([], cors))
        if not progress.status:  # a whole answer, not yet sent: count it as it goes out
            progress.status = response.status
            body = getattr(response, "body", None)
            progress.sent = len(body) if isinstance(body, bytes) else 0
        # Answer first, account after (nginx's log phase): the client has its
        # response while the metrics and the access line are being written.
        # aiohttp's own prepare/write_eof after we return are then no-ops.
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client left; aiohttp sees it again and drops the connection
        return response
    finally:
        metrics.in_flight -= 1
        status = progress.status
        aborted = progress.aborted
        if not status:  # cut before any answer went out (client gone, drain deadline)
            status = CLIENT_CLOSED
        elif aborted is False and error is None and _cut_short():
            aborted = True
        name = route.name if route is not None else None
        metrics.request_done(
            name, request.method, status, progress.upstream_seconds, progress.retried
        )
        ACCESS.emit(
            request.method,
            redact_query(raw_target[:2048]),
            name,
            status,
            round((time.perf_counter() - started) * 1000, 3),
            progress.sent,
            progress.retried,
            request_id,
            error,
            aborted,
            progress.sent_up,
        )


def _check_method(route: Route, request: web.BaseRequest, query: str) -> None:
    """A read-only route: the method, and any override a framework would obey (SPEC §4)."""
    allowed = route.allow_methods
    assert allowed is not None
    method = request.method
    if method in allowed:
        override = overridden_method(request.headers, query)
        if override is None or override in allowed:
            return
        method = f"{override} (as a method override)"
    raise MethodNotAllowed(
        f"{method} is not allowed on {route.prefix}", route.name, tuple(sorted(allowed))
    )


def _preflight(proxy: Proxy, request: web.BaseRequest, path: str) -> web.Response | None:
    """A CORS preflight from a listed origin, answered here (it carries no credential
    and is never forwarded): the methods the route allows."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    matched = match_prefix(proxy.prefixes, path)
    route = proxy.routes[matched[0]] if matched is not None else None
    methods = sorted(route.allow_methods) if route and route.allow_methods else FORWARDABLE
    headers = preflight_headers(request[CORS_ORIGIN], request.headers, methods)
    return web.Response(status=204, headers=headers)


def _cut_short() -> bool:
    """True when this handler is being cancelled: its response did not finish."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _route_of(proxy: Proxy, raw_target: str) -> Route | None:
    """The route a refused request's path names, for its access line (SPEC §5)."""
    try:
        matched = match_prefix(proxy.prefixes, split_target(raw_target)[0])
    except ProxyError:
        return None
    return proxy.routes[matched[0]] if matched is not None else None


# What the admin listener serves (SPEC §4): probes and metrics, nothing else.
ADMIN_LISTENER_PATHS = frozenset({"/-/health", "/-/ready", "/-/metrics"})


async def handle_admin(proxy: Proxy, request: web.BaseRequest) -> web.StreamResponse:
    """The admin listener's only handler: no Host allow-list, no inbound token, no
    route — so a probe from outside the pod reaches a proxy that listens on loopback."""
    started = time.perf_counter()
    path = request.rel_url.raw_path
    error: str | None = None
    try:
        if path not in ADMIN_LISTENER_PATHS:
            raise NoRoute("the admin listener serves only /-/health, /-/ready and /-/metrics")
        response: web.Response = _admin(proxy, request, path)
    except ProxyError as exc:
        error = exc.code
        response = _error_response(exc, new_request_id())
    body = response.body
    ACCESS.emit(
        request.method,
        redact_query(request.raw_path[:2048]),
        None,
        response.status,
        round((time.perf_counter() - started) * 1000, 3),
        len(body) if isinstance(body, bytes) else 0,
        False,
        response.headers.get("X-Request-ID", ""),
        error,
    )
    return response


def _admin(proxy: Proxy, request: web.BaseRequest, path: str) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("admin endpoints are read-only", None, ("GET", "HEAD"))
    if path == "/-/health":
        return _json(200, {"status": "ok"})
    if path == "/-/ready":
        waiting = sorted(r.name for r in proxy.routes.values() if not r.auth.ready())
        # Serving at all means start-up (prefetch included) is over.
        ready = not proxy.shutting_down and not waiting
        body = {"ready": ready, "shutting_down": proxy.shutting_down, "waiting_for_token": waiting}
        return _json(200 if ready else 503, body)
    if path == "/-/metrics":
        return web.Response(
            body=proxy.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )
    if path == "/-/status":
        loaded_at = datetime.fromtimestamp(proxy.loaded_at, UTC).isoformat(timespec="seconds")
        return _json(
            200,
            {
                # pid: which process answered (with `run --workers N`, one of the workers).
                "pid": os.getpid(),
                "upstreams": {r.name: describe(r) for r in proxy.routes.values()},
                "token_store": proxy.state.store.status(),
                "config": {
                    "loaded_at": loaded_at.replace("+00:00", "Z"),
                    "last_reload_error": proxy.state.last_reload_error,
                },
            },
        )
    raise NoRoute("unknown admin endpoint; try /-/health or /-/status")


def build_proxy(
    state: ProxyState,
    config: Config,
    previous: Proxy | None = None,
    keep_tokens: frozenset[str] = frozenset(),
) -> Proxy:
    """A configuration ready to serve. On a reload, `previous` is the one it replaces and
    `keep_tokens` names the upstreams whose token managers carry over (same identity)."""
    routes: dict[str, Route] = {}
    old = {r.name: r for r in previous.routes.values()} if previous is not None else {}
    for name, upstream in config.upstreams.items():
        route = build_route(
            name,
            upstream,
            config,
            state.token_session,
            state.store,
            previous=old.get(name),
            keep_token=name in keep_tokens,
            endpoints=state.endpoints,
        )
        routes[route.prefix] = route
        if not upstream.tls.verify:
            log.warning("tls_verification_disabled", upstream=name)
    hosts = (
        None
        # On a Unix socket any Host is fine: no web page can reach it (SPEC §10).
        if "*" in config.allowed_hosts or config.listen.path is not None
        else frozenset(h.lower() for h in config.allowed_hosts)
    )
    token = config.listen.require_token
    return Proxy(
        config=config,
        client=state.client,
        routes=routes,
        prefixes=sort_prefixes(routes),
        allowed_hosts=hosts,
        allowed_origins=frozenset(config.allowed_origins),
        require_token=token.get_secret_value().encode() if token else None,
        metrics=state.metrics,
        state=state,
        loaded_at=time.time(),
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    token_session = new_token_session()
    client: UpstreamClient = LeanUpstreamClient(pool_size=config.pool_size)
    store = app.get(STORE) or build_store(config.token_store)
    state = ProxyState(client, token_session, store, Metrics())
    try:
        await store.start()  # connects in the background: never delays /-/health
        state.current = build_proxy(state, config)
        state.metrics.watch(
            lambda: [
                (r.name, r.auth.counters())
                for r in (state.current.routes.values() if state.current else ())
            ],
            store.counters,
        )
        app[STATE] = state
        # Nothing here waits on the network: `prefetch` runs once the port is open
        # (proxy.server.ProxyRunner.start), so /-/health answers from the start.
        yield
        state.shutting_down = state.closing = True
        current = state.current
        closing = [asyncio.ensure_future(r.auth.close()) for r in current.routes.values()]
        # Sessions a reload replaced finish their own logout now (their requests are over).
        closing += state.retiring
        if closing:
            _, late = await asyncio.wait(closing, timeout=LOGOUT_TIMEOUT)
            for task in late:
                task.cancel()
            if late:
                log.warning("logout_timed_out", timeout_s=LOGOUT_TIMEOUT, pending=len(late))
                await asyncio.wait(late)
            for task in closing:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("logout_failed", error=type(task.exception()).__name__)
    finally:
        await client.close()
        await token_session.close()
        await store.close()


def create_app(config: Config, token_store: TokenStore | None = None) -> web.Application:
    """The lifecycle container: `startup()` builds the `Proxy`, `cleanup()` closes it."""
    app = web.Application()
    app[CONFIG] = config
    REDACTOR.add(config.secrets)
    if token_store is not None:
        app[STORE] = token_store
    app.cleanup_ctx.append(_lifecycle)
    return app


def make_admin_server(app: web.Application) -> ProxyServer:
    """The admin listener's HTTP server (`admin: {host, port}`)."""
    state = app[STATE]

    async def serve_one(request: web.BaseRequest) -> web.StreamResponse:
        proxy = state.current
        assert proxy is not None
        return await handle_admin(proxy, request)

    return ProxyServer(
        serve_one, max_line_size=MAX_LINE, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS
    )


def make_server(app: web.Application) -> ProxyServer:
    """The HTTP server for a started app: every request target goes to `handle`."""
    state = app[STATE]
    config = current_proxy(app).config

    async def serve_one(request: web.BaseRequest) -> web.StreamResponse:
        proxy = state.current
        assert proxy is not None
        return await handle(proxy, request)

    return ProxyServer(
        serve_one,
        # Bounded request lines and headers; a connection that sends no complete
        # request (or idles between requests) for idle_timeout is closed.
        max_line_size=MAX_LINE,
        max_field_size=MAX_FIELD,
        max_headers=MAX_HEADERS,
        keepalive_timeout=config.listen.idle_timeout,
    )

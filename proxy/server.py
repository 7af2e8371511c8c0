"""Running the app: listen, serve, drain, log out.

`ProxyRunner` is what both the CLI and the tests use, so tests exercise the
same serving path as production.

Start: build the app (no network), open the port — from then on /-/health
answers — and only then run `prefetch` in the background (/-/ready is 503
until it is done). A signal at any moment of start-up stops at once.

Stop (SPEC §1), each step bounded, the whole within `shutdown_delay` +
`shutdown_timeout` + 5 s: keep serving for `shutdown_delay` with
`Connection: close` and /-/ready 503; stop accepting; let in-flight requests
finish until `shutdown_timeout` (0: not at all); then answer those still
waiting for an upstream with 503 `shutting_down` and cut those whose response
had started; force-close what is left; run the logouts (the app's cleanup,
together, at most 5 s). The deadline is ours: aiohttp's
`RequestHandler.shutdown(timeout)` waits its timeout twice, and not at all
for 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
from aiohttp import web

from proxy.app import Proxy, create_app, current_proxy, make_admin_server, make_server
from proxy.config import Config
from proxy.httpserver import ProxyServer
from proxy.listener import UnixSocketFile, bind_unix
from proxy.logs import WRITER
from proxy.reload import ConfigSource, Reloader
from proxy.tokens import TokenStore

log = structlog.get_logger("authproxy")

# Something a worker runs beside its proxy while it serves (proxy/supervisor.py).
ProxyContext = Callable[[Proxy], AbstractAsyncContextManager[None]]

# glibc's mallopt(M_TOP_PAD): bytes kept at the top of the heap when it shrinks.
M_TOP_PAD = -2
TOP_PAD = 4 * 1024 * 1024


def run(main: Coroutine[Any, Any, None], event_loop: str = "auto") -> None:
    """Run `main` to completion on uvloop (`auto` when it is installed, or `uvloop`)
    or on asyncio's own loop. uvloop's loop and transports are C: about 23 % fewer
    instructions per proxied request (callgrind; bench/README.md)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop" or (
        event_loop == "auto" and importlib.util.find_spec("uvloop") is not None
    ):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def tune_allocator() -> bool:
    """Keep 4 MiB of freed heap instead of handing it back to the kernel at once.

    Streaming a large body allocates and frees a ~256 KiB buffer per read. With
    uvloop these come from the top of glibc's heap, which glibc then trims after
    every chunk: a brk() and a fresh page fault per 4 KiB, every chunk, twice the
    kernel CPU of a 100 MiB download. A 4 MiB pad stops that churn (RSS grows by
    at most the pad's touched pages). Returns whether the libc accepted it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt
        return False
    return bool(mallopt(M_TOP_PAD, TOP_PAD))


def listen_url(host: str, port: int) -> str:
    """A URL a person can paste: an IPv6 literal goes in brackets (`http://[::1]:8080`)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _around_proxy(
    context: ProxyContext,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def around(app: web.Application) -> AsyncIterator[None]:
        async with context(current_proxy(app)):
            yield

    return around


class ProxyRunner:
    """Start-up, one listening socket, and the orderly shutdown of a proxy app."""

    def __init__(
        self,
        config: Config,
        token_store: TokenStore | None = None,
        contexts: Sequence[ProxyContext] = (),
    ) -> None:
        self.config = config
        self.app = create_app(config, token_store)
        # Entered once the proxy is built, left after the drain and before logouts.
        for context in contexts:
            self.app.cleanup_ctx.append(_around_proxy(context))
        self._runner: web.ServerRunner | None = None
        self._server: ProxyServer | None = None
        self._admin_runner: web.ServerRunner | None = None
        self._unix: UnixSocketFile | None = None  # listen.path we bound: removed at exit
        self._prefetch: asyncio.Task[None] | None = None
        self.port = 0
        self.admin_port: int | None = None
        self.stopped = False

    @property
    def proxy(self) -> Proxy:
        """The configuration serving new requests now (a reload swaps it)."""
        return current_proxy(self.app)

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
        admin_sock: socket.socket | None = None,
    ) -> int:
        """Build the proxy (no network), listen — on `sock` (and `admin_sock`) when
        given: sockets a supervisor bound and shares between workers — then prefetch
        in the background."""
        self.app.on_startup.freeze()  # as aiohttp's AppRunner does
        await self.app.startup()
        self.app.freeze()
        self._server = make_server(self.app)
        # Our drain has closed every connection by the time cleanup() runs; this only
        # bounds aiohttp's own wait (which it takes twice, and 0 would mean forever).
        self._runner = web.ServerRunner(self._server, shutdown_timeout=0.1)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        elif host is None and port is None and (path := self.config.listen.path) is not None:
            sock, self._unix = bind_unix(path, self.config.listen.mode)
            site = web.SockSite(self._runner, sock)
        else:
            host = self.config.listen.host if host is None else host
            port = self.config.listen.port if port is None else port
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1]) if isinstance(address, tuple) else 0
        admin = self.config.admin
        if admin is not None:
            self._admin_runner = web.ServerRunner(make_admin_server(self.app), shutdown_timeout=1)
            await self._admin_runner.setup()
            admin_site: web.BaseSite
            if admin_sock is not None:
                admin_site = web.SockSite(self._admin_runner, admin_sock)
            else:
                admin_site = web.TCPSite(
                    self._admin_runner, admin.host, admin.port, reuse_address=True
                )
            await admin_site.start()
            self.admin_port = int(self._admin_runner.addresses[0][1])
        self._prefetch = asyncio.create_task(self._warm_up())
        return self.port

    async def _warm_up(self) -> None:
        routes = self.proxy.routes.values()
        await asyncio.gather(*(r.auth.start() for r in routes))

    async def stop(self) -> None:
        """Linger, stop accepting, drain in-flight requests, then log out and close.
        Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        self.proxy.shutting_down = True
        if self._prefetch is not None:
            self._prefetch.cancel()
        relays = self.proxy.relays
        cut: asyncio.TimerHandle | None = None
        try:
            if self._server is not None and self.config.shutdown_delay > 0:
                self._server.closing = True
                log.info("proxy_draining", shutdown_delay_s=self.config.shutdown_delay)
                await asyncio.sleep(self.config.shutdown_delay)
            # WebSocket relays are in flight like any request, cut at the drain deadline.
            cut = asyncio.get_running_loop().call_later(self.config.shutdown_timeout, relays.cut)
            if self._runner is not None:
                await self._drain(self._runner)
                await self._runner.cleanup()
        finally:
            if cut is not None:
                cut.cancel()
            relays.cut()
            if self._unix is not None:
                self._unix.remove()
            if self._admin_runner is not None:  # probes are answered until the very end
                await self._admin_runner.cleanup()
            await self.app.shutdown()
            await self.app.cleanup()

    async def _drain(self, runner: web.ServerRunner) -> None:
        server = self._server
        assert server is not None
        server.closing = True
        for site in list(runner.sites):  # stop accepting
            await site.stop()
        await asyncio.sleep(0)  # requests whose bytes arrived just now start
        server.pre_shutdown()  # idle keep-alive connections close now, busy ones after
        timeout = self.config.shutdown_timeout
        if server.in_flight and timeout > 0:
            await asyncio.wait(list(server.in_flight), timeout=timeout)
        late = dict(server.in_flight)
        if not late:
            return
        log.warning("drain_deadline_passed", in_flight=len(late), shutdown_timeout_s=timeout)
        for task, request in late.items():
            if request.writer.output_size > 0:
                # Its response had started: the only honest end is a cut connection.
                if request.transport is not None:
                    request.transport.abort()
            else:
                task.cancel()  # handle() answers 503 shutting_down
        await asyncio.wait(list(late), timeout=1.0)
        for conn in server.connections:
            conn.force_close()


async def serve(
    config: Config,
    *,
    on_ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
    admin_sock: socket.socket | None = None,
    contexts: Sequence[ProxyContext] = (),
    source: ConfigSource | None = None,
) -> None:
    """Serve until a signal (or `stop`) arrives; `on_ready` receives the bound port.
    A worker of `run --workers N` passes the shared sockets and its `contexts`.
    With `source` (where `config` was read from), SIGHUP reloads it (SPEC §9)."""
    runner = ProxyRunner(config, contexts=contexts)
    reloader = Reloader(runner.app, source) if source is not None else None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and sock is not None:
            # A worker: its supervisor owns "a second signal exits at once", and a
            # repeat here is the same stop arriving twice (systemd signals every
            # process of the unit, and the supervisor passes its copy on).
            return
        if stop.is_set():
            log.warning("proxy_killed", signal=signal.Signals(signum).name)
            WRITER.flush()
            os._exit(1)
        log.info("proxy_stopping", signal=signal.Signals(signum).name)
        runner.proxy.shutting_down = True
        stop.set()

    def on_output_lost() -> None:
        # The terminal is gone (EIO/EPIPE): nobody can read the logs, stop in order.
        if not stop.is_set():
            runner.proxy.shutting_down = True
            stop.set()

    def on_hangup() -> None:
        if reloader is None:
            log.warning("config_reload_skipped", reason="no config file to reload")
        elif not stop.is_set():
            reloader.request("signal")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    WRITER.on_output_lost = on_output_lost
    for warning in config.warnings:
        log.warning("config_warning", path=warning.path, problem=warning.message)
    try:
        port = await runner.start(sock=sock, admin_sock=admin_sock)
        log.info(
            "proxy_started",
            listen=(
                f"unix:{config.listen.path}"
                if config.listen.path is not None
                else listen_url(config.listen.host, port)
            ),
            admin=(
                None
                if config.admin is None or runner.admin_port is None
                else listen_url(config.admin.host, runner.admin_port)
            ),
            event_loop=type(loop).__module__.partition(".")[0],
            upstreams={r.prefix: r.url for r in runner.proxy.routes.values()},
        )
        if on_ready is not None:
            result = on_ready(port)
            if result is not None:
                await result
        await stop.wait()
    finally:
        await runner.stop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        WRITER.on_output_lost = None
        log.info("proxy_stopped")
        WRITER.flush()

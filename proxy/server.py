"""Running the app as a process: listen, wait for a signal, drain, log out, exit.

SIGINT/SIGTERM stop accepting, let in-flight requests finish for up to
`shutdown_timeout`, run logouts (the app's cleanup), and return. A second
signal during the drain exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from proxy.app import PROXY, create_app
from proxy.config import Config

log = structlog.get_logger("authproxy")


async def serve(
    config: Config,
    *,
    on_ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until a signal (or `stop`) arrives; `on_ready` receives the bound port."""
    app = create_app(config)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=config.shutdown_timeout
    )
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("proxy_killed", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("proxy_stopping", signal=signal.Signals(signum).name)
        app[PROXY].shutting_down = True
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        log.info(
            "proxy_started",
            listen=f"http://{config.listen.host}:{port}",
            upstreams={r.prefix: r.url for r in app[PROXY].routes.values()},
        )
        if on_ready is not None:
            result = on_ready(port)
            if result is not None:
                await result
        await stop.wait()
    finally:
        await runner.cleanup()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        log.info("proxy_stopped")

"""Shared fixtures: real servers on loopback port 0, the real proxy in front of them.

Logs are rendered as JSON to stdout exactly as in production, so tests read
what a user would see (via `capsys`) and the leak check scans real output.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, unquote_plus

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Proxy, current_proxy
from proxy.config import Config, parse_config
from proxy.fakes import (
    ISSUED,
    EchoState,
    PaymoState,
    SeedFake,
    create_echo_app,
    serve,
    start_paymo,
)
from proxy.logs import LineWriter, configure_logging
from proxy.server import ProxyRunner

# Re-exported for modules that still say `from tests.conftest import log_lines`.
from tests.support import log_lines as log_lines
from tests.support.redis_server import RedisServer

# Credentials the fakes accept by default (and the demo uses): never to be printed.
FAKE_CREDENTIALS = frozenset(
    {
        "demo-password",
        "demo-paymo-api-key",
        "demo-primaerp-apikey",
        "demo-primaerp-secret-key",
        "demo-didomi-key",
        "demo-didomi-secret",
        "demo-getpaid-secret",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("debug", "json")


@dataclass
class Exposure:
    """Everything the proxy showed the outside during one test."""

    log_lines: list[str] = field(default_factory=list)
    proxy_bodies: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)  # Location headers clients got
    secrets: set[str] = field(default_factory=set)

    def leaks(self) -> list[str]:
        candidates = {s for s in (self.secrets | ISSUED | FAKE_CREDENTIALS) if len(s) >= 4}
        text = "\n".join(self.log_lines + self.proxy_bodies + self.locations)
        if not text:
            return []
        # Each secret also in its derived forms (SPEC §5: "not even encoded"): the
        # text decoded as a URL would be, JSON-unescaped, and every base64-looking
        # run decoded (`Authorization: Basic base64(id:secret)`).
        views = [text, unquote(text), unquote_plus(text), text.replace("\\/", "/")]
        for run in _BASE64_RUN.findall(text):
            with suppress(ValueError):
                views.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode("latin-1"))
        return sorted(s for s in candidates if any(s in view for view in views))


EXPOSURE: Exposure | None = None
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")


@pytest.fixture(autouse=True)
def no_secret_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Exposure]:
    """After every test: no configured secret or issued token in any log line,
    proxy error body or /-/status answer seen during the test."""
    global EXPOSURE
    exposure = EXPOSURE = Exposure()
    original = LineWriter.write

    def tapped(self: LineWriter, line: str) -> None:
        exposure.log_lines.append(line)
        original(self, line)

    monkeypatch.setattr(LineWriter, "write", tapped)
    yield exposure
    EXPOSURE = None
    leaks = exposure.leaks()
    assert not leaks, f"secrets leaked into proxy output: {[s[:6] + '...' for s in leaks]}"


def _is_proxy_own(path: str, body: str) -> bool:
    if path.startswith("/-/"):
        return True
    try:
        document = json.loads(body)
    except ValueError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    return isinstance(error, dict) and "code" in error and "message" in error


def _tracing() -> aiohttp.TraceConfig:
    """Record every response body of the proxy's own making for the leak check."""
    trace = aiohttp.TraceConfig()

    async def on_chunk(
        _session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceResponseChunkReceivedParams,
    ) -> None:
        if not hasattr(ctx, "buffer"):
            ctx.buffer = bytearray()
        if len(ctx.buffer) < 65536:
            ctx.buffer += params.chunk

    async def on_end(
        _session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        if EXPOSURE is not None:
            EXPOSURE.locations += params.response.headers.getall("Location", [])
        buffer = getattr(ctx, "buffer", None)
        if EXPOSURE is None or not buffer:
            return
        body = bytes(buffer).decode("utf-8", "replace")
        if _is_proxy_own(params.url.path, body):
            EXPOSURE.proxy_bodies.append(body)

    trace.on_response_chunk_received.append(on_chunk)
    trace.on_request_end.append(on_end)
    return trace


@dataclass
class RunningProxy:
    url: str
    port: int
    app: web.Application
    config: Config
    runner: ProxyRunner

    @property
    def state(self) -> Proxy:
        return current_proxy(self.app)

    async def stop(self) -> None:
        await self.runner.stop()


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Start the real proxy app on 127.0.0.1:0 from a config mapping."""
    running: list[RunningProxy] = []

    async def start(raw: dict[str, Any], env: dict[str, str] | None = None) -> RunningProxy:
        raw = {"shutdown_timeout": 2, **raw}
        config = parse_config(raw, env=env or {})
        runner = ProxyRunner(config)
        port = await runner.start("127.0.0.1", 0)
        proxy = RunningProxy(f"http://127.0.0.1:{port}", port, runner.app, config, runner)
        if EXPOSURE is not None:
            EXPOSURE.secrets |= config.secrets
        running.append(proxy)
        return proxy

    yield start
    for proxy in reversed(running):
        await proxy.runner.stop()


@dataclass
class Echo:
    state: EchoState
    url: str


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    state = EchoState()
    async with await serve(create_echo_app(state)) as running:
        yield Echo(state, running.url)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no cookies kept, bodies as sent; its answers feed the leak check."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trace_configs=[_tracing()]
    ) as session:
        yield session


@pytest.fixture
async def paymo() -> AsyncIterator[SeedFake[PaymoState]]:
    """A running Paymo fake on loopback (sessions live 60 s), no proxy in front."""
    async with await start_paymo(PaymoState(lifetime=60)) as fake:
        yield fake


@pytest.fixture
def redis_server(tmp_path: Path, no_secret_leaks: Exposure) -> Iterator[RedisServer]:
    """A real redis-server for this test; afterwards every key and value in it is
    scanned: no token, refresh token or secret in any readable form (SPEC §8.6)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
        if server.proc is not None and server.proc.poll() is None:
            candidates = no_secret_leaks.secrets | ISSUED | FAKE_CREDENTIALS
            leaks = server.leaks(candidates)
            assert not leaks, f"readable credentials in Redis: {leaks}"
    finally:
        server.stop()

"""Reload soak: steady load while the configuration is reloaded every 0.5 s.

Runs in-process so it can count the event loop's tasks and the process's open
files. `AUTHPROXY_SOAK_SECONDS` sets the duration (default 15; the issue's
figure is 60).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.fakes import DidomiState, PaymoState, SeedFake, start_didomi, start_paymo
from proxy.logs import configure_logging
from proxy.reload import ConfigSource, Reloader
from proxy.server import ProxyRunner
from tests.conftest import Echo, Exposure

SOAK_SECONDS = float(os.environ.get("AUTHPROXY_SOAK_SECONDS", "15"))
RELOAD_EVERY = 0.5
CLIENTS = 6
PATHS = ("/didomi/properties", "/paymo/me", "/echo/x")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def own_tasks() -> int:
    """Tasks other than aiohttp's per-connection and per-request ones: those follow
    the connections open and the requests in flight at the moment of counting (the
    test's clients to the proxy, the proxy's pool to the fakes), which the fd count
    bounds; a task the proxy leaked per reload shows up here."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if not getattr(task.get_coro(), "__qualname__", "").startswith("RequestHandler.")
    )


@pytest.fixture
async def didomi() -> AsyncIterator[SeedFake[DidomiState]]:
    async with await start_didomi(DidomiState(lifetime=3600)) as fake:
        yield fake


@pytest.fixture
async def paymo() -> AsyncIterator[SeedFake[PaymoState]]:
    async with await start_paymo(PaymoState(lifetime=3600)) as fake:
        yield fake


def two_configs(
    tmp_path: Path, didomi: SeedFake[DidomiState], paymo: SeedFake[PaymoState], echo: Echo
) -> tuple[str, str]:
    """Two valid files with the same credentials (one in a file, one in the environment)."""
    secret = tmp_path / "didomi-secret"
    secret.write_text(didomi.state.secret + "\n")

    def config(version: str, extra: bool) -> str:
        upstreams: dict[str, Any] = {
            "didomi": {
                "url": didomi.url,
                "headers": {"X-Version": version},
                "auth": {
                    "type": "didomi",
                    "key": didomi.state.key,
                    "secret": f"${{file:{secret}}}",
                },
            },
            "paymo": {
                "url": paymo.url,
                "headers": {"X-Version": version},
                "auth": {"type": "paymo_session", "api_key": "${SOAK_PAYMO_KEY}"},
            },
            "echo": {"url": echo.url, "headers": {"X-Version": version}},
        }
        if extra:
            upstreams["extra"] = {"url": echo.url}
        return yaml.safe_dump(
            {"shutdown_timeout": 2, "log": {"level": "info"}, "upstreams": upstreams}
        )

    return config("a", False), config("b", True)


async def test_reloading_every_half_second_under_load_loses_nothing(
    tmp_path: Path,
    didomi: SeedFake[DidomiState],
    paymo: SeedFake[PaymoState],
    echo: Echo,
    no_secret_leaks: Exposure,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOAK_PAYMO_KEY", paymo.state.api_key)
    first, second = two_configs(tmp_path, didomi, paymo, echo)
    path = tmp_path / "config.yaml"
    path.write_text(first)
    source = ConfigSource(str(path), {"listen.host": "127.0.0.1", "listen.port": 0})
    config = source.load()
    no_secret_leaks.secrets |= config.secrets
    runner = ProxyRunner(config)
    reloader = Reloader(runner.app, source)
    port = await runner.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    statuses: dict[int, int] = {}
    failures: list[str] = []
    versions: set[str] = set()
    stop = asyncio.Event()

    async def load(session: aiohttp.ClientSession, n: int) -> None:
        i = n
        while not stop.is_set():
            path_ = PATHS[i % len(PATHS)]
            i += 1
            try:
                async with session.get(url + path_) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status != 200:
                        failures.append(f"{path_} -> {resp.status}")
            except aiohttp.ClientError as exc:
                failures.append(f"{path_} -> {type(exc).__name__}")

    reloads = 0
    try:
        async with aiohttp.ClientSession() as session:
            workers = [asyncio.create_task(load(session, n)) for n in range(CLIENTS)]

            async def reload_next() -> None:
                nonlocal reloads
                await asyncio.sleep(RELOAD_EVERY)
                reloads += 1
                tmp = path.with_suffix(".tmp")
                tmp.write_text(second if reloads % 2 else first)
                tmp.replace(path)
                reloader.request("signal")

            # Warm: tokens fetched, and each file's connection pools filled once (the
            # files' per-upstream pool sizes differ, so each has pools of its own).
            for _ in range(2):
                await reload_next()
            await asyncio.sleep(RELOAD_EVERY)
            tasks_before, files_before = own_tasks(), open_files()
            started = time.monotonic()
            while time.monotonic() - started < SOAK_SECONDS:
                await reload_next()
            await reloader.reload("signal")  # the last one is over before we count
            await asyncio.sleep(0.5)
            tasks_after, files_after = own_tasks(), open_files()
            stop.set()
            await asyncio.gather(*workers)
        versions = {rec.header("X-Version") or "" for rec in echo.state.requests}
        metrics = runner.proxy.metrics.reloads
        endpoints = len(runner.proxy.state.endpoints)
    finally:
        await runner.stop()
        configure_logging("debug", "json")  # the reloads set the level; restore the suite's
    total = sum(statuses.values())
    print(
        f"soak {SOAK_SECONDS:.0f}s: {total} requests, {reloads} reloads {dict(metrics)}, "
        f"tasks {tasks_before}->{tasks_after}, fds {files_before}->{files_after}, "
        f"token requests didomi={didomi.state.token_requests} paymo={paymo.state.token_requests}"
    )
    assert failures == []
    assert total > 100 * SOAK_SECONDS / 15
    assert metrics["success"] >= reloads * 0.8 and metrics["failure"] == 0
    assert versions == {"a", "b"}
    assert tasks_after <= tasks_before
    assert files_after <= files_before + 2
    assert endpoints == 2 * 3 + 1  # one per upstream and file, however many reloads
    # One credential per upstream across every reload: one token request each.
    assert didomi.state.token_requests == 1
    assert paymo.state.token_requests == 1
    assert paymo.state.logout_requests == 1  # at the final stop, not at a reload

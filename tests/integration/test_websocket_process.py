"""WebSocket relays in a real proxy process: flat memory under volume, and SIGTERM.

The proxy runs as `python -m proxy run` (its RSS is read from /proc, its stop is
a real signal); the Didomi fake with its `/ws` echo runs as a second subprocess,
so this process is only the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from proxy.fakes import pattern_chunks
from tests.support import free_port, log_lines, wait_until, wait_until_sync

SIZE = 100 * 1024 * 1024  # each way
MAX_GROWTH = 30 * 1024 * 1024
FRAME = 64 * 1024

DIDOMI_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal
    from proxy.fakes import DidomiState, start_didomi

    async def main():
        fake = await start_didomi(DidomiState())
        print(fake.url, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await fake.close()

    asyncio.run(main())
    """
)


@dataclass
class Stack:
    proxy: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def records(self) -> list[dict[str, Any]]:
        return log_lines(self.stdout.read_text())


def _start(args: list[str], out: Path, err: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(args, stdout=stdout, stderr=stderr, env=env)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env.update(KEY="demo-didomi-key", SECRET="demo-didomi-secret")
    fake = _start(
        [sys.executable, "-c", DIDOMI_SCRIPT], tmp_path / "f.out", tmp_path / "f.err", env
    )
    proxy: subprocess.Popen[bytes] | None = None
    try:
        fake_url = wait_until_sync(
            lambda: (tmp_path / "f.out").read_text().strip(), 15, what="the fake's URL"
        )
        config = tmp_path / "config.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                shutdown_timeout: 2
                upstreams:
                  didomi:
                    url: {fake_url}
                    auth: {{type: didomi, key: "${{KEY}}", secret: "${{SECRET}}"}}
                """
            )
        )
        port = free_port()
        args = [sys.executable, "-m", "proxy", "run", "-c", str(config), "--port", str(port)]
        args += ["--log-format", "json"]
        proxy = _start(args, tmp_path / "p.out", tmp_path / "p.err", env)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proxy is not None and proxy.poll() is None, (tmp_path / "p.err").read_text()
            try:
                with urllib.request.urlopen(url + "/-/health", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until_sync(healthy, 15, what="the proxy's /-/health")
        yield Stack(proxy, url, tmp_path / "p.out", tmp_path / "p.err")
    finally:
        if proxy is not None and proxy.poll() is None:
            _stop(proxy)
        _stop(fake)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssPeak:
    """The peak RSS of a process, sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


async def echo_through(ws: aiohttp.ClientWebSocketResponse, size: int) -> tuple[int, str]:
    """Send `size` pattern bytes in binary frames while reading the echoes back."""

    async def send() -> None:
        for chunk in pattern_chunks(size, FRAME):
            await ws.send_bytes(chunk)

    sender = asyncio.create_task(send())
    digest = hashlib.sha256()
    received = 0
    try:
        while received < size:
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.BINARY, msg
            digest.update(msg.data)
            received += len(msg.data)
    finally:
        await sender
    return received, digest.hexdigest()


async def test_100_mib_each_way_with_flat_memory(stack: Stack) -> None:
    expected = hashlib.sha256()
    for chunk in pattern_chunks(SIZE, FRAME):
        expected.update(chunk)
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(stack.url + "/didomi/ws") as ws:
            await echo_through(ws, 8 * FRAME)  # warm-up: every path touched once
        started = time.monotonic()
        with RssPeak(stack.proxy.pid) as rss:
            async with client.ws_connect(stack.url + "/didomi/ws") as ws:
                received, digest = await echo_through(ws, SIZE)
        took = time.monotonic() - started
    mib = 1024 * 1024
    report = (
        f"{SIZE // mib} MiB each way in {took:.1f} s; proxy RSS {rss.before / mib:.1f} MiB "
        f"-> peak {rss.peak / mib:.1f} MiB (+{(rss.peak - rss.before) / mib:.2f})"
    )
    print(report)
    assert received == SIZE
    assert digest == expected.hexdigest()
    assert rss.peak - rss.before < MAX_GROWTH, report

    def big_line() -> dict[str, Any] | None:
        lines = [r for r in stack.records() if r["event"] == "request_finished"]
        return next((r for r in lines if r.get("bytes_up", 0) > SIZE), None)

    line = await wait_until(big_line, 5, what="the big relay's access line")
    assert line is not None
    assert line["status"] == 101
    assert SIZE < line["bytes"] < SIZE * 1.01


@pytest.mark.parametrize("slow", ["client", "upstream"])
async def test_a_side_that_falls_behind_pauses_the_other(stack: Stack, slow: str) -> None:
    """Flow control: while one side reads nothing, the proxy stops reading from the
    other instead of buffering what it sends."""
    mib = 1024 * 1024
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(stack.url + "/didomi/ws") as ws,
    ):
        await echo_through(ws, 8 * FRAME)  # warm-up
        with RssPeak(stack.proxy.pid) as rss:
            if slow == "client":
                await ws.send_str(f"send {SIZE}")
                await asyncio.sleep(1.0)  # the stall itself: the client reads nothing
                received = 0
                while received < SIZE:
                    msg = await ws.receive(timeout=10)
                    assert msg.type is WSMsgType.BINARY, msg
                    received += len(msg.data)
                assert (await ws.receive(timeout=10)).data == f"sent {SIZE}"
            else:
                await ws.send_str("stall 1")
                started = time.monotonic()
                await echo_through(ws, SIZE // 2)
                assert time.monotonic() - started > 1.0
    growth = rss.peak - rss.before
    print(f"{slow} stalled: proxy RSS grew {growth / mib:.2f} MiB")
    assert growth < MAX_GROWTH, f"{slow} stalled: proxy RSS grew {growth / mib:.2f} MiB"


async def test_sigterm_cuts_relays_at_the_drain_deadline(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(stack.url + "/didomi/ws") as ws,
    ):
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data == "before"
        signalled = time.monotonic()
        stack.proxy.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: any(r["event"] == "proxy_stopping" for r in stack.records()),
            5,
            what="the proxy to start stopping",
        )
        # Draining: the relay still carries bytes both ways ...
        await ws.send_str("while draining")
        assert (await ws.receive(timeout=5)).data == "while draining"
        # ... until the drain deadline (shutdown_timeout: 2) cuts it.
        msg = await ws.receive(timeout=10)
        cut_after = time.monotonic() - signalled
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR), msg
    assert 1.5 < cut_after < 3.2, cut_after
    code = await asyncio.to_thread(stack.proxy.wait, 10)
    stopped_after = time.monotonic() - signalled
    assert code == 0, stack.stderr.read_text()
    assert stopped_after < 2 + 5, stopped_after  # shutdown_timeout + 5 s (SPEC §1)
    records = stack.records()
    cut = [r for r in records if r["event"] == "websocket_cut"]
    assert [(r["upstream"], r["reason"]) for r in cut] == [("didomi", "shutdown")]
    (line,) = [r for r in records if r["event"] == "request_finished" and "bytes_up" in r]
    assert line["status"] == 101 and line["bytes_up"] > 0
    assert records[-1]["event"] == "proxy_stopped"
    assert "Traceback" not in stack.stdout.read_text() + stack.stderr.read_text()
    assert json.dumps(records).count("demo-didomi-secret") == 0

"""Bodies stream through the proxy in both directions with flat memory.

The proxy runs as a real subprocess (`python -m proxy run`), so its resident
set size can be read from `/proc/<pid>/status` while 200 MiB pass through it.
The echo upstream runs as a second subprocess so the test process only has to
be the client (three busy parties on two cores would starve each other).

The transfer tests share one proxy (module scope), in any order; the SIGTERM test
starts its own, carries a transfer through it, stops it and checks the clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.fakes import pattern_chunks
from proxy.fakes import pattern_sha256 as _pattern_sha256
from tests.support import free_port, wait_until_sync

SIZE = 200 * 1024 * 1024  # 209715200 bytes per transfer
MAX_GROWTH = 30 * 1024 * 1024
SAMPLE_EVERY = 0.05
KEY = "stream-key-5c1e0b7d"

ECHO_SCRIPT = textwrap.dedent(
    """
    import asyncio, signal
    from proxy.fakes import EchoState, create_echo_app, serve

    async def main():
        running = await serve(create_echo_app(EchoState()))
        print(running.port, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await running.close()

    asyncio.run(main())
    """
)


@functools.cache
def pattern_sha256(n: int) -> str:
    return _pattern_sha256(n)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every ~50 ms on a thread (immune to a busy event loop)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_bytes(pid)
        self.peak = self.before
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(SAMPLE_EVERY)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def report(self, what: str) -> str:
        mib = 1024 * 1024
        return (
            f"{what}: proxy RSS before {self.before / mib:.1f} MiB, "
            f"peak {self.peak / mib:.1f} MiB, "
            f"growth {self.growth / mib:.2f} MiB over {self.samples} samples "
            f"(limit {MAX_GROWTH / mib:.0f} MiB)"
        )


@dataclass
class Stack:
    proxy: subprocess.Popen[bytes]
    echo: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path


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


@contextlib.contextmanager
def running_stack(tmp: Path) -> Iterator[Stack]:
    """The echo and the proxy as subprocesses, stopped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env["STREAM_KEY"] = KEY
    echo = _start([sys.executable, "-c", ECHO_SCRIPT], tmp / "echo.out", tmp / "echo.err", env)
    proxy: subprocess.Popen[bytes] | None = None
    try:
        echo_port = int(
            wait_until_sync(
                lambda: (tmp / "echo.out").read_text().strip(), 15, what="the echo port"
            )
        )
        echo_url = f"http://127.0.0.1:{echo_port}"
        config = tmp / "config.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                upstreams:
                  h:
                    url: {echo_url}/base
                    auth: {{type: header, name: X-Api-Key, value: "${{STREAM_KEY}}"}}
                  n:
                    url: {echo_url}/base
                """
            )
        )
        port = free_port()
        args = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
        args += ["--port", str(port), "--log-format", "json"]
        proxy = _start(args, tmp / "proxy.out", tmp / "proxy.err", env)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proxy is not None and proxy.poll() is None, (tmp / "proxy.err").read_text()
            try:
                with urllib.request.urlopen(url + "/-/health", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until_sync(healthy, 15, what="the proxy's /-/health")
        yield Stack(proxy, echo, url, tmp / "proxy.out", tmp / "proxy.err")
    finally:
        if proxy is not None and proxy.poll() is None:
            _stop(proxy)
        _stop(echo)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("streaming")) as running:
        yield running


async def _warm_up(client: aiohttp.ClientSession, url: str) -> None:
    """Touch every code path once so the baseline includes imports and pools."""
    n = 2 * 1024 * 1024
    for kind in ("bytes", "chunked"):
        async with client.get(f"{url}/h/{kind}/{n}") as resp:
            async for _ in resp.content.iter_any():
                pass
    for prefix in ("/h", "/n"):
        async with client.post(f"{url}{prefix}/echo/up", data=_body(n)) as resp:
            await resp.read()


async def _body(n: int) -> AsyncIterator[bytes]:
    for chunk in pattern_chunks(n):
        yield chunk


@pytest.mark.parametrize("kind", ["bytes", "chunked"])
async def test_download_streams_with_flat_memory(
    stack: Stack, client: aiohttp.ClientSession, kind: str
) -> None:
    await _warm_up(client, stack.url)
    digest = hashlib.sha256()
    size = 0
    with RssSampler(stack.proxy.pid) as rss:
        async with client.get(f"{stack.url}/h/{kind}/{SIZE}") as resp:
            assert resp.status == 200
            if kind == "bytes":
                assert resp.headers["Content-Length"] == str(SIZE)
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
    report = rss.report(f"download /{kind}/{SIZE}")
    print(report)
    assert size == SIZE
    assert digest.hexdigest() == pattern_sha256(SIZE)
    assert rss.growth < MAX_GROWTH, report


@pytest.mark.parametrize(
    ("prefix", "with_length"),
    [
        pytest.param("/h", False, id="header-auth-chunked"),
        pytest.param("/h", True, id="header-auth-content-length"),
        pytest.param("/n", False, id="none-auth-chunked"),
    ],
)
async def test_upload_streams_with_flat_memory(
    stack: Stack, client: aiohttp.ClientSession, prefix: str, with_length: bool
) -> None:
    await _warm_up(client, stack.url)
    headers = {"Content-Length": str(SIZE)} if with_length else {}
    # `/echo/...` is the echo fake's upload sink that also reports the framing it saw.
    with RssSampler(stack.proxy.pid) as rss:
        async with client.post(
            f"{stack.url}{prefix}/echo/upload", data=_body(SIZE), headers=headers
        ) as resp:
            assert resp.status == 200
            seen = await resp.json()
    report = rss.report(f"upload {prefix} content-length={with_length}")
    print(report)
    assert seen["body_len"] == SIZE
    assert seen["body_sha256"] == pattern_sha256(SIZE)
    arrived = {k.lower(): v for k, v in seen["headers"]}
    if with_length:
        assert arrived.get("content-length") == str(SIZE)
        assert "transfer-encoding" not in arrived
    else:
        assert arrived.get("transfer-encoding") == "chunked"
    if prefix == "/h":
        assert arrived.get("x-api-key") == KEY
    assert rss.growth < MAX_GROWTH, report


async def test_sigterm_stops_the_proxy_cleanly(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """A proxy that carried a big transfer exits 0 on SIGTERM (its own proxy: the shared
    one must outlive the other tests, whatever order they run in)."""
    with running_stack(tmp_path) as stack:
        await _warm_up(client, stack.url)
        async with client.get(f"{stack.url}/h/bytes/{SIZE}") as resp:
            assert resp.status == 200
            size = sum([len(chunk) async for chunk in resp.content.iter_any()])
        assert size == SIZE
        assert stack.proxy.poll() is None, "the proxy died during the transfer"
        assert await asyncio.to_thread(_stop, stack.proxy) == 0
    stdout = stack.stdout.read_text()
    stderr = stack.stderr.read_text()
    assert "Traceback" not in stdout + stderr, stderr
    assert KEY not in stdout + stderr
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    events = [r["event"] for r in records]
    assert events[0] == "proxy_started"
    assert events[-1] == "proxy_stopped"
    finished = [r for r in records if r["event"] == "request_finished"]
    big = [r for r in finished if r["path"].endswith(f"/{SIZE}")]
    assert big and all(r["bytes"] == SIZE and r["status"] == 200 for r in big)

"""The process lifecycle, run exactly as the container's entrypoint runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.fakes import PaymoState, SeedFake, start_paymo

AUTHPROXY = Path(sys.executable).parent / "authproxy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def paymo() -> AsyncIterator[SeedFake[PaymoState]]:
    async with await start_paymo(PaymoState(lifetime=60)) as fake:
        yield fake


async def wait_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 15) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "proxy exited during start-up"
            try:
                async with session.get(url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("proxy never became ready")


def start_like_the_container(
    tmp_path: Path, config: dict[str, object]
) -> tuple[subprocess.Popen[bytes], str, Path]:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        # The Dockerfile's ENV, with a free port instead of 8080.
        "AUTHPROXY_CONFIG": str(config_file),
        "AUTHPROXY_HOST": "0.0.0.0",
        "AUTHPROXY_PORT": str(port),
        "AUTHPROXY_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(AUTHPROXY), "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, f"http://127.0.0.1:{port}", log


async def test_sigterm_drains_in_flight_requests_then_logs_out(tmp_path: Path, paymo, echo) -> None:
    config = {
        "shutdown_timeout": 10,
        "upstreams": {
            "slow": {"url": echo.url},
            "paymo": {
                "url": paymo.url,
                "auth": {"type": "paymo_session", "api_key": paymo.state.api_key},
            },
        },
    }
    proc, url, log = start_like_the_container(tmp_path, config)
    try:
        await wait_ready(url, proc)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/paymo/me") as resp:
                assert resp.status == 200
            session_id = paymo.state.requests[-1].header("X-Session")
            in_flight = [
                asyncio.create_task(client.get(url + "/slow/slow?seconds=1.0")) for _ in range(5)
            ]
            deadline = time.monotonic() + 5
            while echo.state.in_flight < 5:
                assert time.monotonic() < deadline, "requests never reached the upstream"
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*in_flight)
            assert [r.status for r in responses] == [200] * 5
            for r in responses:
                r.release()
        # Wait without blocking the loop: the fakes in this process must answer the logout.
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert paymo.state.logout_requests == 1
    assert paymo.state.deleted_sessions == [session_id]
    events = [
        json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")
    ]
    assert (
        events.index("proxy_stopping")
        < events.index("token_logout")
        < events.index("proxy_stopped")
    )
    assert "Traceback" not in log.read_text()


async def test_second_signal_exits_at_once(tmp_path: Path, echo) -> None:
    proc, url, _ = start_like_the_container(
        tmp_path, {"shutdown_timeout": 30, "upstreams": {"slow": {"url": echo.url}}}
    )
    try:
        await wait_ready(url, proc)
        async with aiohttp.ClientSession() as client:
            pending = asyncio.create_task(client.get(url + "/slow/slow?seconds=20"))
            deadline = time.monotonic() + 5
            while echo.state.in_flight < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert proc.poll() is None  # draining: waits for the slow request
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 5) == 1
            with pytest.raises(aiohttp.ClientError):
                await pending
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""The process lifecycle, run exactly as the container's entrypoint runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support import free_port, wait_until

AUTHPROXY = Path(sys.executable).parent / "authproxy"


async def wait_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 15) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            assert proc.poll() is None, "proxy exited during start-up"
            try:
                async with session.get(url + "/-/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, deadline_s, what="the proxy to become ready", interval=0.05)


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
            await wait_until(
                lambda: echo.state.in_flight >= 5, 5, what="requests to reach the upstream"
            )
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
            await wait_until(lambda: echo.state.in_flight >= 1, 5, what="the slow request")
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

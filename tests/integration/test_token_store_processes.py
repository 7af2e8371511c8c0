"""SPEC §8's acceptance with real processes: three `authproxy run` on one redis-server.

Token requests are counted where they arrive: at the fake (every login, refresh
and logout it saw, `state.token_calls`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml

from proxy.fakes import PaymoState, PrimaerpState, start_paymo, start_primaerp
from tests.support import free_port, wait_until
from tests.support.redis_server import RedisServer

AUTHPROXY = Path(sys.executable).parent / "authproxy"


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 20)


class Fleet:
    """Proxy processes from one config; each stopped by its PID at the end."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.config_file = tmp_path / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.procs: list[ProxyProcess] = []

    def start(self) -> ProxyProcess:
        port = free_port()
        log = self.tmp_path / f"proxy-{len(self.procs)}.log"
        env = {
            **os.environ,
            "AUTHPROXY_CONFIG": str(self.config_file),
            "AUTHPROXY_PORT": str(port),
            "AUTHPROXY_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(AUTHPROXY), "run"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        running = ProxyProcess(proc, f"http://127.0.0.1:{port}", log)
        self.procs.append(running)
        return running

    async def start_ready(self, n: int) -> list[ProxyProcess]:
        started = [self.start() for _ in range(n)]
        async with aiohttp.ClientSession() as session:

            async def ready(p: ProxyProcess) -> bool:
                assert p.proc.poll() is None, p.log.read_text()[-2000:]
                try:
                    async with session.get(p.url + "/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            for p in started:
                await wait_until(functools.partial(ready, p), timeout=20, what="a proxy is ready")
        return started

    def kill_all(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                os.kill(p.proc.pid, signal.SIGKILL)
                p.proc.wait(10)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(config: dict[str, Any]) -> Fleet:
        fleet = Fleet(tmp_path, config)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.kill_all()


def store(server: RedisServer) -> dict[str, Any]:
    return {"type": "redis", "url": server.url}


async def burst(urls: list[str]) -> list[int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(url: str) -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one(u) for u in urls))


async def test_three_processes_one_token_one_refetch_and_none_after_a_restart(
    fleet_factory: Any, redis_server: RedisServer
) -> None:
    async with await start_paymo(PaymoState(lifetime=600, token_delay=0.5)) as fake:
        upstream = {
            "url": fake.url,
            "auth": {"type": "paymo_session", "api_key": fake.state.api_key},
        }
        fleet = fleet_factory(
            {"token_store": store(redis_server), "upstreams": {"paymo": upstream}}
        )
        procs = await fleet.start_ready(3)
        urls = [procs[i % 3].url + "/paymo/me" for i in range(300)]

        assert await burst(urls) == [200] * 300
        assert len(fake.state.token_calls) == 1

        fake.state.revoke_all()
        assert await burst(urls) == [200] * 300
        assert len(fake.state.token_calls) == 2

        assert await procs[0].stop() == 0
        events = procs[0].events()
        assert {(e["event"], e.get("reason")) for e in events} >= {("logout_skipped", "shared")}
        (again,) = await fleet.start_ready(1)
        assert await burst([again.url + "/paymo/me"] * 10) == [200] * 10
        assert len(fake.state.token_calls) == 2  # no login, no logout
        for p in fleet.procs:
            assert "Traceback" not in p.log.read_text()


async def test_primaerp_refresh_tokens_are_spent_once_across_three_processes(
    fleet_factory: Any, redis_server: RedisServer
) -> None:
    state = PrimaerpState(lifetime=3, refresh_lifetime=120)
    async with await start_primaerp(state) as fake:
        upstream = {
            "url": fake.url,
            "auth": {"type": "primaerp", "api_key": state.apikey, "secret_key": state.secret_key},
        }
        fleet = fleet_factory({"token_store": store(redis_server), "upstreams": {"erp": upstream}})
        procs = await fleet.start_ready(3)
        statuses: list[int] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def load(url: str, until: float) -> None:
                while time.monotonic() < until:
                    async with session.get(url) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                    await asyncio.sleep(0.02)

            until = time.monotonic() + 15
            await asyncio.gather(*(load(p.url + "/erp/projects", until) for p in procs * 3))
        assert statuses and set(statuses) == {200}
        spent = [
            parse_qs(urlsplit(call.raw_path).query)["refresh_token"][0]
            for call in state.token_calls
            if "/auth/refreshtoken" in call.raw_path
        ]
        assert len(spent) >= 4  # ~15 s of 3 s tokens refreshed from 1.5 s before expiry
        assert len(spent) == len(set(spent)), "a refresh token was presented twice"
        assert state.token_requests == 1  # one login; every later token came by refresh
        assert len(state.used_refresh_tokens) == len(spent)  # and every refresh worked

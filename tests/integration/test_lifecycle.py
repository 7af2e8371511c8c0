"""The process lifecycle, run exactly as the container's entrypoint runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.fakes import PaymoState, SeedFake, serve
from tests.conftest import StartProxy
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


# -- listen first (SPEC §1, §4): the port opens before any start-up work --------------


def paymo_upstream(paymo: SeedFake[PaymoState], **auth: object) -> dict[str, object]:
    return {
        "url": paymo.url,
        "auth": {"type": "paymo_session", "api_key": paymo.state.api_key, **auth},
    }


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json()


async def wait_listening(url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> float:
    """Seconds until /-/health answers 200."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline_s:
            assert proc.poll() is None, "proxy exited during start-up"
            try:
                async with session.get(url + "/-/health") as resp:
                    assert resp.status == 200
                    return time.monotonic() - started
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
    raise AssertionError(f"/-/health did not answer within {deadline_s} s")


async def test_health_answers_while_prefetch_hangs_and_sigterm_stops_at_once(
    tmp_path: Path, paymo: SeedFake[PaymoState]
) -> None:
    paymo.state.token_failure = "hang"
    config: dict[str, object] = {"upstreams": {"paymo": paymo_upstream(paymo, prefetch=True)}}
    proc, url, log = start_like_the_container(tmp_path, config)
    try:
        # Python's start-up is part of it; the prefetch never answers at all.
        assert await wait_listening(url, proc, 5) < 2.5  # ~0.4-0.8 s measured, idle
        deadline = time.monotonic() + 5
        while paymo.state.token_requests == 0:
            assert time.monotonic() < deadline, "the prefetch never started"
            await asyncio.sleep(0.02)
        status, body = await get_json(url + "/-/ready")
        assert status == 503
        assert body["waiting_for_token"] == ["paymo"]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 5) == 0
        assert time.monotonic() - sent < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


async def test_ready_flips_once_the_prefetch_is_done(
    tmp_path: Path, paymo: SeedFake[PaymoState]
) -> None:
    paymo.state.token_delay = 1.5
    config: dict[str, object] = {"upstreams": {"paymo": paymo_upstream(paymo, prefetch=True)}}
    proc, url, _ = start_like_the_container(tmp_path, config)
    try:
        await wait_listening(url, proc, 5)
        status, body = await get_json(url + "/-/ready")
        assert (status, body["waiting_for_token"]) == (503, ["paymo"])
        await wait_ready(url, proc, 5)
        assert paymo.state.token_requests == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert paymo.state.logout_requests == 1


# -- stop on time (SPEC §1): delay + timeout + 5 s at most ---------------------------


@pytest.mark.parametrize(("shutdown_timeout", "within"), [(0, 1.0), (3, 4.0), (10, 11.0)])
async def test_stop_keeps_its_deadline_with_a_long_request_in_flight(
    tmp_path: Path, paymo: SeedFake[PaymoState], echo, shutdown_timeout: int, within: float
) -> None:
    config = {
        "shutdown_timeout": shutdown_timeout,
        "upstreams": {"slow": {"url": echo.url}, "paymo": paymo_upstream(paymo)},
    }
    proc, url, log = start_like_the_container(tmp_path, config)
    try:
        await wait_ready(url, proc)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/paymo/me") as resp:
                assert resp.status == 200
            pending = asyncio.create_task(client.get(url + "/slow/slow?seconds=60"))
            deadline = time.monotonic() + 5
            while echo.state.in_flight < 1:
                assert time.monotonic() < deadline, "the request never reached the upstream"
                await asyncio.sleep(0.01)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            resp = await asyncio.wait_for(pending, within + 2)
            answered = time.monotonic() - sent
            assert resp.status == 503
            assert resp.headers["Connection"] == "close"
            assert (await resp.json())["error"]["code"] == "shutting_down"
            assert await asyncio.to_thread(proc.wait, 10) == 0
            stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert shutdown_timeout - 0.2 < answered < within, answered
    assert stopped < within + 1.0, stopped  # + the logout, on loopback
    assert paymo.state.logout_requests == 1
    events = [json.loads(x)["event"] for x in log.read_text().splitlines() if x.startswith("{")]
    assert events.index("drain_deadline_passed") < events.index("token_logout")
    assert "Traceback" not in log.read_text()


async def test_a_response_that_had_started_is_cut_at_the_deadline(tmp_path: Path, echo) -> None:
    config = {"shutdown_timeout": 1, "upstreams": {"slow": {"url": echo.url}}}
    proc, url, _ = start_like_the_container(tmp_path, config)
    try:
        await wait_ready(url, proc)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "/slow/slowbody?seconds=30") as resp:
                assert resp.status == 200
                await resp.content.readany()  # the answer has started
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(resp.read(), 5)
            assert time.monotonic() - sent < 2.5
        assert await asyncio.to_thread(proc.wait, 5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_shutdown_delay_keeps_serving_with_connection_close(tmp_path: Path, echo) -> None:
    config = {
        "shutdown_delay": 2,
        "shutdown_timeout": 1,
        "upstreams": {"e": {"url": echo.url}},
    }
    proc, url, _ = start_like_the_container(tmp_path, config)
    try:
        await wait_ready(url, proc)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        served = 0
        async with aiohttp.ClientSession() as client:

            async def unready() -> bool:
                async with client.get(url + "/-/ready") as resp:
                    return resp.status == 503

            await wait_until(unready, 1, what="/-/ready to turn 503")
            while time.monotonic() - sent < 1.5:
                async with client.get(url + "/e/x") as resp:
                    assert resp.status == 200
                    assert resp.headers["Connection"] == "close"
                    served += 1
                async with client.get(url + "/-/ready") as resp:
                    assert resp.status == 503
                await asyncio.sleep(0.1)
        assert served >= 5
        assert await asyncio.to_thread(proc.wait, 6) == 0
        assert 2 <= time.monotonic() - sent < 2 + 1 + 1.5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stdout_closed_for_good_stops_gracefully(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"upstreams": {"e": {"url": "http://127.0.0.1:9"}}}))
    port = free_port()
    env = {**os.environ, "AUTHPROXY_PORT": str(port), "AUTHPROXY_LOG_FORMAT": "json"}
    errors = tmp_path / "stderr"
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(AUTHPROXY), "run", "-c", str(config_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        assert b"proxy_started" in proc.stdout.readline()
        proc.stdout.close()  # the terminal went away
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # each request writes an access line
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/health", timeout=2).close()
            time.sleep(0.1)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in errors.read_bytes(), errors.read_text()


async def test_logouts_run_together_and_are_bounded_by_5_s(
    start_proxy: StartProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two upstreams whose logout endpoint never answers (token timeout 30 s): the stop
    still ends within 5 s, and both logouts were sent at once, not one after the other."""
    logouts: list[float] = []

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"token": f"tok-{request.match_info['who']}", "expires_in": 3600})

    async def logout(request: web.Request) -> web.Response:
        logouts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(60)
        return web.json_response({})

    async def resource(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/{who}/login", login)
    app.router.add_delete("/{who}/logout", logout)
    app.router.add_get("/{who}/x", resource)
    async with await serve(app) as endpoint:

        def upstream(who: str) -> dict[str, object]:
            return {
                "url": f"{endpoint.url}/{who}",
                "timeout": {"connect": 10, "read": 60},  # token timeout: the 30 s cap
                "auth": {
                    "type": "login",
                    "request": {"url": f"{endpoint.url}/{who}/login"},
                    "token": "token",
                    "expires_in": "expires_in",
                    "logout": {"method": "DELETE", "url": f"{endpoint.url}/{who}/logout"},
                },
            }

        proxy = await start_proxy({"upstreams": {"a": upstream("a"), "b": upstream("b")}})
        async with aiohttp.ClientSession() as client:
            for who in ("a", "b"):
                async with client.get(f"{proxy.url}/{who}/x") as resp:
                    assert resp.status == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.stop()
        stopped = loop.time() - started
    assert 4.5 < stopped < 6.0, stopped
    assert len(logouts) == 2 and logouts[1] - logouts[0] < 0.5, logouts
    await asyncio.sleep(0)
    assert "logout_timed_out" in capsys.readouterr().out

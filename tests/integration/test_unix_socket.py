"""`listen.path` (SPEC §10) as a user runs it: `authproxy run` in a subprocess, curl
`--unix-socket` in front, and on the way out an HTTPS upstream behind tinyproxy (the
subprocess runs on uvloop, so this is also the CONNECT tunnel on uvloop)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.egress_kit import (
    PROXY_EGRESS_ADDRESS,
    Pki,
    Recorder,
    make_pki,
    recording_upstream,
    tinyproxy,
)
from tests.support.net import free_port
from tests.support.polling import wait_until

AUTHPROXY = Path(sys.executable).parent / "authproxy"


def _environ(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AUTHPROXY_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    return {**env, **extra}


def _start(
    tmp_path: Path, config: dict[str, Any], *args: str, **env: str
) -> tuple[subprocess.Popen[bytes], Path]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(AUTHPROXY), "run", "-c", str(path), "--log-format", "json", *args],
            env=_environ(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


async def _curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code or 0), body


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    return await _wait_exit(proc)


async def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    await wait_until(lambda: proc.poll() is not None, 15, what="the proxy to exit")
    return int(proc.returncode)


def _started(log: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    if proc.poll() is not None:
        raise AssertionError(f"proxy exited {proc.returncode}: {log.read_text()[-2000:]}")
    for line in log.read_text(errors="replace").splitlines():
        if '"proxy_started"' in line:
            record: dict[str, Any] = json.loads(line)
            return record
    return None


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[Recorder]:
    async with recording_upstream(pki.server_context("localhost"), name="localhost") as up:
        yield up


async def test_curl_over_the_unix_socket_mode_0600_and_gone_after_sigterm(
    tmp_path: Path, pki: Pki, tls_upstream: Recorder
) -> None:
    sock_path = tmp_path / "authproxy.sock"
    config = {
        "listen": {"path": str(sock_path)},
        "upstreams": {"api": {"url": tls_upstream.url, "tls": {"ca_file": str(pki.ca_file)}}},
    }
    async with tinyproxy(tmp_path / "tp", connect_ports=(tls_upstream.port,)) as tp:
        proc, log = _start(tmp_path, config, https_proxy=tp.url)
        try:
            started = await wait_until(lambda: _started(log, proc), 20, what="proxy_started")
            assert started is not None
            assert started["listen"] == f"unix:{sock_path}"
            assert started["event_loop"] == "uvloop"  # the CONNECT tunnel on uvloop, too
            assert stat.S_ISSOCK(sock_path.lstat().st_mode)
            assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o600
            # Any Host is accepted on a Unix socket: no web page can reach it.
            code, body = await _curl(
                "--unix-socket", str(sock_path), "http://some.name.test/api/items?q=1"
            )
            assert code == 200, body
            assert json.loads(body)["path"] == "/items?q=1"
            assert [s.peer for s in tls_upstream.seen] == [PROXY_EGRESS_ADDRESS]
            assert await _stop(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert not sock_path.exists()
    assert any('"proxy_stopped"' in line for line in log.read_text().splitlines())


async def test_listen_mode_sets_the_socket_permissions(tmp_path: Path) -> None:
    sock_path = tmp_path / "group.sock"
    config = {
        "listen": {"path": str(sock_path), "mode": "0660"},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
    }
    proc, log = _start(tmp_path, config)
    try:
        await wait_until(lambda: _started(log, proc), 20, what="proxy_started")
        assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o660
        code, body = await _curl("--unix-socket", str(sock_path), "http://x/-/health")
        assert code == 200, body
    finally:
        assert await _stop(proc) == 0
    assert not sock_path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_is_an_error(tmp_path: Path) -> None:
    sock_path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound, never listening: what a crash leaves behind
    stale.close()
    config = {
        "listen": {"path": str(sock_path)},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
    }
    first, log = _start(tmp_path, config)
    try:
        await wait_until(lambda: _started(log, first), 20, what="proxy_started")
        code, _ = await _curl("--unix-socket", str(sock_path), "http://x/-/health")
        assert code == 200

        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second, second_log = _start(second_dir, config)
        assert await _wait_exit(second) == 1
        text = second_log.read_text()
        assert "another process is listening on it" in text, text
        assert "Traceback" not in text
        # The live proxy keeps its socket and keeps serving.
        code, _ = await _curl("--unix-socket", str(sock_path), "http://x/-/health")
        assert code == 200
    finally:
        assert await _stop(first) == 0
    assert not sock_path.exists()


async def test_a_path_that_is_not_a_socket_is_never_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "data.txt"
    precious.write_text("keep me")
    config = {
        "listen": {"path": str(precious)},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
    }
    proc, log = _start(tmp_path, config)
    assert await _wait_exit(proc) == 1
    assert "exists and is not a socket" in log.read_text()
    assert precious.read_text() == "keep me"


async def test_port_on_the_command_line_replaces_listen_path(tmp_path: Path) -> None:
    sock_path = tmp_path / "unused.sock"
    config = {
        "listen": {"path": str(sock_path)},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
    }
    port = free_port()
    proc, log = _start(tmp_path, config, "--port", str(port))
    try:
        started = await wait_until(lambda: _started(log, proc), 20, what="proxy_started")
        assert started is not None
        assert started["listen"] == f"http://127.0.0.1:{port}"
        code, _ = await _curl(f"http://127.0.0.1:{port}/-/health")
        assert code == 200
        assert not sock_path.exists()
    finally:
        assert await _stop(proc) == 0


async def test_workers_share_one_unix_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "workers.sock"
    config = {
        "listen": {"path": str(sock_path)},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
    }
    proc, log = _start(tmp_path, config, "--workers", "2")
    try:

        def supervisor_started() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(log.read_text()[-2000:])
            text = log.read_text(errors="replace")
            if text.count('"proxy_started"') < 2:
                return None
            record: dict[str, Any] = next(
                json.loads(line) for line in text.splitlines() if '"supervisor_started"' in line
            )
            return record

        started = await wait_until(supervisor_started, 30, what="two workers")
        assert started is not None
        assert started["listen"] == f"unix:{sock_path}"
        assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o600
        code, body = await _curl("--unix-socket", str(sock_path), "http://x/-/health")
        assert code == 200, body
    finally:
        assert await _stop(proc) == 0
    assert not sock_path.exists()

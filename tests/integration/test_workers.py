"""`authproxy run --workers N` as a user runs it: a subprocess, real HTTP (SPEC §1, §8).

One supervisor binds the port (here `--port 0`: the bound port is read from its
`supervisor_started` line) and forks the workers; every check talks to the
proxy over loopback. Which worker answered is told by `/-/status`'s `pid`; a
keep-alive connection keeps talking to the worker that accepted it, so
`/-/status` then `/-/metrics` on one connection says who answered the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.fakes import PaymoState, start_paymo

AUTHPROXY = Path(sys.executable).parent / "authproxy"
START_S = 20.0


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == event]

    def workers(self) -> set[int]:
        """Worker pids alive now, from the supervisor's own lines."""
        started = {r["pid"] for r in self.events("worker_started")}
        gone = {r["pid"] for r in self.events("worker_exited") + self.events("worker_stopped")}
        return started - gone


async def until(check: Callable[[], Any], what: str, deadline_s: float = START_S) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(tmp_path: Path, config: dict[str, Any], *args: str, **env: str) -> Running:
    """`authproxy run --workers ...` on a free port (`--port 0`), or on the config's
    `listen.path` when it has one (a port on the command line would replace it)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "proxy.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(AUTHPROXY),
                "run",
                "-c",
                str(path),
                *([] if "path" in config.get("listen", {}) else ["--port", "0"]),
                *("--log-format", "json", *args),
            ],
            env={**environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as at a terminal
        )
    return Running(proc, log)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def go(config: dict[str, Any], *args: str, **env: str) -> Running:
        r = start(tmp_path, config, *args, **env)
        running.append(r)
        return r

    yield go
    for r in running:  # a failed test must not leave processes behind
        pids = r.workers()
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def ready(r: Running, workers: int) -> Running:
    started = await until(
        lambda: r.events("supervisor_started") or r.proc.poll() is not None, "start"
    )
    assert r.proc.poll() is None, r.log.read_text()
    r.url = started[0]["listen"]
    await until(lambda: len(r.events("proxy_started")) >= workers, f"{workers} workers serving")
    return r


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: a new connection per request, so the kernel hands each to either worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def pids_answering(url: str, attempts: int = 40) -> list[int]:
    async def one() -> int:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(url + "/-/status") as resp,
        ):
            assert resp.status == 200
            return int((await resp.json())["pid"])

    return list(await asyncio.gather(*(one() for _ in range(attempts))))


async def scrape_per_worker(
    url: str, want: set[int], deadline_s: float = START_S
) -> dict[int, str]:
    """One `/-/metrics` answer from each worker in `want` (status, then metrics, one connection)."""
    got: dict[int, str] = {}
    deadline = time.monotonic() + deadline_s

    async def one() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(url + "/-/status") as resp:
                pid = int((await resp.json())["pid"])
            async with s.get(url + "/-/metrics") as resp:
                assert resp.status == 200
                got[pid] = await resp.text()

    while not want <= set(got) and time.monotonic() < deadline:
        await asyncio.gather(*(one() for _ in range(8)))
    assert want <= set(got), f"scrapes came only from {sorted(got)}, wanted {sorted(want)}"
    return {pid: got[pid] for pid in want}


def requests_counted(metrics: str, upstream: str) -> float:
    pattern = re.compile(r"^authproxy_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)
    return sum(
        float(value)
        for labels, value in pattern.findall(metrics)
        if f'upstream="{upstream}"' in labels
    )


def config_for(echo_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "shutdown_timeout": 5,
        "upstreams": {
            "echo": {"url": echo_url},
            # A token upstream never used: with the memory store it logs in once per worker.
            "paymo": {
                "url": "http://127.0.0.1:9",
                "auth": {"type": "paymo_session", "api_key": "key-for-tests-only"},
            },
        },
        **extra,
    }


async def stop(r: Running) -> None:
    pids = r.workers()
    r.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(r.proc.wait, 20) == 0, r.log.read_text()[-3000:]
    assert not [pid for pid in pids if alive(pid)], "a worker outlived the supervisor"


async def test_two_workers_both_serve_and_sigterm_exits_0_with_nothing_left(
    spawn, echo, session
) -> None:
    r = await ready(spawn(config_for(echo.url), "--workers", "2"), 2)
    workers = r.workers()
    assert len(workers) == 2 and r.proc.pid not in workers

    seen: set[int] = set()
    deadline = time.monotonic() + START_S
    while seen != workers and time.monotonic() < deadline:
        seen |= set(await pids_answering(r.url))
    assert seen == workers, f"answers came from {sorted(seen)}; workers are {sorted(workers)}"
    async with session.get(r.url + "/echo/hello") as resp:  # and they proxy
        assert resp.status == 200

    (notice,) = r.events("tokens_per_worker")
    assert notice["upstreams"] == ["paymo"] and notice["level"] == "warning"

    await stop(r)
    assert len(r.events("worker_stopped")) == 2
    assert all(e["exit_code"] == 0 for e in r.events("worker_stopped"))


async def test_the_admin_listener_is_bound_once_and_served_by_every_worker(spawn, echo) -> None:
    config = config_for(echo.url, admin={"host": "127.0.0.1", "port": 0})
    r = await ready(spawn(config, "--workers", "2"), 2)
    admin = r.events("supervisor_started")[0]["admin"]
    assert admin.startswith("http://127.0.0.1:") and admin != r.url
    async with aiohttp.ClientSession() as s, s.get(admin + "/-/metrics") as resp:
        assert resp.status == 200
        assert "authproxy_requests_total" in await resp.text()
    assert all(e["admin"] == admin for e in r.events("proxy_started"))
    await stop(r)


async def test_workers_from_the_file_and_from_the_environment(spawn, echo) -> None:
    r = await ready(spawn(config_for(echo.url, workers=2)), 2)
    assert len(r.workers()) == 2
    await stop(r)
    r = await ready(spawn(config_for(echo.url), AUTHPROXY_WORKERS="3"), 3)
    assert len(r.workers()) == 3
    await stop(r)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--workers", "0"], {}, "command line (workers)"),
        ([], {"AUTHPROXY_WORKERS": "many"}, "AUTHPROXY_WORKERS"),
        ([], {"AUTHPROXY_WORKERS": "0"}, "AUTHPROXY_WORKERS"),
    ],
)
def test_a_bad_worker_count_is_a_config_error_naming_where_it_came_from(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for("http://127.0.0.1:9")))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    done = subprocess.run(
        [str(AUTHPROXY), "run", "-c", str(config), *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_a_killed_worker_is_replaced_with_a_back_off_when_they_keep_dying(
    spawn, echo
) -> None:
    r = await ready(spawn(config_for(echo.url), "--workers", "2"), 2)
    delays = []
    for _ in range(3):  # three quick deaths of one slot
        victim = next(e["pid"] for e in reversed(r.events("worker_started")) if e["slot"] == 0)
        before = r.workers() - {victim}
        os.kill(victim, signal.SIGKILL)

        def exited_event(v: int = victim) -> dict[str, Any] | None:
            return next((e for e in r.events("worker_exited") if e["pid"] == v), None)

        exited = await until(exited_event, "the worker's exit")
        assert exited["signal"] == "SIGKILL"
        delays.append(exited["restart_in_s"])

        def replaced(b: set[int] = before) -> bool:
            return len(r.workers() - b) == 1

        await until(replaced, "a replacement", 30)
    assert delays == [0.0, 0.5, 1.0]

    seen: set[int] = set()
    deadline = time.monotonic() + START_S
    while seen != r.workers() and time.monotonic() < deadline:
        seen |= set(await pids_answering(r.url))
    assert seen == r.workers()
    await stop(r)


async def test_sighup_reloads_every_worker_and_stops_nobody(spawn, echo, tmp_path: Path) -> None:
    """SPEC §9 with workers: the supervisor passes SIGHUP on; each worker reloads."""
    config = config_for(echo.url)
    r = await ready(spawn(config, "--workers", "2"), 2)
    workers = r.workers()
    config["upstreams"]["added"] = {"url": echo.url, "prefix": "/added"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r.proc.send_signal(signal.SIGHUP)
    await until(lambda: len(r.events("config_reloaded")) >= 2, "both workers reloaded")
    assert all(e["added"] == ["added"] for e in r.events("config_reloaded"))
    assert r.proc.poll() is None and r.workers() == workers  # nobody stopped or restarted

    async def added_route() -> int:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s,
            s.get(r.url + "/-/status") as status,
        ):
            pid = int((await status.json())["pid"])
            async with s.get(r.url + "/added/echo/x") as resp:
                assert resp.status == 200, await resp.text()
            return pid

    seen: set[int] = set()
    deadline = time.monotonic() + START_S
    while seen != workers and time.monotonic() < deadline:
        seen |= set(await asyncio.gather(*(added_route() for _ in range(10))))
    assert seen == workers
    await stop(r)


async def served_on_one_connection(url: str, n: int) -> tuple[int, int]:
    """`n` proxied requests on one keep-alive connection: (the worker's pid, how many got 200)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        async with s.get(url + "/-/status") as resp:
            pid = int((await resp.json())["pid"])
        ok = 0
        for k in range(n):
            async with s.get(f"{url}/echo/{k}") as resp:
                await resp.read()
                ok += resp.status == 200
        async with s.get(url + "/-/status") as resp:
            assert int((await resp.json())["pid"]) == pid, "the connection changed worker"
    return pid, ok


async def test_metrics_count_every_worker_whichever_answers_and_keep_the_dead_ones(
    spawn, echo
) -> None:
    r = await ready(spawn(config_for(echo.url), "--workers", "2"), 2)
    workers = r.workers()
    served = dict.fromkeys(workers, 0)
    deadline = time.monotonic() + START_S
    while min(served.values()) == 0 and time.monotonic() < deadline:
        for pid, ok in await asyncio.gather(
            *(served_on_one_connection(r.url, 5) for _ in range(4))
        ):
            served[pid] += ok
    assert min(served.values()) > 0, served
    sent = sum(served.values())

    async def every_answer_is(count: float, want: set[int]) -> dict[int, float]:
        # Each worker publishes its numbers every second: poll until the answers agree.
        limit = time.monotonic() + START_S
        while True:
            answers = await scrape_per_worker(r.url, want)
            counts = {pid: requests_counted(text, "echo") for pid, text in answers.items()}
            if set(counts.values()) == {count} or time.monotonic() > limit:
                return counts
            await asyncio.sleep(0.2)

    assert await every_answer_is(sent, workers) == dict.fromkeys(workers, sent)

    victim = max(workers, key=lambda pid: served[pid])  # it served some: its counts must stay
    os.kill(victim, signal.SIGKILL)
    await until(lambda: len(r.workers()) == 2 and victim not in r.workers(), "a replacement")
    await until(lambda: len(r.events("proxy_started")) >= 3, "the replacement serving")
    now = r.workers()
    assert await every_answer_is(sent, now) == dict.fromkeys(now, sent), "dead worker's counts lost"
    await stop(r)


async def test_request_debug_fingerprints_mean_the_same_in_every_worker(spawn, echo) -> None:
    """SPEC §5: the HMAC key is drawn once, by the supervisor, for all its workers."""
    config = config_for(echo.url, log={"level": "debug", "format": "json"})
    config["upstreams"]["echo"]["auth"] = {
        "type": "header",
        "name": "X-Api-Key",
        "value": "static-key-for-tests",
    }
    r = await ready(spawn(config, "--workers", "2"), 2)
    served = dict.fromkeys(r.workers(), 0)
    deadline = time.monotonic() + START_S
    while min(served.values()) == 0 and time.monotonic() < deadline:
        batch = await asyncio.gather(*(served_on_one_connection(r.url, 2) for _ in range(4)))
        for pid, ok in batch:
            served[pid] += ok
    assert min(served.values()) > 0, served
    await stop(r)
    fingerprints = {e["credential"] for e in r.events("request_debug") if e["route"] == "echo"}
    assert len(fingerprints) == 1, fingerprints  # one credential, one fingerprint
    assert "static-key-for-tests" not in r.log.read_text()


async def test_ctrl_c_at_a_terminal_drains_once_instead_of_killing_the_workers(
    spawn, echo, session
) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group: the workers
    must not take it as the second signal (exit at once) once the supervisor passes it on."""
    r = await ready(spawn(config_for(echo.url), "--workers", "2"), 2)
    slow = [asyncio.ensure_future(session.get(f"{r.url}/echo/slow?seconds=1.5")) for _ in range(6)]
    await until(lambda: echo.state.in_flight >= 6, "the slow requests upstream", 10)
    os.killpg(r.proc.pid, signal.SIGINT)  # what the terminal does
    responses = await asyncio.gather(*slow)
    assert [resp.status for resp in responses] == [200] * 6  # drained, not cut
    for resp in responses:
        resp.release()
    assert await asyncio.to_thread(r.proc.wait, 20) == 0, r.log.read_text()[-3000:]
    assert not r.events("proxy_killed")


async def test_sigterm_to_every_process_of_the_unit_drains_once(spawn, echo, session) -> None:
    """systemd's default KillMode (and `kill -TERM` on a cgroup) signals the supervisor and
    each worker: a worker's own copy plus the supervisor's is still one stop, not two."""
    r = await ready(spawn(config_for(echo.url), "--workers", "2"), 2)
    workers = r.workers()
    slow = [asyncio.ensure_future(session.get(f"{r.url}/echo/slow?seconds=1.5")) for _ in range(6)]
    await until(lambda: echo.state.in_flight >= 6, "the slow requests upstream", 10)
    for pid in (r.proc.pid, *workers):
        os.kill(pid, signal.SIGTERM)
    responses = await asyncio.gather(*slow)
    assert [resp.status for resp in responses] == [200] * 6  # drained, not cut
    for resp in responses:
        resp.release()
    assert await asyncio.to_thread(r.proc.wait, 20) == 0, r.log.read_text()[-3000:]
    assert not r.events("proxy_killed")


async def test_a_second_signal_to_the_supervisor_stops_the_workers_at_once(
    spawn, echo, session
) -> None:
    """SPEC §1: a second signal during the drain exits at once — the workers too."""
    config = config_for(echo.url, shutdown_timeout=30)
    r = await ready(spawn(config, "--workers", "2"), 2)
    workers = r.workers()
    slow = asyncio.ensure_future(session.get(f"{r.url}/echo/slow?seconds=20"))
    await until(lambda: echo.state.in_flight >= 1, "the slow request upstream", 10)
    r.proc.send_signal(signal.SIGTERM)
    await until(lambda: len(r.events("proxy_stopping")) >= 2, "both workers draining", 10)
    started = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(r.proc.wait, 10) == 1
    assert time.monotonic() - started < 5
    assert not [pid for pid in workers if alive(pid)]
    with contextlib.suppress(aiohttp.ClientError):
        (await slow).release()


async def test_a_worker_that_never_drains_is_killed_at_the_bound(spawn, echo) -> None:
    """No wait is unbounded: shutdown_delay + shutdown_timeout + 5 s for the worker's own
    stop, a margin, then SIGKILL, and the supervisor exits 1 (not a clean stop)."""
    config = config_for(echo.url, shutdown_timeout=0)
    r = await ready(spawn(config, "--workers", "2"), 2)
    hung = min(r.workers())
    os.kill(hung, signal.SIGSTOP)  # alive, but deaf
    started = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(r.proc.wait, 30) == 1
    took = time.monotonic() - started
    assert 9 <= took < 20, took  # 0 + 0 + 5 + the 5 s margin
    (killed,) = r.events("worker_killed")
    assert killed["pid"] == hung and not alive(hung)


async def test_two_workers_serve_one_unix_socket_and_count_together(
    spawn, echo, tmp_path: Path
) -> None:
    sock_path = tmp_path / "authproxy.sock"
    r = await ready(
        spawn(config_for(echo.url, listen={"path": str(sock_path)}), "--workers", "2"), 2
    )
    assert r.url == f"unix:{sock_path}"
    workers = r.workers()

    def unix_session() -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(path=str(sock_path), force_close=True)
        return aiohttp.ClientSession(connector=connector)

    async def one(k: int) -> int:
        async with unix_session() as s:
            async with s.get(f"http://proxy/echo/{k}") as resp:
                assert resp.status == 200
            async with s.get("http://proxy/-/status") as resp:
                return int((await resp.json())["pid"])

    async def scrape() -> float:
        async with unix_session() as s, s.get("http://proxy/-/metrics") as resp:
            return requests_counted(await resp.text(), "echo")

    seen: set[int] = set()
    sent = 0
    deadline = time.monotonic() + START_S
    while seen != workers and time.monotonic() < deadline:
        seen |= set(await asyncio.gather(*(one(sent + k) for k in range(20))))
        sent += 20
    assert seen == workers, f"answers came from {sorted(seen)}; workers are {sorted(workers)}"

    limit = time.monotonic() + START_S
    while True:  # every worker's requests, whichever answers (snapshots are 1 s apart)
        counts = await asyncio.gather(*(scrape() for _ in range(6)))
        if counts == [sent] * 6:
            break
        assert time.monotonic() < limit, (counts, sent)
        await asyncio.sleep(0.2)
    await stop(r)
    assert not sock_path.exists()


async def connections_per_worker(url: str, workers: set[int], each: int) -> list[Any]:
    """Keep-alive sessions (one connection each), at least `each` per worker, by pid."""
    by_pid: dict[int, list[aiohttp.ClientSession]] = {pid: [] for pid in workers}
    deadline = time.monotonic() + START_S
    while min(len(v) for v in by_pid.values()) < each and time.monotonic() < deadline:
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with s.get(url + "/-/status") as resp:
            pid = int((await resp.json())["pid"])
        if pid in by_pid and len(by_pid[pid]) < each:
            by_pid[pid].append(s)
        else:
            await s.close()
    chosen = [s for v in by_pid.values() for s in v]
    if min(len(v) for v in by_pid.values()) < each:
        for s in chosen:
            await s.close()
        raise AssertionError(f"connections per worker: { {k: len(v) for k, v in by_pid.items()} }")
    return chosen


async def test_with_the_redis_store_two_workers_share_one_token(spawn, redis_server) -> None:
    """SPEC §8 promises 1 and 2 within one `run --workers 2`: a burst over both workers
    makes one token request, and a worker that replaces a killed one makes none."""
    async with await start_paymo(PaymoState(lifetime=600, token_delay=0.5)) as fake:
        upstream = {
            "url": fake.url,
            "auth": {"type": "paymo_session", "api_key": fake.state.api_key},
        }
        config = {
            "token_store": {"type": "redis", "url": redis_server.url},
            "upstreams": {"paymo": upstream},
        }
        r = await ready(spawn(config, "--workers", "2"), 2)
        assert not r.events("tokens_per_worker")  # shared: no worker logs in on its own

        async def burst(sessions: list[aiohttp.ClientSession]) -> list[int]:
            async def ten(s: aiohttp.ClientSession) -> list[int]:
                statuses = []
                for _ in range(10):
                    async with s.get(r.url + "/paymo/me") as resp:
                        await resp.read()
                        statuses.append(resp.status)
                await s.close()
                return statuses

            return [
                code
                for codes in await asyncio.gather(*(ten(s) for s in sessions))
                for code in codes
            ]

        # Every connection asks at once, none holding a token: both workers wait.
        sessions = await connections_per_worker(r.url, r.workers(), 3)
        assert await burst(sessions) == [200] * 60
        assert len(fake.state.token_calls) == 1

        victim = min(r.workers())
        os.kill(victim, signal.SIGKILL)
        await until(lambda: len(r.workers()) == 2 and victim not in r.workers(), "a replacement")
        sessions = await connections_per_worker(r.url, r.workers(), 2)
        assert await burst(sessions) == [200] * 40
        assert len(fake.state.token_calls) == 1  # the replacement found the stored token

        await stop(r)
        assert len(fake.state.token_calls) == 1  # no logout either: the session is shared

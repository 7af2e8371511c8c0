"""`authproxy run --workers N`: one listening socket, N serving processes (SPEC §8).

The supervisor binds the listening socket once — TCP, or a Unix socket with
`listen.path` — and forks N workers that inherit it; each runs the ordinary
single-process server (`proxy.server.serve`) on that socket and never learns
it is one of N. The kernel hands each new connection to whichever worker
accepts first. Not `SO_REUSEPORT`: it does not exist for Unix sockets, with
`--port 0` every worker would get a port of its own, and the connections
queued on a dying worker's socket would be reset instead of served by the others.

The supervisor forks before any event loop or thread exists (it never runs
one: signals are waited for with `sigtimedwait`), so every worker starts from
a clean process with the config already loaded and validated, and shares
whatever was drawn at import time: the `request_debug` HMAC key of SPEC §5
(proxy/logs.py) is the supervisor's, so a fingerprint means the same in every worker.

It restarts a worker that dies — at once the first time, then with a back-off
doubling from 0.5 s to 30 s while workers of that slot keep dying within 10 s
of starting; it passes SIGTERM, SIGINT and SIGHUP on to every worker, and
exits 0 once all of them have drained (1 if one had to be killed). It also
owns the directory the workers' metrics snapshots meet in
(proxy/workermetrics.py) and removes it at exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy.config import Config, TokenAuthBase
from proxy.listener import UnixSocketFile, bind_unix
from proxy.logs import WRITER
from proxy.reload import ConfigSource
from proxy.server import (  # imported before the fork: workers share what it draws
    listen_url,
    run,
    serve,
)
from proxy.workermetrics import mark_dead, share_metrics

log = structlog.get_logger("authproxy.supervisor")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAITED = frozenset({*FORWARDED, signal.SIGCHLD})
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long resets its slot's back-off
TICK = 0.5  # the longest the supervisor sleeps without looking at its workers
BACKLOG = 1024
# Beyond a worker's own bound on its stop (delay + drain + logouts), before it is killed.
STOP_MARGIN = 5.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Listeners:
    """What the supervisor bound once, for every worker to accept on."""

    main: socket.socket
    admin: socket.socket | None
    metrics_dir: Path


ServeWorker = Callable[[Config, Listeners], None]


def serve_worker(config: Config, listeners: Listeners, source: ConfigSource | None = None) -> None:
    """A worker's whole life: the single-process server on the shared sockets; with
    `source`, the SIGHUP the supervisor passes on reloads it (SPEC §9)."""
    directory = listeners.metrics_dir
    run(
        serve(
            config,
            sock=listeners.main,
            admin_sock=listeners.admin,
            contexts=[lambda proxy: share_metrics(proxy.metrics, directory)],
            source=source,
        ),
        config.event_loop,
    )


def bind_tcp(host: str, port: int) -> tuple[socket.socket, str]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address, family=family, backlog=BACKLOG)
    bound = sock.getsockname()
    return sock, listen_url(bound[0], bound[1])


def bind_listener(config: Config) -> tuple[socket.socket, str, UnixSocketFile | None]:
    """The socket every worker accepts on, what to call it in the log, and the
    Unix socket's path (removed at exit) when it is one."""
    path = config.listen.path
    if path is not None:
        # A stale socket is replaced, a live one is an error (proxy/listener.py).
        sock, unix = bind_unix(path, config.listen.mode, BACKLOG)
        return sock, f"unix:{path}", unix
    sock, shown = bind_tcp(config.listen.host, config.listen.port)
    return sock, shown, None


def per_worker_logins(config: Config) -> list[str]:
    """Upstreams that will log in once per worker: token auth without a shared store."""
    if config.token_store.type != "memory":
        return []
    return sorted(
        name
        for name, upstream in config.upstreams.items()
        if isinstance(upstream.auth, TokenAuthBase)
    )


@dataclass(slots=True)
class Worker:
    slot: int
    pid: int
    started: float


class Supervisor:
    def __init__(self, config: Config, count: int, serve: ServeWorker = serve_worker) -> None:
        self.config = config
        self.count = count
        self._serve = serve
        self._workers: dict[int, Worker] = {}  # by pid
        self._due: dict[int, float] = {}  # slot -> when to restart it
        self._failures: dict[int, int] = {}  # slot -> quick deaths in a row
        self._stopping = False
        self._stop_deadline = 0.0
        self._unclean = False
        self._mask: set[int | signal.Signals] = set()
        self._listeners: Listeners | None = None

    def run(self) -> int:
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
        sock, shown, unix_file = bind_listener(self.config)
        admin, admin_shown = None, None
        try:
            if self.config.admin is not None:
                admin, admin_shown = bind_tcp(self.config.admin.host, self.config.admin.port)
        except BaseException:
            sock.close()
            raise
        self._listeners = Listeners(
            sock, admin, Path(tempfile.mkdtemp(prefix="authproxy-metrics-"))
        )
        try:
            log.info(
                "supervisor_started",
                listen=shown,
                admin=admin_shown,
                workers=self.count,
                pid=os.getpid(),
            )
            logins = per_worker_logins(self.config)
            if logins and self.count > 1:
                log.warning(
                    "tokens_per_worker",
                    upstreams=logins,
                    workers=self.count,
                    message="with the memory token store each worker obtains its own tokens; "
                    "token_store: {type: redis} shares one",
                )
            for slot in range(self.count):
                self._start(slot)
            return self._loop()
        finally:
            sock.close()
            if admin is not None:
                admin.close()
            if unix_file is not None:
                unix_file.remove()  # only if it is still ours
            shutil.rmtree(self._listeners.metrics_dir, ignore_errors=True)
            log.info("supervisor_stopped")
            WRITER.flush()
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def _loop(self) -> int:
        while True:
            info = signal.sigtimedwait(WAITED, self._timeout())
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._on_signal(signal.Signals(info.si_signo))
            self._reap()
            now = time.monotonic()
            if self._stopping:
                if not self._workers:
                    return 1 if self._unclean else 0
                if now >= self._stop_deadline:
                    self._kill_all()
                continue
            for slot, when in list(self._due.items()):
                if when <= now:
                    del self._due[slot]
                    self._start(slot)

    def _timeout(self) -> float:
        soonest = min(self._due.values(), default=time.monotonic() + TICK)
        return max(0.0, min(TICK, soonest - time.monotonic()))

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self._stopping:
                # A second stop signal: exit at once (SPEC §1). The workers ignore a
                # repeated one themselves (under systemd's default KillMode each gets
                # its own copy as well as ours), so the supervisor ends them.
                self._kill_all(f"a second {signum.name}")
                return
            if not self._stopping:
                log.info("supervisor_stopping", signal=signum.name, workers=len(self._workers))
                config = self.config
                bound = config.shutdown_delay + config.shutdown_timeout + 5 + STOP_MARGIN
                self._stop_deadline = time.monotonic() + bound
            self._stopping = True
            self._due.clear()
        for pid in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _start(self, slot: int) -> None:
        assert self._listeners is not None
        WRITER.flush()  # or the child would write the parent's pending lines again
        sys.stdout.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child(self._listeners, parent)
        self._workers[pid] = Worker(slot, pid, time.monotonic())
        log.info("worker_started", slot=slot, pid=pid)

    def _child(self, listeners: Listeners, parent: int) -> None:
        code = 1
        try:
            # A process group of its own: a terminal's Ctrl-C (sent to the whole
            # foreground group) reaches the supervisor only, which passes it on
            # once; twice would be "a second signal: exit at once".
            os.setpgid(0, 0)
            _die_with_parent(parent)
            WRITER.max_write = select.PIPE_BUF  # whole lines, never mixed with a sibling's
            # SIGHUP is a reload (SPEC §9), never a reason to die: ignored until the
            # server takes it over. A stop signal before the server's own handlers
            # are in place stops this worker before it serves anything.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, _exit_quietly)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._serve(self.config, listeners)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker_failed", pid=os.getpid())
        finally:
            with contextlib.suppress(BaseException):
                WRITER.flush()
            os._exit(code)

    def _reap(self) -> None:
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            if self._listeners is not None:
                mark_dead(self._listeners.metrics_dir, pid)
            code = os.waitstatus_to_exitcode(status)
            lived = time.monotonic() - worker.started
            fields: dict[str, object] = {
                "slot": worker.slot,
                "pid": pid,
                "lived_s": round(lived, 1),
            }
            if code < 0:
                fields["signal"] = signal.Signals(-code).name
            else:
                fields["exit_code"] = code
            if self._stopping:
                self._unclean |= code != 0
                log.info("worker_stopped", **fields)
                continue
            failures = 0 if lived >= STABLE_AFTER else self._failures.get(worker.slot, 0) + 1
            self._failures[worker.slot] = failures
            delay = 0.0 if failures <= 1 else min(RESTART_FIRST * 2 ** (failures - 2), RESTART_MAX)
            self._due[worker.slot] = time.monotonic() + delay
            log.warning("worker_exited", **fields, restart_in_s=delay)

    def _kill_all(self, reason: str = "did not stop in time") -> None:
        for pid in self._workers:
            log.warning("worker_killed", pid=pid, reason=reason)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._unclean = True
        self._stop_deadline = time.monotonic() + TICK * 4


def _exit_quietly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _die_with_parent(parent: int) -> None:
    """Linux: a worker whose supervisor was SIGKILLed gets SIGTERM and drains."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(config: Config, source: ConfigSource | None = None) -> int:
    """Serve `config` with `config.workers` processes; the exit code of `run`."""
    return Supervisor(config, config.workers, functools.partial(serve_worker, source=source)).run()

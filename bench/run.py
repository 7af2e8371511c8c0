#!/usr/bin/env python3
"""authproxy benchmark: authproxy against nginx as a peer proxy and against no proxy at all.

One command, everything on 127.0.0.1, in a temporary work directory::

    python bench/run.py [--smoke] [--rounds N] [--duration S] [--out DIR] [--keep]

It starts an upstream nginx (a ~200-byte JSON file, a large file, an upload
sink), a second nginx as the peer proxy a user would otherwise deploy, two
authproxy processes (a static header route and an OAuth2 client-credentials
route whose token comes from the getpaid fake in its own process), then runs
wrk at several concurrencies and curl for large downloads and uploads,
interleaved over several rounds. It prints a markdown report and writes
``bench-<UTC timestamp>.md`` and ``.json`` into ``--out``. See bench/README.md.

Exit codes: 0 done, 1 a failure (a target misbehaved, a process died), 2 usage
or a missing tool (nginx, wrk, curl), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
APT_COMMAND = "apt-get install -y nginx-light wrk"

STATIC_AUTHORIZATION = "Bearer static-bench-token"
GETPAID_CLIENT_ID = "demo-getpaid-client"
GETPAID_CLIENT_SECRET = "demo-getpaid-secret"  # the fake's demo default, not a real secret
GETPAID_AUDIENCE = "https://api.getpaid.io"
GETPAID_SCOPE = "accounts:read_write invoices:read_write"

DIRECT, NGINX, AUTHPROXY, TOKEN = "direct", "nginx", "authproxy", "authproxy-token"
TARGETS = (DIRECT, NGINX, AUTHPROXY, TOKEN)
LARGE_TARGETS = (DIRECT, NGINX, AUTHPROXY)
LATENCY_TARGETS = (DIRECT, NGINX, AUTHPROXY)
PREFIX = "/up"
TOKEN_EVENTS = ("token_acquired", "token_refreshed")

TIMES = "\u00d7"  # the multiplication sign in ratios
MIB = 1024 * 1024
MB = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_INTERVAL_S = 0.02

TABLE_HEADER = (
    "| c | target | req/s | p50 µs | p99 µs | CPU µs/req (proxy) | CPU µs/req (upstream) "
    "| req/s ÷ nginx | req/s ÷ direct | CPU ÷ nginx |"
)

SMALL_JSON = (
    json.dumps(
        {
            "id": 4242,
            "object": "invoice",
            "status": "paid",
            "customer": {"id": 17, "name": "Example Ltd", "email": "billing@example.invalid"},
            "amount": {"value": "1999.00", "currency": "EUR"},
            "lines": 3,
            "created_at": "2024-05-01T12:00:00Z",
        },
        separators=(",", ":"),
    )
    + "\n"
)


class BenchError(Exception):
    """A failure that makes the figures meaningless (exit 1)."""


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    smoke: bool
    rounds: int
    duration: int
    concurrencies: tuple[int, ...]
    warmup_s: int
    big_bytes: int
    out: Path
    keep: bool
    peer_access_log: bool
    transfers: int
    pairs: int
    tmp_base: Path | None


def default_tmp_base() -> Path | None:
    """tmpfs when there is one: nginx's upload temp files and big.bin stay off the disk."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark authproxy against nginx (peer proxy) and direct-to-upstream.",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes (tests)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; smoke 1)")
    parser.add_argument(
        "--duration",
        type=int,
        help="seconds per wrk run (default 5; smoke 1; wrk takes whole seconds only)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="comma-separated wrk connection counts (default 1,10,100; smoke 1,10)",
    )
    parser.add_argument(
        "--big-mib", type=int, help="size of the large file in MiB (default 100; smoke 1)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="report directory (default bench/results/)"
    )
    parser.add_argument(
        "--transfers",
        type=int,
        help="large downloads/uploads per target per round; the round takes their median "
        "(default 3; smoke 1)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="short paired runs for the figures that compare near neighbours: 1-second runs "
        "of the static and the token route per concurrency (token ÷ static), and of direct, "
        "nginx and authproxy at c=1 (added latency) (default 12; smoke 1)",
    )
    parser.add_argument(
        "--tmp",
        type=Path,
        help="where the work directory is created (default /dev/shm if usable, else $TMPDIR)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--peer-access-log",
        choices=("on", "off"),
        default="on",
        help="nginx peer's access log (default on, as nginx ships; authproxy logs too)",
    )
    args = parser.parse_args(argv)
    smoke: bool = args.smoke
    rounds = args.rounds if args.rounds is not None else (1 if smoke else 3)
    duration = args.duration if args.duration is not None else (1 if smoke else 5)
    conc = (
        args.concurrency if args.concurrency is not None else ((1, 10) if smoke else (1, 10, 100))
    )
    big_mib = args.big_mib if args.big_mib is not None else (1 if smoke else 100)
    transfers = args.transfers if args.transfers is not None else (1 if smoke else 3)
    pairs = args.pairs if args.pairs is not None else (1 if smoke else 12)
    if min(rounds, duration, big_mib, transfers, pairs, *conc) < 1 or not conc:
        parser.error(
            "--rounds, --duration, --big-mib, --transfers, --pairs, --concurrency: positive"
        )
    return Settings(
        smoke=smoke,
        rounds=rounds,
        duration=duration,
        concurrencies=tuple(conc),
        warmup_s=1 if smoke else 2,
        big_bytes=big_mib * MIB,
        out=args.out,
        keep=args.keep,
        peer_access_log=args.peer_access_log == "on",
        transfers=transfers,
        pairs=pairs,
        tmp_base=args.tmp if args.tmp is not None else default_tmp_base(),
    )


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    curl: str


def find_tools() -> Tools | None:
    """nginx (often in /usr/sbin, not on a user's PATH), wrk and curl; None after a message."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    wrk = shutil.which("wrk")
    curl = shutil.which("curl")
    if nginx and wrk and curl:
        return Tools(nginx=nginx, wrk=wrk, curl=curl)
    missing = [n for n, p in (("nginx", nginx), ("wrk", wrk), ("curl", curl)) if not p]
    print(f"bench: missing {', '.join(missing)}. Install with:", file=sys.stderr)
    if nginx is None or wrk is None:
        print(f"  {APT_COMMAND}", file=sys.stderr)
    if curl is None:
        print("  apt-get install -y curl", file=sys.stderr)
    return None


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised comm), or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children, by scanning /proc for ppid (works without CONFIG_PROC_CHILDREN)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:  # field 4: ppid
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in children_of(pid):
        pids.extend(process_tree(child))
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat) summed over `pids`."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS (``echo 5 > /proc/<pid>/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssWatch:
    """Resident memory of a process tree around one transfer.

    Samples the summed VmRSS every ~20 ms on a thread; the kernel's VmHWM is
    reset before the transfer and read after it, so a peak shorter than the
    sampling interval is not missed (for a multi-process tree the summed VmHWM
    is an upper bound). ``lifetime_hwm_kib`` keeps the largest VmHWM ever read,
    i.e. the peak over the whole run although the counter gets reset.
    """

    def __init__(self, pids_fn: Callable[[], list[int]]) -> None:
        self._pids_fn = pids_fn
        self.lifetime_hwm_kib = 0
        self._pids: list[int] = []
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self.before_kib = 0

    def _sum(self, key: str) -> int:
        return sum(status_kib(pid, key) or 0 for pid in self._pids)

    def note_hwm(self) -> int:
        self._pids = self._pids_fn()
        hwm = self._sum("VmHWM")
        self.lifetime_hwm_kib = max(self.lifetime_hwm_kib, hwm)
        return hwm

    def start(self) -> None:
        self.note_hwm()
        self._hwm_reset = all([reset_hwm(pid) for pid in self._pids])  # noqa: C419 (reset all)
        self.before_kib = self._sum("VmRSS")
        self._samples = [self.before_kib]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._samples.append(self._sum("VmRSS"))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples.append(self._sum("VmRSS"))
        sampled_peak = max(self._samples)
        hwm = self.note_hwm()
        peak = max(sampled_peak, hwm) if self._hwm_reset else sampled_peak
        return {
            "rss_before_kib": self.before_kib,
            "rss_peak_kib": peak,
            "rss_sampled_peak_kib": sampled_peak,
            "rss_growth_kib": peak - self.before_kib,
            "rss_samples": len(self._samples),
            "hwm_reset": self._hwm_reset,
        }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """Our environment without proxy variables (loopback only) and AUTHPROXY_* overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("AUTHPROXY_")
    }
    env["BENCH_GETPAID_CLIENT_SECRET"] = GETPAID_CLIENT_SECRET
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    pgid_members: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Services:
    """Every process we started; all of them are stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.items: list[Service] = []

    def start(self, name: str, argv: list[str], port: int, log_path: Path, cwd: Path) -> Service:
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env(),
                start_new_session=True,  # own process group: no terminal Ctrl-C, killpg works
            )
        service = Service(name=name, proc=proc, port=port, log_path=log_path)
        self.items.append(service)
        return service

    def check_alive(self) -> None:
        for s in self.items:
            if not s.alive():
                raise BenchError(
                    f"{s.name} (pid {s.proc.pid}) exited with {s.proc.returncode}; "
                    f"last lines of {s.log_path.name}:\n{s.log_tail()}"
                )

    def stop_all(self) -> None:
        """SIGTERM every process group (newest first), wait, then SIGKILL what is left."""
        for s in self.items:
            s.pgid_members = {pid for pid in s.pids() if _pgid(pid) == s.proc.pid}
        for s in reversed(self.items):
            if s.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for s in reversed(self.items):
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{s.name} did not stop on SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
        # Stragglers of a group whose leader already exited (e.g. an nginx worker): by pid.
        time.sleep(0.05)
        for s in self.items:
            for pid in s.pgid_members:
                if pid != s.proc.pid and _pgid(pid) == s.proc.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields is not None else None  # field 5: pgrp


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment: this traffic stays on 127.0.0.1."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_http(service: Service, url: str, timeout: float = 30.0) -> None:
    """Until `url` answers 200 (or the process dies, or `timeout`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(
                f"{service.name} exited with {service.proc.returncode} during start-up:\n"
                f"{service.log_tail()}"
            )
        try:
            status, _ = http_get(url, timeout=2.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"status {status}"
        time.sleep(0.05)
    raise BenchError(f"{service.name} not ready at {url} after {timeout:.0f}s ({last})")


# --------------------------------------------------------------------------- set-up


@dataclass
class Work:
    root: Path
    www: Path
    big: Path


def make_workdir(settings: Settings) -> Work:
    root = Path(tempfile.mkdtemp(prefix="authproxy-bench-", dir=settings.tmp_base))
    # nginx workers run as `nobody` when started by root: they must read www/.
    root.chmod(0o755)
    www = root / "www"
    www.mkdir()
    www.chmod(0o755)
    (www / "small.json").write_text(SMALL_JSON)
    big = www / "big.bin"
    with big.open("wb") as f:
        remaining = settings.big_bytes
        while remaining:
            n = min(remaining, MIB)
            f.write(os.urandom(n))
            remaining -= n
    for p in (www / "small.json", big):
        p.chmod(0o644)
    for name in ("upstream", "peer"):  # nginx creates the temp dirs, not their parent
        (root / f"{name}-tmp").mkdir(mode=0o755)
    return Work(root=root, www=www, big=big)


def _temp_paths(root: Path, name: str) -> str:
    tmp = root / f"{name}-tmp"
    return "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def upstream_conf(work: Work, port: int) -> str:
    """The fast upstream. /upload reads the whole body before answering (see README)."""
    r = work.root
    return f"""# upstream: static files and an upload sink
worker_processes 1;
daemon off;
pid {r / "upstream.pid"};
error_log {r / "upstream-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  types {{ application/json json; application/octet-stream bin; }}
  default_type application/octet-stream;
{_temp_paths(r, "upstream")}
  server {{
    listen 127.0.0.1:{port};
    root {work.www};
    # What reached the upstream as Authorization (checked once at start, never printed).
    location = /auth-echo {{ return 200 "$http_authorization"; }}
    # Upload sink: proxy_pass with request buffering (nginx's default) reads the
    # WHOLE body (1 MiB reads, into a temp file) before it sends anything; the
    # body is not passed on. `return` alone would answer before the body arrived.
    location = /upload {{
      client_max_body_size 0;
      client_body_buffer_size 1m;
      proxy_pass http://127.0.0.1:{port}/upload-done;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Bench-Received $content_length;
    }}
    location = /upload-done {{ return 200 '{{"received": "${{http_x_bench_received}}"}}\\n'; }}
  }}
}}
"""


def peer_conf(work: Work, port: int, upstream_port: int, access_log: bool) -> str:
    """nginx as the proxy a user would otherwise deploy, injecting a static header."""
    r = work.root
    log_line = f"access_log {r / 'nginx-peer-access.log'};" if access_log else "access_log off;"
    return f"""# nginx peer proxy
worker_processes 1;
daemon off;
pid {r / "nginx-peer.pid"};
error_log {r / "nginx-peer-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  {log_line}
{_temp_paths(r, "peer")}
  upstream bench_upstream {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location {PREFIX}/ {{
      proxy_pass http://bench_upstream/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{STATIC_AUTHORIZATION}";
      proxy_request_buffering off;
      client_max_body_size 0;
    }}
  }}
}}
"""


def authproxy_config(port: int, upstream_port: int, auth: dict[str, Any]) -> str:
    """A one-route config (JSON is YAML); logging stays as shipped (info, JSON lines)."""
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "log": {"level": "info", "format": "json"},
        "upstreams": {
            "up": {"prefix": PREFIX, "url": f"http://127.0.0.1:{upstream_port}", "auth": auth}
        },
    }
    return json.dumps(config, indent=2) + "\n"


def authproxy_argv() -> list[str]:
    """`authproxy` of this interpreter's environment, else `python -m proxy`."""
    script = Path(sys.executable).with_name("authproxy")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy"]


@dataclass(frozen=True)
class Target:
    name: str
    base: str  # URL prefix for the upstream's paths
    service: Service | None  # the proxy process; None for direct


@dataclass
class Bench:
    settings: Settings
    tools: Tools
    work: Work
    services: Services
    upstream: Service
    targets: dict[str, Target]


def start_all(settings: Settings, tools: Tools, work: Work, services: Services) -> Bench:
    def start_nginx(name: str, conf: str, port: int) -> Service:
        conf_path = work.root / f"{name}.conf"
        conf_path.write_text(conf)
        argv = [tools.nginx, "-p", str(work.root), "-c", str(conf_path)]
        argv += ["-e", str(work.root / f"{name}-error.log")]
        return services.start(name, argv, port, work.root / f"{name}.out", work.root)

    up_port = free_port()
    upstream = start_nginx("upstream", upstream_conf(work, up_port), up_port)
    wait_http(upstream, f"http://127.0.0.1:{up_port}/small.json")

    peer_port = free_port()
    peer = start_nginx(
        "nginx-peer", peer_conf(work, peer_port, up_port, settings.peer_access_log), peer_port
    )

    fake_port = free_port()
    fake = services.start(
        "getpaid-fake",
        [sys.executable, str(BENCH_DIR / "getpaid_fake.py"), "--port", str(fake_port)],
        fake_port,
        work.root / "getpaid-fake.log",
        REPO_ROOT,
    )

    def start_authproxy(name: str, auth: dict[str, Any]) -> Service:
        port = free_port()
        conf = work.root / f"{name}.yaml"
        conf.write_text(authproxy_config(port, up_port, auth))
        argv = [*authproxy_argv(), "run", "-c", str(conf), "--log-format", "json"]
        return services.start(name, argv, port, work.root / f"{name}.log", work.root)

    static = start_authproxy(
        AUTHPROXY,
        {"type": "header", "name": "Authorization", "value": STATIC_AUTHORIZATION},
    )
    _wait_any_http(fake, f"http://127.0.0.1:{fake_port}/")  # any answer from the fake
    token = start_authproxy(
        TOKEN,
        {
            "type": "oauth2_client_credentials",
            "token_url": f"http://127.0.0.1:{fake_port}/oauth/token",
            "client_id": GETPAID_CLIENT_ID,
            "client_secret": "${BENCH_GETPAID_CLIENT_SECRET}",
            "audience": GETPAID_AUDIENCE,
            "scope": GETPAID_SCOPE,
            "body_format": "json",
        },
    )
    targets = {
        DIRECT: Target(DIRECT, f"http://127.0.0.1:{up_port}", None),
        NGINX: Target(NGINX, f"http://127.0.0.1:{peer_port}{PREFIX}", peer),
        AUTHPROXY: Target(AUTHPROXY, f"http://127.0.0.1:{static.port}{PREFIX}", static),
        TOKEN: Target(TOKEN, f"http://127.0.0.1:{token.port}{PREFIX}", token),
    }
    for t in targets.values():
        if t.service is not None:
            wait_http(t.service, t.base + "/small.json")
    return Bench(settings, tools, work, services, upstream, targets)


def _wait_any_http(service: Service, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited during start-up:\n{service.log_tail()}")
        try:
            http_get(url, timeout=2.0)
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise BenchError(f"{service.name} not listening at {url} after {timeout:.0f}s")


def answers_100_continue(base: str) -> bool:
    """Does `base`/upload answer ``Expect: 100-continue`` with an interim 100 within 0.5 s?

    curl sends the header with large uploads (here: 1 MiB and up) and, without
    a 100, waits a full second before sending the body anyway: a proxy that
    does not answer it loses a second on every large upload.
    """
    url = urllib.parse.urlsplit(base)
    assert url.hostname is not None and url.port is not None
    head = (
        f"PUT {url.path}/upload HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0.5)
        try:
            first = sock.recv(64)
        except TimeoutError:
            first = b""
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            sock.sendall(b"hello")
            while sock.recv(65536):
                pass
    return first.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100"))


def verify(bench: Bench) -> dict[str, bool]:
    """Every target serves the JSON file, and the upstream sees the right credential.

    Returns, per target, whether it answers ``Expect: 100-continue``.
    """
    expect: dict[str, bool] = {}
    for t in bench.targets.values():
        expect[t.name] = answers_100_continue(t.base)
        status, body = http_get(t.base + "/small.json")
        if status != 200 or body != SMALL_JSON.encode():
            raise BenchError(f"{t.name}: GET /small.json gave {status}, {len(body)} bytes")
        status, seen = http_get(t.base + "/auth-echo")
        if status != 200:
            raise BenchError(f"{t.name}: GET /auth-echo gave {status}")
        value = seen.decode()
        if t.name == DIRECT:
            ok = value == ""
        elif t.name == TOKEN:
            ok = value.startswith("Bearer ey") and value != STATIC_AUTHORIZATION
        else:
            ok = value == STATIC_AUTHORIZATION
        if not ok:  # never print the value: it may be a token
            raise BenchError(f"{t.name}: the upstream did not receive the expected Authorization")
    return expect


# --------------------------------------------------------------------------- wrk

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_LAT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQS_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKERR_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def to_us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """requests/sec, requests, duration, latency percentiles (µs) and errors from wrk output."""
    rps = _RPS_RE.search(text)
    reqs = _REQS_RE.search(text)
    if rps is None or reqs is None:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    pct = {float(m[1]): to_us(m[2], m[3]) for m in _LAT_RE.finditer(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"wrk printed no latency distribution:\n{text}")
    non2xx = _NON2XX_RE.search(text)
    sockerr = _SOCKERR_RE.search(text)
    return {
        "rps": float(rps[1]),
        "requests": int(reqs[1]),
        "duration_s": to_us(reqs[2], reqs[3]) / 1e6,
        "p50_us": pct[50.0],
        "p75_us": pct.get(75.0),
        "p90_us": pct.get(90.0),
        "p99_us": pct[99.0],
        "non2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sockerr.groups()) if sockerr else 0,
    }


def run_wrk(bench: Bench, url: str, connections: int, duration: int) -> dict[str, Any]:
    argv = [bench.tools.wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, env=child_env(), check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return parse_wrk(proc.stdout)


def measure_small(
    bench: Bench, target: Target, connections: int, duration: int | None = None
) -> dict[str, Any]:
    bench.services.check_alive()
    proxy_pids = target.service.pids() if target.service else []
    up_pids = bench.upstream.pids()
    proxy0, up0 = cpu_seconds(proxy_pids), cpu_seconds(up_pids)
    seconds = bench.settings.duration if duration is None else duration
    result = run_wrk(bench, target.base + "/small.json", connections, seconds)
    proxy1, up1 = cpu_seconds(proxy_pids), cpu_seconds(up_pids)
    n = result["requests"]
    proxy_us = (proxy1 - proxy0) * 1e6 / n if target.service and n else None
    up_us = (up1 - up0) * 1e6 / n if n else None
    return {
        **result,
        "url": target.base + "/small.json",
        "proxy_cpu_s": proxy1 - proxy0 if target.service else None,
        "upstream_cpu_s": up1 - up0,
        "proxy_cpu_us_per_req": proxy_us,
        "upstream_cpu_us_per_req": up_us,
        # The figure for the target itself: the proxy's, or the upstream's for direct.
        "cpu_us_per_req": proxy_us if target.service else up_us,
    }


# --------------------------------------------------------------------------- curl


def run_curl(bench: Bench, argv: list[str]) -> list[str]:
    full = [bench.tools.curl, "-s", "-S", "--noproxy", "*", "--max-time", "600", *argv]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=660, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(full)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.split()


def measure_large(
    bench: Bench, target: Target, direction: str, rss: RssWatch | None
) -> dict[str, Any]:
    """One 100 MiB download or upload through `target` with curl; MB/s with 1 MB = 10^6 B."""
    bench.services.check_alive()
    size = bench.settings.big_bytes
    response = bench.work.root / "upload-response.json"
    if direction == "download":
        argv = ["-o", "/dev/null", "-w", "%{http_code} %{speed_download} %{size_download}"]
        argv.append(target.base + "/big.bin")
    else:
        argv = ["-o", str(response), "-T", str(bench.work.big)]
        argv += ["-w", "%{http_code} %{speed_upload} %{size_upload}", target.base + "/upload"]
    if rss is not None:
        rss.start()
    try:
        code, speed, nbytes = run_curl(bench, argv)
    finally:
        memory = rss.stop() if rss is not None else {}
    if code != "200" or int(nbytes) != size:
        raise BenchError(f"{target.name} {direction}: status {code}, {nbytes} of {size} bytes")
    if direction == "upload":
        received = json.loads(response.read_text())["received"]
        if int(received) != size:
            raise BenchError(f"{target.name} upload: the upstream received {received} bytes")
    return {"mb_per_s": float(speed) / MB, "bytes": int(nbytes), **memory}


# --------------------------------------------------------------------------- the run


def round_order(items: Sequence[str], rnd: int) -> list[str]:
    """Round `rnd`'s order (1-based): rotated by one a round, and reversed every
    second round, so no target always runs right after the same neighbour (a plain
    rotation keeps every target's predecessor)."""
    k = (rnd - 1) % len(items)
    order = [*items[k:], *items[:k]]
    return order if rnd % 2 else order[::-1]


@dataclass
class Raw:
    small: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    triples: list[dict[str, Any]] = field(default_factory=list)
    large: list[dict[str, Any]] = field(default_factory=list)
    warmup_large: list[dict[str, Any]] = field(default_factory=list)
    rss_watch: dict[str, RssWatch] = field(default_factory=dict)


def run_bench(bench: Bench, raw: Raw) -> None:
    s = bench.settings
    for name in (AUTHPROXY, NGINX):
        svc = bench.targets[name].service
        assert svc is not None
        raw.rss_watch[name] = RssWatch(svc.pids)

    log(f"warm-up: wrk -c{max(s.concurrencies)} for {s.warmup_s}s per target, one large each way")
    for name in TARGETS:
        run_wrk(bench, bench.targets[name].base + "/small.json", max(s.concurrencies), s.warmup_s)
    for name in LARGE_TARGETS:
        for direction in ("download", "upload"):
            result = measure_large(bench, bench.targets[name], direction, raw.rss_watch.get(name))
            raw.warmup_large.append({"target": name, "direction": direction, **result})

    for rnd in range(1, s.rounds + 1):
        for c in s.concurrencies:
            for name in round_order(TARGETS, rnd):
                result = measure_small(bench, bench.targets[name], c)
                raw.small.append({"round": rnd, "c": c, "target": name, **result})
                log(
                    f"round {rnd} c={c:<3} {name:<15} {result['rps']:>9.0f} req/s  "
                    f"p50 {result['p50_us']:>7.0f} µs  "
                    f"CPU {_f(result['cpu_us_per_req'], 1):>6} µs/req"
                )
        for k in range(1, s.transfers + 1):
            for name in round_order(LARGE_TARGETS, rnd):
                for direction in ("download", "upload"):
                    result = measure_large(
                        bench, bench.targets[name], direction, raw.rss_watch.get(name)
                    )
                    raw.large.append(
                        {"round": rnd, "transfer": k, "target": name, "direction": direction}
                        | result
                    )
                    log(f"round {rnd} {direction:<8} {name:<15} {result['mb_per_s']:>7.0f} MB/s")
    for watch in raw.rss_watch.values():
        watch.note_hwm()
    run_pairs(bench, raw)


def run_pairs(bench: Bench, raw: Raw) -> None:
    """The two figures that compare near neighbours, in back-to-back 1-second runs:
    the token route against the static route (CPU), and authproxy's added latency
    against nginx's at c=1.

    Two proxy processes doing the same work differ by 10-20 % from one 5-second
    run to the next on a shared 2-core VM, far more than a 10 % target can
    tolerate; the neighbours' noise drifts over seconds. Many short runs, each
    next to the run it is compared with and the order changed every time, put
    that drift on both sides of each ratio; the figure is the median of the ratios.
    """
    s = bench.settings
    static, token = bench.targets[AUTHPROXY], bench.targets[TOKEN]
    log(f"token ÷ static: {s.pairs} pair(s) of 1-second runs per concurrency")
    for c in s.concurrencies:
        for k in range(1, s.pairs + 1):
            got: dict[str, float | None] = {}
            for target in (static, token) if k % 2 else (token, static):
                got[target.name] = measure_small(bench, target, c, 1)["proxy_cpu_us_per_req"]
            st, tk = got[AUTHPROXY], got[TOKEN]
            raw.pairs.append(
                {"c": c, "pair": k, "static_us": st, "token_us": tk, "ratio": ratio(tk, st)}
            )
        mid = median([p["ratio"] for p in raw.pairs if p["c"] == c])
        log(f"token ÷ static c={c:<3} median {_f(mid, 3)}")

    # Added latency is a difference of two p50s, nginx's only some 30-50 µs: the
    # same drift, the same cure. Direct, nginx and authproxy back to back at c=1.
    c1 = 1 if 1 in s.concurrencies else min(s.concurrencies)
    log(f"added latency: {s.pairs} triple(s) of 1-second runs at c={c1}")
    for k in range(1, s.pairs + 1):
        p50 = {
            name: measure_small(bench, bench.targets[name], c1, 1)["p50_us"]
            for name in round_order(LATENCY_TARGETS, k)
        }
        ng, ap = p50[NGINX] - p50[DIRECT], p50[AUTHPROXY] - p50[DIRECT]
        raw.triples.append(
            {
                "triple": k,
                "p50_us": p50,
                "nginx_added_us": ng,
                "authproxy_added_us": ap,
                "ratio": ap / ng if ng > 0 else None,  # None: nginx added nothing measurable
            }
        )
    mid = median([t["ratio"] for t in raw.triples])
    log(f"added latency c={c1}: authproxy ÷ nginx median {_f(mid, 2)}")


# --------------------------------------------------------------------------- summary


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _f(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def summarize(settings: Settings, raw: Raw) -> dict[str, Any]:
    rounds = range(1, settings.rounds + 1)
    by = {(r["round"], r["c"], r["target"]): r for r in raw.small}

    def val(rnd: int, c: int, target: str, key: str) -> float | None:
        row = by.get((rnd, c, target))
        return None if row is None else row[key]

    small: dict[str, dict[str, dict[str, Any]]] = {}
    for target in TARGETS:
        small[target] = {}
        for c in settings.concurrencies:
            rows = [by[(rnd, c, target)] for rnd in rounds]
            entry: dict[str, Any] = {
                key: median([row[key] for row in rows])
                for key in (
                    "rps",
                    "requests",
                    "p50_us",
                    "p99_us",
                    "cpu_us_per_req",
                    "proxy_cpu_us_per_req",
                    "upstream_cpu_us_per_req",
                )
            }
            entry["non2xx"] = sum(row["non2xx"] for row in rows)
            entry["socket_errors"] = sum(row["socket_errors"] for row in rows)

            def r_of(key: str, other: str, c: int = c, target: str = target) -> float | None:
                return median(
                    [ratio(val(rnd, c, target, key), val(rnd, c, other, key)) for rnd in rounds]
                )

            entry["rps_vs_nginx"] = r_of("rps", NGINX)
            entry["rps_vs_direct"] = r_of("rps", DIRECT)
            entry["cpu_vs_nginx"] = (
                r_of("proxy_cpu_us_per_req", NGINX) if target in (AUTHPROXY, TOKEN) else None
            )
            entry["cpu_vs_static"] = (
                r_of("proxy_cpu_us_per_req", AUTHPROXY) if target == TOKEN else None
            )
            small[target][str(c)] = entry

    # Added latency at c=1: p50(proxy) - p50(direct) in the same round.
    added: dict[str, Any] = {}
    c1 = 1 if 1 in settings.concurrencies else min(settings.concurrencies)
    for target in (NGINX, AUTHPROXY, TOKEN):

        def add(rnd: int, t: str = target) -> float | None:
            p, d = val(rnd, c1, t, "p50_us"), val(rnd, c1, DIRECT, "p50_us")
            return None if p is None or d is None else p - d

        added[target] = {
            "added_us": median([add(rnd) for rnd in rounds]),
            "vs_nginx": None
            if target == NGINX
            else median([ratio(add(rnd), add(rnd, NGINX)) for rnd in rounds]),
            "per_round_us": [add(rnd) for rnd in rounds],
        }

    def transfers(rnd: int, target: str, direction: str) -> list[dict[str, Any]]:
        return [
            r
            for r in raw.large
            if (r["round"], r["target"], r["direction"]) == (rnd, target, direction)
        ]

    large: dict[str, Any] = {}
    for target in LARGE_TARGETS:
        large[target] = {}
        for direction in ("download", "upload"):

            def mbs(rnd: int, t: str = target, d: str = direction) -> float | None:
                """The round's figure: the median of its transfers."""
                return median([float(r["mb_per_s"]) for r in transfers(rnd, t, d)])

            entry = {
                "mb_per_s": median([mbs(rnd) for rnd in rounds]),
                "vs_nginx": median([ratio(mbs(rnd), mbs(rnd, NGINX)) for rnd in rounds]),
                "vs_direct": median([ratio(mbs(rnd), mbs(rnd, DIRECT)) for rnd in rounds]),
            }
            if target in raw.rss_watch:
                # Per round: RSS before the first transfer, the highest peak and growth.
                per_round = [transfers(rnd, target, direction) for rnd in rounds]
                per_round = [rows for rows in per_round if rows]
                entry["rss_before_mib"] = median(
                    [rows[0]["rss_before_kib"] / 1024 for rows in per_round]
                )
                for key in ("rss_peak", "rss_growth"):
                    entry[f"{key}_mib"] = median(
                        [max(r[f"{key}_kib"] for r in rows) / 1024 for rows in per_round]
                    )
                entry["rss_growth_max_mib"] = max(
                    r["rss_growth_kib"] / 1024 for rows in per_round for r in rows
                )
            large[target][direction] = entry
    for target, watch in raw.rss_watch.items():
        large[target]["vmhwm_end_mib"] = watch.lifetime_hwm_kib / 1024

    paired: dict[str, Any] = {}
    for c in settings.concurrencies:
        rows = [p for p in raw.pairs if p["c"] == c]
        ratios = [p["ratio"] for p in rows if p["ratio"] is not None]
        q1, q3 = quartiles(ratios)
        paired[str(c)] = {
            "pairs": len(rows),
            "static_us": median([p["static_us"] for p in rows]),
            "token_us": median([p["token_us"] for p in rows]),
            "ratio": median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
        }
    ratios = [t["ratio"] for t in raw.triples if t["ratio"] is not None]
    q1, q3 = quartiles(ratios)
    triples = {
        "c": c1,
        "triples": len(raw.triples),
        "nginx_added_us": median([t["nginx_added_us"] for t in raw.triples]),
        "authproxy_added_us": median([t["authproxy_added_us"] for t in raw.triples]),
        "ratio": median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "unmeasurable": len(raw.triples) - len(ratios),
    }
    return {
        "small": small,
        "added_latency": {"c": c1, **added},
        "added_latency_paired": triples,
        "large": large,
        "token_vs_static": paired,
    }


def quartiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    """First and third quartiles (None for fewer than two values)."""
    if len(values) < 2:
        return None, None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


@dataclass(frozen=True)
class Goal:
    figure: str
    value: float | None
    shown: str
    must: float
    aim: float
    higher_is_better: bool

    def status(self) -> str:
        if self.value is None:
            return "not measured"

        def ok(limit: float) -> bool:
            assert self.value is not None
            return self.value >= limit if self.higher_is_better else self.value <= limit

        if ok(self.aim):
            return "met (aim too)"
        if ok(self.must):
            return "met (must); aim not met"
        return "NOT met"


def goals(settings: Settings, summary: dict[str, Any]) -> list[Goal]:
    small = summary["small"]
    cs = [str(c) for c in settings.concurrencies]
    top = str(100 if 100 in settings.concurrencies else max(settings.concurrencies))

    def worst(target: str, key: str) -> tuple[float | None, str]:
        vals = [(small[target][c][key], c) for c in cs if small[target][c][key] is not None]
        if not vals:
            return None, "—"
        v, c = max(vals)
        return v, f"{v:.2f}{TIMES} (worst, at c={c})"

    cpu_v, cpu_s = worst(AUTHPROXY, "cpu_vs_nginx")
    paired = [(e["ratio"], c) for c, e in summary["token_vs_static"].items() if e["ratio"]]
    tok_v, tok_c = max(paired) if paired else (None, "—")
    tok_s = "—" if tok_v is None else f"{tok_v:.2f}{TIMES} (worst, at c={tok_c}; paired runs)"
    rps_v = small[AUTHPROXY][top]["rps_vs_nginx"]
    lat_v = summary["added_latency_paired"]["ratio"]
    lat_s = "—" if lat_v is None else f"{lat_v:.2f}{TIMES} (paired runs)"
    large = summary["large"][AUTHPROXY]
    dl_v, ul_v = large["download"]["vs_nginx"], large["upload"]["vs_nginx"]
    growth = max(large["download"]["rss_growth_mib"], large["upload"]["rss_growth_mib"])
    c1 = summary["added_latency"]["c"]
    size = f"{settings.big_bytes // MIB} MiB"
    return [
        Goal("CPU per proxied small request, ÷ nginx's", cpu_v, cpu_s, 6, 3, False),
        Goal(f"throughput at c={top}, ÷ nginx's", rps_v, _x(rps_v), 0.25, 0.5, True),
        Goal(f"added latency at c={c1} (p50 over direct), ÷ nginx's", lat_v, lat_s, 4, 2, False),
        Goal(f"{size} download MB/s, ÷ nginx's", dl_v, _x(dl_v), 1.0, 1.2, True),
        Goal(f"{size} upload MB/s, ÷ nginx's", ul_v, _x(ul_v), 1.2, 1.5, True),
        Goal(
            f"proxy RSS growth during a {size} transfer", growth, f"{growth:.2f} MiB", 5, 2, False
        ),
        Goal(
            "cached-token route CPU/request ÷ static-header route", tok_v, tok_s, 1.1, 1.05, False
        ),
    ]


# --------------------------------------------------------------------------- report


def render(
    meta: dict[str, Any], settings: Settings, summary: dict[str, Any], gl: list[Goal]
) -> str:
    small, added, large = summary["small"], summary["added_latency"], summary["large"]
    out: list[str] = []
    w = out.append
    w(f"# authproxy benchmark — {meta['finished_utc']}")
    w("")
    if settings.smoke:
        w("**SMOKE RUN** (short runs, small file): checks the harness, the figures mean little.")
        w("")
    w(f"- command: `{meta['command_line']}`")
    w(f"- commit: `{meta['git_commit']}`")
    m = meta["machine"]
    w(
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"Python {m['python']}, aiohttp {m['aiohttp']}, {m['nginx']}, {m['wrk']}"
    )
    w(
        f"- {settings.rounds} interleaved round(s); wrk `-t1 -c{{C}} -d{settings.duration}s "
        f"--latency` at c = {', '.join(map(str, settings.concurrencies))}; "
        f"medians over rounds, ratios taken within each round; total {meta['elapsed_s']:.0f} s"
    )
    w(
        f"- token route: {_f(meta['token_requests'])} token request(s) served by the getpaid fake "
        f"in the whole run ({_f(meta['token_log_events'])} token_acquired/refreshed log events)"
    )
    w(
        "- load average (1/5/15 min) at start {} and end {}; other work on the machine "
        "skews every figure".format(*(_load(meta[k]) for k in ("loadavg_start", "loadavg_end")))
    )
    if meta.get("problems"):
        for problem in meta["problems"]:
            w(f"- **WARNING**: {problem}")
    w("")
    w("## Small requests (~200-byte JSON)")
    w("")
    w(TABLE_HEADER)
    w("|" + "---|" * (TABLE_HEADER.count("|") - 1))
    for c in settings.concurrencies:
        for target in TARGETS:
            e = small[target][str(c)]
            w(
                f"| {c} | {target} | {_f(e['rps'])} | {_f(e['p50_us'])} | {_f(e['p99_us'])} "
                f"| {_f(e['proxy_cpu_us_per_req'], 1)} | {_f(e['upstream_cpu_us_per_req'], 1)} "
                f"| {_x(e['rps_vs_nginx']) if target != NGINX else '—'} "
                f"| {_x(e['rps_vs_direct']) if target != DIRECT else '—'} "
                f"| {_x(e['cpu_vs_nginx'])} |"
            )
    w("")
    w("## Cached-token route vs static-header route, proxy CPU per request")
    w("")
    paired = summary["token_vs_static"]
    n_pairs = max((e["pairs"] for e in paired.values()), default=0)
    w(
        f"Paired: {n_pairs} pair(s) of back-to-back 1-second wrk runs per concurrency, the "
        "order flipped every pair; medians of the pairs' figures, the ratio's quartiles beside "
        "it. The rounds' ratio (median of the rounds' same-round ratios) is shown for "
        f"comparison: one {settings.duration}-second run against another, it carries the drift "
        "of the machine."
    )
    w("")
    w("| c | static µs/req | token µs/req | token ÷ static | quartiles | rounds' ratio |")
    w("|---|---|---|---|---|---|")
    for c in settings.concurrencies:
        e = paired[str(c)]
        w(
            f"| {c} | {_f(e['static_us'], 1)} | {_f(e['token_us'], 1)} | {_x(e['ratio'])} "
            f"| {_x(e['ratio_q1'])} to {_x(e['ratio_q3'])} "
            f"| {_x(small[TOKEN][str(c)]['cpu_vs_static'])} |"
        )
    w("")
    w(f"## Added latency at c={added['c']} (p50 minus direct's p50)")
    w("")
    tr = summary["added_latency_paired"]
    w(
        f"Paired: {tr['triples']} triple(s) of back-to-back 1-second wrk runs (direct, nginx, "
        "authproxy; the order turned every triple); medians of the triples' figures, the "
        "ratio's quartiles beside it"
        + (
            f"; {tr['unmeasurable']} triple(s) where nginx added nothing measurable are left "
            "out of the ratio"
            if tr["unmeasurable"]
            else ""
        )
        + "."
    )
    w("")
    w("| proxy | added µs | ÷ nginx's added | quartiles |")
    w("|---|---|---|---|")
    w(f"| nginx | {_f(tr['nginx_added_us'])} | — | — |")
    w(
        f"| authproxy | {_f(tr['authproxy_added_us'])} | {_x(tr['ratio'])} "
        f"| {_x(tr['ratio_q1'])} to {_x(tr['ratio_q3'])} |"
    )
    w("")
    w("Rounds (the main runs, same round; median over rounds):")
    w("")
    w("| proxy | added µs | ÷ nginx's added |")
    w("|---|---|---|")
    for target in (NGINX, AUTHPROXY, TOKEN):
        a = added[target]
        w(f"| {target} | {_f(a['added_us'])} | {_x(a['vs_nginx'])} |")
    w("")
    size = f"{settings.big_bytes // MIB} MiB"
    w(f"## Large bodies ({size}, curl; MB/s with 1 MB = 10^6 bytes)")
    w("")
    w(
        f"{settings.transfers} transfer(s) each way per target per round; a round's figure is "
        "their median, the table the median over rounds."
    )
    w("")
    w(
        "| target | download MB/s | upload MB/s | download ÷ nginx | upload ÷ nginx "
        "| download ÷ direct | upload ÷ direct |"
    )
    w("|---|---|---|---|---|---|---|")
    for target in LARGE_TARGETS:
        d, u = large[target]["download"], large[target]["upload"]
        w(
            f"| {target} | {_f(d['mb_per_s'])} | {_f(u['mb_per_s'])} "
            f"| {_x(d['vs_nginx'])} | {_x(u['vs_nginx'])} "
            f"| {_x(d['vs_direct'])} | {_x(u['vs_direct'])} |"
        )
    w("")
    w(
        "Proxy resident memory (MiB) around the transfers (a round's highest peak and growth, "
        "median over rounds; peak = max of 20 ms VmRSS samples and VmHWM, which is reset "
        "before each transfer; growth = peak - RSS before that transfer):"
    )
    w("")
    w(
        "| proxy | RSS before | peak during download | growth | peak during upload | growth "
        "| VmHWM at end |"
    )
    w("|---|---|---|---|---|---|---|")
    for target in (AUTHPROXY, NGINX):
        d, u = large[target]["download"], large[target]["upload"]
        w(
            f"| {target} | {_f(d['rss_before_mib'], 1)} | {_f(d['rss_peak_mib'], 1)} "
            f"| {_f(d['rss_growth_mib'], 2)} | {_f(u['rss_peak_mib'], 1)} "
            f"| {_f(u['rss_growth_mib'], 2)} | {_f(large[target]['vmhwm_end_mib'], 1)} |"
        )
    w("")
    w("## Targets (issue 6; single authproxy process, logging on as shipped)")
    w("")
    w("| figure | measured | must reach | aim for | result |")
    w("|---|---|---|---|---|")
    for g in gl:
        cmp_ = "≥" if g.higher_is_better else "≤"
        unit = " MiB" if "RSS" in g.figure else TIMES
        w(
            f"| {g.figure} | {g.shown} | {cmp_} {g.must}{unit} | {cmp_} {g.aim}{unit} "
            f"| {g.status()} |"
        )
    w("")
    return "\n".join(out)


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(tools: Tools) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "authproxy": version("authproxy"),
        "nginx": _first_line([tools.nginx, "-v"]).replace("nginx version: ", ""),
        "wrk": _first_line([tools.wrk, "-v"]).split(" Copyright")[0],
        "curl": _first_line([tools.curl, "--version"]),
        "clk_tck": CLK_TCK,
    }


def git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def count_events(path: Path, events: Sequence[str]) -> int | None:
    """Log lines whose JSON `event` is one of `events` (None if the log is unreadable)."""
    needles = [e.encode() for e in events]
    count = 0
    try:
        with path.open("rb") as f:
            for line in f:
                if not any(n in line for n in needles):
                    continue
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") in events:
                        count += 1
    except OSError:
        return None
    return count


def fake_token_requests(path: Path) -> int | None:
    """Token requests the getpaid fake served, from the line it prints when it stops."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "stopped":
                    return int(record["token_requests"])
    return None


def problems_of(raw: Raw) -> list[str]:
    bad = [r for r in raw.small if r["non2xx"] or r["socket_errors"]]
    return [
        f"round {r['round']} c={r['c']} {r['target']}: {r['non2xx']} non-2xx responses, "
        f"{r['socket_errors']} socket errors"
        for r in bad
    ]


def write_reports(
    out_dir: Path, stamp: str, markdown: str, data: dict[str, Any]
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"bench-{stamp}.md"
    json_path = out_dir / f"bench-{stamp}.json"
    md_path.write_text(markdown + "\n")
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return md_path, json_path


# --------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    tools = find_tools()
    if tools is None:
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    t0 = time.monotonic()
    services = Services()
    raw = Raw()
    work: Work | None = None
    try:
        work = make_workdir(settings)
        log(f"work dir {work.root}")
        try:
            bench = start_all(settings, tools, work, services)
            expect_100 = verify(bench)
            log("all targets verified; measuring")
            run_bench(bench, raw)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
            services.stop_all()
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, _raise_interrupt)
        token_events = count_events(work.root / f"{TOKEN}.log", TOKEN_EVENTS)
        token_requests = fake_token_requests(work.root / "getpaid-fake.log")
        access_lines = count_events(work.root / f"{AUTHPROXY}.log", ("request_finished",))
        finished = dt.datetime.now(dt.UTC)
        summary = summarize(settings, raw)
        gl = goals(settings, summary)
        meta: dict[str, Any] = {
            "command": command,
            "command_line": shlex.join(
                ["python", os.path.relpath(command[1], Path.cwd()), *command[2:]]
            ),
            "cwd": str(Path.cwd()),
            "git_commit": git_commit(),
            "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "finished_utc": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "elapsed_s": time.monotonic() - t0,
            "machine": machine_info(tools),
            "token_requests": token_requests,
            "token_log_events": token_events,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "authproxy_access_log_lines": access_lines,
            "expect_100_continue": expect_100,
            "problems": problems_of(raw)
            + [
                f"{name} does not answer 'Expect: 100-continue' (curl then waits 1 s before "
                "sending an upload body: the upload figure includes that second)"
                for name, ok in expect_100.items()
                if not ok
            ],
        }
        markdown = render(meta, settings, summary, gl)
        data = {
            "schema": 1,
            **meta,
            "settings": {
                "smoke": settings.smoke,
                "rounds": settings.rounds,
                "duration_s": settings.duration,
                "concurrencies": list(settings.concurrencies),
                "warmup_s": settings.warmup_s,
                "big_bytes": settings.big_bytes,
                "peer_access_log": settings.peer_access_log,
                "transfers": settings.transfers,
                "pairs": settings.pairs,
                "work_dir": str(work.root),
                "mb": MB,
            },
            "summary": summary,
            "small": {"summary": summary["small"], "runs": raw.small},
            "token_vs_static": {"summary": summary["token_vs_static"], "pairs": raw.pairs},
            "added_latency_paired": {
                "summary": summary["added_latency_paired"],
                "triples": raw.triples,
            },
            "large": {
                "summary": summary["large"],
                "runs": raw.large,
                "warmup": raw.warmup_large,
            },
            "targets": [
                {
                    "figure": g.figure,
                    "value": g.value,
                    "must": g.must,
                    "aim": g.aim,
                    "higher_is_better": g.higher_is_better,
                    "status": g.status(),
                }
                for g in gl
            ],
        }
        stamp = finished.strftime("%Y%m%dT%H%M%SZ")
        md_path, json_path = write_reports(settings.out, stamp, markdown, data)
        print(markdown)
        log(f"wrote {md_path} and {json_path}")
        return 0
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopped every process")
        return 130
    finally:
        if work is not None:
            if settings.keep:
                log(f"kept work dir {work.root}")
            else:
                shutil.rmtree(work.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""What is measured: the upstream and peer nginx configs, the authproxy processes,
the work directory they serve from, and the check that each target answers right.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import Service, Services, free_port, http_get, wait_http, wait_listening
from bench.settings import (
    BENCH_DIR,
    GETPAID_AUDIENCE,
    GETPAID_CLIENT_ID,
    GETPAID_SCOPE,
    MIB,
    REPO_ROOT,
    STATIC_AUTHORIZATION,
    BenchError,
    Settings,
    Tools,
)

DIRECT, NGINX, AUTHPROXY, TOKEN = "direct", "nginx", "authproxy", "authproxy-token"
TARGETS = (DIRECT, NGINX, AUTHPROXY, TOKEN)
LARGE_TARGETS = (DIRECT, NGINX, AUTHPROXY)
LATENCY_TARGETS = (DIRECT, NGINX, AUTHPROXY)
PREFIX = "/up"
TOKEN_EVENTS = ("token_acquired", "token_refreshed")


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


def peer_conf(
    work: Work,
    port: int,
    upstream_port: int,
    access_log: bool,
    name: str = "nginx-peer",
    processes: int = 1,
) -> str:
    """nginx as the proxy a user would otherwise deploy, injecting a static header."""
    r = work.root
    log_line = f"access_log {r / f'{name}-access.log'};" if access_log else "access_log off;"
    tmp = "peer" if name == "nginx-peer" else name
    (r / f"{tmp}-tmp").mkdir(mode=0o755, exist_ok=True)
    return f"""# nginx peer proxy
worker_processes {processes};
daemon off;
pid {r / f"{name}.pid"};
error_log {r / f"{name}-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  {log_line}
{_temp_paths(r, tmp)}
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


def _start_nginx(
    tools: Tools, work: Work, services: Services, name: str, conf: str, port: int
) -> Service:
    conf_path = work.root / f"{name}.conf"
    conf_path.write_text(conf)
    argv = [tools.nginx, "-p", str(work.root), "-c", str(conf_path)]
    argv += ["-e", str(work.root / f"{name}-error.log")]
    return services.start(name, argv, port, work.root / f"{name}.out", work.root)


def _start_upstream(tools: Tools, work: Work, services: Services) -> Service:
    port = free_port()
    upstream = _start_nginx(tools, work, services, "upstream", upstream_conf(work, port), port)
    wait_http(upstream, f"http://127.0.0.1:{port}/small.json")
    return upstream


def _start_authproxy(
    work: Work, services: Services, name: str, upstream_port: int, auth: dict[str, Any], *args: str
) -> Service:
    port = free_port()
    conf = work.root / f"{name}.yaml"
    conf.write_text(authproxy_config(port, upstream_port, auth))
    argv = [*authproxy_argv(), "run", "-c", str(conf), "--log-format", "json", *args]
    return services.start(name, argv, port, work.root / f"{name}.log", work.root)


STATIC_AUTH = {"type": "header", "name": "Authorization", "value": STATIC_AUTHORIZATION}
# The --workers mode's targets: the static-header route through 1 and 2 processes of each.
NGINX_1W, NGINX_2W, AUTHPROXY_1W, AUTHPROXY_2W = (
    "nginx-1w",
    "nginx-2w",
    "authproxy-1w",
    "authproxy-2w",
)
WORKER_TARGETS = (NGINX_1W, NGINX_2W, AUTHPROXY_1W, AUTHPROXY_2W)


def start_workers(settings: Settings, tools: Tools, work: Work, services: Services) -> Bench:
    """The --workers set-up: one upstream, nginx with 1 and 2 worker processes,
    authproxy as one process and as `run --workers 2` (a supervisor and 2 workers)."""
    upstream = _start_upstream(tools, work, services)
    up_port = upstream.port
    targets: dict[str, Target] = {}
    for name, processes in ((NGINX_1W, 1), (NGINX_2W, 2)):
        port = free_port()
        conf = peer_conf(work, port, up_port, settings.peer_access_log, name, processes)
        service = _start_nginx(tools, work, services, name, conf, port)
        targets[name] = Target(name, f"http://127.0.0.1:{port}{PREFIX}", service)
    for name, args in ((AUTHPROXY_1W, ()), (AUTHPROXY_2W, ("--workers", "2"))):
        service = _start_authproxy(work, services, name, up_port, STATIC_AUTH, *args)
        targets[name] = Target(name, f"http://127.0.0.1:{service.port}{PREFIX}", service)
    for t in targets.values():
        assert t.service is not None
        wait_http(t.service, t.base + "/small.json")
    return Bench(settings, tools, work, services, upstream, targets)


def start_all(settings: Settings, tools: Tools, work: Work, services: Services) -> Bench:
    upstream = _start_upstream(tools, work, services)
    up_port = upstream.port

    def start_nginx(name: str, conf: str, port: int) -> Service:
        return _start_nginx(tools, work, services, name, conf, port)

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
        return _start_authproxy(work, services, name, up_port, auth)

    static = start_authproxy(AUTHPROXY, STATIC_AUTH)
    wait_listening(fake, f"http://127.0.0.1:{fake_port}/")  # any answer from the fake
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

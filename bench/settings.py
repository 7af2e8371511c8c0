"""What a run measures (the command line), the tools it needs, and the few names
every part of the harness shares.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
APT_COMMAND = "apt-get install -y nginx-light wrk"

STATIC_AUTHORIZATION = "Bearer static-bench-token"
GETPAID_CLIENT_ID = "demo-getpaid-client"
GETPAID_CLIENT_SECRET = "demo-getpaid-secret"  # the fake's demo default, not a real secret
GETPAID_AUDIENCE = "https://api.getpaid.io"
GETPAID_SCOPE = "accounts:read_write invoices:read_write"


MIB = 1024 * 1024
MB = 1_000_000


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
    workers: bool = False  # the --workers mode: authproxy with 1 and 2 workers beside nginx


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
        "--workers",
        action="store_true",
        help="instead: throughput and CPU per request of authproxy with 1 and 2 worker processes "
        "beside nginx with 1 and 2 (default c=10,100; smoke c=10)",
    )
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
    default_conc: tuple[int, ...] = (1, 10) if smoke else (1, 10, 100)
    if args.workers:
        default_conc = (10,) if smoke else (10, 100)
    conc = args.concurrency if args.concurrency is not None else default_conc
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
        workers=args.workers,
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

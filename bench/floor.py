"""How close to nginx can a proxy on asyncio get at c=1? authproxy beside three floors.

    python bench/floor.py [--rounds 3] [--duration 4] [--callgrind] [--smoke]

Starts the `bench/run.py` set-up (nginx upstream, nginx peer, authproxy with a
static header, logging on as shipped) plus the reference servers of
`bench/floor_servers.py` (a raw asyncio byte relay; aiohttp's server answering
by itself; aiohttp's server waiting on a raw socket hop; aiohttp's server plus
the lean client and nothing else). For each,
in interleaved rounds: wrk -c1 p50, the latency it adds over direct (same
round), that figure ÷ nginx's, and CPU µs per request from /proc.

`--callgrind` also counts CPU instructions per request under valgrind (a
deterministic figure, whatever else the machine does): each server is started
under callgrind and sent N1 and then N2 sequential keep-alive GETs from this
process; (instructions(N2) - instructions(N1)) / (N2 - N1). It takes minutes.

Writes `floor-<UTC>.md` to bench/results/ (or `--out`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: import the package from the repository root, and keep
    # bench/ itself off the path (bench/profile.py would shadow the stdlib's).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# The harness bench/run.py runs, reused.
from bench.measure import measure_small, round_order, run_wrk
from bench.processes import Services, child_env, free_port, wait_http
from bench.report import git_commit
from bench.settings import (
    DEFAULT_OUT,
    REPO_ROOT,
    STATIC_AUTHORIZATION,
    BenchError,
    find_tools,
    log,
    parse_args,
)
from bench.stats import TIMES, median, quartiles
from bench.targets import (
    AUTHPROXY,
    DIRECT,
    NGINX,
    PREFIX,
    Bench,
    Target,
    authproxy_config,
    make_workdir,
    start_all,
)

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "floor_servers.py"
FLOORS = ("relay", "aiohttp-fixed", "aiohttp-hop", "aiohttp-lean")
CALLGRIND_REQUESTS = (200, 1200)


def start_floor(bench: Bench, mode: str) -> Target:
    port = free_port()
    up_port = bench.upstream.port
    argv = [sys.executable, str(SERVERS), mode, str(port), str(up_port)]
    service = bench.services.start(mode, argv, port, bench.work.root / f"{mode}.log", REPO_ROOT)
    # The relay passes paths through unchanged; the aiohttp ones serve /up/... like authproxy.
    base = f"http://127.0.0.1:{port}" + ("" if mode == "relay" else PREFIX)
    target = Target(mode, base, service)
    wait_http(service, base + "/small.json")
    return target


def _get_many(port: int, path: str, n: int) -> None:
    """n sequential keep-alive GETs; each answer read whole (by its Content-Length)."""
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        for _ in range(n):
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += _recv(sock)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += _recv(sock)


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise BenchError("the server closed the connection mid-answer")
    return data


def _callgrind_total(argv: list[str], port: int, path: str, n: int, work: Path) -> int:
    out = work / f"callgrind-{port}-{n}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        env=child_env(),
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # start-up under valgrind takes tens of seconds
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{argv} did not start under valgrind") from None
                time.sleep(0.2)
        _get_many(port, path, n)
    finally:
        proc.send_signal(signal.SIGINT)  # a clean exit, so callgrind writes its totals
        proc.wait(timeout=120)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {out}")


def instructions_per_request(
    argv_for_port: Callable[[int], list[str]], path: str, work: Path
) -> float:
    n1, n2 = CALLGRIND_REQUESTS
    totals = []
    for n in (n1, n2):
        port = free_port()
        totals.append(_callgrind_total(argv_for_port(port), port, path, n, work))
    return (totals[1] - totals[0]) / (n2 - n1)


def callgrind_figures(bench: Bench) -> dict[str, float]:
    up = str(bench.upstream.port)
    python = sys.executable  # the interpreter itself: valgrind must not trace a shim

    def floor_argv(mode: str) -> Callable[[int], list[str]]:
        return lambda port: [python, str(SERVERS), mode, str(port), up]

    def authproxy_argv(port: int) -> list[str]:
        conf = bench.work.root / f"callgrind-{port}.yaml"
        auth = {"type": "header", "name": "Authorization", "value": STATIC_AUTHORIZATION}
        conf.write_text(authproxy_config(port, bench.upstream.port, auth))
        return [python, "-m", "proxy", "run", "-c", str(conf), "--log-format", "json"]

    figures = {}
    for mode in FLOORS:
        path = "/small.json" if mode == "relay" else PREFIX + "/small.json"
        log(f"callgrind: {mode}")
        figures[mode] = instructions_per_request(floor_argv(mode), path, bench.work.root)
    log("callgrind: authproxy")
    figures[AUTHPROXY] = instructions_per_request(
        authproxy_argv, PREFIX + "/small.json", bench.work.root
    )
    return figures


def _cell(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def render(rows: dict[str, dict[str, Any]], instr: dict[str, float], header: str) -> str:
    lines = [header, ""]
    lines += [
        "| target | p50 µs | added over direct µs | added ÷ nginx's | CPU µs/req |"
        " ratio's quartiles |" + (" instructions/req |" if instr else ""),
        "|---|---|---|---|---|---|" + ("---|" if instr else ""),
    ]
    for name, row in rows.items():
        cells = [_cell(row.get("p50")), _cell(row.get("added"))]
        cells += [_cell(row.get("ratio"), 2, TIMES), _cell(row.get("cpu"), 1)]
        q1, q3 = row.get("quartiles", (None, None))
        both = q1 is not None and q3 is not None
        cells.append(f"{_cell(q1, 2)} to {_cell(q3, 2, TIMES)}" if both else "—")
        if instr:
            cells.append(f"{instr[name] / 1000:,.0f}k" if name in instr else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s (tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration = 1, 1
    tools = find_tools()
    if tools is None:
        return 2
    if args.callgrind and shutil.which("valgrind") is None:
        print("--callgrind needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    settings = parse_args(["--smoke", "--duration", str(args.duration)])
    services = Services()
    work = make_workdir(settings)
    try:
        bench = start_all(settings, tools, work, services)
        targets = {n: bench.targets[n] for n in (DIRECT, NGINX, AUTHPROXY)}
        for mode in FLOORS:
            targets[mode] = start_floor(bench, mode)
        for target in targets.values():  # warm up
            run_wrk(bench, target.base + "/small.json", 1, 1)
        samples: dict[str, list[dict[str, float | None]]] = {n: [] for n in targets}
        for round_no in range(args.rounds):
            log(f"round {round_no + 1}/{args.rounds}")
            got = {
                name: measure_small(bench, targets[name], 1)
                for name in round_order(list(targets), round_no + 1)
            }
            direct = got[DIRECT]["p50_us"]
            nginx_added = got[NGINX]["p50_us"] - direct
            for name, result in got.items():
                added = result["p50_us"] - direct if name != DIRECT else None
                samples[name].append(
                    {
                        "p50": result["p50_us"],
                        "added": added,
                        "ratio": added / nginx_added
                        if added is not None and nginx_added > 0
                        else None,
                        "cpu": result["cpu_us_per_req"] if name != DIRECT else None,
                    }
                )
        rows: dict[str, dict[str, Any]] = {
            name: {key: median([s[key] for s in got]) for key in ("p50", "added", "ratio", "cpu")}
            for name, got in samples.items()
        }
        for name, taken in samples.items():
            rows[name]["quartiles"] = quartiles([s["ratio"] for s in taken if s["ratio"]])
        instr = callgrind_figures(bench) if args.callgrind else {}
    except BenchError as exc:
        print(f"floor: {exc}", file=sys.stderr)
        return 1
    finally:
        services.stop_all()
        shutil.rmtree(work.root, ignore_errors=True)
    command = "python bench/floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"# Floors at c=1 — {dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}\n\n"
        f"- command: `{command.strip()}`\n- commit: `{git_commit()}`\n"
        f"- {args.rounds} interleaved round(s) of wrk -t1 -c1 -d{args.duration}s; medians; "
        "ratios within each round, with their quartiles over the rounds. CPU µs/req of "
        "direct is not a proxy's and is left out."
    )
    report = render(rows, instr, header)
    print(report)
    if not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"floor-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.md"
        path.write_text(report)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

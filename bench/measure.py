"""Taking the figures: wrk for small requests, curl for large bodies, CPU and RSS
from /proc around each, in interleaved rounds and paired short runs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.processes import RssWatch, child_env, children_cpu_seconds, cpu_seconds, machine_cpu
from bench.settings import MB, BenchError, log
from bench.stats import median, num, ratio
from bench.targets import (
    AUTHPROXY,
    AUTHPROXY_1W,
    AUTHPROXY_2W,
    DIRECT,
    LARGE_TARGETS,
    LATENCY_TARGETS,
    NGINX,
    TARGETS,
    TOKEN,
    WORKER_TARGETS,
    Bench,
    Target,
)

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
    wrk0, machine0 = children_cpu_seconds(), machine_cpu()
    each0 = {pid: cpu_seconds([pid]) for pid in proxy_pids}
    seconds = bench.settings.duration if duration is None else duration
    result = run_wrk(bench, target.base + "/small.json", connections, seconds)
    proxy1, up1 = cpu_seconds(proxy_pids), cpu_seconds(up_pids)
    wrk1, machine1 = children_cpu_seconds(), machine_cpu()
    each = {pid: cpu_seconds([pid]) - each0[pid] for pid in proxy_pids}
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
        # Who else had the cores: wrk itself, and the whole machine (busy CPU-seconds,
        # every process of everyone, and time stolen by the hypervisor) during the run.
        "wrk_cpu_s": wrk1 - wrk0,
        "machine_busy_cpu_s": machine1[0] - machine0[0],
        "machine_steal_cpu_s": machine1[1] - machine0[1],
        # The busiest process's part of the proxy tree's CPU: 0.5 for two evenly
        # loaded workers, 1.0 when one did all the work.
        "busiest_share": max(each.values()) / (proxy1 - proxy0)
        if each and proxy1 > proxy0
        else None,
        "processes_cpu_s": {
            "proxy": proxy1 - proxy0,
            "upstream": up1 - up0,
            "wrk": wrk1 - wrk0,
        },
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
                    f"CPU {num(result['cpu_us_per_req'], 1):>6} µs/req"
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
        log(f"token ÷ static c={c:<3} median {num(mid, 3)}")

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
    log(f"added latency c={c1}: authproxy ÷ nginx median {num(mid, 2)}")


def run_workers(bench: Bench, raw: Raw) -> None:
    """The --workers mode: the static route through nginx and authproxy with 1 and 2
    processes each, in interleaved rounds, with everyone's CPU around every run."""
    s = bench.settings
    top = max(s.concurrencies)
    log(f"warm-up: wrk -c{top} for {s.warmup_s}s per target")
    for name in WORKER_TARGETS:
        run_wrk(bench, bench.targets[name].base + "/small.json", top, s.warmup_s)
    for rnd in range(1, s.rounds + 1):
        for c in s.concurrencies:
            for name in round_order(WORKER_TARGETS, rnd):
                result = measure_small(bench, bench.targets[name], c)
                raw.small.append({"round": rnd, "c": c, "target": name, **result})
                log(
                    f"round {rnd} c={c:<3} {name:<13} {result['rps']:>9.0f} req/s  "
                    f"CPU {num(result['cpu_us_per_req'], 1):>6} µs/req  "
                    f"machine busy {result['machine_busy_cpu_s'] / result['duration_s']:.2f} cores"
                )
    run_worker_pairs(bench, raw)


def run_worker_pairs(bench: Bench, raw: Raw) -> None:
    """authproxy with 2 workers against 1 in back-to-back 1-second runs, the order
    flipped every pair: on a shared machine the neighbours' load drifts over seconds,
    and a pair puts that drift on both sides of its ratio (as `run_pairs` does)."""
    s = bench.settings
    one, two = bench.targets[AUTHPROXY_1W], bench.targets[AUTHPROXY_2W]
    log(f"2 workers ÷ 1: {s.pairs} pair(s) of 1-second runs per concurrency")
    for c in s.concurrencies:
        for k in range(1, s.pairs + 1):
            got = {
                t.name: measure_small(bench, t, c, 1) for t in ((one, two) if k % 2 else (two, one))
            }
            a, b = got[AUTHPROXY_1W], got[AUTHPROXY_2W]
            raw.pairs.append(
                {
                    "c": c,
                    "pair": k,
                    "rps_1w": a["rps"],
                    "rps_2w": b["rps"],
                    "rps_ratio": ratio(b["rps"], a["rps"]),
                    "cpu_ratio": ratio(b["cpu_us_per_req"], a["cpu_us_per_req"]),
                    "others_cores": (
                        a["machine_busy_cpu_s"]
                        - sum(a["processes_cpu_s"].values())
                        + b["machine_busy_cpu_s"]
                        - sum(b["processes_cpu_s"].values())
                    )
                    / (a["duration_s"] + b["duration_s"]),
                }
            )
        mid = median([p["rps_ratio"] for p in raw.pairs if p["c"] == c])
        log(f"2 workers ÷ 1 c={c:<3} median {num(mid, 2)}")

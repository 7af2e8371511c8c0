"""The markdown report and the JSON beside it, with the machine and commit measured."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.measure import Raw
from bench.processes import CLK_TCK
from bench.settings import MIB, REPO_ROOT, Settings, Tools
from bench.stats import TIMES, loads, num, times
from bench.summary import Goal
from bench.targets import (
    AUTHPROXY,
    AUTHPROXY_2W,
    DIRECT,
    LARGE_TARGETS,
    NGINX,
    NGINX_2W,
    TARGETS,
    TOKEN,
    WORKER_TARGETS,
)

TABLE_HEADER = (
    "| c | target | req/s | p50 µs | p99 µs | CPU µs/req (proxy) | CPU µs/req (upstream) "
    "| req/s ÷ nginx | req/s ÷ direct | CPU ÷ nginx |"
)


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
        f"- token route: {num(meta['token_requests'])} token request(s) served by the getpaid fake "
        f"in the whole run ({num(meta['token_log_events'])} token_acquired/refreshed log events)"
    )
    w(
        "- load average (1/5/15 min) at start {} and end {}; other work on the machine "
        "skews every figure".format(*(loads(meta[k]) for k in ("loadavg_start", "loadavg_end")))
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
                f"| {c} | {target} | {num(e['rps'])} | {num(e['p50_us'])} | {num(e['p99_us'])} "
                f"| {num(e['proxy_cpu_us_per_req'], 1)} | {num(e['upstream_cpu_us_per_req'], 1)} "
                f"| {times(e['rps_vs_nginx']) if target != NGINX else '—'} "
                f"| {times(e['rps_vs_direct']) if target != DIRECT else '—'} "
                f"| {times(e['cpu_vs_nginx'])} |"
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
            f"| {c} | {num(e['static_us'], 1)} | {num(e['token_us'], 1)} | {times(e['ratio'])} "
            f"| {times(e['ratio_q1'])} to {times(e['ratio_q3'])} "
            f"| {times(small[TOKEN][str(c)]['cpu_vs_static'])} |"
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
    w(f"| nginx | {num(tr['nginx_added_us'])} | — | — |")
    w(
        f"| authproxy | {num(tr['authproxy_added_us'])} | {times(tr['ratio'])} "
        f"| {times(tr['ratio_q1'])} to {times(tr['ratio_q3'])} |"
    )
    w("")
    w("Rounds (the main runs, same round; median over rounds):")
    w("")
    w("| proxy | added µs | ÷ nginx's added |")
    w("|---|---|---|")
    for target in (NGINX, AUTHPROXY, TOKEN):
        a = added[target]
        w(f"| {target} | {num(a['added_us'])} | {times(a['vs_nginx'])} |")
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
            f"| {target} | {num(d['mb_per_s'])} | {num(u['mb_per_s'])} "
            f"| {times(d['vs_nginx'])} | {times(u['vs_nginx'])} "
            f"| {times(d['vs_direct'])} | {times(u['vs_direct'])} |"
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
            f"| {target} | {num(d['rss_before_mib'], 1)} | {num(d['rss_peak_mib'], 1)} "
            f"| {num(d['rss_growth_mib'], 2)} | {num(u['rss_peak_mib'], 1)} "
            f"| {num(u['rss_growth_mib'], 2)} | {num(large[target]['vmhwm_end_mib'], 1)} |"
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
    out_dir: Path, stamp: str, markdown: str, data: dict[str, Any], prefix: str = "bench"
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{prefix}-{stamp}.md"
    json_path = out_dir / f"{prefix}-{stamp}.json"
    md_path.write_text(markdown + "\n")
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return md_path, json_path


WORKERS_TABLE_HEADER = (
    "| c | target | req/s | p50 µs | p99 µs | CPU µs/req (proxy) | cores: proxy "
    "| upstream | wrk | others | machine busy | steal | busiest process |"
)


def render_workers(
    meta: dict[str, Any], settings: Settings, summary: dict[str, Any], gl: list[Goal]
) -> str:
    out: list[str] = []
    w = out.append
    w(f"# authproxy workers benchmark — {meta['finished_utc']}")
    w("")
    if settings.smoke:
        w("**SMOKE RUN** (short runs): checks the harness, the figures mean little.")
        w("")
    m = meta["machine"]
    w(f"- command: `{meta['command_line']}`")
    w(f"- commit: `{meta['git_commit']}`")
    w(
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"Python {m['python']}, {m['nginx']}, {m['wrk']}"
    )
    w(
        f"- {settings.rounds} interleaved round(s); wrk `-t1 -c{{C}} -d{settings.duration}s` at "
        f"c = {', '.join(map(str, settings.concurrencies))}; the static-header route; medians "
        f"over rounds, ratios within each round; total {meta['elapsed_s']:.0f} s"
    )
    w(
        "- load average (1/5/15 min) at start {} and end {}".format(
            *(loads(meta[k]) for k in ("loadavg_start", "loadavg_end"))
        )
    )
    for problem in meta.get("problems", []):
        w(f"- **WARNING**: {problem}")
    w("")
    w("## Small requests, 1 and 2 processes")
    w("")
    w(
        "Cores: CPU-seconds per second of the run. `proxy` is the whole process tree "
        "(nginx's master and workers; authproxy's supervisor and workers), `others` the "
        "machine's busy CPU that was none of proxy, upstream and wrk (other users of the "
        "machine), `steal` what the hypervisor took; `busiest process` its part of the proxy "
        "tree's CPU (0.50: two workers evenly loaded, 1.00: one did everything)."
    )
    w("")
    w(WORKERS_TABLE_HEADER)
    w("|" + "---|" * (WORKERS_TABLE_HEADER.count("|") - 1))
    for c in settings.concurrencies:
        for target in WORKER_TARGETS:
            e = summary["small"][target][str(c)]
            k = e["cores"]
            w(
                f"| {c} | {target} | {num(e['rps'])} | {num(e['p50_us'])} | {num(e['p99_us'])} "
                f"| {num(e['cpu_us_per_req'], 1)} | {num(k['proxy'], 2)} | {num(k['upstream'], 2)} "
                f"| {num(k['wrk'], 2)} | {num(k['others'], 2)} | {num(k['machine_busy'], 2)} "
                f"| {num(k['steal'], 2)} | {num(e['busiest_share'], 2)} |"
            )
    w("")
    w("## 2 processes ÷ 1 (same round)")
    w("")
    w("| c | proxy | req/s ratio | per round | CPU µs/req ratio |")
    w("|---|---|---|---|---|")
    for c in settings.concurrencies:
        for two in (AUTHPROXY_2W, NGINX_2W):
            s = summary["scaling"][two][str(c)]
            rounds = ", ".join(times(v) for v in s["rps_ratio_per_round"])
            w(f"| {c} | {two} | {times(s['rps_ratio'])} | {rounds} | {times(s['cpu_ratio'])} |")
    w("")
    w(
        "Paired: back-to-back 1-second runs of authproxy-1w and authproxy-2w, the order "
        "flipped every pair; medians of the pairs' figures and the ratio's quartiles. "
        "`others`: the cores the machine's other users took during the pair."
    )
    w("")
    w("| c | pairs | 1w req/s | 2w req/s | 2w ÷ 1w | quartiles | CPU µs/req 2w ÷ 1w | others |")
    w("|---|---|---|---|---|---|---|---|")
    for c in settings.concurrencies:
        p = summary["paired"][str(c)]
        w(
            f"| {c} | {p['pairs']} | {num(p['rps_1w'])} | {num(p['rps_2w'])} "
            f"| {times(p['rps_ratio'])} | {times(p['rps_ratio_q1'])} to {times(p['rps_ratio_q3'])} "
            f"| {times(p['cpu_ratio'])} | {num(p['others_cores'], 2)} |"
        )
    w("")
    w("## Targets (issue 17)")
    w("")
    w("| figure | measured | must reach | result |")
    w("|---|---|---|---|")
    for g in gl:
        w(f"| {g.figure} | {g.shown} | ≥ {g.must}{TIMES} | {g.status()} |")
    w("")
    return "\n".join(out)

"""`python bench/run.py` (or `python -m bench`): set up, verify, measure, report, clean up."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.measure import Raw, run_bench, run_workers
from bench.processes import Services
from bench.report import (
    count_events,
    fake_token_requests,
    git_commit,
    machine_info,
    problems_of,
    render,
    render_workers,
    write_reports,
)
from bench.settings import (
    BENCH_DIR,
    MB,
    MIB,
    BenchError,
    Settings,
    Tools,
    find_tools,
    log,
    parse_args,
)
from bench.summary import goals, summarize, summarize_workers, worker_goals
from bench.targets import (
    AUTHPROXY,
    TOKEN,
    TOKEN_EVENTS,
    Work,
    make_workdir,
    start_all,
    start_workers,
    verify,
)

# --------------------------------------------------------------------------- main


def command_line(command: list[str]) -> str:
    """The command as one would type it again: `python bench/run.py ...` or `python -m bench`."""
    entry = Path(command[1])
    how = ["-m", "bench"] if entry.name == "__main__.py" else [os.path.relpath(entry, Path.cwd())]
    return shlex.join(["python", *how, *command[2:]])


def workers_mode(
    settings: Settings,
    tools: Tools,
    work: Work,
    services: Services,
    command: list[str],
    started: dt.datetime,
    load_start: tuple[float, float, float],
    t0: float,
) -> int:
    """`--workers`: authproxy with 1 and 2 processes beside nginx with 1 and 2."""
    raw = Raw()
    try:
        bench = start_workers(settings, tools, work, services)
        verify(bench)
        log("all targets verified; measuring")
        run_workers(bench, raw)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        services.stop_all()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _raise_interrupt)
    finished = dt.datetime.now(dt.UTC)
    summary = summarize_workers(settings, raw)
    gl = worker_goals(settings, summary)
    meta: dict[str, Any] = {
        "mode": "workers",
        "command": command,
        "command_line": command_line(command),
        "git_commit": git_commit(),
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished_utc": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "elapsed_s": time.monotonic() - t0,
        "machine": machine_info(tools),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "problems": problems_of(raw),
    }
    markdown = render_workers(meta, settings, summary, gl)
    data = {
        "schema": 1,
        **meta,
        "settings": {
            "smoke": settings.smoke,
            "rounds": settings.rounds,
            "duration_s": settings.duration,
            "concurrencies": list(settings.concurrencies),
            "warmup_s": settings.warmup_s,
            "peer_access_log": settings.peer_access_log,
        },
        "small": {"summary": summary["small"], "runs": raw.small},
        "scaling": summary["scaling"],
        "paired": {"summary": summary["paired"], "pairs": raw.pairs},
        "targets": [
            {"figure": g.figure, "value": g.value, "must": g.must, "status": g.status()} for g in gl
        ],
    }
    stamp = finished.strftime("%Y%m%dT%H%M%SZ")
    md_path, json_path = write_reports(settings.out, stamp, markdown, data, prefix="workers")
    print(markdown)
    log(f"wrote {md_path} and {json_path}")
    return 0


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    tools = find_tools()
    if tools is None:
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    script = str(BENCH_DIR / "run.py")
    command = [sys.executable, *sys.argv] if argv is None else [sys.executable, script, *argv]
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    t0 = time.monotonic()
    services = Services()
    raw = Raw()
    work: Work | None = None
    try:
        if settings.workers:  # no large bodies in this mode: a small file will do
            settings = dataclasses.replace(settings, big_bytes=MIB)
        work = make_workdir(settings)
        log(f"work dir {work.root}")
        if settings.workers:
            return workers_mode(settings, tools, work, services, command, started, load_start, t0)
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
            "command_line": command_line(command),
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

"""Where does authproxy's CPU go? A py-spy profile under wrk load, as text.

    python bench/profile.py [--connections 10] [--seconds 8] [--out bench/results]

Starts the same set-up as `bench/run.py` (nginx upstream, authproxy with a
static header, logging on as shipped), drives the static route with wrk, and
samples the authproxy process with py-spy (`pip install -e '.[bench]'`). Writes
`profile-<UTC timestamp>-c<N>.txt` with the commit it measured: time by file,
self time and inclusive time by function.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the package from the repository root, and keep
    # bench/ itself off the path (bench/profile.py would shadow the stdlib's).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# The harness bench/run.py runs, reused.
from bench.measure import run_wrk
from bench.processes import Services
from bench.report import git_commit
from bench.settings import find_tools, parse_args
from bench.targets import AUTHPROXY, make_workdir, start_all

RESULTS = Path(__file__).resolve().parent / "results"


def _frame(entry: str) -> str:
    return re.sub(r":\d+\)", ")", entry)


def summarize(raw_profile: str, top: int = 30) -> str:
    """Turn py-spy's raw (collapsed stack) output into three ranked tables."""
    by_file: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_profile.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_time[_frame(leaf)] += n
        found = re.search(r"\((.*?):\d+\)", leaf)
        by_file[found.group(1).split("site-packages/")[-1] if found else leaf] += n
        for frame in {_frame(f) for f in frames}:
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"samples: {total}", "", "## self time by file", ""]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in by_file.most_common(top)]
    lines += ["", "## self time by function", ""]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "## inclusive time by function", ""]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top + 10)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tools = find_tools()
    py_spy = shutil.which("py-spy")
    if tools is None or py_spy is None:
        print(
            "needs nginx, wrk (apt-get install -y nginx-light wrk) and py-spy "
            "(pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return 2
    settings = parse_args(["--smoke"])
    services = Services()
    work = make_workdir(settings)
    try:
        bench = start_all(settings, tools, work, services)
        target = bench.targets[AUTHPROXY]
        assert target.service is not None
        url = target.base + "/small.json"
        run_wrk(bench, url, args.connections, 1)  # warm up
        load = subprocess.Popen(
            [tools.wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds + 2}s", url],
            stdout=subprocess.DEVNULL,
        )
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as raw:
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(target.service.proc.pid),
                    "-r",
                    "997",
                    "-d",
                    str(args.seconds),
                    "-f",
                    "raw",
                    "-o",
                    raw.name,
                ],
                check=True,
                capture_output=True,
            )
            load.wait()
            profile = summarize(Path(raw.name).read_text())
    finally:
        services.stop_all()
        shutil.rmtree(work.root, ignore_errors=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    header = (
        f"# authproxy CPU profile, static header route, wrk -c{args.connections}\n"
        f"# commit: {git_commit()}\n"
        f"# command: python bench/profile.py --connections {args.connections} "
        f"--seconds {args.seconds}\n# py-spy record -r 997, {args.seconds} s; "
        "self time excludes idle\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{stamp}-c{args.connections}.txt"
    path.write_text(header + profile)
    print(header + profile)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

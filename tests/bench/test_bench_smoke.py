"""The benchmark harness runs end to end (bench/run.py --smoke), so it never rots.

Needs nginx, wrk and curl (CI installs them with apt). Without them the test
fails, naming the apt command: a skipped benchmark is one nobody notices breaking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"
APT_COMMAND = "apt-get install -y nginx-light wrk"
TARGETS = ("direct", "nginx", "authproxy", "authproxy-token")
TABLE_HEADER = (
    "| c | target | req/s | p50 µs | p99 µs | CPU µs/req (proxy) | CPU µs/req (upstream) "
    "| req/s ÷ nginx | req/s ÷ direct | CPU ÷ nginx |"
)


def _missing_tools() -> list[str]:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    found = {"nginx": nginx, "wrk": shutil.which("wrk"), "curl": shutil.which("curl")}
    return [name for name, path in found.items() if path is None]


def _run_smoke(script: Path, *args: str) -> str:
    """Run a bench script in smoke mode; its stdout (failing, not skipping, without tools)."""
    missing = _missing_tools()
    if missing:
        pytest.fail(f"bench needs {', '.join(missing)}: {APT_COMMAND} curl")
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_bench_smoke(tmp_path: Path) -> None:
    stdout = _run_smoke(RUN, "--out", str(tmp_path))

    json_files = sorted(tmp_path.glob("bench-*.json"))
    md_files = sorted(tmp_path.glob("bench-*.md"))
    assert len(json_files) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert len(md_files) == 1, sorted(p.name for p in tmp_path.iterdir())
    data = json.loads(json_files[0].read_text())

    summary = data["small"]["summary"]
    assert sorted(summary) == sorted(TARGETS)
    for target in TARGETS:
        assert summary[target], target
        for c, figures in summary[target].items():
            assert figures["rps"] > 0, (target, c, figures)
            assert figures["cpu_us_per_req"] > 0, (target, c, figures)
            assert figures["non2xx"] == 0, (target, c, figures)
            assert figures["socket_errors"] == 0, (target, c, figures)
    for run in data["small"]["runs"]:
        assert run["requests"] > 0, run
    paired = data["token_vs_static"]
    assert sorted(paired["summary"]) == sorted(summary["authproxy"])  # every concurrency
    for c, figures in paired["summary"].items():
        assert figures["pairs"] >= 1, (c, figures)
        assert figures["ratio"] > 0, (c, figures)
    assert all(p["static_us"] > 0 and p["token_us"] > 0 for p in paired["pairs"])
    triples = data["added_latency_paired"]
    assert triples["summary"]["triples"] >= 1
    for triple in triples["triples"]:
        assert sorted(triple["p50_us"]) == ["authproxy", "direct", "nginx"], triple
        assert all(v > 0 for v in triple["p50_us"].values()), triple
    assert data["token_requests"] == 1, "the token route must fetch its token once, then cache it"
    assert data["machine"]["nproc"] >= 1
    assert data["command"][1].endswith("run.py")
    assert {g["status"] for g in data["targets"]} <= {
        "met (aim too)",
        "met (must); aim not met",
        "NOT met",
        "not measured",
    }

    markdown = md_files[0].read_text()
    assert TABLE_HEADER in markdown
    assert "## Targets" in markdown
    assert TABLE_HEADER in stdout


def test_floor_smoke() -> None:
    """bench/floor.py (authproxy beside the asyncio and aiohttp floors) runs end to end."""
    stdout = _run_smoke(REPO / "bench" / "floor.py")
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| target")
    }
    assert sorted(rows) == sorted(
        ["direct", "nginx", "authproxy", "relay", "aiohttp-fixed", "aiohttp-hop", "aiohttp-lean"]
    )
    for name, cells in rows.items():
        p50 = float(cells[0].replace(",", ""))
        assert p50 > 0, (name, cells)
        if name != "direct":  # every proxy's CPU was read from /proc
            assert float(cells[3].replace(",", "")) > 0, (name, cells)


@pytest.mark.parametrize("entry", [["bench/run.py"], ["-m", "bench"]])
def test_bench_entry_points(entry: list[str]) -> None:
    """`python bench/run.py` and `python -m bench` start the same harness."""
    proc = subprocess.run(
        [sys.executable, *entry, "--rounds", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr  # usage error from the harness's own parser
    assert "--rounds" in proc.stderr and "positive" in proc.stderr, proc.stderr


def test_bench_workers_smoke(tmp_path: Path) -> None:
    """`--workers`: authproxy with 1 and 2 processes beside nginx with 1 and 2, end to end."""
    stdout = _run_smoke(RUN, "--workers", "--out", str(tmp_path))
    (json_file,) = tmp_path.glob("workers-*.json")
    data = json.loads(json_file.read_text())
    summary = data["small"]["summary"]
    assert sorted(summary) == sorted(["nginx-1w", "nginx-2w", "authproxy-1w", "authproxy-2w"])
    for target, by_c in summary.items():
        for c, figures in by_c.items():
            assert figures["rps"] > 0 and figures["cpu_us_per_req"] > 0, (target, c, figures)
            assert figures["non2xx"] == 0 and figures["socket_errors"] == 0, (target, c)
            assert figures["cores"]["machine_busy"] > 0, (target, c, figures)
    for two in ("authproxy-2w", "nginx-2w"):
        assert all(s["rps_ratio"] > 0 for s in data["scaling"][two].values()), data["scaling"]
    paired = data["paired"]
    assert paired["pairs"] and all(p["rps_ratio"] > 0 for p in paired["pairs"]), paired
    assert sorted(paired["summary"]) == sorted(summary["authproxy-1w"])  # every concurrency
    (goal,) = data["targets"]
    assert goal["figure"].startswith("throughput at c=") and goal["value"] > 0
    assert "## 2 processes ÷ 1 (same round)" in stdout

"""Merging the workers' metrics (proxy/workermetrics.py): counters add up, gauges by meaning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.workermetrics import SharedMetrics, mark_dead, snapshot_path


def worker_metrics(requests: int, in_flight: int, ttl: float | None, latency: float) -> Metrics:
    m = Metrics()
    m.watch(lambda: [("paymo", {"fetch_success": 1, "fetch_failure": 0, "ttl": ttl})])
    for _ in range(requests):
        m.request_done("paymo", "GET", 200, latency, False)
    m.in_flight = in_flight
    return m


def write_snapshot(directory: Path, pid: int, m: Metrics, age: float, now: float, **kw) -> None:
    shared = SharedMetrics(m, directory, clock=lambda: now - age)
    shared._pid, shared._path = pid, snapshot_path(directory, pid)
    shared.write(**kw)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_add_up_and_gauges_merge_by_meaning(tmp_path: Path) -> None:
    now = 1_000_000.0
    write_snapshot(tmp_path, 101, worker_metrics(3, 2, 500.0, 0.003), age=0.5, now=now)
    write_snapshot(tmp_path, 102, worker_metrics(4, 7, 100.0, 0.2), age=0.0, now=now)
    write_snapshot(tmp_path, 103, worker_metrics(5, 9, 1.0, 0.003), age=0.0, now=now)
    mark_dead(tmp_path, 103)  # died: its counts stay, its gauges go
    me = SharedMetrics(worker_metrics(1, 1, 300.0, 0.003), tmp_path, clock=lambda: now)
    got = samples(me.render())

    req = (
        "authproxy_requests_total",
        (("method_class", "read"), ("status_class", "2xx"), ("upstream", "paymo")),
    )
    assert got[req] == 3 + 4 + 5 + 1
    assert (
        got[("authproxy_token_fetches_total", (("outcome", "success"), ("upstream", "paymo")))] == 4
    )
    assert got[("authproxy_in_flight_requests", ())] == 2 + 7 + 1  # the dead one's 9 left out
    # The smallest remaining lifetime of the living, each less its snapshot's age.
    assert got[("authproxy_token_ttl_seconds", (("upstream", "paymo"),))] == 100.0
    bucket = ("authproxy_upstream_latency_seconds_bucket", (("le", "0.005"), ("upstream", "paymo")))
    assert got[bucket] == 3 + 5 + 1  # worker 102's requests took 0.2 s
    count = ("authproxy_upstream_latency_seconds_count", (("upstream", "paymo"),))
    assert got[count] == 13


def test_ttl_is_aged_and_final_or_stale_snapshots_drop_their_gauges(tmp_path: Path) -> None:
    now = 5_000.0
    write_snapshot(tmp_path, 201, worker_metrics(1, 3, 50.0, 0.01), age=0.8, now=now)
    write_snapshot(tmp_path, 202, worker_metrics(1, 4, 10.0, 0.01), age=0.0, now=now, final=True)
    write_snapshot(tmp_path, 203, worker_metrics(1, 5, 5.0, 0.01), age=60.0, now=now)  # hung
    me = SharedMetrics(worker_metrics(1, 0, None, 0.01), tmp_path, clock=lambda: now)
    got = samples(me.render())
    assert got[("authproxy_token_ttl_seconds", (("upstream", "paymo"),))] == pytest.approx(49.2)
    assert got[("authproxy_in_flight_requests", ())] == 3
    req = (
        "authproxy_requests_total",
        (("method_class", "read"), ("status_class", "2xx"), ("upstream", "paymo")),
    )
    assert got[req] == 4  # counts of every snapshot, final and stale ones too


def test_own_snapshot_is_not_counted_twice_and_junk_is_ignored(tmp_path: Path) -> None:
    mine = worker_metrics(2, 0, None, 0.01)
    me = SharedMetrics(mine, tmp_path)
    me.write()
    (tmp_path / "999.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("hello")
    assert snapshot_path(tmp_path, os.getpid()).exists()
    got = samples(me.render())
    req = (
        "authproxy_requests_total",
        (("method_class", "read"), ("status_class", "2xx"), ("upstream", "paymo")),
    )
    assert got[req] == 2
    assert json.loads(snapshot_path(tmp_path, os.getpid()).read_text())["final"] is False

"""`/-/metrics` across the workers of `run --workers N` (SPEC §8).

Each worker writes a snapshot of its registry to a directory the supervisor
created, once a second and when it stops; the worker that answers a scrape
merges everyone else's latest snapshot with its own live numbers. The hot path
is untouched: requests bump the same plain counters as in one process, and the
cost (one collect and one small file write a second, a directory read per
scrape) is paid off it. prometheus-client's multiprocess mode was not an
option: it does not run custom collectors (metrics.py's scrape-time view is
one) and puts a locked mmap write on every increment.

How families merge:

* counters and histograms add up, over every snapshot ever written — a worker
  that died keeps its counts (its last snapshot, at most a second old, stays;
  the supervisor marks it dead);
* gauges only count for workers alive now (a dead worker has nothing in
  flight), merged by meaning: in-flight requests add up, a token's remaining
  lifetime is the smallest (each snapshot's value less its age).

A scrape is therefore exact for this worker and at most a second behind for
the others: two scrapes a second apart answer the same whichever worker serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxy.metrics import Metrics

log = structlog.get_logger("authproxy.workers")

SNAPSHOT_INTERVAL = 1.0
# A live worker's snapshot older than this has stopped being refreshed: its gauges are dropped.
STALE_AFTER = 5.0
SUFFIX, DEAD_SUFFIX = ".json", ".dead.json"

# How a gauge merges across workers; unlisted gauges add up.
GAUGE_MERGE: dict[str, str] = {"authproxy_token_ttl_seconds": "min_remaining"}

Samples = list[tuple[str, dict[str, str], float]]


def snapshot_path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}{SUFFIX}"


def mark_dead(directory: Path, pid: int) -> None:
    """Called by the supervisor for a worker it reaped: its counts stay, its gauges go."""
    with contextlib.suppress(OSError):
        snapshot_path(directory, pid).rename(directory / f"{pid}{DEAD_SUFFIX}")


def _families(metrics: Iterable[Metric]) -> list[dict[str, Any]]:
    return [
        {
            "name": m.name,
            "type": m.type,
            "help": m.documentation,
            "unit": m.unit,
            "samples": [[s.name, s.labels, s.value] for s in m.samples],
        }
        for m in metrics
    ]


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics


class _Family:
    """One metric family being merged: samples grouped by labels (without `le`),
    so a histogram's buckets stay together and in order."""

    def __init__(self, name: str, typ: str, help_: str, unit: str) -> None:
        self.name, self.type, self.help, self.unit = name, typ, help_, unit
        self.groups: dict[tuple[tuple[str, str], ...], dict[str, tuple[dict[str, str], float]]] = {}

    def add(self, samples: Samples, how: str, age: float) -> None:
        for sample_name, labels, value in samples:
            group = self.groups.setdefault(
                tuple(sorted((k, v) for k, v in labels.items() if k != "le")), {}
            )
            key = sample_name + "\0" + labels.get("le", "")
            if how == "min_remaining":
                value -= age
            seen = group.get(key)
            if seen is None:
                group[key] = (labels, value)
            elif how == "min_remaining":
                group[key] = (labels, min(seen[1], value))
            else:
                group[key] = (labels, seen[1] + value)

    def metric(self) -> Metric:
        metric = Metric(self.name, self.help, self.type, self.unit)
        for group in self.groups.values():
            for key, (labels, value) in group.items():
                metric.add_sample(key.partition("\0")[0], labels, value)
        return metric


def merge(
    live: Iterable[Metric], snapshots: Iterable[tuple[dict[str, Any], bool, float]]
) -> list[Metric]:
    """This worker's `live` families plus `snapshots` — (snapshot, alive, age in
    seconds) — into one list of families, by the rules in the module docstring."""
    merged: dict[str, _Family] = {}

    def take(families: list[dict[str, Any]], alive: bool, age: float) -> None:
        for fam in families:
            family = merged.get(fam["name"])
            if family is None:
                family = merged[fam["name"]] = _Family(
                    fam["name"], fam["type"], fam["help"], fam["unit"]
                )
            if fam["type"] == "gauge":
                if not alive:
                    continue
                how = GAUGE_MERGE.get(fam["name"], "sum")
            else:
                how = "sum"
            family.add([(s[0], s[1], float(s[2])) for s in fam["samples"]], how, age)

    take(_families(live), True, 0.0)
    for snapshot, alive, age in snapshots:
        take(snapshot["families"], alive, age)
    return [family.metric() for family in merged.values()]


class SharedMetrics:
    """One worker's side: publish its snapshot, answer scrapes with everyone's."""

    def __init__(
        self, metrics: Metrics, directory: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._metrics = metrics
        self._directory = directory
        self._clock = clock
        self._pid = os.getpid()
        self._path = snapshot_path(directory, self._pid)

    def write(self, final: bool = False) -> None:
        """Replace this worker's snapshot atomically (readers never see half a file)."""
        body = {
            "pid": self._pid,
            "written_at": self._clock(),
            "final": final,
            "families": _families(self._metrics.registry.collect()),
        }
        tmp = self._directory / f".{self._pid}.tmp"
        tmp.write_text(json.dumps(body, separators=(",", ":")))
        os.replace(tmp, self._path)

    def _others(self) -> Iterator[tuple[dict[str, Any], bool, float]]:
        now = self._clock()
        try:
            entries = list(os.scandir(self._directory))
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if not name.endswith(SUFFIX) or name.startswith(".") or entry.path == str(self._path):
                continue
            try:
                snapshot = json.loads(Path(entry.path).read_text())
            except (OSError, ValueError):
                continue  # removed meanwhile, or not one of ours
            age = max(0.0, now - float(snapshot["written_at"]))
            alive = not name.endswith(DEAD_SUFFIX) and not snapshot["final"] and age < STALE_AFTER
            yield snapshot, alive, age

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(merge(self._metrics.registry.collect(), self._others())))
        return generate_latest(registry)

    async def publish(self, interval: float = SNAPSHOT_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.write()
            except OSError as exc:  # a full disk must not stop the worker serving
                log.warning("metrics_snapshot_failed", error=exc.strerror or str(exc))


@contextlib.asynccontextmanager
async def share_metrics(metrics: Metrics, directory: Path) -> AsyncIterator[None]:
    """While the worker serves: publish every second, merge on scrape; a last
    snapshot once it has drained, so none of its requests go uncounted."""
    shared = SharedMetrics(metrics, directory)
    shared.write()  # at once: a scrape right after start-up already sees this worker
    metrics.merged = shared.render
    task = asyncio.create_task(shared.publish())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            shared.write(final=True)

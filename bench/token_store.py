"""The cached-token route's CPU per request with the Redis store ÷ with the memory store.

SPEC §8: a token in hand is used without asking Redis, so the two must cost the
same. Two authproxy processes with the same oauth2 route in front of the same
nginx upstream, one with `token_store: memory`, one with `token_store: redis`
(a real redis-server); short paired wrk runs, the order reversed every second
pair; each run's figure is the proxy process's CPU (utime + stime) ÷ requests::

    python bench/token_store.py --pairs 10 --concurrency 10

Prints one JSON object: the median ratio, its quartiles, and the store
operations the Redis-backed proxy made during the measured runs (expected: 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import parse_wrk
from bench.processes import Services, child_env, cpu_seconds, free_port, http_get, wait_http
from bench.settings import (
    BENCH_DIR,
    GETPAID_AUDIENCE,
    GETPAID_CLIENT_ID,
    GETPAID_SCOPE,
    REPO_ROOT,
    find_tools,
    parse_args,
)
from bench.targets import PREFIX, authproxy_argv, authproxy_config, make_workdir, upstream_conf

REDIS_SERVER = "/usr/bin/redis-server"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="paired runs (default 10)")
    parser.add_argument("--duration", type=int, default=1, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, default=10, help="wrk connections")
    args = parser.parse_args()
    tools = find_tools()
    if tools is None:
        return 2
    settings = parse_args(["--smoke"])  # only for the work directory (small files)
    work = make_workdir(settings)
    services = Services()
    try:
        up_port = free_port()
        conf = work.root / "upstream.conf"
        conf.write_text(upstream_conf(work, up_port))
        argv = [tools.nginx, "-p", str(work.root), "-c", str(conf), "-e", str(work.root / "e.log")]
        upstream = services.start("upstream", argv, up_port, work.root / "upstream.out", work.root)
        wait_http(upstream, f"http://127.0.0.1:{up_port}/small.json")
        fake_port, redis_port = free_port(), free_port()
        services.start(
            "getpaid-fake",
            [sys.executable, str(BENCH_DIR / "getpaid_fake.py"), "--port", str(fake_port)],
            fake_port,
            work.root / "fake.log",
            REPO_ROOT,
        )
        services.start(
            "redis",
            [REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work.root)],
            redis_port,
            work.root / "redis.log",
            work.root,
        )  # fmt: skip
        auth = {
            "type": "oauth2_client_credentials",
            "token_url": f"http://127.0.0.1:{fake_port}/oauth/token",
            "client_id": GETPAID_CLIENT_ID,
            "client_secret": "${BENCH_GETPAID_CLIENT_SECRET}",
            "audience": GETPAID_AUDIENCE,
            "scope": GETPAID_SCOPE,
            "body_format": "json",
        }
        proxies = {}
        for store in ("memory", "redis"):
            port = free_port()
            config = json.loads(authproxy_config(port, up_port, auth))
            config["token_store"] = (
                {"type": "redis", "url": f"redis://127.0.0.1:{redis_port}/0"}
                if store == "redis"
                else {"type": "memory"}
            )
            path = work.root / f"{store}.yaml"
            path.write_text(json.dumps(config))
            argv = [*authproxy_argv(), "run", "-c", str(path), "--log-format", "json"]
            service = services.start(store, argv, port, work.root / f"{store}.log", work.root)
            base = f"http://127.0.0.1:{port}{PREFIX}"
            wait_http(service, base + "/small.json", timeout=60)
            proxies[store] = (service, base)

        def run(store: str) -> float:
            service, base = proxies[store]
            before = cpu_seconds(service.pids())
            wrk = [tools.wrk, "-t1", f"-c{args.concurrency}", f"-d{args.duration}s", "--latency",
                   base + "/small.json"]  # fmt: skip
            out = subprocess.run(wrk, capture_output=True, text=True, env=child_env(), check=True)
            used = cpu_seconds(service.pids()) - before
            result = parse_wrk(out.stdout)
            if result["non2xx"] or result["socket_errors"]:
                raise SystemExit(f"{store}: errors during the run: {result}")
            return float(used * 1e6 / result["requests"])

        def store_ops() -> int:
            _, base = proxies["redis"]
            _, text = http_get(base.removesuffix(PREFIX) + "/-/metrics")
            return sum(
                int(float(line.rsplit(" ", 1)[1]))
                for line in text.decode().splitlines()
                if line.startswith("authproxy_token_store_operations_total{")
            )

        for store in proxies:  # warm-up: the token, the pools, the caches
            run(store)
        ops_before = store_ops()
        ratios: list[float] = []
        cpu: dict[str, list[float]] = {"memory": [], "redis": []}
        for i in range(args.pairs):
            order = ("memory", "redis") if i % 2 == 0 else ("redis", "memory")
            got = {store: run(store) for store in order}
            for store, value in got.items():
                cpu[store].append(value)
            ratios.append(got["redis"] / got["memory"])
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        report: dict[str, Any] = {
            "figure": "cached-token route CPU per request, redis store / memory store",
            "median_ratio": round(median, 4),
            "quartiles": [round(q1, 4), round(q3, 4)],
            "cpu_us_per_req": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
            "pairs": args.pairs,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "store_operations_during_runs": store_ops() - ops_before,
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        services.stop_all()
        shutil.rmtree(work.root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""From raw runs to figures: medians over rounds, same-round ratios, the paired
figures, and the targets of issue 6 judged against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.measure import Raw
from bench.settings import MIB, Settings
from bench.stats import TIMES, median, quartiles, ratio, times
from bench.targets import (
    AUTHPROXY,
    AUTHPROXY_1W,
    AUTHPROXY_2W,
    DIRECT,
    LARGE_TARGETS,
    NGINX,
    NGINX_1W,
    NGINX_2W,
    TARGETS,
    TOKEN,
    WORKER_TARGETS,
)


def summarize(settings: Settings, raw: Raw) -> dict[str, Any]:
    rounds = range(1, settings.rounds + 1)
    by = {(r["round"], r["c"], r["target"]): r for r in raw.small}

    def val(rnd: int, c: int, target: str, key: str) -> float | None:
        row = by.get((rnd, c, target))
        return None if row is None else row[key]

    small: dict[str, dict[str, dict[str, Any]]] = {}
    for target in TARGETS:
        small[target] = {}
        for c in settings.concurrencies:
            rows = [by[(rnd, c, target)] for rnd in rounds]
            entry: dict[str, Any] = {
                key: median([row[key] for row in rows])
                for key in (
                    "rps",
                    "requests",
                    "p50_us",
                    "p99_us",
                    "cpu_us_per_req",
                    "proxy_cpu_us_per_req",
                    "upstream_cpu_us_per_req",
                )
            }
            entry["non2xx"] = sum(row["non2xx"] for row in rows)
            entry["socket_errors"] = sum(row["socket_errors"] for row in rows)

            def r_of(key: str, other: str, c: int = c, target: str = target) -> float | None:
                return median(
                    [ratio(val(rnd, c, target, key), val(rnd, c, other, key)) for rnd in rounds]
                )

            entry["rps_vs_nginx"] = r_of("rps", NGINX)
            entry["rps_vs_direct"] = r_of("rps", DIRECT)
            entry["cpu_vs_nginx"] = (
                r_of("proxy_cpu_us_per_req", NGINX) if target in (AUTHPROXY, TOKEN) else None
            )
            entry["cpu_vs_static"] = (
                r_of("proxy_cpu_us_per_req", AUTHPROXY) if target == TOKEN else None
            )
            small[target][str(c)] = entry

    # Added latency at c=1: p50(proxy) - p50(direct) in the same round.
    added: dict[str, Any] = {}
    c1 = 1 if 1 in settings.concurrencies else min(settings.concurrencies)
    for target in (NGINX, AUTHPROXY, TOKEN):

        def add(rnd: int, t: str = target) -> float | None:
            p, d = val(rnd, c1, t, "p50_us"), val(rnd, c1, DIRECT, "p50_us")
            return None if p is None or d is None else p - d

        added[target] = {
            "added_us": median([add(rnd) for rnd in rounds]),
            "vs_nginx": None
            if target == NGINX
            else median([ratio(add(rnd), add(rnd, NGINX)) for rnd in rounds]),
            "per_round_us": [add(rnd) for rnd in rounds],
        }

    def transfers(rnd: int, target: str, direction: str) -> list[dict[str, Any]]:
        return [
            r
            for r in raw.large
            if (r["round"], r["target"], r["direction"]) == (rnd, target, direction)
        ]

    large: dict[str, Any] = {}
    for target in LARGE_TARGETS:
        large[target] = {}
        for direction in ("download", "upload"):

            def mbs(rnd: int, t: str = target, d: str = direction) -> float | None:
                """The round's figure: the median of its transfers."""
                return median([float(r["mb_per_s"]) for r in transfers(rnd, t, d)])

            entry = {
                "mb_per_s": median([mbs(rnd) for rnd in rounds]),
                "vs_nginx": median([ratio(mbs(rnd), mbs(rnd, NGINX)) for rnd in rounds]),
                "vs_direct": median([ratio(mbs(rnd), mbs(rnd, DIRECT)) for rnd in rounds]),
            }
            if target in raw.rss_watch:
                # Per round: RSS before the first transfer, the highest peak and growth.
                per_round = [transfers(rnd, target, direction) for rnd in rounds]
                per_round = [rows for rows in per_round if rows]
                entry["rss_before_mib"] = median(
                    [rows[0]["rss_before_kib"] / 1024 for rows in per_round]
                )
                for key in ("rss_peak", "rss_growth"):
                    entry[f"{key}_mib"] = median(
                        [max(r[f"{key}_kib"] for r in rows) / 1024 for rows in per_round]
                    )
                entry["rss_growth_max_mib"] = max(
                    r["rss_growth_kib"] / 1024 for rows in per_round for r in rows
                )
            large[target][direction] = entry
    for target, watch in raw.rss_watch.items():
        large[target]["vmhwm_end_mib"] = watch.lifetime_hwm_kib / 1024

    paired: dict[str, Any] = {}
    for c in settings.concurrencies:
        rows = [p for p in raw.pairs if p["c"] == c]
        ratios = [p["ratio"] for p in rows if p["ratio"] is not None]
        q1, q3 = quartiles(ratios)
        paired[str(c)] = {
            "pairs": len(rows),
            "static_us": median([p["static_us"] for p in rows]),
            "token_us": median([p["token_us"] for p in rows]),
            "ratio": median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
        }
    ratios = [t["ratio"] for t in raw.triples if t["ratio"] is not None]
    q1, q3 = quartiles(ratios)
    triples = {
        "c": c1,
        "triples": len(raw.triples),
        "nginx_added_us": median([t["nginx_added_us"] for t in raw.triples]),
        "authproxy_added_us": median([t["authproxy_added_us"] for t in raw.triples]),
        "ratio": median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "unmeasurable": len(raw.triples) - len(ratios),
    }
    return {
        "small": small,
        "added_latency": {"c": c1, **added},
        "added_latency_paired": triples,
        "large": large,
        "token_vs_static": paired,
    }


@dataclass(frozen=True)
class Goal:
    figure: str
    value: float | None
    shown: str
    must: float
    aim: float
    higher_is_better: bool

    def status(self) -> str:
        if self.value is None:
            return "not measured"

        def ok(limit: float) -> bool:
            assert self.value is not None
            return self.value >= limit if self.higher_is_better else self.value <= limit

        if ok(self.aim):
            return "met (aim too)"
        if ok(self.must):
            return "met (must); aim not met"
        return "NOT met"


def goals(settings: Settings, summary: dict[str, Any]) -> list[Goal]:
    small = summary["small"]
    cs = [str(c) for c in settings.concurrencies]
    top = str(100 if 100 in settings.concurrencies else max(settings.concurrencies))

    def worst(target: str, key: str) -> tuple[float | None, str]:
        vals = [(small[target][c][key], c) for c in cs if small[target][c][key] is not None]
        if not vals:
            return None, "—"
        v, c = max(vals)
        return v, f"{v:.2f}{TIMES} (worst, at c={c})"

    cpu_v, cpu_s = worst(AUTHPROXY, "cpu_vs_nginx")
    paired = [(e["ratio"], c) for c, e in summary["token_vs_static"].items() if e["ratio"]]
    tok_v, tok_c = max(paired) if paired else (None, "—")
    tok_s = "—" if tok_v is None else f"{tok_v:.2f}{TIMES} (worst, at c={tok_c}; paired runs)"
    rps_v = small[AUTHPROXY][top]["rps_vs_nginx"]
    lat_v = summary["added_latency_paired"]["ratio"]
    lat_s = "—" if lat_v is None else f"{lat_v:.2f}{TIMES} (paired runs)"
    large = summary["large"][AUTHPROXY]
    dl_v, ul_v = large["download"]["vs_nginx"], large["upload"]["vs_nginx"]
    growth = max(large["download"]["rss_growth_mib"], large["upload"]["rss_growth_mib"])
    c1 = summary["added_latency"]["c"]
    size = f"{settings.big_bytes // MIB} MiB"
    return [
        Goal("CPU per proxied small request, ÷ nginx's", cpu_v, cpu_s, 6, 3, False),
        Goal(f"throughput at c={top}, ÷ nginx's", rps_v, times(rps_v), 0.25, 0.5, True),
        Goal(f"added latency at c={c1} (p50 over direct), ÷ nginx's", lat_v, lat_s, 4, 2, False),
        Goal(f"{size} download MB/s, ÷ nginx's", dl_v, times(dl_v), 1.0, 1.2, True),
        Goal(f"{size} upload MB/s, ÷ nginx's", ul_v, times(ul_v), 1.2, 1.5, True),
        Goal(
            f"proxy RSS growth during a {size} transfer", growth, f"{growth:.2f} MiB", 5, 2, False
        ),
        Goal(
            "cached-token route CPU/request ÷ static-header route", tok_v, tok_s, 1.1, 1.05, False
        ),
    ]


def summarize_workers(settings: Settings, raw: Raw) -> dict[str, Any]:
    """Per target and concurrency: medians over rounds, each process group's share of
    the cores, and the same-round ratios of 2 processes to 1 (throughput and CPU)."""
    rounds = range(1, settings.rounds + 1)
    by = {(r["round"], r["c"], r["target"]): r for r in raw.small}
    out: dict[str, Any] = {}
    for target in WORKER_TARGETS:
        out[target] = {}
        for c in settings.concurrencies:
            rows = [by[(rnd, c, target)] for rnd in rounds]

            def cores(row: dict[str, Any], key: str) -> float:
                return float(row[key]) / float(row["duration_s"])

            entry: dict[str, Any] = {
                key: median([row[key] for row in rows])
                for key in ("rps", "requests", "p50_us", "p99_us", "cpu_us_per_req")
            }
            entry["upstream_cpu_us_per_req"] = median([r["upstream_cpu_us_per_req"] for r in rows])
            entry["wrk_cpu_us_per_req"] = median(
                [r["wrk_cpu_s"] * 1e6 / r["requests"] if r["requests"] else None for r in rows]
            )
            entry["cores"] = {
                "proxy": median([cores(r, "proxy_cpu_s") for r in rows]),
                "upstream": median([cores(r, "upstream_cpu_s") for r in rows]),
                "wrk": median([cores(r, "wrk_cpu_s") for r in rows]),
                "machine_busy": median([cores(r, "machine_busy_cpu_s") for r in rows]),
                "steal": median([cores(r, "machine_steal_cpu_s") for r in rows]),
                # Busy CPU that none of the three was: the machine's other users.
                "others": median(
                    [
                        cores(r, "machine_busy_cpu_s")
                        - cores(r, "proxy_cpu_s")
                        - cores(r, "upstream_cpu_s")
                        - cores(r, "wrk_cpu_s")
                        for r in rows
                    ]
                ),
            }
            entry["busiest_share"] = median([r["busiest_share"] for r in rows])
            entry["non2xx"] = sum(r["non2xx"] for r in rows)
            entry["socket_errors"] = sum(r["socket_errors"] for r in rows)
            out[target][str(c)] = entry
    scaling: dict[str, Any] = {}
    for two, one in ((AUTHPROXY_2W, AUTHPROXY_1W), (NGINX_2W, NGINX_1W)):
        scaling[two] = {}
        for c in settings.concurrencies:

            def r_of(key: str, c: int = c, two: str = two, one: str = one) -> list[float | None]:
                return [ratio(by[(rnd, c, two)][key], by[(rnd, c, one)][key]) for rnd in rounds]

            scaling[two][str(c)] = {
                "rps_ratio": median(r_of("rps")),
                "rps_ratio_per_round": r_of("rps"),
                "cpu_ratio": median(r_of("cpu_us_per_req")),
            }
    paired: dict[str, Any] = {}
    for c in settings.concurrencies:
        rows = [p for p in raw.pairs if p["c"] == c]
        ratios = [p["rps_ratio"] for p in rows if p["rps_ratio"] is not None]
        q1, q3 = quartiles(ratios)
        paired[str(c)] = {
            "pairs": len(rows),
            "rps_1w": median([p["rps_1w"] for p in rows]),
            "rps_2w": median([p["rps_2w"] for p in rows]),
            "rps_ratio": median(ratios),
            "rps_ratio_q1": q1,
            "rps_ratio_q3": q3,
            "cpu_ratio": median([p["cpu_ratio"] for p in rows]),
            "others_cores": median([p["others_cores"] for p in rows]),
        }
    return {"small": out, "scaling": scaling, "paired": paired}


def worker_goals(settings: Settings, summary: dict[str, Any]) -> list[Goal]:
    top = str(100 if 100 in settings.concurrencies else max(settings.concurrencies))
    value = summary["paired"][top]["rps_ratio"]
    rounds = summary["scaling"][AUTHPROXY_2W][top]["rps_ratio"]
    shown = f"{times(value)} (paired runs; rounds {times(rounds)})"
    return [Goal(f"throughput at c={top}, 2 workers ÷ 1 worker", value, shown, 1.6, 1.6, True)]

"""Medians, ratios, quartiles and how a figure is printed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

TIMES = "\u00d7"  # the multiplication sign in ratios


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def quartiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    """First and third quartiles (None for fewer than two values)."""
    if len(values) < 2:
        return None, None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3

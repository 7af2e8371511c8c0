"""The proxy's JSON log output, as captured from stdout."""

from __future__ import annotations

import json
from typing import Any


def log_lines(text: str) -> list[dict[str, Any]]:
    """Parse captured stdout into log records (every line must be JSON)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def access_lines(text: str) -> list[dict[str, Any]]:
    """The access lines (`request_finished`) among the captured records."""
    return [r for r in log_lines(text) if r["event"] == "request_finished"]

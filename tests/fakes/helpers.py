"""Small helpers shared by the fakes' tests."""

from __future__ import annotations

import asyncio
import base64
import time

from tests.support import bearer as bearer  # shared; re-exported for the fakes' tests


def basic(username: str, password: str) -> dict[str, str]:
    """An ``Authorization: Basic`` header (aiohttp's BasicAuth is deprecated)."""
    raw = f"{username}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


async def sleep_until(instant: float) -> None:
    """Sleep until the wall clock passes ``instant`` (bounded: at most 5 s)."""
    delay = instant - time.time() + 0.02
    assert delay < 5, "test would wait too long"
    if delay > 0:
        await asyncio.sleep(delay)

"""Poll a condition with a deadline instead of sleeping and hoping.

The condition returns a truthy value when met (returned to the caller); it may raise
(an AssertionError, say) to fail at once, e.g. when a subprocess died.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    cond: Callable[[], Awaitable[T]],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    what: str = ...,
    interval: float = ...,
) -> T: ...
@overload
async def wait_until(
    cond: Callable[[], T],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    what: str = ...,
    interval: float = ...,
) -> T: ...
async def wait_until(
    cond: Callable[[], Any],
    timeout: float = 5.0,  # noqa: ASYNC109 - the deadline is the point; it bounds cond too
    *,
    what: str = "the condition",
    interval: float = 0.02,
) -> Any:
    """Await until `cond()` (sync or async) is truthy; fail after `timeout` seconds,
    also when an async `cond()` itself hangs."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = cond()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def wait_until_sync(
    cond: Callable[[], T],
    timeout: float = 5.0,
    *,
    what: str = "the condition",
    interval: float = 0.05,
) -> T:
    """`wait_until` for code outside an event loop (sync fixtures, subprocess helpers)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)

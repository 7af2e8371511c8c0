"""The store boundary: what a TokenManager needs from wherever tokens are kept.

One async protocol, two stores: `MemoryTokenStore` (each process its own) and
`proxy.tokens.redis.RedisTokenStore` (one token per identity across a deployment).
A store hands each token flow a `Slot`, keyed by the flow's identity (SPEC §8
promise 5), never by the upstream's name. The manager drives a slot so:

    get → (usable? adopt it) → lock → get again → fetch → put(replaces=what it read)
                 └ lock held elsewhere → changes() (subscribe) → get again → wait

Everything a slot stores is a `Record` in wall-clock time (processes do not
share a monotonic clock). `put` is a compare-and-swap on the `Entry` it
replaces and `delete` a compare-and-delete, both by the entry's `version`
(for Redis: the exact stored bytes, which carry a random nonce).

A shared store that cannot answer raises `StoreUnavailable`; the manager then
serves from its own memory (promise 8). The memory store never raises it.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol


class StoreUnavailable(Exception):
    """The shared store is down, too slow or erroring: fall back to memory."""


@dataclass(frozen=True, slots=True)
class Record:
    """What is shared about one token flow. Times are epoch seconds (wall clock)."""

    value: str | None = None  # the token; None: only a failure is recorded
    obtained_at: float | None = None
    expires_at: float | None = None
    refresh_token: str | None = None
    refresh_expires_at: float | None = None
    failures: int = 0  # consecutive token-endpoint failures
    backoff_until: float = 0.0  # every process backs off until then
    last_error: str | None = None  # our own message, never a secret

    def lives_until(self) -> float | None:
        """The entry's expiry: its longest-lived part (None: no known end)."""
        ends = [self.backoff_until] if self.backoff_until else []
        if self.value is not None:
            if self.expires_at is None:
                return None
            ends.append(self.expires_at)
        if self.refresh_token is not None:
            if self.refresh_expires_at is None:
                return None
            ends.append(self.refresh_expires_at)
        return max(ends) if ends else None


@dataclass(frozen=True, slots=True)
class Entry:
    """A record as read from a store. `record` is None when it could not be read
    (a secret rotated, a newer format): a miss that a put may still replace."""

    record: Record | None
    version: object


class Identity(Protocol):
    """What a store keys a slot on (`proxy.auth.identity.AuthIdentity` is one)."""

    @property
    def digest(self) -> str: ...

    @property
    def material(self) -> bytes: ...


class Waiter(Protocol):
    async def wait(self, within: float) -> bool:
        """Until the slot changes (True) or `within` seconds pass (False)."""
        ...


class Slot(Protocol):
    """One token flow's place in a store."""

    shared: bool  # other processes may read what is put here

    async def get(self) -> Entry | None: ...

    async def put(self, record: Record, replaces: Entry | None) -> Entry | None:
        """Store `record` if the slot still holds `replaces`; the new entry, or None."""
        ...

    async def delete(self, entry: Entry) -> bool:
        """Remove `entry` if it is still the one stored."""
        ...

    async def lock(self, ttl: float) -> str | None:
        """Take the slot's lock for `ttl` seconds: the owner's id, or None if held."""
        ...

    async def unlock(self, owner: str) -> None: ...

    def changes(self) -> Any:
        """`async with slot.changes() as waiter:` — subscribed before the body runs."""
        ...

    def fell_back(self) -> None:
        """A manager served from its own memory because the store was unavailable."""
        ...


class TokenStore(Protocol):
    type_name: str

    def slot(self, identity: Identity | None, name: str) -> Slot:
        """The slot for one token flow (`name`: the upstream, when there is no identity)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, str]:
        """For /-/status: {"type", "state": "ok" | "unavailable"}."""
        ...

    def counters(self) -> dict[tuple[str, str], int]:
        """For /-/metrics: operations by (op, outcome); ("fallback", "memory") too."""
        ...


# -- the memory store -----------------------------------------------------------


class EventWaiter:
    """A local waiter, woken by whoever saw the slot change."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    async def wait(self, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                await self.changed.wait()
        except TimeoutError:
            return False
        return True


class _MemorySlot:
    shared = False

    def __init__(self) -> None:
        self._entry: Entry | None = None
        self._owner: str | None = None
        self._waiters: set[EventWaiter] = set()
        self._versions = itertools.count(1)

    def _changed(self) -> None:
        for waiter in self._waiters:
            waiter.changed.set()

    async def get(self) -> Entry | None:
        return self._entry

    async def put(self, record: Record, replaces: Entry | None) -> Entry | None:
        if self._entry is not replaces:
            return None
        self._entry = Entry(record, next(self._versions))
        self._changed()
        return self._entry

    async def delete(self, entry: Entry) -> bool:
        if self._entry is not entry:
            return False
        self._entry = None
        self._changed()
        return True

    async def lock(self, ttl: float) -> str | None:
        # One event loop: a holder that dies takes its `finally: unlock` with it.
        if self._owner is not None:
            return None
        self._owner = secrets.token_hex(8)
        return self._owner

    async def unlock(self, owner: str) -> None:
        if self._owner == owner:
            self._owner = None
            self._changed()

    @asynccontextmanager
    async def changes(self) -> AsyncIterator[EventWaiter]:
        waiter = EventWaiter()
        self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)

    def fell_back(self) -> None:
        pass


class MemoryTokenStore:
    """Per-process: upstreams with the same identity share one slot, nothing more."""

    type_name = "memory"

    def __init__(self) -> None:
        self._slots: dict[str, _MemorySlot] = {}

    def slot(self, identity: Identity | None, name: str) -> _MemorySlot:
        key = identity.digest if identity is not None else f"name:{name}"
        found = self._slots.get(key)
        if found is None:
            found = self._slots[key] = _MemorySlot()
        return found

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def status(self) -> dict[str, str]:
        return {"type": self.type_name, "state": "ok"}

    def counters(self) -> dict[tuple[str, str], int]:
        return {}

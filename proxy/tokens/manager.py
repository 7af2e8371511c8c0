"""TokenManager: the only holder of mutable credential state for one upstream.

The promises it keeps (SPEC §3, and §8 for the whole deployment with a shared store):

* a token is fetched on first use and reused until `refresh_before` (at most half
  its lifetime) before expiry; a stale-but-valid token keeps serving while one
  background refresh runs; a fresh token is served without any store I/O;
* at most one token request is in flight: in the process every caller awaits the
  same task, and that task takes the store slot's lock before it calls the
  endpoint; a token another process stored meanwhile is adopted instead;
* `rejected(token)` drops *that* token only — compared by value, never by
  clock — locally and in the store (compare-and-delete), so a newer token
  fetched meanwhile is reused, not refetched;
* failures back off exponentially (1 s doubling to 60 s, at least a
  `Retry-After`), and during the backoff callers fail fast without I/O; the
  backoff deadline is stored, so every process backs off together;
* when the store is unavailable the manager serves from its own memory.

The decision logic is driven by injectable clocks, so unit tests run it
without a network or sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from proxy.errors import AuthBackoff, AuthError, AuthFailed
from proxy.tokens.store import Entry, MemoryTokenStore, Record, Slot, StoreUnavailable

log = structlog.get_logger("authproxy.tokens")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
DEFAULT_LOCK_TTL = 31.0  # the token timeout (at most 30 s) + 1 s


@dataclass(frozen=True, slots=True)
class Token:
    """A credential obtained from an endpoint. Times are `time.monotonic()` seconds.

    `repr` hides the secret parts so a stray log of a Token leaks nothing.
    `shared`: written to or read from a shared store (others may be using it).
    """

    value: str = field(repr=False)
    obtained_at: float
    expires_at: float | None  # None: valid until the upstream rejects it
    refresh_at: float | None  # when to start refreshing ahead of expiry
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_at: float | None = None
    shared: bool = False

    @property
    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token endpoint answered, before the manager dates it."""

    value: str
    expires_at: float | None  # wall-clock epoch seconds, or None when unknown
    refresh_token: str | None
    via: str  # "login" or "refresh"
    endpoint_status: int = 200
    refresh_expires_at: float | None = None  # wall clock, when the endpoint says


class TokenSource(Protocol):
    async def fetch(self, previous: Token | None) -> Grant:
        """Obtain a token: refresh from `previous` when the flow allows, else log in."""
        ...


class TokenManager:
    def __init__(
        self,
        upstream: str,
        source: TokenSource,
        *,
        refresh_before: float = 60.0,
        slot: Slot | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self._source = source
        self._refresh_before = refresh_before
        self._clock = clock
        self._wall = wall_clock
        self._slot: Slot = slot if slot is not None else MemoryTokenStore().slot(None, upstream)
        self._lock_ttl = lock_ttl
        self._current: Token | None = None  # hot-path copy of the store's entry
        self._last: Token | None = None  # kept after invalidation, for its refresh token
        self._rejected: str | None = None  # the value an upstream refused last
        self._inflight: asyncio.Task[Token] | None = None
        self._failures = 0
        self._backoff_until = 0.0
        self.last_error: str | None = None
        self.fetch_success = 0
        self.fetch_failure = 0

    def use_source(self, source: TokenSource) -> None:
        """A reload kept this manager (same identity) and rebuilt its transport."""
        self._source = source

    # -- the hot path -------------------------------------------------------

    async def get(self) -> Token:
        token = self._current
        if token is not None:
            if token.refresh_at is None or self._clock() < token.refresh_at:
                return token
            if token.expires_at is not None and self._clock() < token.expires_at:
                self._refresh_in_background()
                return token
        return await self._obtain("expiry")

    def invalidate(self, used: Token) -> None:
        """Forget `used` if it is still the current token; a newer one stays. The
        store's copy is compare-and-deleted by the next fetch, before it locks."""
        if self._current is used:
            self._current = None
            self._rejected = used.value

    async def rejected(self, used: Token, status: int) -> Token:
        """The upstream refused `used`: drop it, and share one refetch among all who saw it."""
        self.invalidate(used)
        if self._current is not None:
            return self._current
        return await self._obtain(f"status {status}")

    # -- obtaining: from the store, or from the endpoint under the store's lock --

    async def _obtain(self, reason: str) -> Token:
        if self._inflight is None:
            self._check_backoff()
            self._inflight = asyncio.create_task(self._acquire(reason))
            self._inflight.add_done_callback(_consume_exception)
        return await asyncio.shield(self._inflight)

    def _refresh_in_background(self) -> None:
        if self._inflight is None and self._clock() >= self._backoff_until:
            self._inflight = asyncio.create_task(self._acquire("expiry"))
            self._inflight.add_done_callback(_consume_exception)

    def _check_backoff(self) -> None:
        remaining = self._backoff_until - self._clock()
        if remaining > 0:
            # Whole seconds, rounded up: the message says what Retry-After says.
            seconds = max(1, math.ceil(remaining))
            raise AuthBackoff(
                f"token endpoint for {self.upstream} is failing; retrying in {seconds} s"
                + (f" (last error: {self.last_error})" if self.last_error else ""),
                self.upstream,
                retry_after=seconds,
            )

    async def _acquire(self, reason: str) -> Token:
        try:
            try:
                return await self._acquire_shared(reason)
            except StoreUnavailable:
                self._slot.fell_back()
                return await self._fetch(reason, None, None)
        finally:
            self._inflight = None

    async def _acquire_shared(self, reason: str) -> Token:
        slot = self._slot
        deadline = self._clock() + 2 * self._lock_ttl
        while True:
            entry = await self._read()
            token = self._adopt(entry)
            if token is not None:
                return token
            owner = await slot.lock(self._lock_ttl)
            if owner is not None:
                try:
                    entry = await self._read()  # what was stored before we locked
                    token = self._adopt(entry)
                    if token is not None:
                        return token
                    return await self._fetch(reason, slot, entry)
                finally:
                    with contextlib.suppress(StoreUnavailable):
                        await slot.unlock(owner)
            if self._clock() >= deadline:
                # The lock outlived two holders' worth of time: stop waiting for it.
                raise StoreUnavailable("the token lock is never released")
            async with slot.changes() as change:  # subscribe first, then read again
                token = self._adopt(await self._read())
                if token is not None:
                    return token
                # Woken by the holder's publish; at worst when its lock expires.
                await change.wait(self._lock_ttl)

    async def _read(self) -> Entry | None:
        """The stored entry; a copy of the token an upstream refused is deleted first."""
        entry = await self._slot.get()
        record = entry.record if entry is not None else None
        rejected = self._rejected
        if entry is not None and record is not None and rejected and record.value == rejected:
            await self._slot.delete(entry)
            return None
        return entry

    def _adopt(self, entry: Entry | None) -> Token | None:
        """A fresh token from the store, or None; a stored backoff is honoured."""
        record = entry.record if entry is not None else None
        if record is None:
            return None
        wall = self._wall()
        if record.value is not None and record.value != self._rejected:
            token = self._from_record(record, record.value)
            if token.refresh_at is None or self._clock() < token.refresh_at:
                current = self._current
                if current is not None and current.value == token.value:
                    return current
                self._current = self._last = token
                log.info("token_adopted", upstream=self.upstream, store="shared")
                return token
        if record.backoff_until > wall:
            self._failures = max(self._failures, record.failures)
            self._backoff_until = self._clock() + (record.backoff_until - wall)
            self.last_error = record.last_error
            self._check_backoff()
        return None

    def _from_record(self, record: Record, value: str) -> Token:
        now, wall = self._clock(), self._wall()

        def local(at: float | None) -> float | None:
            return None if at is None else now + (at - wall)

        obtained = local(record.obtained_at) or now
        expires = local(record.expires_at)
        refresh_at = None
        if expires is not None:
            refresh_at = expires - min(self._refresh_before, (expires - obtained) / 2)
        return Token(
            value,
            obtained,
            expires,
            refresh_at,
            record.refresh_token,
            local(record.refresh_expires_at),
            shared=self._slot.shared,
        )

    def _record(self, token: Token | None, failure: AuthFailed | None = None) -> Record:
        now, wall = self._clock(), self._wall()

        def shared_time(at: float | None) -> float | None:
            return None if at is None else wall + (at - now)

        fields: dict[str, Any] = {}
        if token is not None:
            fields = {
                "value": token.value,
                "obtained_at": shared_time(token.obtained_at),
                "expires_at": shared_time(token.expires_at),
                "refresh_token": token.refresh_token,
                "refresh_expires_at": shared_time(token.refresh_expires_at),
            }
        if failure is not None:
            fields |= {
                "failures": self._failures,
                "backoff_until": wall + (self._backoff_until - now),
                "last_error": self.last_error,
            }
        return Record(**fields)

    def _previous(self, entry: Entry | None) -> Token | None:
        """Whose refresh token a refresh may spend: the stored entry's (it is
        replaced atomically), else our own — never one read from a store we
        cannot reach now, as another process may be spending it."""
        record = entry.record if entry is not None else None
        if record is not None and record.refresh_token is not None:
            token = self._from_record(record, record.value or "")
            ends = token.refresh_expires_at
            if ends is None or self._clock() < ends:
                return token
        last = self._last
        if last is not None and not last.shared:
            return last
        return None

    async def _fetch(self, reason: str, slot: Slot | None, entry: Entry | None) -> Token:
        """Call the endpoint; with `slot` (its lock held) store the result there."""
        previous = self._previous(entry)
        first = self._last is None
        if entry is not None and entry.record is not None:
            self._failures = max(self._failures, entry.record.failures)
        try:
            grant = await self._source.fetch(previous)
            token = self._date(grant)
        except AuthFailed as exc:
            self.fetch_failure += 1
            self._fail(exc)
            if slot is not None:
                # Keep a stored token that still works (a failed background refresh).
                keep = self._current if self._current is not None else None
                with contextlib.suppress(StoreUnavailable):
                    await slot.put(self._record(keep, exc), entry)
            raise
        self.fetch_success += 1
        self._failures = 0
        self._backoff_until = 0.0
        self.last_error = None
        if slot is not None:
            with contextlib.suppress(StoreUnavailable):
                if await slot.put(self._record(token), entry) is not None:
                    token = replace(token, shared=slot.shared)
        self._current = self._last = token
        lifetime = None if token.lifetime is None else round(token.lifetime, 3)
        if first:
            log.info("token_acquired", upstream=self.upstream, lifetime_s=lifetime, via=grant.via)
        else:
            log.info(
                "token_refreshed",
                upstream=self.upstream,
                reason=reason,
                lifetime_s=lifetime,
                via=grant.via,
            )
        return token

    def _date(self, grant: Grant) -> Token:
        now = self._clock()
        wall = self._wall()
        refresh_ends = (
            None if grant.refresh_expires_at is None else now + grant.refresh_expires_at - wall
        )
        if grant.expires_at is None:
            return Token(grant.value, now, None, None, grant.refresh_token, refresh_ends)
        lifetime = grant.expires_at - wall
        if lifetime <= 0:
            raise AuthFailed(
                f"token endpoint for {self.upstream} answered {grant.endpoint_status} "
                "with a token that has already expired",
                self.upstream,
                grant.endpoint_status,
            )
        skew = min(self._refresh_before, lifetime / 2)
        return Token(
            grant.value,
            now,
            now + lifetime,
            now + lifetime - skew,
            grant.refresh_token,
            refresh_ends,
        )

    def _fail(self, exc: AuthFailed) -> None:
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        self._backoff_until = self._clock() + delay
        self.last_error = exc.message
        log.warning(
            "token_failed",
            upstream=self.upstream,
            endpoint_status=exc.endpoint_status,
            error=exc.message,
            backoff_s=round(delay, 3),
        )

    # -- lifecycle and reporting ----------------------------------------------

    async def prefetch(self) -> None:
        # A failure is logged; the first request tries again once the backoff ends.
        with contextlib.suppress(AuthError):
            await self._obtain("prefetch")

    def current(self) -> Token | None:
        """The token a logout should end: the newest one, whether or not it is stale."""
        return self._last

    async def wait_idle(self) -> None:
        if self._inflight is not None:
            await asyncio.wait([self._inflight])

    def abandon(self) -> None:
        """At shutdown: cancel a token request still in flight (its answer is unused)."""
        if self._inflight is not None:
            self._inflight.cancel()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        token = self._current
        expires_in = None
        if token is not None and token.expires_at is not None:
            expires_in = round(max(0.0, token.expires_at - now), 1)
        if now < self._backoff_until:
            state = "backoff"
        elif self.last_error is not None:
            state = "error"
        elif token is None:
            state = "expired" if self._last is not None else "none"
        elif token.expires_at is not None and now >= token.expires_at:
            state = "expired"
        else:
            state = "valid"
        return {"state": state, "expires_in": expires_in}


def _consume_exception(task: asyncio.Task[Token]) -> None:
    # A background refresh may fail with nobody awaiting it; it is logged in _fail.
    if not task.cancelled():
        task.exception()

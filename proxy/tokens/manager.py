"""TokenManager: the only holder of mutable credential state for one upstream.

The promises it keeps (SPEC §3):

* a token is fetched on first use and reused until `refresh_before` (at most half
  its lifetime) before expiry; a stale-but-valid token keeps serving while one
  background refresh runs;
* at most one token request is in flight: every caller awaits the same task;
* `rejected(token)` drops *that* token only — compared by identity, never by
  clock — so a newer token fetched meanwhile is reused, not refetched;
* failures back off exponentially (1 s doubling to 60 s, at least a
  `Retry-After`), and during the backoff callers fail fast without I/O.

The decision logic is synchronous and driven by an injectable clock, so unit
tests run it without a network or sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from cachetools import TLRUCache

from proxy.auth.base import Token
from proxy.errors import AuthBackoff, AuthFailed

log = structlog.get_logger("authproxy.tokens")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token endpoint answered, before the manager dates it."""

    value: str
    expires_at: float | None  # wall-clock epoch seconds, or None when unknown
    refresh_token: str | None
    via: str  # "login" or "refresh"
    endpoint_status: int = 200


class TokenSource(Protocol):
    async def fetch(self, previous: Token | None) -> Grant:
        """Obtain a token: refresh from `previous` when the flow allows, else log in."""
        ...


class TokenStore(Protocol):
    """Where tokens live between uses. In memory today; a store shared by several
    replicas only has to implement these three calls."""

    def get(self, key: str) -> Token | None: ...

    def put(self, key: str, token: Token) -> None: ...

    def discard(self, key: str, token: Token) -> None: ...


class MemoryTokenStore:
    """Per-process store; entries vanish on their own when the token expires."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, maxsize: int = 1024) -> None:
        self._cache: TLRUCache[str, Token] = TLRUCache(
            maxsize=maxsize, ttu=_time_to_use, timer=clock
        )

    def get(self, key: str) -> Token | None:
        return self._cache.get(key)

    def put(self, key: str, token: Token) -> None:
        self._cache[key] = token

    def discard(self, key: str, token: Token) -> None:
        if self._cache.get(key) is token:
            del self._cache[key]


def _time_to_use(_key: str, token: Token, now: float) -> float:
    return token.expires_at if token.expires_at is not None else float("inf")


class TokenManager:
    def __init__(
        self,
        upstream: str,
        source: TokenSource,
        *,
        refresh_before: float = 60.0,
        store: TokenStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self._source = source
        self._refresh_before = refresh_before
        self._clock = clock
        self._wall = wall_clock
        self._store = store if store is not None else MemoryTokenStore(clock)
        self._current: Token | None = None  # hot-path copy of the store's entry
        self._last: Token | None = None  # kept after invalidation, for its refresh token
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
        """Forget `used` if it is still the current token; a newer one stays."""
        if self._current is used:
            self._current = None
            self._store.discard(self.upstream, used)

    async def rejected(self, used: Token, status: int) -> Token:
        """The upstream refused `used`: drop it, and share one refetch among all who saw it."""
        self.invalidate(used)
        if self._current is not None:
            return self._current
        return await self._obtain(f"status {status}")

    # -- fetching -------------------------------------------------------------

    async def _obtain(self, reason: str) -> Token:
        if self._inflight is None:
            shared = self._store.get(self.upstream) if self._current is None else None
            if shared is not None and (
                shared.expires_at is None or self._clock() < shared.expires_at
            ):
                self._current = shared
                return shared
            self._check_backoff()
            self._inflight = asyncio.create_task(self._fetch(reason))
            self._inflight.add_done_callback(_consume_exception)
        return await asyncio.shield(self._inflight)

    def _refresh_in_background(self) -> None:
        if self._inflight is None and self._clock() >= self._backoff_until:
            self._inflight = asyncio.create_task(self._fetch("expiry"))
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

    async def _fetch(self, reason: str) -> Token:
        first = self._last is None
        try:
            grant = await self._source.fetch(self._last)
            token = self._date(grant)
        except AuthFailed as exc:
            self.fetch_failure += 1
            self._fail(exc)
            raise
        finally:
            self._inflight = None
        self.fetch_success += 1
        self._failures = 0
        self._backoff_until = 0.0
        self.last_error = None
        self._current = self._last = token
        self._store.put(self.upstream, token)
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
        if grant.expires_at is None:
            return Token(grant.value, now, None, None, grant.refresh_token)
        lifetime = grant.expires_at - self._wall()
        if lifetime <= 0:
            raise AuthFailed(
                f"token endpoint for {self.upstream} answered {grant.endpoint_status} "
                "with a token that has already expired",
                self.upstream,
                grant.endpoint_status,
            )
        skew = min(self._refresh_before, lifetime / 2)
        return Token(grant.value, now, now + lifetime, now + lifetime - skew, grant.refresh_token)

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
        with contextlib.suppress(AuthFailed):
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

"""TokenManager decision logic, driven by a fake clock and a scripted token source."""

from __future__ import annotations

import asyncio

import pytest

from proxy.auth.base import Token
from proxy.errors import AuthBackoff, AuthFailed
from proxy.tokens import Grant, TokenManager


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Hands out tok-1, tok-2, ...; can be told to fail or to wait."""

    def __init__(self, clock: Clock, lifetime: float | None = 100.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.previous: list[Token | None] = []
        self.fail: AuthFailed | None = None
        self.gate: asyncio.Event | None = None

    async def fetch(self, previous: Token | None) -> Grant:
        self.calls += 1
        self.previous.append(previous)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        expires = None if self.lifetime is None else self.clock.now + self.lifetime
        return Grant(f"tok-{self.calls}", expires, f"refresh-{self.calls}", "login")


def manager(
    lifetime: float | None = 100.0, refresh_before: float = 60.0
) -> tuple[TokenManager, Source, Clock]:
    clock = Clock()
    source = Source(clock, lifetime)
    # Wall and monotonic clocks are the same fake: expiry maths is then exact.
    return (
        TokenManager("up", source, refresh_before=refresh_before, clock=clock, wall_clock=clock),
        source,
        clock,
    )


async def test_reused_until_refresh_window() -> None:
    tm, source, clock = manager(lifetime=100.0, refresh_before=60.0)
    first = await tm.get()
    # refresh_before is capped at half the lifetime: refresh from t+50.
    clock.now += 49
    assert await tm.get() is first
    # A refresh would start in the background: let it run before counting.
    await tm.wait_idle()
    await asyncio.sleep(0)
    assert source.calls == 1
    clock.now += 2  # stale but valid: old token served, one refresh in the background
    assert await tm.get() is first
    await tm.wait_idle()
    assert source.calls == 2
    assert (await tm.get()).value == "tok-2"


async def test_expired_token_waits_for_a_new_one() -> None:
    tm, source, clock = manager(lifetime=10.0)
    await tm.get()
    clock.now += 11
    assert (await tm.get()).value == "tok-2"
    assert source.calls == 2


async def test_single_flight_under_concurrency() -> None:
    tm, source, _ = manager()
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(tm.get()) for _ in range(1000)]
    await asyncio.sleep(0)
    source.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert source.calls == 1
    assert {t.value for t in tokens} == {"tok-1"}


async def test_rejected_compares_tokens_not_clocks() -> None:
    tm, source, _ = manager()
    old = await tm.get()
    new = await tm.rejected(old, 401)
    assert new.value == "tok-2" and source.calls == 2
    # A late 401 for the old token reuses the newer one: no further fetch.
    assert await tm.rejected(old, 401) is new
    assert source.calls == 2
    # A 401 for the current token (revoked before expiry) does refetch.
    assert (await tm.rejected(new, 401)).value == "tok-3"


async def test_concurrent_rejections_share_one_refetch() -> None:
    tm, source, _ = manager()
    old = await tm.get()
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(tm.rejected(old, 401)) for _ in range(200)]
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiters)
    assert source.calls == 2
    assert {t.value for t in results} == {"tok-2"}


async def test_refresh_gets_previous_token_even_after_invalidation() -> None:
    tm, source, _ = manager()
    old = await tm.get()
    tm.invalidate(old)
    await tm.get()
    assert source.previous == [None, old]


async def test_backoff_doubles_and_fails_fast() -> None:
    tm, source, clock = manager()
    source.fail = AuthFailed("token endpoint for up answered 500", "up", 500)
    delays = []
    for _ in range(8):
        with pytest.raises(AuthFailed):
            await tm.get()
        remaining = tm._backoff_until - clock.now
        delays.append(remaining)
        # During the backoff: fast 503, no call.
        calls = source.calls
        with pytest.raises(AuthBackoff) as info:
            await tm.get()
        assert source.calls == calls
        assert info.value.retry_after == pytest.approx(remaining)
        assert tm.status()["state"] == "backoff"
        clock.now += remaining
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    source.fail = None
    assert (await tm.get()).value == f"tok-{source.calls}"
    assert tm.status()["state"] == "valid"
    assert tm._backoff_until == 0


async def test_retry_after_sets_a_floor() -> None:
    tm, source, clock = manager()
    source.fail = AuthFailed("429", "up", 429, retry_after=7)
    with pytest.raises(AuthFailed):
        await tm.get()
    assert tm._backoff_until - clock.now == 7


async def test_expiry_in_the_past_is_a_failure() -> None:
    tm, _source, _ = manager(lifetime=-5)
    with pytest.raises(AuthFailed, match="already expired"):
        await tm.get()
    assert tm.status()["state"] == "backoff"


async def test_unknown_expiry_lives_until_rejected() -> None:
    tm, _source, clock = manager(lifetime=None)
    token = await tm.get()
    clock.now += 10**6
    assert await tm.get() is token
    assert tm.status() == {"state": "valid", "expires_in": None}


async def test_status_states() -> None:
    tm, _, clock = manager(lifetime=10)
    assert tm.status() == {"state": "none", "expires_in": None}
    await tm.get()
    assert tm.status() == {"state": "valid", "expires_in": 10.0}
    clock.now += 11
    assert tm.status()["state"] == "expired"


def test_token_repr_hides_secrets() -> None:
    token = Token("secret-value", 0.0, 1.0, 0.5, "refresh-secret")
    assert "secret" not in repr(token)


@pytest.mark.parametrize(("left", "seconds"), [(0.95, 1), (0.05, 1), (1.2, 2), (3.0, 3)])
async def test_backoff_message_and_retry_after_agree(left: float, seconds: int) -> None:
    """Whole seconds, rounded up, in both (a message saying 0.0s beside Retry-After: 1
    was what users saw)."""
    tm, source, clock = manager()
    source.fail = AuthFailed("down", "up", 500, retry_after=3.0)
    with pytest.raises(AuthFailed):
        await tm.get()
    clock.now += 3.0 - left
    with pytest.raises(AuthBackoff) as info:
        await tm.get()
    assert info.value.headers()["Retry-After"] == str(seconds)
    assert f"retrying in {seconds} s" in info.value.message

"""TokenManager decision logic, driven by a fake clock and a scripted token source."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from proxy.auth.base import Token
from proxy.errors import AuthBackoff, AuthFailed
from proxy.tokens import Grant, MemoryTokenStore, TokenManager
from proxy.tokens.store import EventWaiter, Record
from tests.support import log_lines


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


# -- pinned by the mutation run (tests/README.md) ------------------------------------------


def token_events(out: str) -> list[dict[str, object]]:
    """The token events of SPEC §5, without timestamps."""
    return [
        {k: v for k, v in r.items() if k not in ("timestamp", "level")}
        for r in log_lines(out)
        if str(r["event"]).startswith("token_")
    ]


async def test_token_events_say_what_happened(capsys: pytest.CaptureFixture[str]) -> None:
    tm, source, clock = manager(lifetime=12.34567, refresh_before=1)
    capsys.readouterr()
    first = await tm.get()
    clock.now += 12  # stale, still valid: a background refresh
    await tm.get()
    await tm.wait_idle()
    clock.now += 13  # expired: the caller waits for a new one
    await tm.get()
    await tm.rejected(await tm.get(), 401)
    source.fail = AuthFailed("token endpoint for up answered 429", "up", 429, retry_after=7.12345)
    tm.invalidate(await tm.get())
    with pytest.raises(AuthFailed):
        await tm.get()
    assert first.value == "tok-1"
    assert token_events(capsys.readouterr().out) == [
        {"event": "token_acquired", "upstream": "up", "lifetime_s": 12.346, "via": "login"},
        *[
            {
                "event": "token_refreshed",
                "upstream": "up",
                "reason": reason,
                "lifetime_s": 12.346,
                "via": "login",
            }
            for reason in ("expiry", "expiry", "status 401")
        ],
        {
            "event": "token_failed",
            "upstream": "up",
            "endpoint_status": 429,
            "error": "token endpoint for up answered 429",
            "backoff_s": 7.123,
        },
    ]


async def test_counters_count_fetches() -> None:
    tm, source, clock = manager(lifetime=10)
    await tm.get()
    clock.now += 11
    await tm.get()
    source.fail = AuthFailed("boom", "up", 500)
    clock.now += 11
    for _ in range(2):
        with pytest.raises(AuthFailed):
            await tm.get()
        clock.now = tm._backoff_until
    assert (tm.fetch_success, tm.fetch_failure) == (2, 2)
    fresh, _, _ = manager()
    assert (fresh.fetch_success, fresh.fetch_failure) == (0, 0)


async def test_default_refresh_before_is_60_s() -> None:
    clock = Clock()
    source = Source(clock, lifetime=1000.0)
    tm = TokenManager("up", source, clock=clock, wall_clock=clock)
    await tm.get()
    clock.now += 939.9
    await tm.get()
    await tm.wait_idle()
    assert source.calls == 1
    clock.now += 0.1  # 60 s before expiry
    await tm.get()
    await tm.wait_idle()
    assert source.calls == 2


async def test_a_clock_starting_at_zero_is_not_a_backoff() -> None:
    tm, _source, clock = manager()
    clock.now = 0.0
    assert (await tm.get()).value == "tok-1"


async def test_refresh_window_and_expiry_boundaries() -> None:
    tm, source, clock = manager(lifetime=100.0, refresh_before=10.0)
    first = await tm.get()
    clock.now += 90  # exactly refresh_at: stale
    assert await tm.get() is first
    await tm.wait_idle()
    assert source.calls == 2
    second = await tm.get()
    clock.now += 100  # exactly the second token's expiry: expired, so wait for a new one
    assert tm.status()["state"] == "expired"
    assert (await tm.get()).value == "tok-3"
    assert second.value == "tok-2"


async def test_one_background_refresh_at_a_time() -> None:
    tm, source, clock = manager(lifetime=100.0, refresh_before=10.0)
    first = await tm.get()
    clock.now += 95
    source.gate = asyncio.Event()
    assert await tm.get() is first
    await asyncio.sleep(0)
    assert await tm.get() is first  # the refresh is still in flight: no second one
    await asyncio.sleep(0)
    source.gate.set()
    await tm.wait_idle()
    assert source.calls == 2


async def test_background_refresh_waits_out_the_backoff_to_the_instant() -> None:
    tm, source, clock = manager(lifetime=100.0, refresh_before=10.0)
    first = await tm.get()
    clock.now += 91
    source.fail = AuthFailed("boom", "up", 500)
    assert await tm.get() is first
    await tm.wait_idle()  # failed: backoff 1 s
    source.fail = None
    clock.now += 0.5
    assert await tm.get() is first
    await tm.wait_idle()
    assert source.calls == 2
    clock.now += 0.5  # exactly the end of the backoff
    assert await tm.get() is first
    await tm.wait_idle()
    assert source.calls == 3


async def test_backoff_restarts_at_one_second_after_a_success() -> None:
    tm, source, clock = manager(lifetime=10.0)
    source.fail = AuthFailed("boom", "up", 500)
    for _ in range(2):
        with pytest.raises(AuthFailed):
            await tm.get()
        clock.now = tm._backoff_until
    source.fail = None
    await tm.get()
    clock.now += 11
    source.fail = AuthFailed("boom", "up", 500)
    with pytest.raises(AuthFailed):
        await tm.get()
    assert tm._backoff_until - clock.now == 1


async def test_backoff_error_names_the_upstream_and_the_last_error() -> None:
    tm, source, _ = manager()
    source.fail = AuthFailed("token endpoint for up answered 500", "up", 500)
    with pytest.raises(AuthFailed):
        await tm.get()
    with pytest.raises(AuthBackoff) as info:
        await tm.get()
    assert info.value.upstream == "up"
    assert info.value.message == (
        "token endpoint for up is failing; retrying in 1 s "
        "(last error: token endpoint for up answered 500)"
    )


async def test_failures_are_retrieved_and_callbacks_run_cleanly() -> None:
    """A failed fetch nobody awaits (a background refresh) must not end in the loop's
    exception handler ("Task exception was never retrieved", a broken callback)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        tm, source, clock = manager(lifetime=100.0, refresh_before=10.0)
        await tm.get()
        clock.now += 95
        source.fail = AuthFailed("boom", "up", 500)
        await tm.get()  # starts the background refresh, which fails
        await tm.wait_idle()
        clock.now += 10  # expired, and the backoff is over: a failing foreground fetch
        with pytest.raises(AuthFailed):
            await tm.get()
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert seen == []


async def test_a_shared_store_serves_another_manager() -> None:
    clock = Clock()
    slot = MemoryTokenStore().slot(None, "up")
    first = TokenManager("up", Source(clock), slot=slot, clock=clock, wall_clock=clock)
    other_source = Source(clock)
    second = TokenManager("up", other_source, slot=slot, clock=clock, wall_clock=clock)
    token = await first.get()
    assert (await second.get()).value == token.value
    assert other_source.calls == 0
    assert second.status() == {"state": "valid", "expires_in": 100.0}


async def test_an_expired_shared_token_is_not_used() -> None:
    clock = Clock()
    slot = MemoryTokenStore().slot(None, "up")
    first = TokenManager("up", Source(clock), slot=slot, clock=clock, wall_clock=clock)
    await first.get()
    clock.now += 100  # exactly its expiry (the store keeps the entry: the manager checks)
    other_source = Source(clock)
    second = TokenManager("up", other_source, slot=slot, clock=clock, wall_clock=clock)
    assert (await second.get()).value == "tok-1"  # its own first token
    assert other_source.calls == 1
    never = TokenManager("up", Source(clock, lifetime=None), clock=clock)
    assert (await never.get()).expires_at is None


async def test_memory_slot_swaps_and_deletes_only_the_entry_it_was_given() -> None:
    store = MemoryTokenStore()
    slot = store.slot(None, "up")
    assert store.slot(None, "up") is slot and store.slot(None, "other") is not slot
    first = await slot.put(Record("a"), None)
    assert first is not None and await slot.get() is first
    assert await slot.put(Record("b"), None) is None  # not what is stored now
    second = await slot.put(Record("b"), first)
    assert second is not None and second.record == Record("b")
    assert not await slot.delete(first)
    assert await slot.get() is second
    assert await slot.delete(second) and await slot.get() is None
    owner = await slot.lock(1.0)
    assert owner is not None and await slot.lock(1.0) is None
    await slot.unlock("someone else")
    assert await slot.lock(1.0) is None
    await slot.unlock(owner)
    assert await slot.lock(1.0) is not None


async def test_dated_tokens_keep_value_time_and_refresh_token() -> None:
    for lifetime in (None, 100.0):
        tm, _, clock = manager(lifetime=lifetime)
        token = await tm.get()
        assert (token.value, token.obtained_at, token.refresh_token) == (
            "tok-1",
            clock.now,
            "refresh-1",
        )


async def test_lifetime_boundaries() -> None:
    tm, _, clock = manager(lifetime=1.0)
    token = await tm.get()
    assert token.expires_at == clock.now + 1
    zero, _, _ = manager(lifetime=0.0)
    with pytest.raises(AuthFailed) as info:
        await zero.get()
    assert info.value.message == (
        "token endpoint for up answered 200 with a token that has already expired"
    )
    assert (info.value.upstream, info.value.endpoint_status) == ("up", 200)


async def test_prefetch_swallows_a_failure() -> None:
    tm, source, _ = manager()
    source.fail = AuthFailed("boom", "up", 500)
    await tm.prefetch()
    assert tm.status()["state"] == "backoff"
    assert tm.last_error == "boom"


async def test_status_reports_every_state_to_the_instant() -> None:
    tm, source, clock = manager(lifetime=10.0)
    await tm.get()
    clock.now += 0.26
    assert tm.status() == {"state": "valid", "expires_in": 9.7}
    clock.now += 9.24
    assert tm.status() == {"state": "valid", "expires_in": 0.5}
    clock.now += 0.5
    assert tm.status() == {"state": "expired", "expires_in": 0.0}
    tm.invalidate(await tm.get())
    assert tm.status() == {"state": "expired", "expires_in": None}
    source.fail = AuthFailed("boom", "up", 500)
    with pytest.raises(AuthFailed):
        await tm.get()
    assert tm.status()["state"] == "backoff"
    clock.now = tm._backoff_until  # the backoff is over; the error is still the news
    assert tm.status() == {"state": "error", "expires_in": None}


async def test_use_source_swaps_the_transport() -> None:
    tm, _, clock = manager(lifetime=10.0)
    await tm.get()
    replacement = Source(clock, lifetime=10.0)
    tm.use_source(replacement)
    clock.now += 11
    assert (await tm.get()).value == "tok-1"  # from the new source's first call
    assert replacement.calls == 1


async def test_abandon_cancels_the_request_in_flight() -> None:
    tm, source, _ = manager()
    source.gate = asyncio.Event()
    waiter = asyncio.create_task(tm.get())
    await asyncio.sleep(0)
    tm.abandon()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    tm.abandon()  # nothing in flight: nothing to do


# -- two managers on one slot: what another process sees (pinned by the mutation run) ------


def pair(
    lifetime: float = 100.0, refresh_before: float = 60.0
) -> tuple[TokenManager, Source, TokenManager, Source, Clock]:
    clock = Clock()
    slot = MemoryTokenStore().slot(None, "up")
    sources = Source(clock, lifetime), Source(clock, lifetime)
    a, b = (
        TokenManager(
            "up", s, refresh_before=refresh_before, slot=slot, clock=clock, wall_clock=clock
        )
        for s in sources
    )
    return a, sources[0], b, sources[1], clock


async def test_an_adopted_token_keeps_the_half_lifetime_cap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _, b, b_source, clock = pair()
    capsys.readouterr()
    token = await a.get()
    assert (await b.get()).value == token.value
    clock.now += 49
    await b.get()
    await b.wait_idle()
    assert b_source.calls == 0  # refresh_before 60 s is capped at half of 100 s
    clock.now += 2
    await b.get()
    await b.wait_idle()
    assert b_source.calls == 1
    adopted = [e for e in token_events(capsys.readouterr().out) if e["event"] == "token_adopted"]
    assert adopted == [{"event": "token_adopted", "upstream": "up", "store": "shared"}]


async def test_a_stored_backoff_is_honoured_by_the_other_manager() -> None:
    a, a_source, b, b_source, clock = pair()
    a_source.fail = AuthFailed("token endpoint for up answered 500", "up", 500)
    with pytest.raises(AuthFailed):
        await a.get()
    with pytest.raises(AuthBackoff) as info:
        await b.get()
    assert b_source.calls == 0
    assert info.value.retry_after == 1
    assert b.last_error == "token endpoint for up answered 500"
    assert b.status()["state"] == "backoff"
    clock.now += 1
    assert (await b.get()).value == "tok-1"
    assert b_source.calls == 1


async def test_the_other_manager_refreshes_with_the_stored_refresh_token() -> None:
    a, _, b, b_source, clock = pair()
    await a.get()
    clock.now += 100  # expired
    await b.get()
    (previous,) = b_source.previous
    assert previous is not None
    assert (previous.value, previous.refresh_token) == ("tok-1", "refresh-1")


async def test_a_refused_token_is_not_adopted_again() -> None:
    a, a_source, b, b_source, _ = pair()
    b_source.calls = 10  # b's tokens are tok-11, tok-12, ...
    token = await a.get()
    adopted = await b.get()
    assert adopted.value == token.value == "tok-1"
    fresh = await b.rejected(adopted, 401)
    assert fresh.value == "tok-11"
    assert (await a.rejected(token, 401)).value == "tok-11"  # a adopts b's new one
    assert a_source.calls == 1


async def test_the_other_manager_waits_for_the_lock_holder_and_adopts() -> None:
    a, a_source, b, b_source, _ = pair()
    a_source.gate = asyncio.Event()
    fetching = asyncio.create_task(a.get())  # holds the slot's lock while it fetches
    await asyncio.sleep(0)
    waiting = asyncio.create_task(b.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    a_source.gate.set()
    assert (await fetching).value == (await waiting).value == "tok-1"
    assert (a_source.calls, b_source.calls) == (1, 0)


async def test_a_lock_never_released_ends_in_a_fetch_of_our_own() -> None:
    """A dead holder's lock: stop waiting after two lock lifetimes and serve from memory."""
    slot = MemoryTokenStore().slot(None, "up")
    assert await slot.lock(60.0) is not None  # held by someone who never comes back
    wall = Clock()
    wall.now = time.time()  # the manager runs on the real clocks here
    source = Source(wall)
    tm = TokenManager("up", source, slot=slot, lock_ttl=0.05)
    started = asyncio.get_running_loop().time()
    assert (await tm.get()).value == "tok-1"
    assert 0.08 <= asyncio.get_running_loop().time() - started < 2
    assert source.calls == 1


async def test_event_waiter_says_whether_it_was_woken() -> None:
    waiter = EventWaiter()
    assert await waiter.wait(0.01) is False
    waiter.changed.set()
    assert await waiter.wait(0.01) is True


def test_memory_store_status() -> None:
    assert MemoryTokenStore().status() == {"type": "memory", "state": "ok"}

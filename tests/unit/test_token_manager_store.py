"""TokenManager against a store slot: SPEC §3 lifecycle and §8 shared-store promises.

The slot is the memory store's, wrapped in `Probe`, which records every call, can
play a shared store (`shared=True`) and can be taken down (`StoreUnavailable`).
Monotonic and wall clocks are separate fakes that move together, so a time that is
translated between them the wrong way shows. Pinned by the mutation run (tests/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.errors import AuthBackoff, AuthFailed
from proxy.tokens import Grant, MemoryTokenStore, TokenManager
from proxy.tokens.manager import Token
from proxy.tokens.store import Entry, Record, StoreUnavailable
from tests.unit.test_tokens import token_events

WALL_OFFSET = 1_700_000_000.0  # wall clock = monotonic clock + this


class Clocks:
    def __init__(self) -> None:
        self.now = 1000.0  # monotonic

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Source:
    """tok-1, tok-2, ...; answers in wall-clock time, as an endpoint does."""

    def __init__(
        self, clocks: Clocks, lifetime: float | None = 100.0, refresh_for: float | None = 300.0
    ) -> None:
        self.clocks = clocks
        self.lifetime = lifetime
        self.refresh_for = refresh_for
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
        wall = self.clocks.wall()
        return Grant(
            f"tok-{self.calls}",
            None if self.lifetime is None else wall + self.lifetime,
            f"refresh-{self.calls}",
            "login",
            refresh_expires_at=None if self.refresh_for is None else wall + self.refresh_for,
        )


class Probe:
    """A memory slot that records its calls, may claim to be shared, and may be down."""

    def __init__(self, shared: bool = False) -> None:
        self.inner = MemoryTokenStore().slot(None, "up")
        self.shared = shared
        self.down = False
        self.ops: list[str] = []
        self.fallbacks = 0
        self.ttls: list[float] = []
        self.on_lock: Any = None  # async hook: runs before a lock is granted or refused
        self.fake_waits: Clocks | None = None  # waits end at once, moving this clock
        self.waits: list[float] = []

    def _op(self, name: str) -> None:
        self.ops.append(name)
        if self.down:
            raise StoreUnavailable("down")

    async def get(self) -> Entry | None:
        self._op("get")
        return await self.inner.get()

    async def put(self, record: Record, replaces: Entry | None) -> Entry | None:
        self._op("put")
        return await self.inner.put(record, replaces)

    async def delete(self, entry: Entry) -> bool:
        self._op("delete")
        return await self.inner.delete(entry)

    async def lock(self, ttl: float) -> str | None:
        self._op("lock")
        self.ttls.append(ttl)
        if self.on_lock is not None:
            await self.on_lock()
        return await self.inner.lock(ttl)

    async def unlock(self, owner: str) -> None:
        self._op("unlock")
        await self.inner.unlock(owner)

    def changes(self) -> Any:
        self.ops.append("changes")
        if self.fake_waits is not None:
            return self._fake_changes(self.fake_waits)
        return self.inner.changes()

    @contextlib.asynccontextmanager
    async def _fake_changes(self, clocks: Clocks) -> AsyncIterator[Probe]:
        yield self

    async def wait(self, within: float) -> bool:  # the fake waiter: nobody wakes it
        self.waits.append(within)
        assert self.fake_waits is not None
        self.fake_waits.advance(within)
        return False

    def fell_back(self) -> None:
        self.fallbacks += 1


def manager(
    clocks: Clocks, slot: Probe, source: Source | None = None
) -> tuple[TokenManager, Source]:
    source = source if source is not None else Source(clocks)
    tm = TokenManager("up", source, slot=slot, clock=clocks.mono, wall_clock=clocks.wall)
    return tm, source


async def test_a_fresh_token_is_served_without_store_io() -> None:
    clocks, slot = Clocks(), Probe()
    tm, source = manager(clocks, slot)
    token = await tm.get()
    # refresh_before (60 s) is capped at half the 100 s lifetime.
    assert (token.obtained_at, token.expires_at, token.refresh_at) == (1000.0, 1100.0, 1050.0)
    seen = len(slot.ops)
    clocks.advance(49.9)
    assert await tm.get() is token
    await tm.wait_idle()
    assert len(slot.ops) == seen and source.calls == 1


async def test_one_background_refresh_reads_the_store_once() -> None:
    clocks, slot = Clocks(), Probe()
    tm, source = manager(clocks, slot)
    token = await tm.get()
    clocks.advance(51)  # stale but valid
    source.gate = asyncio.Event()
    slot.ops.clear()
    assert await tm.get() is token
    for _ in range(5):
        await asyncio.sleep(0)
    assert await tm.get() is token  # the refresh is in flight: no second one
    for _ in range(5):
        await asyncio.sleep(0)
    assert slot.ops == ["get", "lock", "get"] and source.calls == 2
    source.gate.set()
    await tm.wait_idle()
    assert (await tm.get()).value == "tok-2"


async def test_the_refresh_tokens_expiry_is_dated_in_the_monotonic_clock() -> None:
    for lifetime in (100.0, None):
        clocks, slot = Clocks(), Probe()
        tm, _ = manager(clocks, slot, Source(clocks, lifetime=lifetime))
        token = await tm.get()
        assert (token.value, token.refresh_token) == ("tok-1", "refresh-1")
        assert token.refresh_expires_at == 1300.0
        entry = await slot.inner.get()
        assert entry is not None and entry.record is not None
        # Stored in wall-clock time: other processes do not share our monotonic clock.
        assert entry.record.refresh_expires_at == 1300.0 + WALL_OFFSET
        assert entry.record.obtained_at == 1000.0 + WALL_OFFSET


async def test_an_adopted_token_keeps_its_times_and_is_marked_shared() -> None:
    clocks, slot = Clocks(), Probe(shared=True)
    a, _ = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    mine = await a.get()
    assert mine.shared is True  # written to a shared store: others may use it (SPEC §8.9)
    clocks.advance(10)
    adopted = await b.get()
    assert b_source.calls == 0
    assert adopted.shared is True
    assert (adopted.value, adopted.refresh_token) == ("tok-1", "refresh-1")
    assert (adopted.obtained_at, adopted.expires_at, adopted.refresh_at) == (1000, 1100, 1050)
    assert adopted.refresh_expires_at == 1300.0


async def test_an_adopted_token_without_expiry_is_reused() -> None:
    clocks, slot = Clocks(), Probe()
    a, _ = manager(clocks, slot, Source(clocks, lifetime=None))
    b, b_source = manager(clocks, slot)
    await a.get()
    adopted = await b.get()
    assert (adopted.expires_at, adopted.refresh_at) == (None, None)
    clocks.advance(10_000)
    assert await b.get() is adopted
    assert b_source.calls == 0


async def test_a_stored_refresh_token_is_spent_only_before_it_expires() -> None:
    for wait, spent in ((299.9, "refresh-1"), (300.0, None)):
        clocks, slot = Clocks(), Probe()
        a, _ = manager(clocks, slot)
        b, b_source = manager(clocks, slot)
        await a.get()
        clocks.advance(wait)  # the access token is long expired
        await b.get()
        (previous,) = b_source.previous
        assert (previous.refresh_token if previous is not None else None) == spent


async def test_a_failed_background_refresh_keeps_the_stored_token() -> None:
    clocks, slot = Clocks(), Probe()
    a, a_source = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    token = await a.get()
    clocks.advance(51)
    a_source.fail = AuthFailed("token endpoint for up answered 500", "up", 500)
    assert await a.get() is token  # stale: served while the refresh fails
    await a.wait_idle()
    entry = await slot.inner.get()
    assert entry is not None and entry.record is not None
    record = entry.record
    assert (record.value, record.refresh_token) == ("tok-1", "refresh-1")
    assert record.expires_at == 1100.0 + WALL_OFFSET
    assert (record.failures, record.backoff_until) == (1, 1052.0 + WALL_OFFSET)
    assert record.last_error == "token endpoint for up answered 500"
    with pytest.raises(AuthBackoff):
        await b.get()  # every process backs off together
    assert b_source.calls == 0


async def test_an_unavailable_store_falls_back_to_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clocks, slot = Clocks(), Probe(shared=True)
    tm, source = manager(clocks, slot)
    slot.down = True
    capsys.readouterr()
    token = await tm.get()
    assert token.value == "tok-1" and token.shared is False  # obtained locally: stays local
    assert slot.fallbacks == 1
    clocks.advance(100)
    assert (await tm.get()).value == "tok-2"
    assert slot.fallbacks == 2 and source.calls == 2
    events = token_events(capsys.readouterr().out)
    assert [(e["event"], e.get("reason")) for e in events] == [
        ("token_acquired", None),
        ("token_refreshed", "expiry"),
    ]


async def test_prefetch_names_itself_as_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    clocks, slot = Clocks(), Probe()
    tm, _ = manager(clocks, slot)
    await tm.prefetch()
    clocks.advance(100)
    capsys.readouterr()
    await tm.prefetch()
    events = token_events(capsys.readouterr().out)
    assert [(e["event"], e.get("reason")) for e in events] == [("token_refreshed", "prefetch")]


def test_an_empty_record_has_no_end() -> None:
    assert Record().lives_until() is None
    assert Record(backoff_until=5.0).lives_until() == 5.0


async def test_waiting_on_a_dead_holders_lock_ends_after_two_lock_lifetimes() -> None:
    clocks, slot = Clocks(), Probe()
    assert await slot.inner.lock(1e9) is not None  # held by someone who never comes back
    slot.fake_waits = clocks
    source = Source(clocks)
    tm = TokenManager(
        "up", source, slot=slot, lock_ttl=10.0, clock=clocks.mono, wall_clock=clocks.wall
    )
    token = await tm.get()
    # Waits at +0 and +10; at +20 (two lock lifetimes, to the instant) it stops waiting.
    assert slot.waits == [10.0, 10.0]
    assert set(slot.ttls) == {10.0}
    assert (token.value, token.shared, source.calls, slot.fallbacks) == ("tok-1", False, 1, 1)


async def test_a_stored_token_is_adopted_without_taking_the_lock() -> None:
    clocks, slot = Clocks(), Probe()
    a, _ = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    await a.get()
    slot.ops.clear()
    assert (await b.get()).value == "tok-1"
    assert slot.ops == ["get"] and b_source.calls == 0


async def test_a_token_stored_just_before_we_lock_is_adopted() -> None:
    clocks, slot = Clocks(), Probe()
    a, _ = manager(clocks, slot)
    b, b_source = manager(clocks, slot)

    async def other_process_stores() -> None:
        slot.on_lock = None
        await a.get()  # takes and releases the lock, stores tok-1

    slot.on_lock = other_process_stores
    assert (await b.get()).value == "tok-1"
    assert b_source.calls == 0


async def test_a_token_stored_before_we_subscribe_is_not_missed() -> None:
    clocks, slot = Clocks(), Probe()
    a, _ = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    slot.fake_waits = clocks
    owner = await slot.inner.lock(60.0)
    assert owner is not None

    async def holder_finishes() -> None:  # between b's refused lock and its subscription
        slot.on_lock = None
        await slot.inner.put(a._record(a._date(await a._source.fetch(None))), None)
        # ... and has not yet unlocked: b's lock is refused, then b subscribes.

    slot.on_lock = holder_finishes
    assert (await b.get()).value == "tok-1"
    assert slot.waits == [] and b_source.calls == 0
    assert slot.ops == ["get", "lock", "changes", "get"]
    await slot.inner.unlock(owner)


async def test_the_store_going_down_mid_fetch_costs_no_second_fetch() -> None:
    for fail in (None, AuthFailed("token endpoint for up answered 500", "up", 500)):
        clocks, slot = Clocks(), Probe(shared=True)
        tm, source = manager(clocks, slot)
        source.fail = fail
        source.gate = asyncio.Event()
        getting = asyncio.create_task(tm.get())
        for _ in range(5):
            await asyncio.sleep(0)
        slot.down = True  # neither the put nor the unlock will answer
        source.gate.set()
        if fail is None:
            token = await getting
            assert (token.value, token.shared) == ("tok-1", False)
        else:
            with pytest.raises(AuthFailed):  # the endpoint's error, not the store's
                await getting
        assert source.calls == 1


async def test_a_refused_token_is_deleted_from_the_store_before_the_refetch() -> None:
    clocks, slot = Clocks(), Probe()
    a, _ = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    token = await a.get()
    b_source.gate = asyncio.Event()
    b.invalidate(await b.get())
    refetch = asyncio.create_task(b.rejected(token, 401))
    for _ in range(5):
        await asyncio.sleep(0)
    assert "delete" in slot.ops
    assert await slot.inner.get() is None  # nobody else adopts the refused token meanwhile
    b_source.gate.set()
    assert (await refetch).value == "tok-1"  # b's own first token
    assert b_source.calls == 1


async def test_consecutive_failures_count_across_processes() -> None:
    clocks, slot = Clocks(), Probe()
    a, a_source = manager(clocks, slot)
    b, b_source = manager(clocks, slot)
    a_source.fail = b_source.fail = AuthFailed("token endpoint for up answered 500", "up", 500)
    with pytest.raises(AuthFailed):
        await a.get()
    clocks.advance(1)
    with pytest.raises(AuthFailed):
        await b.get()  # the second failure of the deployment: 2 s
    with pytest.raises(AuthBackoff) as info:
        await b.get()
    assert info.value.retry_after == 2


async def test_a_stored_backoff_without_an_error_says_only_when() -> None:
    clocks, slot = Clocks(), Probe()
    await slot.inner.put(Record(failures=1, backoff_until=clocks.wall() + 5), None)
    tm, source = manager(clocks, slot)
    with pytest.raises(AuthBackoff) as info:
        await tm.get()
    assert info.value.message == "token endpoint for up is failing; retrying in 5 s"
    assert source.calls == 0


@dataclass(frozen=True)
class Same:
    digest: str = "d1"
    material: bytes = b"m"


def test_memory_slots_are_keyed_by_identity_not_by_name() -> None:
    store = MemoryTokenStore()
    assert store.slot(Same(), "a") is store.slot(Same(), "b")  # SPEC §8.5
    assert store.slot(Same(), "a") is not store.slot(Same("d2"), "a")
    assert store.slot(None, "a") is not store.slot(Same(), "a")

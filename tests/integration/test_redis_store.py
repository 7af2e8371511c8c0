"""The Redis store's protocol against a real redis-server: two stores (two
"processes", each with its own connections and subscriber), managers with a
scripted token source. Waiting is woken by the holder's publish, never polled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.tokens import Grant, Token, TokenManager
from proxy.tokens.redis import RedisTokenStore
from tests.support import wait_until
from tests.support.redis_server import RedisServer


@dataclass(frozen=True)
class Identity:
    digest: str
    material: bytes


IDENTITY = Identity("d", b'{"flow": "for the redis store tests", "secret": "s3cret-value"}')


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.returned_at = 0.0

    async def fetch(self, previous: Token | None) -> Grant:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        self.returned_at = time.monotonic()
        return Grant(f"store-test-token-{self.calls}", time.time() + 600, None, "login")


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[RedisTokenStore]]:
    made = [RedisTokenStore(redis_server.url, "authproxy", timeout=2.0) for _ in range(2)]
    for store in made:
        await store.start()
    yield made
    for store in made:
        await store.close()


def managers(stores: list[RedisTokenStore], source: Source) -> list[TokenManager]:
    return [TokenManager("up", source, slot=s.slot(IDENTITY, "up")) for s in stores]


async def subscribed(stores: list[RedisTokenStore]) -> None:
    await wait_until(
        lambda: all(s.subscribed for s in stores),
        what="both subscribers are listening",
    )


async def test_a_waiter_is_woken_by_the_publish_within_100_ms(
    stores: list[RedisTokenStore],
) -> None:
    await subscribed(stores)
    source = Source()
    source.gate = asyncio.Event()
    holder, waiter = managers(stores, source)
    first = asyncio.create_task(holder.get())
    await wait_until(lambda: source.calls == 1, what="the holder calls the endpoint")
    second = asyncio.create_task(waiter.get())
    await asyncio.sleep(0.3)  # the waiter is parked on the lock, not polling
    gets = stores[1].ops[("get", "ok")]
    await asyncio.sleep(0.5)
    assert stores[1].ops[("get", "ok")] == gets, "the waiter polled the store"
    source.gate.set()
    token = await asyncio.wait_for(second, 5)
    woken = time.monotonic() - source.returned_at
    assert token.value == (await first).value
    assert source.calls == 1
    assert woken < 0.1, f"woken {woken * 1000:.0f} ms after the token arrived"


async def test_the_subscriber_resubscribes_after_redis_restarts(
    stores: list[RedisTokenStore], redis_server: RedisServer
) -> None:
    await subscribed(stores)
    redis_server.restart()
    # Both stores notice (the subscriber's health check pings a quiet channel) ...
    await wait_until(
        lambda: all(s.status()["state"] == "unavailable" for s in stores),
        timeout=10,
        what="the stores notice the restart",
    )
    # ... probe, recover, and listen again.
    await wait_until(
        lambda: all(s.status()["state"] == "ok" and s.subscriptions == 2 for s in stores),
        timeout=15,
        what="the stores recover and resubscribe",
    )
    source = Source()
    source.gate = asyncio.Event()
    holder, waiter = managers(stores, source)
    first = asyncio.create_task(holder.get())
    await wait_until(lambda: source.calls == 1, what="the holder calls the endpoint")
    second = asyncio.create_task(waiter.get())
    await asyncio.sleep(0.2)
    source.gate.set()
    # The lock lives 31 s: only a publish heard on the new subscription wakes it this soon.
    token = await asyncio.wait_for(second, 2)
    assert token.value == (await first).value and source.calls == 1

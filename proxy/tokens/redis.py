"""The shared token store on Redis (SPEC §8): one token per identity for a deployment.

Keys, for each identity (the name part is HKDF-derived, `proxy.tokens.sealing`):

    <prefix>:token:<name>   the sealed Record, PX = its longest-lived part
    <prefix>:lock:<name>    SET NX PX <token timeout + 1 s>, value = a random owner
    <prefix>:changed        the channel every write and unlock PUBLISHes the key name on

Writes are Lua (EVAL/EVALSHA) so compare-and-swap, compare-and-delete and the
publish are one atomic step. One subscriber connection per process fans the
publishes out to local waiters; redis-py's asyncio PubSub does not resubscribe
after a reconnect, so the listener does it itself, and pings on a quiet
channel so a dead connection is noticed. After every (re)subscription all
waiters are woken to read again: a publish may have been missed meanwhile.

Any error or an answer slower than `timeout` marks the store unavailable:
`token_store_unavailable` is logged once, every slot call raises
`StoreUnavailable` at once (the managers serve from memory), and a probe
PINGs every 5 s until `token_store_recovered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.tokens.sealing import Sealer, sealer_for
from proxy.tokens.store import Entry, EventWaiter, Identity, Record, StoreUnavailable

log = structlog.get_logger("authproxy.tokens")

PROBE_INTERVAL = 5.0
HEALTH_CHECK_INTERVAL = 1.0  # ping a quiet subscriber connection this often
RESUBSCRIBE_DELAY = 1.0
NO_EXPIRY_TTL_MS = 24 * 3600 * 1000  # an entry with no known end is refetched daily
MIN_TTL_MS = 1000

T = TypeVar("T")

# KEYS[1] entry; ARGV: expected ('' = absent), new value, ttl ms, channel.
_CAS = """
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('PUBLISH', ARGV[4], KEYS[1])
  return 1
end
return 0
"""
# KEYS[1] entry or lock; ARGV: expected value, channel.
_CAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], KEYS[1])
  return 1
end
return 0
"""


def _version(entry: Entry | None) -> bytes:
    """The exact bytes a compare-and-swap expects; b"" stands for no entry."""
    return entry.version if entry is not None and isinstance(entry.version, bytes) else b""


class RedisSlot:
    shared = True

    def __init__(self, store: RedisTokenStore, sealer: Sealer) -> None:
        self._store = store
        self._sealer = sealer
        prefix = store.key_prefix
        self.key = f"{prefix}:token:{sealer.name}"
        self.lock_key = f"{prefix}:lock:{sealer.name}"

    async def get(self) -> Entry | None:
        raw = await self._store.call("get", lambda r: r.get(self.key))
        if not isinstance(raw, bytes):
            return None
        return Entry(self._sealer.open(raw), raw)

    async def put(self, record: Record, replaces: Entry | None) -> Entry | None:
        sealed = self._sealer.seal(record)
        expected = _version(replaces)
        ends = record.lives_until()
        if ends is None:
            ttl = NO_EXPIRY_TTL_MS
        else:
            ttl = max(MIN_TTL_MS, int((ends - self._store.wall()) * 1000))
        store = self._store
        done = await store.call(
            "put", lambda r: store.cas(keys=[self.key], args=[expected, sealed, ttl, store.channel])
        )
        if not done:
            store.ops[("put", "conflict")] += 1
            return None
        return Entry(record, sealed)

    async def delete(self, entry: Entry) -> bool:
        store = self._store
        done = await store.call(
            "delete", lambda r: store.cad(keys=[self.key], args=[_version(entry), store.channel])
        )
        return bool(done)

    async def lock(self, ttl: float) -> str | None:
        owner = secrets.token_hex(16)
        taken = await self._store.call(
            "lock", lambda r: r.set(self.lock_key, owner, nx=True, px=int(ttl * 1000))
        )
        if not taken:
            self._store.ops[("lock", "held")] += 1
        return owner if taken else None

    async def unlock(self, owner: str) -> None:
        store = self._store
        await store.call(
            "unlock", lambda r: store.cad(keys=[self.lock_key], args=[owner, store.channel])
        )

    @asynccontextmanager
    async def changes(self) -> AsyncIterator[EventWaiter]:
        waiter = EventWaiter()
        waiters = self._store.waiters.setdefault(self.key.encode(), set())
        waiters.add(waiter)
        try:
            yield waiter
        finally:
            waiters.discard(waiter)

    def fell_back(self) -> None:
        self._store.ops[("fallback", "memory")] += 1


class RedisTokenStore:
    type_name = "redis"

    def __init__(
        self,
        url: str,
        key_prefix: str = "authproxy",
        timeout: float = 2.0,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.channel = f"{key_prefix}:changed"
        self.wall = wall or time.time
        self.ops: Counter[tuple[str, str]] = Counter()
        self.waiters: dict[bytes, set[EventWaiter]] = {}
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One retry on a fresh connection (a pooled one may predate a Redis
            # restart); the whole operation stays within `timeout` regardless.
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        # The subscriber never reconnects behind our back: a lost connection must
        # reach `_listen`, which resubscribes and wakes every waiter to read again.
        self._subscriber: Redis = Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self.cas = self._redis.register_script(_CAS)
        self.cad = self._redis.register_script(_CAD)
        self._up = True
        self.subscribed = False  # the listener hears publishes now
        self.subscriptions = 0  # how many times it (re)subscribed
        self._tasks: set[asyncio.Task[None]] = set()
        self._recovered = asyncio.Event()
        self._closed = False

    def slot(self, identity: Identity | None, name: str) -> RedisSlot:
        if identity is None:
            raise ValueError(f"upstream {name} has no token identity to share")
        return RedisSlot(self, sealer_for(identity.material, self.key_prefix))

    # -- every operation goes through here -------------------------------------

    async def call(self, op: str, run: Callable[[Redis], Awaitable[T]]) -> T:
        if not self._up:
            self.ops[(op, "bypassed")] += 1
            raise StoreUnavailable("token store unavailable")
        try:
            async with asyncio.timeout(self.timeout):
                result = await run(self._redis)
        except (RedisError, OSError, TimeoutError) as exc:
            self.ops[(op, "error")] += 1
            self._down(exc)
            raise StoreUnavailable("token store unavailable") from None
        self.ops[(op, "ok")] += 1
        return result

    def _down(self, exc: BaseException) -> None:
        if not self._up or self._closed:
            return
        self._up = False
        self._recovered.clear()
        # The class name only: a redis error message may quote the URL (credentials).
        log.warning(
            "token_store_unavailable",
            store="redis",
            error=type(exc).__name__,
            probe_every_s=PROBE_INTERVAL,
        )
        self._spawn(self._probe())

    async def _probe(self) -> None:
        while not self._closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(self.timeout):
                    # Pooled connections predate the outage: start afresh.
                    await self._redis.connection_pool.disconnect()
                    await self._redis.ping()
            except (RedisError, OSError, TimeoutError):
                self.ops[("probe", "error")] += 1
                continue
            self.ops[("probe", "ok")] += 1
            self._up = True
            self._recovered.set()
            log.info("token_store_recovered", store="redis")
            return

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the subscriber ----------------------------------------------------------

    def _wake(self, key: bytes | None) -> None:
        groups = self.waiters.values() if key is None else [self.waiters.get(key, set())]
        for group in groups:
            for waiter in group:
                waiter.changed.set()

    async def _listen(self) -> None:
        while not self._closed:
            if not self._up:
                await self._recovered.wait()
                continue
            pubsub = self._subscriber.pubsub()
            try:
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.channel)
                self.subscribed = True
                self.subscriptions += 1
                self._wake(None)  # a publish may have gone by unheard: read again
                while not self._closed:
                    message = await pubsub.get_message(timeout=HEALTH_CHECK_INTERVAL)
                    if message is None:
                        # A quiet channel or a dead connection: a ping tells which
                        # (its pong, or an error, arrives on the next read).
                        async with asyncio.timeout(self.timeout):
                            await pubsub.ping()
                            message = await pubsub.get_message(timeout=self.timeout)
                        if message is None:
                            raise TimeoutError("no pong on the subscriber connection")
                    if message.get("type") == "message":
                        self._wake(message.get("data"))
            except (RedisError, OSError, TimeoutError) as exc:
                self.ops[("subscribe", "error")] += 1
                self._down(exc)
                self._wake(None)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self._closed:
                await asyncio.sleep(RESUBSCRIBE_DELAY)

    # -- lifecycle and reporting -------------------------------------------------

    async def start(self) -> None:
        """Subscribe in the background (start-up never waits on Redis); a store that
        is down is found so by the subscriber or the first operation, then probed."""
        self._spawn(self._listen())

    async def close(self) -> None:
        self._closed = True
        self._recovered.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._redis, self._subscriber):
            with contextlib.suppress(Exception):
                await client.aclose()

    def status(self) -> dict[str, str]:
        return {"type": self.type_name, "state": "ok" if self._up else "unavailable"}

    def counters(self) -> dict[tuple[str, str], int]:
        return dict(self.ops)

"""The shared token store (SPEC §8) with a real redis-server: proxies in this
process, each with its own store connection and subscriber, as separate
processes would have. (tests/integration/test_token_store_processes.py runs
the acceptance scenarios with real `authproxy run` processes.)"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.auth.identity import auth_identity
from proxy.fakes import (
    GetpaidState,
    PaymoState,
    PrimaerpState,
    SeedFake,
    start_getpaid,
    start_paymo,
    start_primaerp,
)
from proxy.tokens.sealing import sealer_for
from tests.conftest import RunningProxy, StartProxy
from tests.support import log_lines, wait_until
from tests.support.redis_server import RedisServer


def store_cfg(server: RedisServer, **extra: Any) -> dict[str, Any]:
    # The default timeout: one event loop serves the proxies, the fakes and the
    # clients here, on a shared machine; a tighter one would measure the loop.
    return {"type": "redis", "url": server.url, **extra}


def paymo_upstream(fake: SeedFake[PaymoState]) -> dict[str, Any]:
    return {"url": fake.url, "auth": {"type": "paymo_session", "api_key": fake.state.api_key}}


@pytest.fixture
async def paymo_fake() -> AsyncIterator[SeedFake[PaymoState]]:
    async with await start_paymo(PaymoState(lifetime=60)) as fake:
        yield fake


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def status_of(client: aiohttp.ClientSession, proxy: RunningProxy) -> dict[str, Any]:
    _, body = await get_json(client, proxy.url + "/-/status")
    return dict(body)


def events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return log_lines(capsys.readouterr().out)


async def test_processes_share_one_token_and_names_do_not_matter(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    paymo_fake.state.token_delay = 0.3  # every proxy asks while the first request runs
    cfg = store_cfg(redis_server)
    a = await start_proxy({"token_store": cfg, "upstreams": {"paymo": paymo_upstream(paymo_fake)}})
    b = await start_proxy({"token_store": cfg, "upstreams": {"other": paymo_upstream(paymo_fake)}})
    urls = [a.url + "/paymo/me", b.url + "/other/me"] * 50
    answers = await asyncio.gather(*(get_json(client, u) for u in urls))
    assert [s for s, _ in answers] == [200] * 100
    assert paymo_fake.state.token_requests == 1
    sent = {r.header("X-Session") for r in paymo_fake.state.requests if r.header("X-Session")}
    assert len(sent) == 1
    # Fresh tokens are served from memory: no store I/O on the hot path.
    before = dict(a.state.state.store.counters())
    for _ in range(20):
        assert (await get_json(client, a.url + "/paymo/me"))[0] == 200
    assert a.state.state.store.counters() == before
    # A proxy that starts while the token is stored uses it.
    c = await start_proxy({"token_store": cfg, "upstreams": {"paymo": paymo_upstream(paymo_fake)}})
    assert (await get_json(client, c.url + "/paymo/me"))[0] == 200
    assert paymo_fake.state.token_requests == 1


async def test_another_secret_for_the_same_client_id_never_gets_the_token(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    async with await start_getpaid(GetpaidState(lifetime=60)) as fake:

        def upstream(secret: str) -> dict[str, Any]:
            return {
                "url": fake.url,
                "auth": {
                    "type": "oauth2_client_credentials",
                    "token_url": fake.token_url,
                    "client_id": fake.state.client_id,
                    "client_secret": secret,
                    "body_format": "json",
                    "audience": fake.state.audience,
                },
            }

        cfg = store_cfg(redis_server)
        good = await start_proxy(
            {"token_store": cfg, "upstreams": {"gp": upstream(fake.state.client_secret)}}
        )
        bad = await start_proxy({"token_store": cfg, "upstreams": {"gp": upstream("not-it-1234")}})
        assert (await get_json(client, good.url + "/gp/invoices"))[0] == 200
        status, body = await get_json(client, bad.url + "/gp/invoices")
        assert status == 502 and body["error"]["code"] == "auth_failed"
        assert fake.state.token_requests == 2  # the wrong secret asked for its own
        tokens = [k for k, _ in redis_server.dump() if b":token:" in k]
        assert len(tokens) == 2  # two identities, two entries


async def test_a_stored_failure_backs_off_every_process(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    paymo_fake.state.token_failure = "500"
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    a, b = await start_proxy(cfg), await start_proxy(cfg)
    assert (await get_json(client, a.url + "/p/me"))[0] == 502
    async with client.get(b.url + "/p/me") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "auth_backoff"
        assert int(resp.headers["Retry-After"]) >= 1
    assert paymo_fake.state.token_requests == 1
    assert (await status_of(client, b))["upstreams"]["p"]["token"]["state"] == "backoff"


async def test_a_dead_lock_holder_blocks_no_longer_than_the_lock_lives(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    upstream = {**paymo_upstream(paymo_fake), "timeout": {"connect": 0.5, "read": 0.5}}
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": upstream}}
    proxy = await start_proxy(cfg)
    identity = auth_identity(proxy.config.upstreams["p"])
    assert identity is not None
    name = sealer_for(identity.material, "authproxy").name
    # A holder that took the lock (token timeout 1 s + 1 s) and died.
    assert redis_server.client().set(f"authproxy:lock:{name}", "dead", nx=True, px=2000)
    started = time.monotonic()
    assert (await get_json(client, proxy.url + "/p/me"))[0] == 200
    assert 1.0 < time.monotonic() - started < 4.0
    assert paymo_fake.state.token_requests == 1


async def test_a_401_deletes_only_the_token_it_saw_and_processes_share_the_refetch(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    a, b = await start_proxy(cfg), await start_proxy(cfg)
    assert (await get_json(client, a.url + "/p/me"))[0] == 200
    assert (await get_json(client, b.url + "/p/me"))[0] == 200
    assert paymo_fake.state.token_requests == 1
    paymo_fake.state.revoke_all()
    assert (await get_json(client, a.url + "/p/me"))[0] == 200  # 401, refetch, replay
    assert paymo_fake.state.token_requests == 2
    # b still holds the revoked token: its 401 must not delete a's new one, only adopt it.
    assert (await get_json(client, b.url + "/p/me"))[0] == 200
    assert paymo_fake.state.token_requests == 2
    assert (await get_json(client, a.url + "/p/me"))[0] == 200
    assert paymo_fake.state.token_requests == 2


async def test_primaerp_entry_lives_as_long_as_its_refresh_token(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    state = PrimaerpState(lifetime=3, refresh_lifetime=600)
    async with await start_primaerp(state) as fake:
        upstream = {
            "url": fake.url,
            "auth": {"type": "primaerp", "api_key": state.apikey, "secret_key": state.secret_key},
        }
        proxy = await start_proxy(
            {"token_store": store_cfg(redis_server), "upstreams": {"e": upstream}}
        )
        assert (await get_json(client, proxy.url + "/e/projects"))[0] == 200
        (key,) = [k for k, _ in redis_server.dump() if b":token:" in k]
        assert 500_000 < redis_server.client().pttl(key) <= 600_000


async def test_a_value_that_does_not_open_is_a_miss(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    first = await start_proxy(cfg)
    assert (await get_json(client, first.url + "/p/me"))[0] == 200
    (key,) = [k for k, _ in redis_server.dump() if b":token:" in k]
    redis_server.client().set(key, b"\x01" + b"garbage" * 8)  # a rotated secret, say
    second = await start_proxy(cfg)
    assert (await get_json(client, second.url + "/p/me"))[0] == 200
    assert paymo_fake.state.token_requests == 2
    # ... and the new token replaced it, for the next process to use.
    third = await start_proxy(cfg)
    assert (await get_json(client, third.url + "/p/me"))[0] == 200
    assert paymo_fake.state.token_requests == 2


async def test_shutdown_never_logs_out_a_shared_session(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    paymo_fake,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    writer, reader = await start_proxy(cfg), await start_proxy(cfg)
    assert (await get_json(client, writer.url + "/p/me"))[0] == 200
    assert (await get_json(client, reader.url + "/p/me"))[0] == 200
    await writer.stop()
    await reader.stop()
    assert paymo_fake.state.logout_requests == 0
    skipped = [e for e in events(capsys) if e["event"] == "logout_skipped"]
    assert [(e["upstream"], e["reason"]) for e in skipped] == [("p", "shared"), ("p", "shared")]


async def test_a_session_obtained_while_the_store_was_down_is_logged_out(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    redis_server.kill()
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    proxy = await start_proxy(cfg)
    assert (await get_json(client, proxy.url + "/p/me"))[0] == 200
    await proxy.stop()
    assert paymo_fake.state.logout_requests == 1


async def test_redis_killed_mid_load_then_restarted(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with await start_paymo(PaymoState(lifetime=2)) as fake:  # refreshed every ~1 s
        cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(fake)}}
        proxies = [await start_proxy(cfg), await start_proxy(cfg)]
        failures: list[int] = []
        done = asyncio.Event()

        async def load(proxy: RunningProxy) -> int:
            served = 0
            while not done.is_set():
                status, _ = await get_json(client, proxy.url + "/p/me")
                served += 1
                if status != 200:
                    failures.append(status)
                await asyncio.sleep(0.01)
            return served

        workers = [asyncio.create_task(load(p)) for p in proxies for _ in range(3)]
        await asyncio.sleep(1.5)
        redis_server.kill()
        await wait_until(
            lambda: all(p.state.state.store.status()["state"] == "unavailable" for p in proxies),
            timeout=10,
            what="both proxies notice the store is gone",
        )
        body = await status_of(client, proxies[0])
        assert body["token_store"] == {"type": "redis", "state": "unavailable"}
        await asyncio.sleep(2.5)  # tokens expire meanwhile: refreshed from memory
        redis_server.start()
        await wait_until(
            lambda: all(p.state.state.store.status()["state"] == "ok" for p in proxies),
            timeout=15,
            what="both proxies find the store again",
        )
        await asyncio.sleep(2.5)  # and share tokens through it again
        done.set()
        served = await asyncio.gather(*workers)
        assert failures == []
        assert sum(served) > 100
        async with client.get(proxies[0].url + "/-/metrics") as resp:
            metrics = await resp.text()
        fallbacks = [
            line
            for line in metrics.splitlines()
            if line.startswith("authproxy_token_store_fallbacks")
        ]
        assert fallbacks and float(fallbacks[0].split()[-1]) >= 1
        store_lines = [m for m in metrics.splitlines() if m.startswith("authproxy_token_store_op")]
        assert any('outcome="error"' in m for m in store_lines), store_lines
        assert any('outcome="bypassed"' in m for m in store_lines), store_lines
    seen = [(e["event"], e.get("error")) for e in events(capsys) if "store" in e]
    names = [name for name, _ in seen]
    assert names.count("token_store_unavailable") == 2, seen  # once per proxy
    assert names.count("token_store_recovered") == 2


@pytest.mark.parametrize("fault", ["slow", "erroring"])
async def test_a_slow_or_erroring_store_falls_back_without_client_errors(
    fault: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    paymo_fake,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    proxy = await start_proxy(cfg)
    admin = redis_server.client()
    if fault == "slow":
        admin.client_pause(4000)  # answers later than the 2 s timeout
    else:
        admin.acl_setuser(
            "default", enabled=True, reset_keys=False, commands=["-get"]
        )  # every read: -NOPERM
    try:
        started = time.monotonic()
        assert (await get_json(client, proxy.url + "/p/me"))[0] == 200
        assert time.monotonic() - started < 3.5  # one store timeout at most, then memory
        assert (await status_of(client, proxy))["token_store"]["state"] == "unavailable"
        assert (await get_json(client, proxy.url + "/p/me"))[0] == 200
        assert paymo_fake.state.token_requests == 1
    finally:
        if fault == "slow":
            admin.client_unpause()
        else:
            admin.acl_setuser("default", enabled=True, reset_keys=False, commands=["+get"])
    logged = [e for e in events(capsys) if e["event"] == "token_store_unavailable"]
    assert len(logged) == 1
    assert logged[0]["error"] in ("TimeoutError", "NoPermissionError", "ResponseError")


async def test_status_and_metrics_show_the_store(
    start_proxy: StartProxy, client: aiohttp.ClientSession, redis_server: RedisServer, paymo_fake
) -> None:
    cfg = {"token_store": store_cfg(redis_server), "upstreams": {"p": paymo_upstream(paymo_fake)}}
    proxy = await start_proxy(cfg)
    assert (await status_of(client, proxy))["token_store"] == {"type": "redis", "state": "ok"}
    assert (await get_json(client, proxy.url + "/p/me"))[0] == 200
    async with client.get(proxy.url + "/-/metrics") as resp:
        metrics = await resp.text()
    for op in ("get", "lock", "put", "unlock"):
        assert f'authproxy_token_store_operations_total{{operation="{op}",outcome="ok"}}' in metrics
    assert "authproxy_token_store_fallbacks_total 0.0" in metrics
    memory = await start_proxy({"upstreams": {"p": paymo_upstream(paymo_fake)}})
    assert (await status_of(client, memory))["token_store"] == {"type": "memory", "state": "ok"}


def test_the_redis_scan_finds_planted_credentials(redis_server: RedisServer) -> None:
    """The fixture's scan must be able to fail: plant a secret and a Basic encoding."""
    client = redis_server.client()
    client.set("authproxy:plain", "value demo-paymo-api-key here")
    assert redis_server.leaks({"demo-paymo-api-key"}) == ["demo-p..."]
    client.flushall()
    client.set("k", "Basic " + base64.b64encode(b"demo:demo-password").decode())
    assert redis_server.leaks({"demo", "demo-password"})
    client.flushall()

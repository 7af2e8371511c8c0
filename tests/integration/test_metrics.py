"""`/-/metrics` moves with the traffic: requests, retries, token fetches, TTL."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_requests_retries_and_token_fetches(start_proxy, paymo, client) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "paymo": {"url": paymo.url, "auth": {"type": "paymo_session", "api_key": "${K}"}}
            }
        },
        env={"K": paymo.state.api_key},
    )
    for _ in range(5):
        async with client.get(proxy.url + "/paymo/clients") as resp:
            assert resp.status == 200
    async with client.post(proxy.url + "/paymo/clients", json={"name": "x"}) as resp:
        assert resp.status == 200
    paymo.state.revoke_all()  # the next request sees 401, refreshes once, retries once
    async with client.get(proxy.url + "/paymo/clients") as resp:
        assert resp.status == 200
    async with client.get(proxy.url + "/nowhere") as resp:
        assert resp.status == 404

    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        found = samples(await resp.text())

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    labels = {"upstream": "paymo", "method_class": "read", "status_class": "2xx"}
    assert value("authproxy_requests_total", **labels) == 6
    assert value("authproxy_requests_total", **{**labels, "method_class": "write"}) == 1
    assert (
        value("authproxy_requests_total", upstream="", method_class="read", status_class="4xx") == 1
    )
    assert value("authproxy_retries_total", upstream="paymo") == 1
    assert value("authproxy_token_fetches_total", upstream="paymo", outcome="success") == 2
    assert value("authproxy_token_fetches_total", upstream="paymo", outcome="failure") == 0
    assert 0 < value("authproxy_token_ttl_seconds", upstream="paymo") <= 61
    assert value("authproxy_upstream_latency_seconds_count", upstream="paymo") == 7
    # The scrape itself is in flight while it is rendered.
    assert value("authproxy_in_flight_requests") == 1
    assert paymo.state.token_requests == 2


async def test_ready_waits_for_prefetched_tokens(start_proxy, paymo, client) -> None:
    paymo.state.token_failure = "500"
    proxy = await start_proxy(
        {
            "upstreams": {
                "paymo": {
                    "url": paymo.url,
                    "auth": {"type": "paymo_session", "api_key": "${K}", "prefetch": True},
                }
            }
        },
        env={"K": paymo.state.api_key},
    )
    # Fetched at start, in the background once the port is open, before any request.
    await wait_until(lambda: paymo.state.token_requests == 1, 5, what="the prefetch")
    async with client.get(proxy.url + "/-/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["waiting_for_token"] == ["paymo"]
    async with client.get(proxy.url + "/-/health") as resp:
        assert resp.status == 200  # alive, just not ready
    paymo.state.token_failure = None
    auth = proxy.state.routes["/paymo"].auth
    # The first failure backs off 1 s.
    await wait_until(lambda: auth.status()["state"] != "backoff", 3, what="the backoff to end")
    async with client.get(proxy.url + "/paymo/me") as resp:
        assert resp.status == 200
    async with client.get(proxy.url + "/-/ready") as resp:
        assert resp.status == 200
    proxy.state.shutting_down = True
    async with client.get(proxy.url + "/-/ready") as resp:
        assert resp.status == 503


async def test_a_failed_prefetch_retries_on_the_backoff_schedule(
    start_proxy, paymo, client
) -> None:
    """No client request needed: the prefetch tries again when its backoff ends, and
    ready turns on once it has a token (and stays on)."""
    paymo.state.token_failure = "500"
    proxy = await start_proxy(
        {
            "upstreams": {
                "paymo": {
                    "url": paymo.url,
                    "auth": {"type": "paymo_session", "api_key": "${K}", "prefetch": True},
                }
            }
        },
        env={"K": paymo.state.api_key},
    )
    await wait_until(lambda: paymo.state.token_requests == 1, 5, what="the prefetch")
    paymo.state.token_failure = None

    async def ready() -> bool:
        async with client.get(proxy.url + "/-/ready") as resp:
            return bool(resp.status == 200)

    await wait_until(ready, 4, what="the retried prefetch (backoff 1 s)")
    assert paymo.state.token_requests == 2
    assert paymo.state.resource_requests == 0
    paymo.state.token_failure = "500"
    proxy.state.routes["/paymo"].auth.invalidate(  # a later failure...
        await proxy.state.routes["/paymo"].auth.credential()
    )
    assert await ready()  # ...does not turn ready off

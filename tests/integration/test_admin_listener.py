"""The admin listener (SPEC §2 `admin`, §4): probes and Prometheus from outside the pod.

It serves only /-/health, /-/ready and /-/metrics, without the Host allow-list or
`require_token`; the main listener keeps serving them under its own guards.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Echo, StartProxy, log_lines

TOKEN = "admin-listener-inbound-token"


async def start(start_proxy: StartProxy, echo: Echo) -> Any:
    return await start_proxy(
        {
            "listen": {"require_token": "${PROXY_TOKEN}"},
            "admin": {"host": "127.0.0.1", "port": 0},
            "upstreams": {"e": {"url": echo.url}},
        },
        env={"PROXY_TOKEN": TOKEN},
    )


async def test_metrics_reach_prometheus_with_a_host_the_main_listener_refuses(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await start(start_proxy, echo)
    auth = {"Proxy-Authorization": f"Bearer {TOKEN}"}
    async with client.get(proxy.url + "/e/echo/x", headers=auth) as resp:
        assert resp.status == 200
    admin = f"http://127.0.0.1:{proxy.runner.admin_port}"
    outside = {"Host": "10.1.2.3:9901"}  # what a pod-IP scrape sends
    async with client.get(proxy.url + "/-/metrics", headers=outside) as resp:
        assert resp.status == 403  # the main listener's Host allow-list holds
    async with client.get(admin + "/-/metrics", headers=outside) as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["authproxy_requests"]
    assert sum(s.value for s in requests.samples if s.labels.get("upstream") == "e") == 1
    for path in ("/-/health", "/-/ready"):
        async with client.get(admin + path, headers=outside) as resp:
            assert resp.status == 200


async def test_the_admin_listener_serves_nothing_else(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await start(start_proxy, echo)
    admin = f"http://127.0.0.1:{proxy.runner.admin_port}"
    for path in ("/e/echo/x", "/-/status", "/-/other"):
        async with client.get(admin + path) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "no_route"
    assert echo.state.requests == []
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 407  # main listener: require_token still applies


async def test_admin_requests_are_logged(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, capsys: Any
) -> None:
    proxy = await start(start_proxy, echo)
    capsys.readouterr()
    async with client.get(f"http://127.0.0.1:{proxy.runner.admin_port}/-/health") as resp:
        body = await resp.read()
    lines = [r for r in log_lines(capsys.readouterr().out) if r["event"] == "request_finished"]
    assert [(r["path"], r["status"], r["bytes"]) for r in lines] == [("/-/health", 200, len(body))]

from __future__ import annotations


async def test_header_auth_reaches_upstream(start_proxy, echo, client) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "e": {
                    "url": echo.url + "/base",
                    "auth": {"type": "header", "name": "X-Api-Key", "value": "${KEY}"},
                }
            }
        },
        env={"KEY": "sekrit-value"},
    )
    async with client.get(proxy.url + "/e/echo/x", headers={"X-Api-Key": "client"}) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert ["X-Api-Key", "sekrit-value"] in seen["headers"]
    assert ["X-Api-Key", "client"] not in seen["headers"]
    async with client.get(proxy.url + "/-/status") as resp:
        assert resp.status == 200

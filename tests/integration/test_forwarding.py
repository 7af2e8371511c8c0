"""The proxy in front of the echo upstream: what arrives there, what comes back.

Every assertion about forwarding is made on what the upstream *received*
(`echo.state.requests`, or the echo JSON), never on what the proxy meant to send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.fakes import RecordedRequest, pattern_sha256
from tests.conftest import Echo, RunningProxy, StartProxy, log_lines
from tests.support import error_of, free_port

HEADER_SECRET = "hdr-secret-7f3a9c"
BASIC_USER = "basic-user-41d2"
BASIC_PASSWORD = "basic-pass-9e8b"
QUERY_SECRET = "q/secret e+9&1"  # characters that need percent-encoding in a query
SECRETS_ENV = {
    "HDR": HEADER_SECRET,
    "BUSER": BASIC_USER,
    "BPASS": BASIC_PASSWORD,
    "QSECRET": QUERY_SECRET,
}
BASIC_VALUE = "Basic " + base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
QUERY_ENCODED = "key=" + quote(QUERY_SECRET, safe="")

HEADER_AUTH = {"type": "header", "name": "X-Api-Key", "value": "${HDR}"}
BASIC_AUTH = {"type": "basic", "username": "${BUSER}", "password": "${BPASS}"}
QUERY_AUTH = {"type": "query", "param": "key", "value": "${QSECRET}"}

ACCESS_KEYS = {
    "method",
    "path",
    "upstream",
    "status",
    "duration_ms",
    "bytes",
    "retried",
    "request_id",
    "timestamp",
    "level",
    "event",
}


# -- helpers -----------------------------------------------------------------


def route(url: str, auth: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"url": url, **extra}
    if auth is not None:
        cfg["auth"] = auth
    return cfg


async def one_route(
    start_proxy: StartProxy, echo: Echo, auth: dict[str, Any] | None = None, **extra: Any
) -> RunningProxy:
    """A proxy with the single route `/e` -> `<echo>/base`."""
    return await start_proxy(
        {"upstreams": {"e": route(echo.url + "/base", auth, **extra)}}, env=SECRETS_ENV
    )


def only_request(echo: Echo) -> RecordedRequest:
    assert len(echo.state.requests) == 1, [r.raw_path for r in echo.state.requests]
    return echo.state.requests[0]


def names(headers: Iterable[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers]


# -- injected credentials ------------------------------------------------------


# The client's own x-api-key is a credential only where X-Api-Key is the injected
# header; elsewhere it is an ordinary header and passes through.
CLIENT_KEY = ("x-api-key", "client-key")


@pytest.mark.parametrize(
    ("auth", "expected_headers"),
    [
        pytest.param(HEADER_AUTH, [("X-Api-Key", HEADER_SECRET)], id="header"),
        pytest.param(
            {"type": "header", "name": "Authorization", "value": "Bearer ${HDR}"},
            [CLIENT_KEY, ("Authorization", f"Bearer {HEADER_SECRET}")],
            id="header-authorization",
        ),
        pytest.param(BASIC_AUTH, [CLIENT_KEY, ("Authorization", BASIC_VALUE)], id="basic"),
        pytest.param(
            {"type": "basic", "username": "${BUSER}"},
            [
                CLIENT_KEY,
                ("Authorization", "Basic " + base64.b64encode(f"{BASIC_USER}:".encode()).decode()),
            ],
            id="basic-empty-password",
        ),
        pytest.param({"type": "none"}, [CLIENT_KEY], id="none"),
        pytest.param(None, [CLIENT_KEY], id="default-none"),
        pytest.param(QUERY_AUTH, [CLIENT_KEY], id="query"),
    ],
)
async def test_static_credentials_replace_client_credentials(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    auth: dict[str, Any] | None,
    expected_headers: list[tuple[str, str]],
) -> None:
    proxy = await one_route(start_proxy, echo, auth)
    sent = CIMultiDict(
        [
            ("Authorization", "Bearer client-token"),
            ("Proxy-Authorization", "Basic client-proxy"),
            ("Cookie", "session=client-cookie"),
            ("x-api-key", "client-key"),
            ("X-Keep", "kept"),
        ]
    )
    async with client.get(proxy.url + "/e/echo/x", headers=sent) as resp:
        assert resp.status == 200
    seen = only_request(echo)
    credential_names = {"authorization", "proxy-authorization", "cookie", "x-api-key"}
    arrived = [(k, v) for k, v in seen.headers if k.lower() in credential_names]
    assert arrived == expected_headers
    assert seen.header("X-Keep") == "kept"
    assert urlsplit(seen.raw_path).path == "/base/echo/x"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("/e/echo/x", f"/base/echo/x?{QUERY_ENCODED}", id="no-query"),
        pytest.param("/e/echo/x?a=1", f"/base/echo/x?a=1&{QUERY_ENCODED}", id="appended"),
        pytest.param(
            "/e/echo/x?key=client&a=1&key=again",
            f"/base/echo/x?a=1&{QUERY_ENCODED}",
            id="incoming-param-removed",
        ),
        pytest.param(
            "/e/echo/x?k%65y=client&a=%20x",
            f"/base/echo/x?a=%20x&{QUERY_ENCODED}",
            id="encoded-name-removed",
        ),
        pytest.param("/e", f"/base?{QUERY_ENCODED}", id="prefix-only"),
        pytest.param("/e?keys=1", f"/base?keys=1&{QUERY_ENCODED}", id="similar-name-kept"),
    ],
)
async def test_query_credential_appended_and_client_param_removed(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, target: str, expected: str
) -> None:
    proxy = await one_route(start_proxy, echo, QUERY_AUTH)
    async with client.get(URL(proxy.url + target, encoded=True)) as resp:
        assert resp.status == 200
    seen = only_request(echo)
    assert seen.raw_path == expected
    params = parse_qsl(urlsplit(seen.raw_path).query, keep_blank_values=True)
    assert [v for k, v in params if k == "key"] == [QUERY_SECRET]


async def test_strip_headers_and_strip_query_keep_everything_else_in_order(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(
        start_proxy,
        echo,
        HEADER_AUTH,
        strip_headers=["X-Internal", "x-debug-token"],
        strip_query=["debug", "trace"],
    )
    sent = [
        ("X-First", "1"),
        ("X-Internal", "drop me"),
        ("X-Multi", "a"),
        ("X-Debug-Token", "drop me too"),
        ("X-Multi", "b"),
        ("Cookie", "c=1"),
        ("X-Last", "z"),
    ]
    target = "/e/echo/x?z=1&debug=1&a=%20x&trace&b=2&debug=2&c=+"
    async with client.get(URL(proxy.url + target, encoded=True), headers=sent) as resp:
        assert resp.status == 200
    seen = only_request(echo)
    assert seen.raw_path == "/base/echo/x?z=1&a=%20x&b=2&c=+"
    x_headers = [(k, v) for k, v in seen.headers if k.lower().startswith("x-") and k != "X-Api-Key"]
    x_headers = [(k, v) for k, v in x_headers if k.lower() != "x-request-id"]
    assert x_headers == [("X-First", "1"), ("X-Multi", "a"), ("X-Multi", "b"), ("X-Last", "z")]
    assert seen.header_values("X-Api-Key") == [HEADER_SECRET]
    assert seen.header("Cookie") is None


# -- hop-by-hop ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "gone", "kept"),
    [
        pytest.param(
            [("Connection", "close, X-Foo"), ("X-Foo", "1"), ("X-Bar", "2")],
            ["connection", "x-foo"],
            ["x-bar"],
            id="connection-close-names-x-foo",
        ),
        pytest.param(
            [("Connection", "keep-alive, X-Foo , x-baz"), ("X-Foo", "1"), ("X-Baz", "3")],
            ["connection", "x-foo", "x-baz"],
            [],
            id="connection-names-case-and-spaces",
        ),
        pytest.param(
            [("Keep-Alive", "timeout=5"), ("Connection", "keep-alive"), ("X-Bar", "2")],
            ["keep-alive", "connection"],
            ["x-bar"],
            id="keep-alive",
        ),
        pytest.param([("TE", "trailers"), ("X-Bar", "2")], ["te"], ["x-bar"], id="te"),
        pytest.param([("Trailer", "X-Sum"), ("X-Bar", "2")], ["trailer"], ["x-bar"], id="trailer"),
        pytest.param([("Upgrade", "h2c"), ("X-Bar", "2")], ["upgrade"], ["x-bar"], id="upgrade"),
        pytest.param(
            [("Proxy-Connection", "keep-alive"), ("X-Bar", "2")],
            ["proxy-connection"],
            ["x-bar"],
            id="proxy-connection",
        ),
    ],
)
async def test_hop_by_hop_request_headers_removed(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    sent: list[tuple[str, str]],
    gone: list[str],
    kept: list[str],
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/echo/hop", headers=sent) as resp:
        assert resp.status == 200
    arrived = names(only_request(echo).headers)
    for name in gone:
        # The proxy's own client may open its upstream connection as it likes,
        # but never with the client's Connection tokens.
        if name == "connection":
            value = (only_request(echo).header("Connection") or "").lower()
            assert "x-foo" not in value and "x-baz" not in value and "close" not in value
        else:
            assert name not in arrived, f"{name} was forwarded: {arrived}"
    for name in kept:
        assert name in arrived


async def test_every_connection_header_line_counts(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    sent = [("Connection", "keep-alive"), ("Connection", "X-Foo"), ("X-Foo", "1")]
    async with client.get(proxy.url + "/e/echo/x", headers=sent) as resp:
        assert resp.status == 200
    assert "x-foo" not in names(only_request(echo).headers)


async def test_hop_by_hop_response_headers_removed(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/hop") as resp:
        assert resp.status == 200
        body = await resp.read()
        headers = resp.headers
    assert body == b"hop-by-hop headers attached\n"
    assert headers.get("X-Normal") == "yes"
    for name in ("X-Hop", "Keep-Alive", "Trailer", "Upgrade", "Proxy-Connection"):
        assert name not in headers, f"{name} reached the client"
    assert "x-hop" not in headers.get("Connection", "").lower()
    # The upstream's `Connection: close` concerns the upstream hop only: the
    # client's connection to the proxy stays usable.
    async with client.get(proxy.url + "/e/echo/after") as resp:
        assert resp.status == 200


# -- byte-exact path, query, Host, defaults, request id ---------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(
            "/e/echo/a%2Fb%20c+d/%7E/%C3%A9",
            "/base/echo/a%2Fb%20c+d/%7E/%C3%A9",
            id="percent-encoding-kept",
        ),
        pytest.param("/e/echo/x?a=1&b=%20x&c=+&d", "/base/echo/x?a=1&b=%20x&c=+&d", id="query"),
        pytest.param("/e/echo/%41%62?q=%2F%3F", "/base/echo/%41%62?q=%2F%3F", id="no-normalising"),
        pytest.param("/e/echo/x/", "/base/echo/x/", id="trailing-slash"),
        pytest.param("/e/echo//x", "/base/echo//x", id="double-slash"),
        pytest.param("/e/echo/x?", "/base/echo/x", id="empty-query"),
        pytest.param("/e", "/base", id="prefix-alone-is-base-url"),
        pytest.param("/e/", "/base/", id="prefix-slash"),
        pytest.param("/e?x=1", "/base?x=1", id="prefix-alone-with-query"),
    ],
)
async def test_path_and_query_arrive_byte_for_byte(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, target: str, expected: str
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(URL(proxy.url + target, encoded=True)) as resp:
        assert resp.status == 200
    assert only_request(echo).raw_path == expected


async def test_host_is_the_upstreams(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/echo/x", headers={"Host": "localhost"}) as resp:
        assert resp.status == 200
    seen = only_request(echo)
    assert seen.header_values("Host") == [URL(echo.url).raw_authority]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param({}, {"accept": "application/json", "x-default": "d"}, id="not-sent"),
        pytest.param(
            {"Accept": "text/plain", "x-default": "mine"},
            {"accept": "text/plain", "x-default": "mine"},
            id="client-wins-case-insensitively",
        ),
    ],
)
async def test_route_headers_are_defaults(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    sent: dict[str, str],
    expected: dict[str, str],
) -> None:
    proxy = await one_route(
        start_proxy, echo, HEADER_AUTH, headers={"Accept": "application/json", "X-Default": "d"}
    )
    # Without skip_auto_headers aiohttp would send `Accept: */*` itself.
    async with client.get(
        proxy.url + "/e/echo/x", headers=sent, skip_auto_headers=["Accept"]
    ) as resp:
        assert resp.status == 200
    seen = only_request(echo)
    for name, value in expected.items():
        assert seen.header_values(name) == [value]


async def test_request_id_passed_through_when_sent(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/echo/x", headers={"X-Request-ID": "req-123"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "req-123"
    assert only_request(echo).header("X-Request-ID") == "req-123"


async def test_request_id_forwarded_exactly_once(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/echo/x", headers={"X-Request-ID": "req-123"}) as resp:
        assert resp.status == 200
    assert only_request(echo).header_values("X-Request-ID") == ["req-123"]


async def test_request_id_generated_when_absent(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    ids = []
    for _ in range(2):
        async with client.get(proxy.url + "/e/echo/x") as resp:
            assert resp.status == 200
            ids.append(resp.headers["X-Request-ID"])
    assert ids[0] and ids[1] and ids[0] != ids[1]
    assert [r.header_values("X-Request-ID") for r in echo.state.requests] == [[i] for i in ids]


async def test_request_body_forwarded(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    payload = b"x" * 100_000

    async def chunks() -> Any:
        for i in range(0, len(payload), 7_000):
            yield payload[i : i + 7_000]

    async with client.post(proxy.url + "/e/upload", data=payload) as resp:
        assert resp.status == 200
        with_length = await resp.json()
    async with client.put(proxy.url + "/e/upload", data=chunks()) as resp:
        assert resp.status == 200
        chunked = await resp.json()
    digest = hashlib.sha256(payload).hexdigest()
    assert with_length == {"body_len": len(payload), "body_sha256": digest}
    assert chunked == {"body_len": len(payload), "body_sha256": digest}
    first, second = echo.state.requests
    assert (first.method, first.header("Content-Length")) == ("POST", str(len(payload)))
    assert second.method == "PUT"


# -- prefix matching ---------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a", "/ra"),
        ("/a/", "/ra/"),
        ("/a/x", "/ra/x"),
        ("/a/b", "/rab"),
        ("/a/b/c", "/rab/c"),
        ("/a/bc", "/ra/bc"),
        ("/pay/x", "/rpay/x"),
        ("/pay?q=1", "/rpay?q=1"),
        ("/n", "/"),
        ("/n/x", "/x"),
        ("/paymo/x", None),
        ("/payx", None),
        ("/ab", None),
        ("/", None),
        ("/nx", None),
    ],
)
async def test_prefix_matching(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    target: str,
    expected: str | None,
) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "a": route(echo.url + "/ra"),
                "ab": route(echo.url + "/rab", prefix="/a/b"),
                "pay": route(echo.url + "/rpay"),
                "n": route(echo.url),
            }
        }
    )
    async with client.get(URL(proxy.url + target, encoded=True)) as resp:
        if expected is None:
            assert resp.status == 404
            error = await error_of(resp)
            assert error["code"] == "no_route"
            assert error["upstream"] is None
            for prefix in ("/a", "/a/b", "/pay", "/n"):
                assert prefix in error["message"]
            assert echo.state.requests == []
        else:
            assert resp.status == 200
            assert only_request(echo).raw_path == expected


# -- responses ---------------------------------------------------------------


@pytest.mark.parametrize("code", [200, 201, 202, 400, 403, 404, 418, 500, 503])
async def test_status_and_body_pass_through(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, code: int
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(f"{proxy.url}/e/status/{code}") as resp:
        assert resp.status == code
        assert await resp.json() == {"status": code}
        assert resp.content_type == "application/json"


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, code: int
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    for _ in range(2):  # the connection stays usable after a body-less answer
        async with client.get(f"{proxy.url}/e/status/{code}") as resp:
            assert resp.status == code
            assert await resp.read() == b""
            assert "Transfer-Encoding" not in resp.headers
    async with client.get(f"{proxy.url}/e/echo/after") as resp:
        assert resp.status == 200


async def test_multiple_set_cookie_preserved(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/e/cookie") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


async def test_gzip_passes_through_compressed(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(echo.url + "/gzip") as resp:
        direct = await resp.read()
    async with client.get(proxy.url + "/e/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(direct))
        body = await resp.read()
    assert body == direct
    assert json.loads(gzip.decompress(body))["compressed"] is True


@pytest.mark.parametrize(
    ("path", "length"),
    [("/e/bytes/1000", "1000"), ("/e/chunked/1000", None), ("/e/echo/x", None)],
)
async def test_head(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    path: str,
    length: str | None,
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    for _ in range(2):
        async with client.head(proxy.url + path) as resp:
            assert resp.status == 200
            assert await resp.read() == b""
            if length is not None:
                assert resp.headers["Content-Length"] == length
    async with client.get(proxy.url + "/e/echo/after") as resp:
        assert resp.status == 200
        assert (await resp.json())["raw_path"] == "/base/echo/after"
    assert [r.method for r in echo.state.requests] == ["HEAD", "HEAD", "GET"]


async def test_large_download_and_chunked_download(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    n = 3 * 1024 * 1024 + 17
    for kind in ("bytes", "chunked"):
        async with client.get(f"{proxy.url}/e/{kind}/{n}") as resp:
            assert resp.status == 200
            digest = hashlib.sha256()
            size = 0
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        assert (size, digest.hexdigest()) == (n, pattern_sha256(n))


# -- redirects ---------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(
    ("location", "expected"),
    [
        pytest.param("{echo}/base/x/y?q=1", "/e/x/y?q=1", id="absolute-under-base"),
        pytest.param("{echo}/base", "/e", id="absolute-base-itself"),
        pytest.param("/base/x?q=%20", "/e/x?q=%20", id="path-under-base"),
        pytest.param("/base?x=1", "/e?x=1", id="base-path-with-query"),
        pytest.param("/basement/x", "/basement/x", id="not-a-segment-boundary"),
        pytest.param("/other/x", "/other/x", id="path-outside-base"),
        pytest.param("{echo}/other", "{echo}/other", id="same-host-outside-base"),
        pytest.param("https://example.com/base/x", "https://example.com/base/x", id="foreign"),
        pytest.param("http://127.0.0.1:1/base/x", "http://127.0.0.1:1/base/x", id="other-port"),
        pytest.param("relative/x", "relative/x", id="relative"),
    ],
)
async def test_redirects_returned_and_location_rewritten(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    status: int,
    location: str,
    expected: str,
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    to = location.format(echo=echo.url)
    url = URL(proxy.url + "/e/redirect").with_query(to=to, status=str(status))
    async with client.get(url, allow_redirects=False) as resp:
        assert resp.status == status
        assert resp.headers["Location"] == expected.format(echo=echo.url)
    assert len(echo.state.requests) == 1  # not followed


# -- errors ------------------------------------------------------------------


async def test_upstream_unreachable(start_proxy: StartProxy, client: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"upstreams": {"dead": route(f"http://127.0.0.1:{free_port()}/x")}})
    async with client.get(proxy.url + "/dead/y") as resp:
        assert resp.status == 502
        error = await error_of(resp)
    assert error["code"] == "upstream_unreachable"
    assert error["upstream"] == "dead"


async def test_upstream_timeout(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH, timeout={"read": 0.5})
    async with client.get(proxy.url + "/e/slow?seconds=3") as resp:
        assert resp.status == 504
        error = await error_of(resp)
    assert error["code"] == "upstream_timeout"
    assert error["upstream"] == "e"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_allow_methods_refuses_others_without_reaching_upstream(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, method: str
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH, allow_methods=["GET", "HEAD"])
    async with client.request(method, proxy.url + "/e/upload", data=b"body") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
        error = await error_of(resp)
    assert error["code"] == "method_not_allowed"
    assert error["upstream"] == "e"
    assert echo.state.requests == []
    async with client.get(proxy.url + "/e/echo/x") as resp:
        assert resp.status == 200
    async with client.head(proxy.url + "/e/echo/x") as resp:
        assert resp.status == 200


async def test_static_auth_never_retries(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH, retry_statuses=[401, 500])
    for path in ("/e/status/401", "/e/status-401-once", "/e/status/500"):
        echo.state.requests.clear()
        async with client.get(proxy.url + path) as resp:
            assert resp.status in (401, 500)
        assert len(echo.state.requests) == 1, path


# -- admin -------------------------------------------------------------------


async def test_health(start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    async with client.get(proxy.url + "/-/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_status_shape_without_secrets(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "h": route(echo.url + "/base", HEADER_AUTH),
                "b": route(echo.url, BASIC_AUTH, prefix="/basic"),
                "q": route(echo.url, QUERY_AUTH),
                "n": route(echo.url),
            }
        },
        env=SECRETS_ENV,
    )
    async with client.get(proxy.url + "/-/status") as resp:
        assert resp.status == 200
        text = await resp.text()
    status = json.loads(text)
    assert status.pop("pid") == os.getpid()  # the proxy runs in this test's process
    loaded = status.pop("config")  # SPEC §9: when the running configuration was loaded
    assert loaded["last_reload_error"] is None and loaded["loaded_at"].endswith("Z")
    empty = {"state": "none", "expires_in": None}
    assert status == {
        "upstreams": {
            "h": {
                "prefix": "/h",
                "url": echo.url + "/base",
                "auth": "header",
                "token": empty,
                "last_error": None,
            },
            "b": {
                "prefix": "/basic",
                "url": echo.url,
                "auth": "basic",
                "token": empty,
                "last_error": None,
            },
            "q": {
                "prefix": "/q",
                "url": echo.url,
                "auth": "query",
                "token": empty,
                "last_error": None,
            },
            "n": {
                "prefix": "/n",
                "url": echo.url,
                "auth": "none",
                "token": empty,
                "last_error": None,
            },
        },
        "token_store": {"type": "memory", "state": "ok"},
    }
    for secret in (*SECRETS_ENV.values(), BASIC_VALUE, QUERY_ENCODED):
        assert secret not in text


# -- access log --------------------------------------------------------------


async def test_access_log_one_line_per_request(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await one_route(start_proxy, echo, HEADER_AUTH)
    capsys.readouterr()
    async with client.get(proxy.url + "/e/echo/x", headers={"X-Request-ID": "rid-1"}) as resp:
        body = await resp.read()
    async with client.get(
        URL(proxy.url + "/e/echo/y?token=abc&api_key=x&page=2", encoded=True)
    ) as resp:
        redacted_id = resp.headers["X-Request-ID"]
    async with client.get(proxy.url + "/nowhere") as resp:
        assert resp.status == 404
    async with client.get(proxy.url + "/-/health") as resp:
        assert resp.status == 200

    lines = [r for r in log_lines(capsys.readouterr().out) if r.get("event") == "request_finished"]
    assert len(lines) == 4, lines
    for line in lines:
        # A refused request adds its error code (SPEC §5); nothing else is added.
        assert set(line) - {"error"} == ACCESS_KEYS
        assert ("error" in line) == (line["status"] >= 400)
        assert line["level"] == "info"
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
        assert line["retried"] is False
    first, second, third, fourth = lines
    assert first["method"] == "GET"
    assert first["path"] == "/e/echo/x"
    assert first["upstream"] == "e"
    assert first["status"] == 200
    assert first["bytes"] == len(body)
    assert first["request_id"] == "rid-1"
    assert second["path"] == "/e/echo/y?token=REDACTED&api_key=REDACTED&page=2"
    assert second["request_id"] == redacted_id
    assert "abc" not in json.dumps(second)
    assert (third["upstream"], third["status"], third["error"]) == (None, 404, "no_route")
    assert (fourth["path"], fourth["status"]) == ("/-/health", 200)


# -- no secret anywhere --------------------------------------------------------


async def test_no_secret_in_output_across_every_request_kind(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstreams = {
        "h": route(echo.url + "/base", HEADER_AUTH, timeout={"read": 0.5}),
        "b": route(echo.url + "/base", BASIC_AUTH, allow_methods=["GET", "HEAD"]),
        "q": route(echo.url + "/base", QUERY_AUTH, headers={"Accept": "application/json"}),
        "dead": route(f"http://127.0.0.1:{free_port()}", HEADER_AUTH),
    }
    proxy = await start_proxy({"upstreams": upstreams}, env=SECRETS_ENV)
    u = proxy.url
    requests: list[tuple[str, str | URL, dict[str, Any]]] = []
    for p in ("/h", "/b", "/q"):
        requests += [
            ("GET", URL(u + p + "/echo/a%2Fb%20c+d?a=1&b=%20x&c=+&d", encoded=True), {}),
            ("GET", u + p + "/echo/x", {"headers": {"Connection": "close, X-Foo", "X-Foo": "1"}}),
            ("GET", URL(u + p + "/echo/x?key=client&token=abc&api_key=x", encoded=True), {}),
            ("GET", u + p + "/hop", {}),
            ("GET", u + p + "/cookie", {}),
            ("GET", u + p + "/gzip", {}),
            ("GET", u + p + "/status/401", {}),
            ("GET", u + p + "/status/204", {}),
            ("GET", u + p + "/status/304", {}),
            ("HEAD", u + p + "/bytes/10", {}),
            ("GET", u + p + "/bytes/100000", {}),
            ("GET", u + p + "/chunked/100000", {}),
            ("POST", u + p + "/upload", {"data": b"z" * 5000}),
            ("GET", URL(u + p + "/redirect").with_query(to=echo.url + "/base/x"), {}),
            ("GET", URL(u + p + "/redirect").with_query(to="https://example.com/"), {}),
        ]
    requests += [
        ("GET", u + "/h/slow?seconds=3", {}),  # 504
        ("GET", u + "/dead/x", {}),  # 502
        ("GET", u + "/nowhere", {}),  # 404
        ("DELETE", u + "/b/x", {}),  # 405
        ("GET", u + "/-/health", {}),
        ("GET", u + "/-/status", {}),
    ]
    capsys.readouterr()
    statuses = []
    for method, url, kwargs in requests:
        async with client.request(method, url, allow_redirects=False, **kwargs) as resp:
            await resp.read()
            statuses.append(resp.status)
    assert {502, 504, 404, 405, 401, 204, 304, 302, 200} <= set(statuses)
    out = capsys.readouterr().out
    finished = [r for r in log_lines(out) if r.get("event") == "request_finished"]
    assert len(finished) == len(requests)
    basic_b64 = BASIC_VALUE.removeprefix("Basic ")
    for secret in (*SECRETS_ENV.values(), basic_b64, quote(QUERY_SECRET, safe="")):
        assert secret not in out, f"secret {secret[:4]}... in proxy stdout"


# -- Expect: 100-continue, and methods never forwarded ---------------------------


async def _expect_continue(port: int, extra: bytes = b"") -> tuple[bytes, bytes]:
    """Send headers with Expect: 100-continue; return (interim answer, final answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n" + extra + b"\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        if not interim.startswith(b"HTTP/1.1 100"):
            return b"", interim
        writer.write(b"hello")
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        return interim, final
    finally:
        writer.close()


async def test_expect_100_continue_invites_the_body(start_proxy, echo) -> None:
    proxy = await start_proxy({"upstreams": {"e": {"url": echo.url}}})
    interim, final = await _expect_continue(proxy.port)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200")
    (seen,) = echo.state.requests
    assert seen.body_len == 5
    assert seen.header("Expect") is None  # answered here, never forwarded


async def test_expect_100_continue_refused_before_the_body(start_proxy, echo) -> None:
    proxy = await start_proxy({"upstreams": {"e": {"url": echo.url}}})
    interim, final = await _expect_continue(proxy.port, b"Origin: https://evil.example\r\n")
    assert interim == b""
    assert final.startswith(b"HTTP/1.1 403")
    assert echo.state.requests == []


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
async def test_trace_and_connect_are_never_forwarded(start_proxy, echo, client, method) -> None:
    proxy = await start_proxy({"upstreams": {"e": {"url": echo.url + "/base"}}})
    async with client.request(method, proxy.url + "/e/echo/x") as resp:
        # aiohttp's client sends CONNECT in authority form: refused as a bad target.
        # (An origin-form CONNECT over a raw socket gets the 405: test_hostile.py.)
        if method == "CONNECT":
            assert resp.status == 400
        else:
            assert resp.status == 405
            assert "TRACE" not in resp.headers["Allow"]
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert echo.state.requests == []


# -- response timing (SPEC §4): nothing is held back ----------------------------------


async def test_a_trickling_small_body_reaches_the_client_in_pieces(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """6 bytes over 3 s, Content-Length known: the client has the status line at once
    and each byte as it comes, not all of it after 3 s."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\n"
            )
            for byte in b"abcdef":
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(bytes([byte]))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await start_proxy({"upstreams": {"t": {"url": f"http://127.0.0.1:{port}"}}})
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with client.get(proxy.url + "/t/x") as resp:
            head_after = loop.time() - started
            assert resp.status == 200, await resp.text()
            arrivals: list[tuple[float, bytes]] = []
            while chunk := await resp.content.readany():
                arrivals.append((loop.time() - started, chunk))
    finally:
        server.close()
        await server.wait_closed()
    assert b"".join(c for _, c in arrivals) == b"abcdef"
    assert head_after < 0.4, head_after
    assert len(arrivals) >= 3, arrivals
    assert arrivals[0][0] < 1.2, arrivals


# -- a #fragment in the request target (never sent upstream) --------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/e/x?a=1#frag", f"/base/x?a=1&{QUERY_ENCODED}"),
        ("/e/x?#frag", f"/base/x?{QUERY_ENCODED}"),
        ("/e/x?a=1&b=2#frag?c=3", f"/base/x?a=1&b=2&{QUERY_ENCODED}"),
    ],
)
async def test_a_fragment_is_cut_before_the_query_credential_is_added(
    start_proxy: StartProxy, echo: Echo, target: str, expected: str
) -> None:
    proxy = await start_proxy(
        {"upstreams": {"e": {"url": echo.url + "/base", "auth": QUERY_AUTH}}},
        env=SECRETS_ENV,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    (seen,) = echo.state.requests
    assert seen.raw_path == expected

"""Hostile clients and broken upstreams: what the proxy answers, and what gets through.

Every case asserts two things: the answer the client got, and what reached the
upstream (nothing at all, or exactly the expected request). Requests a normal
HTTP client would refuse to send are written byte by byte on a raw socket.
Upstream faults the echo fake cannot produce come from tiny raw asyncio servers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from proxy.fakes import GetpaidState, RecordedRequest, start_getpaid
from tests.conftest import Echo, RunningProxy, StartProxy
from tests.support import access_lines, error_of, error_shape, free_port, wait_until

BASE = "/base"
INBOUND_TOKEN = "inbound-token-5d8a1f27c9"
TOKEN_ENV = {"PROXY_TOKEN": INBOUND_TOKEN}


# -- raw HTTP on a socket ------------------------------------------------------


@dataclass
class Answer:
    """What came back on a raw connection: a parsed response, or nothing."""

    status: int | None  # None: no status line before the connection closed / timed out
    headers: dict[str, str]  # lower-case names; the last of repeated headers wins
    body: bytes
    closed: bool  # the proxy closed the connection
    raw: bytes

    def error_code(self) -> str:
        """The code of one of the proxy's own JSON errors (shape checked)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.raw[:300]
        error = error_shape(json.loads(self.body))
        assert "x-request-id" in self.headers
        code: str = error["code"]
        return code

    @property
    def refused(self) -> bool:
        """A 4xx, or the connection closed without any answer."""
        if self.status is None:
            return self.closed
        return 400 <= self.status < 500


def request_bytes(
    target: str,
    *,
    method: str = "GET",
    host: str | None = "localhost",
    headers: Iterable[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_some(reader: asyncio.StreamReader, deadline: float) -> bytes | None:
    """Bytes, b"" at EOF, None when the deadline passes first."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(reader.read(65536), remaining)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""


async def read_answer(reader: asyncio.StreamReader, within: float, *, head: bool) -> Answer:
    """Read one response (skipping 1xx); stop at its end, at EOF or at the deadline."""
    deadline = asyncio.get_running_loop().time() + within
    buffer = b""
    closed = False

    async def more() -> bool:
        nonlocal buffer, closed
        chunk = await _read_some(reader, deadline)
        if not chunk:
            closed = chunk == b""
            return False
        buffer += chunk
        return True

    while True:
        while b"\r\n\r\n" not in buffer:
            if not await more():
                return Answer(None, {}, b"", closed, buffer)
        head_bytes, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return Answer(None, {}, b"", closed, buffer)
        status = int(parts[1])
        if 100 <= status < 200:
            buffer = rest
            continue
        break
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest
    if head or status in (204, 304):
        body = b""
    elif "content-length" in headers and headers["content-length"].isdigit():
        length = int(headers["content-length"])
        while len(body) < length and await more():
            body = buffer.partition(b"\r\n\r\n")[2]
        body = body[:length]
    elif "chunked" in headers.get("transfer-encoding", ""):
        while not body.endswith(b"0\r\n\r\n") and await more():
            body = buffer.partition(b"\r\n\r\n")[2]
    else:
        while await more():
            body = buffer.partition(b"\r\n\r\n")[2]
    return Answer(status, headers, body, closed, buffer)


async def exchange(port: int, data: bytes, *, within: float = 3.0, head: bool = False) -> Answer:
    """Open a connection, write `data` as is, read one answer, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        return await read_answer(reader, within, head=head)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


# -- proxies and upstream assertions -------------------------------------------


async def echo_proxy(
    start_proxy: StartProxy,
    echo: Echo,
    *,
    route: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    base: str = BASE,
    **top: Any,
) -> RunningProxy:
    """The real proxy with one route `/e` -> `<echo><base>`, plus top-level settings."""
    upstream = {"url": echo.url + base, **(route or {})}
    return await start_proxy({**top, "upstreams": {"e": upstream}}, env=env)


def upstream_host(echo: Echo) -> str:
    return urlsplit(echo.url).netloc


def forwarded_once(echo: Echo, method: str, raw_path: str) -> RecordedRequest:
    """Exactly one request reached the echo upstream, and it is this one."""
    seen = [(r.method, r.raw_path) for r in echo.state.requests]
    assert seen == [(method, raw_path)]
    record = echo.state.requests[0]
    hosts = [v for k, v in record.headers if k.lower() == "host"]
    assert hosts == [upstream_host(echo)]
    return record


def header_names(record: RecordedRequest) -> set[str]:
    return {k.lower() for k, _ in record.headers}


async def error_code_of(resp: aiohttp.ClientResponse) -> str:
    code: str = (await error_of(resp))["code"]
    return code


def pool_in_use(proxy: RunningProxy) -> int | None:
    """Upstream connections checked out of the proxy's pool (None: client unknown)."""
    state = proxy.state
    client = getattr(state, "client", None)
    session = getattr(client, "session", None) or getattr(state, "session", None)
    acquired = getattr(getattr(session, "connector", None), "_acquired", None)
    if acquired is not None:  # aiohttp's ClientSession
        return len(acquired)
    opened, pools = getattr(client, "_open", None), getattr(client, "_pools", None)
    if isinstance(opened, int) and isinstance(pools, dict):  # proxy.leanclient
        return opened - sum(len(idle) for idle in pools.values())
    return None


# == 1. DNS rebinding: the Host allow-list ======================================


@pytest.mark.parametrize(
    ("host", "version", "expected"),
    [
        pytest.param("evil.com", "HTTP/1.1", 403, id="foreign"),
        pytest.param("evil.com:8080", "HTTP/1.1", 403, id="foreign-with-port"),
        pytest.param("localhost.evil.com", "HTTP/1.1", 403, id="localhost-subdomain"),
        pytest.param("127.0.0.1.nip.io", "HTTP/1.1", 403, id="loopback-looking-name"),
        pytest.param("[::2]", "HTTP/1.1", 403, id="other-ipv6"),
        pytest.param("::2", "HTTP/1.1", 403, id="other-ipv6-unbracketed"),
        pytest.param("", "HTTP/1.1", 403, id="empty"),
        pytest.param(None, "HTTP/1.0", 403, id="missing-http10"),
        pytest.param("localhost", "HTTP/1.1", 200, id="localhost"),
        pytest.param("LOCALHOST", "HTTP/1.1", 200, id="case-insensitive"),
        pytest.param("LocalHost:1234", "HTTP/1.1", 200, id="port-ignored"),
        pytest.param("127.0.0.1", "HTTP/1.1", 200, id="ipv4-loopback"),
        pytest.param("127.0.0.1:8080", "HTTP/1.1", 200, id="ipv4-loopback-port"),
        pytest.param("[::1]", "HTTP/1.1", 200, id="ipv6-loopback"),
        pytest.param("[::1]:8080", "HTTP/1.1", 200, id="ipv6-loopback-port"),
        pytest.param(
            "[::1]evil.com",
            "HTTP/1.1",
            403,
            id="junk-after-ipv6-literal",
        ),
    ],
)
async def test_host_allow_list(
    start_proxy: StartProxy, echo: Echo, host: str | None, version: str, expected: int
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    answer = await exchange(proxy.port, request_bytes("/e/x", host=host, version=version))
    assert answer.status == expected, answer.raw[:300]
    if expected == 403:
        assert answer.error_code() == "host_not_allowed"
        assert echo.state.requests == []
    else:
        forwarded_once(echo, "GET", BASE + "/x")


@pytest.mark.parametrize("path", ["/-/status", "/-/health", "/-/metrics", "/-/ready"])
async def test_admin_endpoints_are_behind_the_host_check(
    start_proxy: StartProxy, echo: Echo, path: str
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    answer = await exchange(proxy.port, request_bytes(path, host="evil.com"))
    assert answer.status == 403
    assert answer.error_code() == "host_not_allowed"
    assert b"upstreams" not in answer.body
    answer = await exchange(proxy.port, request_bytes(path, host="localhost:8080"))
    assert answer.status == 200
    assert echo.state.requests == []


@pytest.mark.parametrize(
    ("allowed", "host", "expected"),
    [
        pytest.param(["*"], "evil.com", 200, id="star-foreign"),
        pytest.param(["*"], "evil.com:8080", 200, id="star-foreign-port"),
        pytest.param(["*"], None, 200, id="star-missing"),
        pytest.param(["authproxy"], "authproxy:8080", 200, id="custom-with-port"),
        pytest.param(["authproxy"], "AUTHPROXY", 200, id="custom-case"),
        pytest.param(["authproxy"], "localhost", 403, id="custom-refuses-localhost"),
        pytest.param(["authproxy"], "127.0.0.1", 403, id="custom-refuses-loopback"),
        pytest.param(["authproxy"], "authproxy.evil.com", 403, id="custom-subdomain"),
    ],
)
async def test_allowed_hosts_setting(
    start_proxy: StartProxy, echo: Echo, allowed: list[str], host: str | None, expected: int
) -> None:
    proxy = await echo_proxy(start_proxy, echo, allowed_hosts=allowed)
    version = "HTTP/1.0" if host is None else "HTTP/1.1"
    answer = await exchange(proxy.port, request_bytes("/e/x", host=host, version=version))
    assert answer.status == expected
    if expected == 403:
        assert answer.error_code() == "host_not_allowed"
        assert echo.state.requests == []
    else:
        forwarded_once(echo, "GET", BASE + "/x")


# == 2. Browsers / CSRF ========================================================


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param("GET", {"Origin": "https://evil.com"}, 403, id="foreign-origin"),
        pytest.param("POST", {"Origin": "https://evil.com"}, 403, id="foreign-origin-post"),
        pytest.param("GET", {"Origin": "null"}, 403, id="null-origin"),
        pytest.param("GET", {"Origin": "http://localhost:8080"}, 403, id="localhost-origin"),
        pytest.param("GET", {"Origin": "{proxy}"}, 403, id="the-proxys-own-origin"),
        pytest.param("GET", {"Origin": ""}, 403, id="empty-origin"),
        pytest.param("GET", {"Sec-Fetch-Site": "cross-site"}, 403, id="cross-site"),
        pytest.param(
            "POST",
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
            403,
            id="cross-site-no-cors-post",
        ),
        # A page served through the proxy itself: its origin is not listed (SPEC §4).
        pytest.param("GET", {"Sec-Fetch-Site": "same-origin"}, 403, id="same-origin"),
        # A page on another localhost port, an <img> tag: no Origin (finding 8).
        pytest.param("GET", {"Sec-Fetch-Site": "same-site"}, 403, id="same-site-no-origin"),
        pytest.param(
            "GET",
            {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"},
            403,
            id="same-site-img",
        ),
        pytest.param("GET", {"Sec-Fetch-Site": "bogus"}, 403, id="unknown-site-value"),
        pytest.param("GET", {"Sec-Fetch-Site": "none"}, 200, id="user-initiated"),
        pytest.param("GET", {}, 200, id="no-browser-headers"),
    ],
)
async def test_browser_requests(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    method: str,
    headers: dict[str, str],
    expected: int,
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    sent = {k: v.format(proxy=proxy.url) for k, v in headers.items()}
    async with client.request(method, proxy.url + "/e/x", headers=sent, data=b"") as resp:
        assert resp.status == expected
        if expected == 403:
            assert await error_code_of(resp) == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in resp.headers
    if expected == 403:
        assert echo.state.requests == []
    else:
        forwarded_once(echo, method, BASE + "/x")


@pytest.mark.parametrize("origin", ["https://evil.com", "http://localhost:3000", "null"])
async def test_cors_preflight_from_a_foreign_origin_is_refused(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, origin: str
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, content-type",
        "Sec-Fetch-Mode": "cors",
    }
    async with client.options(proxy.url + "/e/x", headers=preflight) as resp:
        assert resp.status == 403
        assert await error_code_of(resp) == "origin_not_allowed"
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    assert echo.state.requests == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Origin": "http://localhost:3000"}, 200, id="listed"),
        pytest.param(
            {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"},
            200,
            id="listed-same-site",
        ),
        pytest.param({"Origin": "http://localhost:3001"}, 403, id="other-port"),
        pytest.param({"Origin": "https://localhost:3000"}, 403, id="other-scheme"),
        pytest.param({"Origin": "http://localhost:3000/"}, 403, id="trailing-slash"),
        pytest.param({"Origin": "http://localhost:3000.evil.com"}, 403, id="suffix"),
        pytest.param({"Origin": "http://localhost"}, 403, id="no-port"),
        pytest.param({"Origin": "null"}, 403, id="null"),
        pytest.param(
            {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "cross-site"},
            200,
            id="listed-and-cross-site",
        ),
        pytest.param({"Origin": "HTTP://LOCALHOST:3000"}, 200, id="listed-upper-case"),
        pytest.param({"Sec-Fetch-Site": "same-site"}, 403, id="same-site-without-origin"),
    ],
)
async def test_allowed_origins_admits_exactly_the_listed_origin(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    headers: dict[str, str],
    expected: int,
) -> None:
    proxy = await echo_proxy(start_proxy, echo, allowed_origins=["http://localhost:3000"])
    async with client.post(proxy.url + "/e/x", headers=headers, data=b"payload") as resp:
        assert resp.status == expected
        if expected == 403:
            assert await error_code_of(resp) == "origin_not_allowed"
    if expected == 403:
        assert echo.state.requests == []
    else:
        record = forwarded_once(echo, "POST", BASE + "/x")
        assert record.body_len == len(b"payload")


async def test_a_listed_origin_gets_cors_answers_and_headers(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    origin = "http://localhost:3000"
    proxy = await echo_proxy(
        start_proxy,
        echo,
        route={"allow_methods": ["GET", "HEAD"]},
        allowed_origins=["http://LOCALHOST:3000/".rstrip("/")],
    )
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "x-custom",
        "Sec-Fetch-Site": "same-site",
    }
    async with client.options(proxy.url + "/e/x", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, HEAD"
        assert resp.headers["Access-Control-Allow-Headers"] == "x-custom"
        assert resp.headers["Vary"] == "Origin"
    assert echo.state.requests == []  # answered by the proxy, never forwarded
    headers = {"Origin": origin, "Sec-Fetch-Site": "same-site"}
    async with client.get(proxy.url + "/e/x", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Access-Control-Allow-Origin") == [origin]
        assert "Origin" in resp.headers.getall("Vary")
    async with client.post(proxy.url + "/e/x", headers=headers) as resp:
        assert resp.status == 405  # the proxy's own answer is readable by the page too
        assert resp.headers["Access-Control-Allow-Origin"] == origin
    forwarded_once(echo, "GET", BASE + "/x")


async def test_same_origin_without_origin_counts_as_the_proxys_own(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    """A docs page served through the proxy calls it: listing the proxy's origin
    (`http://` + Host) lets it; nothing else does."""
    port = free_port()
    proxy = await echo_proxy(
        start_proxy, echo, listen={"port": port}, allowed_origins=[f"http://localhost:{port}"]
    )
    same = {"Sec-Fetch-Site": "same-origin"}
    async with client.get(proxy.url + "/e/x", headers={**same, "Host": f"localhost:{port}"}) as r:
        assert r.status == 200
    async with client.get(proxy.url + "/e/x", headers={**same, "Host": "127.0.0.1"}) as r:
        assert r.status == 403
    forwarded_once(echo, "GET", BASE + "/x")


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        pytest.param(
            "/e/x", {"X-HTTP-Method-Override": "DELETE"}, 405, id="x-http-method-override"
        ),
        pytest.param("/e/x", {"X-HTTP-Method": "PUT"}, 405, id="x-http-method"),
        pytest.param("/e/x", {"X-Method-Override": "post"}, 405, id="x-method-override"),
        pytest.param("/e/x?_method=DELETE", {}, 405, id="query"),
        pytest.param("/e/x?a=1&_method=delete", {}, 405, id="query-lower-case"),
        pytest.param("/e/x?%5fmethod=PATCH", {}, 405, id="query-encoded-name"),
        pytest.param("/e/x", {"X-HTTP-Method-Override": "GET"}, 200, id="override-to-allowed"),
        pytest.param("/e/x?_methods=DELETE", {}, 200, id="other-parameter"),
    ],
)
async def test_method_overrides_on_a_read_only_route(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    target: str,
    headers: dict[str, str],
    expected: int,
) -> None:
    proxy = await echo_proxy(start_proxy, echo, route={"allow_methods": ["GET", "HEAD"]})
    async with client.get(proxy.url + target, headers=headers) as resp:
        assert resp.status == expected
        if expected == 405:
            assert await error_code_of(resp) == "method_not_allowed"
            assert resp.headers["Allow"] == "GET, HEAD"
    assert len(echo.state.requests) == (1 if expected == 200 else 0)


async def test_method_overrides_pass_where_every_method_is_allowed(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    async with client.get(proxy.url + "/e/x?_method=DELETE") as resp:
        assert resp.status == 200
    forwarded_once(echo, "GET", BASE + "/x?_method=DELETE")


# == 3. Path and request-target safety =========================================

_CONTROL_ESCAPES = [f"%{i:02x}" for i in range(0x01, 0x20)] + ["%7f", "%7F", "%0D%0A"]

# Dot-segments as the most forgiving upstream decoder reads them (SPEC §4): `;params`
# dropped (Tomcat, Jetty, Spring), decoded once or twice, `%2f`/`%5c` as separators,
# overlong UTF-8, IIS's `%u`.
NEAR_MISS_TAILS = [
    "/..;/x",
    "/.;/x",
    "/x/.;x",
    "/%2e%2e;/x",
    "/%2e%2e;jsessionid=1/x",
    "/..%2fx",
    "/..%2f..%2fetc/passwd",
    "/%2e%2e%2fx",
    "/x%2f..%2fy",
    "/%2e%2e%5cx",
    "/%252e%252e/x",
    "/%252e%252e%252fx",
    "/%25%32%65%25%32%65/x",
    "/%c0%ae%c0%ae/x",
    "/..%c0%afx",
    "/%e0%80%ae%e0%80%ae/x",
    "/%u002e%u002e/x",
    "/x/%u002e",
]

BAD_TARGETS: list[tuple[str, str]] = [
    *[("GET", "/e" + tail) for tail in NEAR_MISS_TAILS],
    ("GET", "/e/../x"),
    ("GET", "/e/./x"),
    ("GET", "/e/x/.."),
    ("GET", "/e/x/."),
    ("GET", "/e/.."),
    ("GET", "/e/x/..?q=1"),
    ("GET", "/e/%2e%2e/x"),
    ("GET", "/e/%2E%2E/x"),
    ("GET", "/e/%2E%2e/x"),
    ("GET", "/e/.%2E/x"),
    ("GET", "/e/%2e./x"),
    ("GET", "/e/%2e/x"),
    ("GET", "/e/%2E"),
    ("GET", "/e/a/%2e%2E/%2E%2e/etc/passwd"),
    ("GET", "/e/a//../x"),
    ("POST", "/e/../upload"),
    ("GET", "http://localhost/e/x"),
    ("GET", "http://127.0.0.1:{port}/e/x"),
    ("GET", "http://evil.com/e/x"),
    ("GET", "https://evil.com/e/x"),
    ("GET", "//evil.com/e/x"),
    ("CONNECT", "evil.com:443"),
    ("CONNECT", "localhost:{port}"),
    ("OPTIONS", "*"),
    ("GET", "/e/a\\b"),
    ("GET", "/e/..\\..\\x"),
    ("GET", "/e/a%5cb"),
    ("GET", "/e/a%5Cb"),
    ("GET", "/e/%5c..%5cx"),
    ("GET", "/e/a%00"),
    ("GET", "/e/a%00b.json"),
    ("GET", "/e/a#fragment"),
    *[("GET", f"/e/a{escape}b") for escape in _CONTROL_ESCAPES],
]


@pytest.mark.parametrize(
    ("method", "target"), [pytest.param(m, t, id=f"{m} {t}") for m, t in BAD_TARGETS]
)
async def test_unsafe_targets_are_400_and_never_forwarded(
    start_proxy: StartProxy, echo: Echo, method: str, target: str
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    data = request_bytes(target.format(port=proxy.port), method=method)
    answer = await exchange(proxy.port, data)
    assert answer.status == 400, answer.raw[:300]
    assert answer.error_code() == "bad_request"
    assert echo.state.requests == []


@pytest.mark.parametrize(
    "tail",
    [
        "/..x",
        "/x..",
        "/...",
        "/.well-known/x",
        "/%2e%2e%2e",
        "/%2ex",
        "/a%2fb",
        "/a%2Fb%20c+d",
        "//evil.com/x",
        "/@evil.com",
        "/a;b=c",
        "/a%3bb",
        "/x..%2fy",
        "/%e2%82%ac",
        "",
        "?q=..%2f",
        "?q=..;/%c0%ae",
    ],
)
async def test_near_misses_are_forwarded_byte_for_byte(
    start_proxy: StartProxy, echo: Echo, tail: str
) -> None:
    """Not over-blocking: these are not dot-segments, and stay under the base path."""
    proxy = await echo_proxy(start_proxy, echo)
    answer = await exchange(proxy.port, request_bytes("/e" + tail))
    assert answer.status == 200, answer.raw[:300]
    forwarded_once(echo, "GET", BASE + tail)


async def test_connect_in_origin_form_is_refused(
    start_proxy: StartProxy, raw_upstream: StartRaw
) -> None:
    """`CONNECT /e/x` has no meaning (CONNECT takes host:port) and must not reach the upstream."""
    upstream = await raw_upstream(answer_ok)
    proxy = await start_proxy({"upstreams": {"e": {"url": upstream.url + BASE}}})
    answer = await exchange(proxy.port, request_bytes("/e/x", method="CONNECT"), within=2)
    request_lines = [h.split(b"\r\n", 1)[0] for h in upstream.heads]
    assert answer.status is not None and 400 <= answer.status < 500, (answer.raw, request_lines)
    assert request_lines == []


# -- the property: whatever the raw path, nothing escapes the base path ----------

_PATH_PIECES = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    st.sampled_from(
        [
            *("%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%00", "%0a", "%0D", "%1f", "%7f"),
            *("%25", "%20", "%3f", "%23", "%40", "%3a", "%2e%2e", "%", "%%32%65", "%252e"),
            *("%c0%ae", "%c0%af", "%u002e", "%252f", "%3b", "%255c", "%e0%80%ae", "%c3%a9"),
        ]
    ),
    st.sampled_from(["/", "//", ".", "..", "/../", "/./", "/..", "/.", "?", "#", ";", "..;"]),
)
RAW_TAILS = st.lists(_PATH_PIECES, max_size=24).map("".join)


def generate_tails(count: int) -> list[str]:
    """Draw `count` raw path tails (after `/e`) with Hypothesis, the known tricks first."""
    tails: list[str] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(RAW_TAILS)
    @example("/..%2f..%2fetc/passwd")
    @example("//evil.com/x")
    @example("/@evil.com")
    @example("/%2e%2e/x")
    @example("/.%2e/.%2E/x")
    @example("/..;/x")
    @example("/%2e%2e%2fx")
    @example("/%252e%252e/x")
    @example("/a/../../x")
    @example("/..")
    @example("/.")
    @example("..")
    @example("/x?../..")
    @example("/x#/../..")
    @example("/%5c..%5cx")
    @example("/\\..\\x")
    @example("")
    @example("/.;x")
    @example("/%c0%ae%c0%ae/x")
    @example("/%u002e%u002e/x")
    @example("/..%c0%afx")
    def collect(tail: str) -> None:
        tails.append(tail)

    collect()
    return tails


def dot_segments_after_decoding(path: str) -> list[str]:
    """Pieces of `path` that some upstream's decoder could read as `.`/`..` (SPEC §4):
    after decoding none, once or twice, split at `/` or `\\`, `;params` dropped; and
    any overlong-UTF-8 or `%u` escape, which some decoders turn into a dot or slash."""
    found = re.findall(r"%(?:c0|c1|e0%[89]|f0%8)|%u[0-9a-f]{4}", path, re.IGNORECASE)
    forms = [path, unquote(path)]
    forms.append(unquote(forms[1]))
    found += re.findall(r"%(?:c0|c1)|%u[0-9a-f]{4}", forms[1], re.IGNORECASE)
    for form in forms:
        found += [p for p in re.split(r"[/\\]", form) if p.split(";", 1)[0] in (".", "..")]
    return found


async def test_property_raw_paths_never_escape_the_base_path(
    start_proxy: StartProxy, echo: Echo
) -> None:
    tails = generate_tails(300)
    assert len(tails) >= 200
    # The base path contains the segment `echo`, so the echo fake always echoes.
    base = "/echo"
    proxy = await echo_proxy(start_proxy, echo, base=base)
    answers: dict[str, Answer] = {}
    gate = asyncio.Semaphore(8)

    async def send(index: int, tail: str) -> None:
        data = request_bytes("/e" + tail, headers=[("X-Request-ID", f"hyp-{index}")])
        async with gate:
            answers[f"hyp-{index}"] = await exchange(proxy.port, data)

    await asyncio.gather(*(send(i, t) for i, t in enumerate(tails)))

    reached: dict[str, RecordedRequest] = {}
    for record in echo.state.requests:
        ids = [v for k, v in record.headers if k.lower() == "x-request-id"]
        assert len(ids) == 1
        reached[ids[0]] = record
        path = record.raw_path.split("?", 1)[0]
        assert path == base or path.startswith(base + "/"), record.raw_path
        assert not dot_segments_after_decoding(path), record.raw_path
        decoded = unquote(path)
        assert "\\" not in decoded, record.raw_path
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded), record.raw_path

    problems: list[tuple[str, int | None, object]] = []
    for index, tail in enumerate(tails):
        request_id = f"hyp-{index}"
        answer = answers[request_id]
        if request_id in reached:
            # Byte for byte: the base path, then the remainder as sent (a fragment
            # and an empty query are not part of what an upstream can see).
            path, _, query = (base + tail.split("#", 1)[0]).partition("?")
            expected = f"{path}?{query}" if query else path
            if answer.status != 200 or reached[request_id].raw_path != expected:
                problems.append((tail, answer.status, reached[request_id].raw_path))
        elif not (
            answer.status is not None
            and 400 <= answer.status < 500
            and answer.error_code() in ("bad_request", "no_route")
        ):
            problems.append((tail, answer.status, answer.raw[:200]))
    assert not problems, problems[:20]


# == 4. Method allow-lists =====================================================


@pytest.mark.parametrize(
    ("method", "forwarded"),
    [
        ("GET", True),
        ("HEAD", True),
        ("POST", False),
        ("PUT", False),
        ("DELETE", False),
        ("PATCH", False),
        ("OPTIONS", False),
        ("TRACE", False),
        ("PURGE", False),
        ("PROPFIND", False),
    ],
)
async def test_read_only_route_over_raw_sockets(
    start_proxy: StartProxy, echo: Echo, method: str, forwarded: bool
) -> None:
    """A read-only route: every other method, with a body or not, stops at the proxy."""
    proxy = await echo_proxy(start_proxy, echo, route={"allow_methods": ["get", "HEAD"]})
    body = b"" if forwarded else b'{"delete": "everything"}'
    data = request_bytes("/e/items/1", method=method, body=body)
    answer = await exchange(proxy.port, data, head=method == "HEAD")
    if forwarded:
        assert answer.status == 200
        forwarded_once(echo, method, BASE + "/items/1")
        return
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.error_code() == "method_not_allowed"
    assert echo.state.requests == []


# == 5. The inbound token ======================================================

_BASIC_TOKEN = base64.b64encode(f"user:{INBOUND_TOKEN}".encode()).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, 407, id="missing"),
        pytest.param("", 407, id="empty"),
        pytest.param("Bearer wrong-token-0000", 407, id="wrong"),
        pytest.param(f"Bearer {INBOUND_TOKEN}x", 407, id="longer"),
        pytest.param(f"Bearer {INBOUND_TOKEN[:-1]}", 407, id="prefix"),
        pytest.param(f"Basic {_BASIC_TOKEN}", 407, id="basic-scheme"),
        pytest.param(f"Basic {INBOUND_TOKEN}", 407, id="basic-scheme-raw-token"),
        pytest.param(INBOUND_TOKEN, 407, id="no-scheme"),
        pytest.param("Bearer", 407, id="scheme-only"),
        pytest.param("Bearer ", 407, id="scheme-and-space"),
        pytest.param(f"Token {INBOUND_TOKEN}", 407, id="other-scheme"),
        pytest.param(f"Bearer {INBOUND_TOKEN}", 200, id="right"),
        pytest.param(f"bearer {INBOUND_TOKEN}", 200, id="scheme-lower-case"),
        pytest.param(f"BEARER {INBOUND_TOKEN}", 200, id="scheme-upper-case"),
    ],
)
async def test_inbound_token(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    value: str | None,
    expected: int,
) -> None:
    proxy = await echo_proxy(
        start_proxy, echo, env=TOKEN_ENV, listen={"require_token": "${PROXY_TOKEN}"}
    )
    headers = {} if value is None else {"Proxy-Authorization": value}
    async with client.get(proxy.url + "/e/x", headers=headers) as resp:
        assert resp.status == expected
        if expected == 407:
            assert await error_code_of(resp) == "proxy_auth_required"
            assert resp.headers["Proxy-Authenticate"].lower().startswith("bearer")
    if expected == 407:
        assert echo.state.requests == []
    else:
        record = forwarded_once(echo, "GET", BASE + "/x")
        assert not header_names(record) & {"proxy-authorization", "authorization"}
        assert all(INBOUND_TOKEN not in v for _, v in record.headers)


@pytest.mark.parametrize(
    ("path", "needs_token"),
    [("/-/health", False), ("/-/status", True), ("/-/metrics", True)],
)
async def test_inbound_token_on_admin_endpoints(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    path: str,
    needs_token: bool,
) -> None:
    proxy = await echo_proxy(
        start_proxy, echo, env=TOKEN_ENV, listen={"require_token": "${PROXY_TOKEN}"}
    )
    async with client.get(proxy.url + path) as resp:
        assert resp.status == (407 if needs_token else 200)
        if needs_token:
            assert await error_code_of(resp) == "proxy_auth_required"
    good = {"Proxy-Authorization": f"Bearer {INBOUND_TOKEN}"}
    async with client.get(proxy.url + path, headers=good) as resp:
        assert resp.status == 200
        assert INBOUND_TOKEN not in await resp.text()
    assert echo.state.requests == []


async def test_inbound_token_is_stripped_even_when_connection_names_it(
    start_proxy: StartProxy, echo: Echo
) -> None:
    proxy = await echo_proxy(
        start_proxy, echo, env=TOKEN_ENV, listen={"require_token": "${PROXY_TOKEN}"}
    )
    headers = [
        ("Proxy-Authorization", f"Bearer {INBOUND_TOKEN}"),
        ("Connection", "keep-alive, X-Keep"),
        ("X-Keep", "1"),
        ("Proxy-Connection", "keep-alive"),
    ]
    answer = await exchange(proxy.port, request_bytes("/e/x", headers=headers))
    assert answer.status == 200
    record = forwarded_once(echo, "GET", BASE + "/x")
    assert not header_names(record) & {"proxy-authorization", "x-keep", "proxy-connection"}
    assert INBOUND_TOKEN.encode() not in answer.raw


async def test_inbound_token_with_non_utf8_bytes_is_407(
    start_proxy: StartProxy, echo: Echo
) -> None:
    proxy = await echo_proxy(
        start_proxy, echo, env=TOKEN_ENV, listen={"require_token": "${PROXY_TOKEN}"}
    )
    data = request_bytes("/e/x", headers=[("Proxy-Authorization", "Bearer \xff\xfe")])
    answer = await exchange(proxy.port, data)
    assert echo.state.requests == []
    assert answer.status == 407
    assert answer.error_code() == "proxy_auth_required"


# == 6. Token endpoints over plain HTTP: config validation, in tests/unit/test_config.py


# == 7. Malformed HTTP ==========================================================

_SMUGGLED = b"GET /e/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
_RNG_BYTES = random.Random(1234).randbytes(600)
_TLS_HELLO = bytes.fromhex(
    "16030100c4010000c00303" + "5a" * 32 + "000020c02bc02fc02cc030cca9cca8c013c014009c009d"
    "002f0035000a01000077000000150013000010617069322e6578616d706c652e636f6d"
)

MALFORMED: list[tuple[str, bytes]] = [
    (
        "cl-then-te-smuggle",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(_SMUGGLED), _SMUGGLED),
    ),
    (
        "te-then-cl-smuggle",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(_SMUGGLED), _SMUGGLED),
    ),
    (
        "te-obfuscated-smuggle",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + _SMUGGLED,
    ),
    (
        "te-chunked-identity",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + _SMUGGLED,
    ),
    (
        "te-xchunked",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc" + _SMUGGLED,
    ),
    (
        "two-content-lengths",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n%s" % (len(_SMUGGLED), _SMUGGLED),
    ),
    (
        "content-length-list",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0, %d\r\n\r\n%s"
        % (len(_SMUGGLED), _SMUGGLED),
    ),
    (
        "content-length-negative",
        b"POST /e/upload HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ),
    (
        "content-length-plus",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: +3\r\n\r\nabc",
    ),
    (
        "bad-chunk-size",
        b"POST /e/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
    ),
    ("space-before-colon", b"GET /e/x HTTP/1.1\r\nHost : evil.com\r\n\r\n"),
    ("duplicate-host", b"GET /e/x HTTP/1.1\r\nHost: localhost\r\nHost: evil.com\r\n\r\n"),
    ("obs-fold", b"GET /e/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n"),
    ("bare-cr", b"GET /e/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\rX-B: b\r\n\r\n"),
    ("nul-in-header", b"GET /e/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n"),
    ("nul-in-method", b"G\x00T /e/x HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    (
        "header-line-9000",
        b"GET /e/x HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    ),
    (
        "header-name-9000",
        b"GET /e/x HTTP/1.1\r\nHost: localhost\r\n" + b"X" * 9000 + b": a\r\n\r\n",
    ),
    ("request-line-9000", b"GET /e/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    (
        "101-headers",
        b"GET /e/x HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        + b"\r\n",
    ),
    ("tls-client-hello", _TLS_HELLO),
    ("random-bytes", _RNG_BYTES),
    ("http-9.9", b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n"),
    ("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("no-version-foreign-host", b"GET /e/x\r\nHost: evil.com\r\n\r\n"),
    ("lower-case-method", b"get /e/x HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    ("bare-lf-request-line", b"GET /e/x HTTP/1.1\nHost: localhost\n\n"),
]


# What each is answered (SPEC §4: every error JSON, including the parser's); the rest
# are 400 bad_request.
MALFORMED_ANSWER = {
    "header-line-9000": (431, "headers_too_large"),
    "header-name-9000": (431, "headers_too_large"),
    "101-headers": (431, "headers_too_large"),
    "request-line-9000": (414, "uri_too_long"),
    "no-version-foreign-host": (403, "host_not_allowed"),
}


@pytest.mark.parametrize("data", [pytest.param(d, id=name) for name, d in MALFORMED])
async def test_malformed_requests_are_refused_and_nothing_slips_through(
    request: pytest.FixtureRequest,
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    data: bytes,
) -> None:
    name = request.node.callspec.id
    proxy = await echo_proxy(start_proxy, echo, listen={"idle_timeout": 2})
    answer = await exchange(proxy.port, data, within=3)
    status, code = MALFORMED_ANSWER.get(name, (400, "bad_request"))
    assert (answer.status, answer.error_code()) == (status, code), answer.raw[:300]
    assert b"bytearray" not in answer.body  # the parser's own words quote raw bytes
    assert [r.raw_path for r in echo.state.requests] == []
    async with client.get(proxy.url + "/e/after") as resp:
        assert resp.status == 200
    forwarded_once(echo, "GET", BASE + "/after")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        pytest.param(request_bytes("/e/" + "a" * 16384), 414, "uri_too_long", id="16k-url"),
        pytest.param(
            request_bytes("/e/x", headers=[(f"X-H{i}", "v") for i in range(200)]),
            431,
            "headers_too_large",
            id="200-headers",
        ),
        pytest.param(
            request_bytes("/e/x", headers=[("X-Big", "b" * 65536)]),
            431,
            "headers_too_large",
            id="64k-header",
        ),
    ],
)
async def test_parser_refusals_are_json_with_an_access_line(
    start_proxy: StartProxy,
    echo: Echo,
    capsys: pytest.CaptureFixture[str],
    data: bytes,
    status: int,
    code: str,
) -> None:
    proxy = await echo_proxy(start_proxy, echo)
    answer = await exchange(proxy.port, data, within=3)
    assert (answer.status, answer.error_code()) == (status, code)
    await asyncio.sleep(0)  # the access line is flushed once per loop turn
    lines = [r for r in access_lines(capsys.readouterr().out) if r.get("error") == code]
    assert [(r["status"], r["request_id"]) for r in lines] == [
        (status, answer.headers["x-request-id"])
    ]
    assert echo.state.requests == []


async def test_slowloris_is_cut_off_by_idle_timeout(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    proxy = await echo_proxy(start_proxy, echo, listen={"idle_timeout": 1})
    loop = asyncio.get_running_loop()

    async def trickle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = loop.time()
        try:
            writer.write(b"GET /e/x HTTP/1.1\r\nHost: localhost\r\n")
            for i in range(40):  # 8 s of headers if nobody stops us
                await asyncio.sleep(0.2)
                writer.write(b"X-Slow-%d: %d\r\n" % (i, i))
                await writer.drain()
                if reader.at_eof():
                    break
            await asyncio.wait_for(reader.read(), 1)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
        return loop.time() - started

    async def idle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = loop.time()
        with suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return loop.time() - started

    slow, quiet = await asyncio.gather(trickle(), idle())
    assert slow < 2.5, f"slowloris connection lived {slow:.2f} s"
    assert quiet < 2.5, f"idle connection lived {quiet:.2f} s"
    assert echo.state.requests == []
    async with client.get(proxy.url + "/e/after") as resp:
        assert resp.status == 200
    forwarded_once(echo, "GET", BASE + "/after")


# == 8. Upstream faults ========================================================

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A hand-written HTTP/1.1 server: records each request head, then misbehaves."""

    server: asyncio.Server
    port: int
    heads: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    ended: list[float] = field(default_factory=list)  # monotonic time each connection ended
    errors: list[str] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


StartRaw = Callable[[Behaviour], Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRaw]:
    running: list[RawUpstream] = []

    async def start(behaviour: Behaviour) -> RawUpstream:
        holder: list[RawUpstream] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream = holder[0]
            task = asyncio.current_task()
            assert task is not None
            upstream.tasks.add(task)
            upstream.writers.append(writer)
            try:
                upstream.heads.append(await reader.readuntil(b"\r\n\r\n"))
                await behaviour(reader, writer)
                writer.transport.set_write_buffer_limits(high=0)
                await writer.drain()  # deliver all that was written before the abort
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                upstream.errors.append(type(e).__name__)
            finally:
                upstream.ended.append(time.monotonic())
                writer.transport.abort()
                upstream.tasks.discard(task)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        upstream = RawUpstream(server, server.sockets[0].getsockname()[1])
        holder.append(upstream)
        running.append(upstream)
        return upstream

    yield start
    for upstream in running:
        upstream.server.close()
        for writer in upstream.writers:
            writer.transport.abort()  # handlers waiting for EOF end on their own
        pending = list(upstream.tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=2)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await upstream.server.wait_closed()


async def until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def set_reset_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()


async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    set_reset_on_close(writer)


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def bad_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    await until_eof(reader)


async def garbage_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_RNG_BYTES)
    await writer.drain()
    await until_eof(reader)


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await until_eof(reader)


async def status_line_then_silence(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    await writer.drain()
    await until_eof(reader)


def breaks_mid_body(declared: int, *, reset: bool) -> Behaviour:
    """Announce `declared` bytes, send 10, then reset the connection or go silent."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + b"x" * 10)
        await writer.drain()
        if reset:
            await asyncio.sleep(0.1)
            set_reset_on_close(writer)
        else:
            await until_eof(reader)

    return behaviour


async def endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    payload = bytes(range(256)) * 256
    chunk = b"%x\r\n%s\r\n" % (len(payload), payload)
    while True:
        writer.write(chunk)
        await writer.drain()


async def fault_proxy(start_proxy: StartProxy, echo: Echo, url: str) -> RunningProxy:
    return await start_proxy(
        {
            "upstreams": {
                "bad": {"url": url + BASE, "timeout": {"connect": 2, "read": 0.5}},
                "e": {"url": echo.url + BASE},
            }
        }
    )


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        pytest.param(None, 502, "upstream_unreachable", id="connection-refused"),
        pytest.param(reset_at_once, 502, "upstream_unreachable", id="reset-before-response"),
        pytest.param(close_at_once, 502, "upstream_unreachable", id="close-before-response"),
        pytest.param(bad_status_line, 502, "upstream_unreachable", id="invalid-status-line"),
        pytest.param(garbage_answer, 502, "upstream_unreachable", id="garbage-answer"),
        pytest.param(never_answer, 504, "upstream_timeout", id="slower-than-read-timeout"),
        pytest.param(status_line_then_silence, 504, "upstream_timeout", id="stalls-in-head"),
    ],
)
async def test_upstream_fails_before_the_response(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    raw_upstream: StartRaw,
    behaviour: Behaviour | None,
    status: int,
    code: str,
) -> None:
    upstream = None if behaviour is None else await raw_upstream(behaviour)
    url = f"http://127.0.0.1:{free_port()}" if upstream is None else upstream.url
    proxy = await fault_proxy(start_proxy, echo, url)
    async with client.post(proxy.url + "/bad/x?q=1", data=b"hello") as resp:
        assert resp.status == status
        assert await error_code_of(resp) == code
    if upstream is not None:
        assert upstream.heads, "the request never reached the raw upstream"
        assert {h.split(b"\r\n", 1)[0] for h in upstream.heads} == {b"POST /base/x?q=1 HTTP/1.1"}
    async with client.get(proxy.url + "/e/after") as resp:
        assert resp.status == 200
    forwarded_once(echo, "GET", BASE + "/after")


@pytest.mark.parametrize(
    ("declared", "reset"),
    [
        pytest.param(1000, True, id="small-reset"),
        pytest.param(
            1000,
            False,
            id="small-stall",
        ),
        pytest.param(4 * 1024 * 1024, True, id="large-reset"),
        pytest.param(4 * 1024 * 1024, False, id="large-stall"),
    ],
)
async def test_upstream_fails_mid_body(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    raw_upstream: StartRaw,
    declared: int,
    reset: bool,
) -> None:
    """Never a silently short body: a JSON 502/504 if the proxy still can, else a cut."""
    upstream = await raw_upstream(breaks_mid_body(declared, reset=reset))
    proxy = await fault_proxy(start_proxy, echo, upstream.url)
    async with client.get(proxy.url + "/bad/x") as resp:
        if resp.status == 200:  # the headers were already on their way: cut the body
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        else:
            # A small body may be buffered, so the failure can still be reported.
            assert declared < 1024 * 1024, "a large body must be streamed, not buffered"
            expected = ("upstream_unreachable", 502) if reset else ("upstream_timeout", 504)
            assert (await error_code_of(resp), resp.status) == expected
    assert len(upstream.heads) == 1
    await wait_until(lambda: not pool_in_use(proxy), what="upstream connection released")
    async with client.get(proxy.url + "/e/after") as resp:
        assert resp.status == 200
    forwarded_once(echo, "GET", BASE + "/after")


async def test_client_leaving_an_endless_body_closes_the_upstream_connection(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(endless_body)
    proxy = await fault_proxy(start_proxy, echo, upstream.url)
    async with client.get(proxy.url + "/e/warm-up") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.05)
    baseline = len(asyncio.all_tasks())

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request_bytes("/bad/stream"))
    await writer.drain()
    received = 0
    while received < 1024 * 1024:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "the proxy ended the endless body"
        received += len(chunk)
    assert pool_in_use(proxy) in (1, None)
    writer.close()
    left_at = time.monotonic()
    with suppress(ConnectionError):
        await writer.wait_closed()

    await wait_until(lambda: upstream.ended, 5, what="the upstream saw the disconnect")
    assert upstream.ended[0] - left_at < 5
    assert upstream.errors, "the upstream's writes should have failed"
    await wait_until(lambda: not pool_in_use(proxy), 3, what="pool slot released")
    await wait_until(
        lambda: len(asyncio.all_tasks()) <= baseline, 3, what=f"tasks back to {baseline}"
    )
    async with client.get(proxy.url + "/e/after") as resp:
        assert resp.status == 200
    assert [r.raw_path for r in echo.state.requests] == [BASE + "/warm-up", BASE + "/after"]


# == 9. Fault isolation ========================================================


@pytest.mark.parametrize("failure", ["500", "hang"])
async def test_a_failing_token_endpoint_does_not_disturb_other_upstreams(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, failure: str
) -> None:
    async with await start_getpaid(GetpaidState()) as getpaid:
        getpaid.state.token_failure = failure
        proxy = await start_proxy(
            {
                "upstreams": {
                    "gp": {
                        "url": getpaid.url,
                        "timeout": {"connect": 2, "read": 1},
                        "auth": {
                            "type": "oauth2_client_credentials",
                            "token_url": getpaid.token_url,
                            "client_id": getpaid.state.client_id,
                            "client_secret": "${GETPAID_SECRET}",
                            "audience": getpaid.state.audience,
                            "body_format": "json",
                        },
                    },
                    "e": {"url": echo.url + BASE},
                }
            },
            env={"GETPAID_SECRET": getpaid.state.client_secret},
        )
        stop = asyncio.Event()
        failed_answers: list[int] = []

        async def hammer_getpaid() -> None:
            while not stop.is_set():
                async with client.get(proxy.url + "/gp/accounts") as resp:
                    failed_answers.append(resp.status)
                    await resp.read()

        async def one(i: int) -> int:
            async with client.get(proxy.url + f"/e/item/{i}") as resp:
                body = await resp.json()
                assert body["raw_path"] == f"{BASE}/item/{i}"
                return resp.status

        hammers = [asyncio.create_task(hammer_getpaid()) for _ in range(4)]
        statuses: list[int] = []
        started = time.monotonic()
        try:
            for batch in range(10):
                statuses += await asyncio.gather(*(one(batch * 100 + i) for i in range(100)))
        finally:
            stop.set()
            await asyncio.gather(*hammers)
        elapsed = time.monotonic() - started

    assert statuses == [200] * 1000
    assert len(echo.state.requests) == 1000
    assert failed_answers, "the failing upstream was not exercised"
    assert set(failed_answers) <= {502, 503}, set(failed_answers)
    # Backoff: 1 s doubling, so only a handful of token requests in the whole run.
    assert 1 <= getpaid.state.token_requests <= 2 + elapsed, getpaid.state.token_requests
    assert getpaid.state.resource_requests == 0


# == 10. Fuzz ===================================================================

FUZZ_COUNT = 3000
_FUZZ_METHODS = [
    *["GET"] * 6,
    *["POST"] * 3,
    "HEAD",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "PURGE",
    "CONNECT",
    "PRI",
    "get",
    "G\x00T",
    "GET GET",
    "",
    "\x16\x03\x01",
    "X" * 300,
]
_FUZZ_TARGETS = [
    *["/e" + tail for tail in NEAR_MISS_TAILS],
    *["/e/x", "/e/echo/a", "/e", "/e/", "/e?q=1", "/e/a%2Fb%20c"] * 3,
    "/e/../x",
    "/e/%2e%2e/x",
    "/e/%2E%2e/x",
    "/e/.%2E/x",
    "/e/./x",
    "/e/..%2f..%2fetc/passwd",
    "/e//evil.com/x",
    "/e/@evil.com",
    "/e/..;/x",
    "/e/%252e%252e/x",
    "/e/%5c..%5cx",
    "/e/\\..\\x",
    "/e/%00",
    "/e/%0d%0aX-Injected:%201",
    "/e/x#frag",
    "/e/x?#",
    "/e/%",
    "/e/%%32%65",
    "/e/status/500",
    "/e/redirect?to=http://evil.com/",
    "/-/health",
    "/-/status",
    "/-/../e/x",
    "/nowhere",
    "/",
    "*",
    "//evil.com/e/x",
    "http://localhost/e/x",
    "http://evil.com/e/x",
    "https://127.0.0.1/e/x",
    "evil.com:443",
    "localhost:80",
    "e/x",
    "?x",
    "",
    "/e/" + "a" * 9000,
]
_FUZZ_VERSIONS = [
    *["HTTP/1.1"] * 8,
    "HTTP/1.0",
    "HTTP/0.9",
    "HTTP/2.0",
    "HTTP/9.9",
    "HTTP/1.1x",
    "http/1.1",
    "HTTP/01.1",
    "HTTP/1.1 extra",
    "",
]
_FUZZ_HEADERS = [
    "X-Ok: 1",
    "Accept: */*",
    "Host: evil.com",
    "Host: localhost",
    "Host:",
    "Origin: https://evil.com",
    "Sec-Fetch-Site: cross-site",
    "Proxy-Authorization: Bearer nope",
    "Authorization: Bearer client",
    "Cookie: a=b",
    "Connection: close",
    "Connection: keep-alive, Host",
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "Content-Length: 5",
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Content-Length: 1e3",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: chunked, identity",
    "Transfer-Encoding: xchunked",
    "Transfer-Encoding : chunked",
    "X-Request-ID: ../../etc",
    "X-Request-ID: " + "r" * 500,
    "X-A: a\x00b",
    "X-A: a\rX-B: b",
    "X-A: a\nX-B: b",
    "X-A: a\r\n b",
    "Bad Header: x",
    ": novalue",
    "NoColon",
    "X-\xff: \xfe",
    "X-Big: " + "b" * 9000,
]
_FUZZ_BODIES = [
    b"",
    b"hello",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\nabc\r\n0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    b"0\r\n\r\n" + _SMUGGLED,
    _SMUGGLED,
]


_PLAIN_METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
# Well-formed header lines with hostile meaning: these get past the HTTP parser.
_SOFT_HEADERS = [
    "X-Ok: 1",
    "Accept: */*",
    "Origin: https://evil.com",
    "Origin: null",
    "Sec-Fetch-Site: cross-site",
    "Sec-Fetch-Site: same-origin",
    "Proxy-Authorization: Bearer nope",
    "Authorization: Bearer client",
    "Cookie: a=b",
    "Connection: close",
    "Connection: keep-alive, X-Ok",
    "Connection: Proxy-Authorization, Host",
    "Proxy-Connection: keep-alive",
    "Keep-Alive: timeout=1",
    "TE: trailers",
    "Upgrade: h2c",
    "Expect: 100-continue",
    "X-Forwarded-Host: evil.com",
    "X-Forwarded-For: 10.0.0.1",
    "X-Original-URL: /../admin",
    "X-Rewrite-URL: //evil.com/",
    "X-HTTP-Method-Override: DELETE",
    "X-Request-ID: ../../etc",
    "X-Request-ID: " + "r" * 500,
    "Content-Type: application/json",
]
_FUZZ_HOSTS = ["localhost"] * 12 + ["evil.com", "127.0.0.1:1", "[::1]:80", "", "LOCALHOST"]


def _chunked(body: bytes, rng: random.Random) -> bytes:
    out = b""
    while body:
        size = rng.randint(1, max(1, len(body)))
        out += b"%x\r\n%s\r\n" % (size, body[:size])
        body = body[size:]
    return out + b"0\r\n\r\n"


def fuzz_request(rng: random.Random) -> bytes:
    """One hostile request: every part possibly broken, or well-formed but hostile."""
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randint(1, 400))
    if roll < 0.08:
        return (
            b"GET /e/x HTTP/1.1\r\nHost: localhost\r\n"
            + b"X-H: v\r\n" * rng.randint(90, 130)
            + b"\r\n"
        )
    chaos = roll > 0.55  # otherwise the framing is valid and only the meaning is hostile
    target = rng.choice(_FUZZ_TARGETS)
    if rng.random() < 0.3:
        target += "".join(rng.choice("/.%2eE5cC0a?#@;\\x") for _ in range(rng.randint(1, 12)))
    if chaos and rng.random() < 0.2:
        target += rng.randbytes(rng.randint(1, 8)).decode("latin-1")
    method = rng.choice(_FUZZ_METHODS if chaos else _PLAIN_METHODS)
    version = rng.choice(_FUZZ_VERSIONS) if chaos else "HTTP/1.1"
    eol = "\r\n"
    if chaos and rng.random() < 0.2:
        eol = rng.choice(["\n", "\r", "\r\r\n", "\n\r"])
    lines = [f"{method} {target} {version}".rstrip()]
    if rng.random() < 0.95:
        lines.append("Host: " + rng.choice(_FUZZ_HOSTS))
    lines += rng.sample(_FUZZ_HEADERS if chaos else _SOFT_HEADERS, rng.randint(0, 4))
    if chaos:
        body = rng.choice(_FUZZ_BODIES)
        if body and rng.random() < 0.5:
            lines.append(f"Content-Length: {len(body)}")
    else:
        payload = rng.randbytes(rng.choice([0, 0, 1, 100, 5000]))
        if payload and rng.random() < 0.5:
            lines.append("Transfer-Encoding: chunked")
            body = _chunked(payload, rng)
        elif payload:
            lines.append(f"Content-Length: {len(payload)}")
            body = payload
        else:
            body = b""
    head = (eol.join(lines) + eol + eol).encode("latin-1")
    return head + body


async def test_fuzz_hostile_requests(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession
) -> None:
    base = "/echo"  # contains the segment `echo`: whatever reaches the fake is echoed
    proxy = await echo_proxy(start_proxy, echo, base=base, listen={"idle_timeout": 1})
    rng = random.Random(20240611)
    requests = [fuzz_request(rng) for _ in range(FUZZ_COUNT)]
    answers: list[Answer] = []
    gate = asyncio.Semaphore(48)
    started = time.monotonic()

    async def send(data: bytes) -> None:
        head = data.startswith(b"HEAD ")
        async with gate:
            answers.append(await exchange(proxy.port, data, within=1.0, head=head))

    await asyncio.gather(*(send(d) for d in requests))
    elapsed = time.monotonic() - started

    statuses = [a.status for a in answers]
    assert len(answers) == FUZZ_COUNT
    assert elapsed < 30, f"fuzz took {elapsed:.1f} s"
    # The proxy never failed on its own account (500 internal_error, SPEC §4: a bug of
    # ours): the code is in the body, so read the body, not the head.
    own_500 = [a.raw[:400] for a in answers if a.status == 500 and b"internal_error" in a.body]
    assert not own_500, (len(own_500), own_500[:5])
    # ... refused plenty, forwarded some ...
    assert sum(1 for s in statuses if s is not None and 400 <= s < 500) > 500
    assert statuses.count(200) > 100
    # ... and nothing it forwarded left the base path or carried a smuggled request.
    for record in echo.state.requests:
        path = record.raw_path.split("?", 1)[0]
        assert path == base or path.startswith(base + "/"), record.raw_path
        assert not dot_segments_after_decoding(path), record.raw_path
        # (`/e/smuggled` may arrive: after an unambiguous body it is a legitimately
        # pipelined request; ambiguous framing is covered case by case above.)
        leaked = header_names(record) & {"authorization", "proxy-authorization", "cookie"}
        assert not leaked, (record.raw_path, leaked)
    # Still alive and still correct.
    async with client.get(proxy.url + "/-/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    echo.state.requests.clear()
    async with client.get(proxy.url + "/e/final?x=1") as resp:
        assert resp.status == 200
        assert (await resp.json())["raw_path"] == base + "/final?x=1"
    forwarded_once(echo, "GET", base + "/final?x=1")

"""The generic echo upstream used by the proxy-core tests."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import time
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from proxy.fakes import (
    CHUNK_SIZE,
    EchoState,
    RunningFake,
    create_echo_app,
    echo_endpoint,
    pattern_chunks,
    pattern_sha256,
    serve,
)


@pytest.fixture
async def echo() -> AsyncIterator[tuple[RunningFake, EchoState]]:
    state = EchoState()
    async with await serve(create_echo_app(state)) as running:
        yield running, state


Echo = tuple[RunningFake, EchoState]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/echo", ("echo", None)),
        ("/base/echo/x/y?q=1", ("echo", None)),
        ("/echo/status/500", ("echo", None)),
        ("/base/bytes/10", ("bytes", "10")),
        ("/chunked/7", ("chunked", "7")),
        ("/a/b/status/418", ("status", "418")),
        ("/upload", ("upload", None)),
        ("/deep/base/redirect?to=/x", ("redirect", None)),
        ("/status-401-once", ("status-401-once", None)),
        ("/base/%68op", ("hop", None)),
        ("/anything/else", ("echo", None)),
        ("/", ("echo", None)),
    ],
)
def test_dispatch_rule(path: str, expected: tuple[str, str | None]) -> None:
    assert echo_endpoint(path) == expected


@pytest.mark.parametrize("base", ["", "/base", "/deep/base/path"])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_echo_any_method_any_base(
    session: aiohttp.ClientSession, echo: Echo, base: str, method: str
) -> None:
    server, state = echo
    body = b"" if method in ("GET", "OPTIONS") else b"hello body"
    async with session.request(method, f"{server.url}{base}/echo/x", data=body) as r:
        assert r.status == 200
        data = await r.json()
    assert data["method"] == method
    assert data["raw_path"] == f"{base}/echo/x"
    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    rec = state.requests[-1]
    assert (rec.method, rec.raw_path, rec.body_len) == (method, f"{base}/echo/x", len(body))
    assert rec.body == b""  # only length and digest are kept


async def test_raw_path_and_headers_byte_for_byte(
    session: aiohttp.ClientSession, echo: Echo
) -> None:
    server, state = echo
    raw = "/b/echo/a%2Fb/%7Euser/caf%C3%A9?x=%2F&y=a+b&z=%20&empty=&flag"
    headers = [("X-Dup", "1"), ("X-Other", "o"), ("X-Dup", "2"), ("x-lower", "v")]
    async with session.get(URL(server.url + raw, encoded=True), headers=headers) as r:
        data = await r.json()
    assert data["raw_path"] == raw
    got = [tuple(h) for h in data["headers"]]
    assert [h for h in got if h[0].lower().startswith("x-")] == headers
    assert state.requests[-1].header_values("X-DUP") == ["1", "2"]


async def test_bytes_with_content_length(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    n = 5 * CHUNK_SIZE + 123
    digest = hashlib.sha256()
    async with session.get(f"{server.url}/base/bytes/{n}") as r:
        assert r.status == 200
        assert r.content_length == n
        async for chunk in r.content.iter_chunked(CHUNK_SIZE):
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(n)
    async with session.get(f"{server.url}/bytes/0") as r:
        assert await r.read() == b""
    async with session.get(f"{server.url}/bytes/nope") as r:
        assert r.status == 400


async def test_bytes_head(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    async with session.head(f"{server.url}/bytes/1000000") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "1000000"
        assert await r.read() == b""


async def test_chunked_has_no_content_length(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    n = 3 * CHUNK_SIZE + 1
    async with session.get(f"{server.url}/x/chunked/{n}") as r:
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"
        body = await r.read()
    assert len(body) == n
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(n)


async def test_upload_streams(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, state = echo
    digest = hashlib.sha256()
    chunks = [bytes([i]) * 100_000 for i in range(30)]
    for c in chunks:
        digest.update(c)

    async def gen() -> AsyncIterator[bytes]:
        for c in chunks:
            yield c

    async with session.put(f"{server.url}/base/upload", data=gen()) as r:
        assert r.status == 200
        data = await r.json()
    assert data == {"body_len": 3_000_000, "body_sha256": digest.hexdigest()}
    assert state.requests[-1].body_len == 3_000_000
    async with session.get(f"{server.url}/upload") as r:
        assert r.status == 405


@pytest.mark.parametrize(
    "to", ["/base/elsewhere?a=1", "http://127.0.0.1:1/base/x", "https://other.example/y", "rel"]
)
async def test_redirect_location_verbatim(
    session: aiohttp.ClientSession, echo: Echo, to: str
) -> None:
    server, _ = echo
    url = URL(f"{server.url}/base/redirect").with_query({"to": to, "status": "307"})
    async with session.get(url, allow_redirects=False) as r:
        assert r.status == 307
        assert r.headers["Location"] == to
    async with session.get(
        URL(f"{server.url}/redirect").with_query({"to": to}), allow_redirects=False
    ) as r:
        assert r.status == 302


@pytest.mark.parametrize("code", [200, 201, 204, 304, 400, 404, 418, 500, 503])
async def test_status(session: aiohttp.ClientSession, echo: Echo, code: int) -> None:
    server, _ = echo
    async with session.get(f"{server.url}/base/status/{code}") as r:
        assert r.status == code
        body = await r.read()
    if code in (204, 304):
        assert body == b""
    else:
        assert json.loads(body) == {"status": code}


async def test_slow(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    started = time.monotonic()
    async with session.get(f"{server.url}/slow?seconds=0.3") as r:
        assert r.status == 200
    assert time.monotonic() - started >= 0.3
    async with session.get(f"{server.url}/slow?seconds=-1") as r:
        assert r.status == 400


async def test_slow_is_cancelled_when_client_leaves(
    session: aiohttp.ClientSession, echo: Echo
) -> None:
    server, state = echo
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(
            f"{server.url}/slow?seconds=30", timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass
    for _ in range(50):
        if state.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert state.in_flight == 0
    assert state.max_in_flight == 1


async def test_slowbody_sends_headers_first(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    started = time.monotonic()
    async with session.get(f"{server.url}/b/slowbody?seconds=0.4") as r:
        assert r.status == 200
        first = await r.content.readline()
        t_first = time.monotonic() - started
        rest = await r.read()
        t_rest = time.monotonic() - started
    assert first == b"first chunk\n"
    assert rest == b"rest of the body\n"
    assert t_first < 0.3 <= 0.4 <= t_rest


async def test_gzip_passes_compressed(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    async with session.get(f"{server.url}/base/gzip") as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Type"] == "application/json"
        raw = await r.read()  # the session does not auto-decompress
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["compressed"] is True


async def test_hop_by_hop_headers_sent(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    async with session.get(f"{server.url}/base/hop") as r:
        raw = {k.decode(): v.decode() for k, v in r.raw_headers}
        await r.read()
    assert raw["Connection"] == "close, X-Hop"
    assert raw["X-Hop"] == "1"
    assert raw["Keep-Alive"] == "timeout=5"
    assert raw["Trailer"] == "X-T"
    assert raw["Upgrade"] == "h2c"
    assert raw["Proxy-Connection"] == "keep-alive"
    assert raw["X-Normal"] == "yes"


async def test_cookie_header_repeated(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, _ = echo
    async with session.get(f"{server.url}/cookie") as r:
        values = r.headers.getall("Set-Cookie")
        await r.read()
    assert values == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


async def test_status_401_once_per_key(session: aiohttp.ClientSession, echo: Echo) -> None:
    server, state = echo

    async def status(key: str) -> int:
        async with session.get(f"{server.url}/b/status-401-once", headers={"X-Test-Key": key}) as r:
            return r.status

    assert [await status("a"), await status("a"), await status("b"), await status("a")] == [
        401,
        200,
        401,
        200,
    ]
    assert state.seen_401_keys == {"a", "b"}


async def test_streaming_memory_stays_flat(session: aiohttp.ClientSession, echo: Echo) -> None:
    """32 MB down and 32 MB up never make the process hold more than a few MB."""
    server, _ = echo
    n = 32 * 1024 * 1024

    async def gen() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(n):
            yield chunk

    tracemalloc.start()
    try:
        async with session.get(f"{server.url}/chunked/{n}") as r:
            size = 0
            async for chunk in r.content.iter_chunked(CHUNK_SIZE):
                size += len(chunk)
        async with session.post(f"{server.url}/upload", data=gen()) as r:
            data = await r.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == n
    assert data["body_len"] == n
    assert peak < 8 * 1024 * 1024, peak

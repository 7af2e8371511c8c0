"""The access line and `request_debug` (SPEC §5): what a person debugging with curl reads.

Every proxied request has one `request_finished` line whose `status` and `bytes`
are what the client received; a refused or failed one names its route and its
error code; at `log.level: debug` a `request_debug` line says what was sent where,
with a fingerprint of the credential that changes exactly when the token does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.fakes import DidomiState, SeedFake, start_didomi
from proxy.logs import ConsoleLines
from tests.conftest import Echo, StartProxy, log_lines

HEADER_AUTH = {"type": "header", "name": "X-Api-Key", "value": "${HDR}"}
SECRET = "access-log-header-secret"


def records(capsys: pytest.CaptureFixture[str], event: str) -> list[dict[str, Any]]:
    return [r for r in log_lines(capsys.readouterr().out) if r.get("event") == event]


def split(out: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    lines = log_lines(out)
    return (
        [r for r in lines if r.get("event") == "request_finished"],
        [r for r in lines if r.get("event") == "request_debug"],
    )


@pytest.fixture
async def echo_route(start_proxy: StartProxy, echo: Echo) -> Any:
    upstream = {"url": echo.url + "/base", "auth": HEADER_AUTH, "allow_methods": ["GET"]}
    return await start_proxy({"upstreams": {"e": upstream}}, env={"HDR": SECRET})


async def test_a_refused_request_names_its_route_and_error(
    echo_route: Any, echo: Echo, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    cases = [
        ("GET", "/e/echo/x", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
        ("GET", "/e/echo/x", {"Host": "rebind.example"}, 403, "host_not_allowed"),
        ("DELETE", "/e/echo/x", {}, 405, "method_not_allowed"),
        ("GET", "/e/a/../b", {}, 400, "bad_request"),
        ("GET", "/nowhere", {}, 404, "no_route"),
    ]
    received = []
    for method, path, headers, _, _ in cases:
        url = URL(echo_route.url + path, encoded=True)
        async with client.request(method, url, headers=headers) as resp:
            received.append((resp.status, len(await resp.read())))
    lines = records(capsys, "request_finished")
    assert len(lines) == len(cases)
    for line, (_, path, _, status, code), (got_status, got_bytes) in zip(
        lines, cases, received, strict=True
    ):
        assert (line["status"], line["error"]) == (status, code)
        assert (line["status"], line["bytes"]) == (got_status, got_bytes)
        assert line["upstream"] == (None if path == "/nowhere" else "e")
    assert echo.state.requests == []


async def test_an_upstream_failure_carries_its_error_code(
    start_proxy: StartProxy, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket_listening() as port:  # bound, never accepting: then closed → refused
        pass
    proxy = await start_proxy({"upstreams": {"dead": {"url": f"http://127.0.0.1:{port}"}}})
    capsys.readouterr()
    async with client.get(proxy.url + "/dead/x") as resp:
        body = await resp.read()
    (line,) = records(capsys, "request_finished")
    assert resp.status == 502
    assert (line["upstream"], line["status"], line["error"]) == (
        "dead",
        502,
        "upstream_unreachable",
    )
    assert line["bytes"] == len(body)


async def test_admin_endpoints_log_the_bytes_they_sent(
    echo_route: Any, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    sizes = []
    for path in ("/-/health", "/-/status", "/-/metrics"):
        async with client.get(echo_route.url + path) as resp:
            assert resp.status == 200
            sizes.append(len(await resp.read()))
    lines = records(capsys, "request_finished")
    assert [line["bytes"] for line in lines] == sizes
    assert all(size > 0 for size in sizes)
    assert all("error" not in line and "aborted" not in line for line in lines)


@contextlib.contextmanager
def socket_listening() -> Any:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
async def breaks_off() -> AsyncIterator[int]:
    """A raw upstream that promises 100,000 bytes, sends 3,000, and hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 3000)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_response_cut_mid_body_says_so(
    start_proxy: StartProxy,
    breaks_off: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await start_proxy({"upstreams": {"cut": {"url": f"http://127.0.0.1:{breaks_off}"}}})
    capsys.readouterr()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /cut/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 5)  # until the proxy cuts it
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0)  # the access line is written after the handler returns
    (line,) = records(capsys, "request_finished")
    assert (line["status"], line["aborted"], line["bytes"]) == (200, True, len(body))
    assert 0 < len(body) < 100000


async def test_a_response_cut_at_shutdown_logs_what_the_client_got(
    start_proxy: StartProxy, echo: Echo, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await start_proxy({"shutdown_timeout": 0.3, "upstreams": {"e": {"url": echo.url}}})
    capsys.readouterr()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /e/slowbody?seconds=30 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    first = await asyncio.wait_for(reader.readuntil(b"first chunk\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(proxy.stop(), 10)
    writer.close()
    (line,) = records(capsys, "request_finished")
    assert (line["status"], line.get("aborted")) == (200, True)
    assert line["bytes"] == len(b"first chunk\n")
    assert first.endswith(b"first chunk\n\r\n")


# -- request_debug ---------------------------------------------------------------------------


async def test_debug_line_for_a_static_route(
    echo_route: Any, client: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    url = URL(echo_route.url + "/e/echo/x?page=2&api_key=mine&token=t", encoded=True)
    headers = {"Authorization": "Bearer client", "Cookie": "a=b", "X-Request-ID": "dbg-1"}
    for _ in range(2):
        async with client.get(url, headers=headers) as resp:
            assert resp.status == 200
    finished, debug = split(capsys.readouterr().out)
    assert len(finished) == len(debug) == 2
    line = debug[0]
    assert line["request_id"] == "dbg-1"
    assert line["level"] == "debug"
    assert (line["route"], line["auth"]) == ("e", "header")
    assert line["upstream_url"].startswith(echo_route.config.upstreams["e"].url + "/echo/x?")
    assert "api_key=REDACTED" in line["upstream_url"] and "mine" not in line["upstream_url"]
    assert len(line["credential"]) == 8 and SECRET not in line["credential"]
    assert debug[1]["credential"] == line["credential"]  # the same value, the same print
    assert (line["token_age_s"], line["token_ttl_s"], line["replay"]) == (None, None, None)
    assert line["connect_ms"] >= 0 and line["first_byte_ms"] >= line["connect_ms"]
    assert {"Authorization", "Cookie"} <= set(line["stripped"])
    assert "X-Request-ID" not in line["stripped"]


@pytest.fixture
async def didomi_fake() -> AsyncIterator[SeedFake[DidomiState]]:
    async with await start_didomi(DidomiState()) as fake:
        yield fake


async def test_debug_line_for_a_token_route_and_a_replay(
    start_proxy: StartProxy,
    didomi_fake: SeedFake[DidomiState],
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = didomi_fake.state
    auth = {"type": "didomi", "key": "${KEY}", "secret": "${SECRET}"}
    proxy = await start_proxy(
        {"upstreams": {"didomi": {"url": didomi_fake.url, "auth": auth}}},
        env={"KEY": state.key, "SECRET": state.secret},
    )
    url = proxy.url + "/didomi/properties"
    capsys.readouterr()
    for _ in range(2):
        async with client.get(url) as resp:
            assert resp.status == 200
    (old,) = state.tokens
    state.revoke(old)
    async with client.get(url) as resp:  # 401, refresh, replay
        assert resp.status == 200
    async with client.get(url) as resp:
        assert resp.status == 200
    out = capsys.readouterr().out
    finished, debug = split(out)
    token_requests = [r for r in log_lines(out) if r.get("event") == "token_request"]
    assert [(r["method"], r["endpoint"], r["endpoint_status"]) for r in token_requests] == [
        ("POST", didomi_fake.url + "/sessions", 200)
    ] * 2
    assert all(r["duration_ms"] >= 0 and r["upstream"] == "didomi" for r in token_requests)
    assert [r["retried"] for r in finished] == [False, False, True, False]
    prints = [r["credential"] for r in debug]
    assert prints[0] == prints[1] != prints[2] == prints[3]  # changes exactly with the token
    assert [r["replay"] for r in debug] == [None, None, "status 401", None]
    for line in debug:
        assert line["auth"] == "didomi"
        assert line["token_age_s"] >= 0
        assert 0 < line["token_ttl_s"] <= state.lifetime + 1  # exp is whole seconds
    assert all(token[:12] not in str(debug) for token in state.tokens)


# -- the console format ----------------------------------------------------------------------


def test_console_access_line_reads_for_a_person() -> None:
    render = ConsoleLines(colors=False)
    line = render(
        None,
        "info",
        {
            "method": "GET",
            "path": "/paymo/clients",
            "upstream": "paymo",
            "status": 200,
            "duration_ms": 4.2,
            "bytes": 268,
            "retried": False,
            "request_id": "abc-1",
            "event": "request_finished",
            "level": "info",
            "timestamp": "2026-12-01T12:04:31.207311Z",
        },
    )
    assert line == (
        "12:04:31.207  GET /paymo/clients → 200  paymo  4.2 ms  268 B  "
        "retried=false  request_id=abc-1"
    )


def test_console_token_event_and_colours() -> None:
    event = {
        "upstream": "didomi",
        "lifetime_s": 3600.0,
        "via": "login",
        "event": "token_acquired",
        "level": "info",
        "timestamp": "2026-12-01T12:04:31.200000Z",
    }
    plain = ConsoleLines(colors=False)(None, "info", dict(event))
    assert plain == "12:04:31.200  info     token_acquired  didomi  lifetime_s=3600.0  via=login"
    coloured = ConsoleLines(colors=True)(None, "info", dict(event))
    assert (
        "\x1b[" in coloured
        and coloured.replace("\x1b[36m", "").replace("\x1b[1m", "").replace("\x1b[0m", "") == plain
    )

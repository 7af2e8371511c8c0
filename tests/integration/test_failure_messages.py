"""A 502 says what failed (SPEC §4), in words a user can act on: in the body and in
one warning log line, for the upstream client and for the token session alike.

Each cause has a real peer on loopback: nothing listening, a name that does not
resolve, a TLS server whose self-signed certificate the proxy does not trust (made
here with openssl), one that demands a client certificate, a server that resets
the connection, and one that answers something that is not HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartProxy
from tests.integration.egress_kit import alerting_tls_server
from tests.support import free_port, log_lines

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return Certificate(cert, key)


async def _answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # SO_LINGER 0: the close is an RST


async def _not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def peer(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)


def _server_tls(certificate: Certificate, *, demand_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certificate.cert, certificate.key)
    if demand_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certificate.cert)  # no client the proxy has qualifies
    return ctx


@dataclass(frozen=True)
class Cause:
    """A peer, the URL scheme and host to reach it by, and the words expected."""

    handler: Handler | None  # None: nothing listens
    expected: tuple[str, ...]
    scheme: str = "http"
    host: str = "127.0.0.1"
    tls: str | None = None  # "plain" | "demand"
    trust: bool = False  # tls.ca_file names the peer's certificate


CAUSES = {
    "dns": Cause(
        None,
        ("DNS lookup failed", "nonexistent.invalid"),
        scheme="https",  # a token URL must be https to a non-loopback host
        host="nonexistent.invalid",
    ),
    "refused": Cause(None, ("connection refused", "127.0.0.1:")),
    "tls-untrusted": Cause(
        _answer_http,
        ("TLS certificate not trusted for localhost", "tls.ca_file"),
        scheme="https",
        host="localhost",
        tls="plain",
    ),
    "client-cert": Cause(
        None,
        ("demands a client certificate", "tls.cert_file"),
        scheme="https",
        host="localhost",
        tls="demand",
        trust=True,
    ),
    "reset": Cause(_reset, ("connection reset by", "127.0.0.1:")),
    "malformed": Cause(_not_http, ("malformed answer",)),
}


@contextlib.asynccontextmanager
async def reach(cause: Cause, certificate: Certificate) -> AsyncIterator[dict[str, Any]]:
    """The base URL (and TLS settings) that lead to `cause`."""
    tls = None
    if cause.tls is not None:
        tls = _server_tls(certificate, demand_client_cert=cause.tls == "demand")
    settings: dict[str, Any] = {}
    if cause.trust:
        settings["tls"] = {"ca_file": str(certificate.cert)}
    if cause.tls == "demand":  # OpenSSL's own alert, as nginx sends it
        assert tls is not None
        with alerting_tls_server(tls) as (port, _):
            settings["url"] = f"{cause.scheme}://{cause.host}:{port}"
            yield settings
        return
    if cause.handler is None:
        settings["url"] = f"{cause.scheme}://{cause.host}:{free_port()}"
        yield settings
        return
    async with peer(cause.handler, tls) as port:
        settings["url"] = f"{cause.scheme}://{cause.host}:{port}"
        yield settings


def _warnings(out: str, event: str) -> list[dict[str, Any]]:
    return [r for r in log_lines(out) if r.get("event") == event and r["level"] == "warning"]


@pytest.mark.parametrize("cause", CAUSES.values(), ids=CAUSES.keys())
async def test_upstream_failure_says_what_failed(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    certificate: Certificate,
    capsys: pytest.CaptureFixture[str],
    cause: Cause,
) -> None:
    async with reach(cause, certificate) as upstream:
        proxy = await start_proxy({"upstreams": {"u": upstream}})
        async with client.get(proxy.url + "/u/x") as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert error["code"] == "upstream_unreachable"
    for words in cause.expected:
        assert words in error["message"], error["message"]
    await asyncio.sleep(0)  # log lines are written once per loop turn
    (line,) = _warnings(capsys.readouterr().out, "upstream_unreachable")
    assert line["error"] == error["message"] and line["upstream"] == "u"


@pytest.mark.parametrize("cause", CAUSES.values(), ids=CAUSES.keys())
async def test_token_endpoint_failure_says_what_failed(
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    certificate: Certificate,
    capsys: pytest.CaptureFixture[str],
    cause: Cause,
) -> None:
    async with reach(cause, certificate) as endpoint:
        upstream = {
            "url": "http://127.0.0.1:9",  # never reached: the token comes first
            "auth": {
                "type": "oauth2_client_credentials",
                "token_url": endpoint["url"] + "/token",
                "client_id": "me",
                "client_secret": "${SECRET}",
            },
            **({"tls": endpoint["tls"]} if "tls" in endpoint else {}),
        }
        proxy = await start_proxy(
            {"upstreams": {"u": upstream}}, env={"SECRET": "token-secret-4b1d"}
        )
        async with client.get(proxy.url + "/u/x") as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert error["code"] == "auth_failed"
    for words in cause.expected:
        assert words in error["message"], error["message"]
    await asyncio.sleep(0)
    (line,) = _warnings(capsys.readouterr().out, "token_failed")
    assert line["error"] == error["message"]

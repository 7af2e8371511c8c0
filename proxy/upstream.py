"""The HTTP client the forwarder talks to upstreams through, behind a small interface.

Two implementations satisfy it: `AiohttpUpstreamClient` (aiohttp's ClientSession,
the reference and the fallback) and `proxy.leanclient.LeanUpstreamClient`
(HTTP/1.1 on asyncio + httptools, much cheaper per request). The config's
`upstream_client` picks one; every proxy test passes with either.

Errors are plain Python ones so the forwarder needs no client-specific code:
`TimeoutError` when the upstream is too slow (connect or read), `ConnectionError`
for anything else that breaks the exchange (refused, reset, malformed response).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from yarl import URL

Body = bytes | AsyncIterator[bytes] | None

# Headers aiohttp's client would otherwise invent; the upstream sees only what the
# client sent (plus the credential, Host and the route's defaults).
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to reach one upstream, computed once at start-up."""

    scheme: str
    host: str
    port: int
    host_header: str  # the Host value: host, plus :port when not the default
    base: str  # scheme://host[:port] — the target is appended to it
    ssl: ssl.SSLContext | bool  # False: no verification; True: default context
    connect_timeout: float
    read_timeout: float


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, in order, repeats kept

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (compressed bodies stay compressed)."""
        ...

    def release(self) -> None:
        """Done with the response: reuse the connection if it is clean, else close it."""
        ...

    def close(self) -> None:
        """Abandon the response and its connection (client gone, error mid-body)."""
        ...


class UpstreamClient(Protocol):
    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> UpstreamResponse:
        """Send one request; `target` is the raw path+query, never re-encoded.
        `headers` must not contain Host: the client adds the endpoint's."""
        ...

    async def close(self) -> None: ...


class _AiohttpResponse:
    __slots__ = ("_resp", "headers", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = list(resp.headers.items())

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError:  # aiohttp's read timeout is both a TimeoutError and a ClientError
            raise
        except aiohttp.ClientError as exc:
            raise ConnectionError(str(exc) or type(exc).__name__) from None

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AiohttpUpstreamClient:
    """One pooled ClientSession for all upstreams: no cookie jar (one client's cookies
    must never ride on another's request) and no decompression (bodies pass as sent)."""

    def __init__(self, pool_size: int) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
    ) -> UpstreamResponse:
        key = (endpoint.connect_timeout, endpoint.read_timeout)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], sock_read=key[1]
            )
        try:
            resp = await self.session.request(
                method,
                URL(endpoint.base + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                ssl=endpoint.ssl,
            )
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:
            raise ConnectionError(type(exc).__name__) from None
        return _AiohttpResponse(resp)

    async def close(self) -> None:
        await self.session.close()

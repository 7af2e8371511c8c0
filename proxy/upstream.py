"""The interface the forwarder talks to upstreams through.

One implementation forwards: `proxy.leanclient.LeanUpstreamClient` (HTTP/1.1 on
asyncio + httptools). aiohttp's client is kept only as the reference the
conformance tests compare it against (tests/…/test_upstream_clients.py): two
forwarding clients meant every capability (egress proxies, WebSockets) twice,
and aiohttp's connector reuses a connection that still holds an unclaimed
response (issue 14, finding 1).

Errors are plain Python ones so the forwarder needs no client-specific code:
`TimeoutError` when the upstream is too slow (connect or read), `ConnectionError`
for anything else that breaks the exchange (refused, reset, malformed response).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from proxy.connector import EgressProxy

Body = bytes | AsyncIterator[bytes] | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to reach one upstream, computed once at start-up."""

    scheme: str
    host: str
    port: int
    host_header: str  # the Host value: host, plus :port when not the default
    base: str  # scheme://host[:port] — the target is appended to it
    ssl: ssl.SSLContext | bool  # False: no verification; True: default context
    connect_timeout: float  # also bounds the wait for a pooled connection
    read_timeout: float  # silence, and the whole wait for the response head
    egress: EgressProxy | None = None  # the egress proxy to go through (SPEC §10)
    pool_size: int = 0  # connections open at once to this endpoint (0: no own limit)
    route: str = ""  # whose pool: connections are never shared between routes


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, in order, repeats kept

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (compressed bodies stay compressed)."""
        ...

    def complete_body(self) -> bytes | None:
        """The whole body if all of it has arrived already (nothing to wait for), else
        None: what lets a small answer go out in one write without being held back."""
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

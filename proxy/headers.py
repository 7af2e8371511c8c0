"""Pure header handling: what never crosses the proxy, in either direction.

The per-route drop set is built once at start-up (`inbound_drop_set`); the
per-request work is one pass over the client's headers.
"""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)
# Credentials a client may carry; the upstream only ever sees ours.
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Set by the proxy itself: Host comes from the upstream URL; Expect was already
# answered by our server (forwarding it would make the upstream wait for nothing).
# X-Request-ID is re-added by the proxy (the client's value or a new one), once.
PROXY_OWNED = frozenset({"host", "expect", "x-request-id"})


def inbound_drop_set(injected_header: str | None, strip_headers: Iterable[str]) -> frozenset[str]:
    names = {h.lower() for h in strip_headers}
    if injected_header:
        names.add(injected_header.lower())
    return HOP_BY_HOP | CREDENTIALS | PROXY_OWNED | names


def connection_named(value: str | None) -> frozenset[str]:
    """Header names listed in a Connection header, which are hop-by-hop too."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def strip_inbound(
    headers: Iterable[tuple[str, str]], drop: frozenset[str], connection: str | None
) -> list[tuple[str, str]]:
    """The client's headers minus credentials, hop-by-hop and route-specific ones."""
    if connection:
        drop = drop | connection_named(connection)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def filter_response(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """The upstream's headers minus hop-by-hop ones (those its `Connection` names
    too), each as (name, lower-case name, value): one pass, one `lower()` a header."""
    out: list[tuple[str, str, str]] = []
    connection: list[str] = []
    for key, value in headers:
        lower = key.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                connection.append(value)
            continue
        out.append((key, lower, value))
    if connection:  # rare: keep-alive answers seldom name extra hop-by-hop headers
        named = connection_named(",".join(connection))
        if named:
            out = [h for h in out if h[1] not in named]
    return out


def add_defaults(
    headers: list[tuple[str, str]], defaults: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """Route `headers:` apply only when the client did not send the header."""
    if not defaults:
        return headers
    present = {k.lower() for k, _ in headers}
    headers.extend((k, v) for k, v in defaults if k.lower() not in present)
    return headers

"""Pure: which browser requests may use the proxy's credentials (SPEC §4, CSRF).

A web page must not spend a credential unless the user listed its origin. Fetch
Metadata says where a request comes from: `Sec-Fetch-Site: none` is the user
typing a URL; anything else (`same-origin`, `same-site` — another localhost port
—, `cross-site`) is a page, refused unless its `Origin` is listed. A same-origin
request without `Origin` (an `<img>` on a page served through the proxy) counts
as the proxy's own origin, `http://` + Host. Non-browser clients send neither
header and pass. For a listed origin the proxy answers CORS preflights itself.

Also here, because it is the same kind of decision: on a read-only route, a
method-override header or `_method` parameter naming a forbidden method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import unquote_plus, urlsplit

from proxy.errors import OriginNotAllowed

METHOD_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_DEFAULT_PORTS = {"http": 80, "https": 443}
PREFLIGHT_MAX_AGE = "600"


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` lower-cased, a default port dropped; None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path or parts.query or parts.fragment or value.rstrip().endswith(("?", "#")):
        return None
    host = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed_origin(headers: Mapping[str, str], allowed: frozenset[str]) -> str | None:
    """The listed origin a browser request comes from (None: not a browser request,
    or a URL the user typed); raises `OriginNotAllowed` for any other page."""
    origin = headers.get("Origin")
    site = headers.get("Sec-Fetch-Site")
    if origin is None:
        if site is None or site == "none":
            return None
        if site == "same-origin" and "Host" in headers:
            origin = "http://" + headers["Host"]
        else:
            raise OriginNotAllowed(
                f"browser requests from other pages (Sec-Fetch-Site: {site[:20]}) are "
                "refused; list the page's origin in allowed_origins"
            )
    normal = normalize_origin(origin) if allowed else None
    if normal is None or normal not in allowed:
        raise OriginNotAllowed(
            "requests from browsers on other origins are refused; "
            "list the origin in allowed_origins"
        )
    return origin.strip() if "Origin" in headers else None  # same-origin needs no CORS


def with_cors(headers: list[tuple[str, str]], origin: str) -> list[tuple[str, str]]:
    """The response headers for a listed origin: ours replace the upstream's own."""
    kept = [h for h in headers if not h[0].lower().startswith("access-control-allow-")]
    return [*kept, ("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]


def preflight_headers(
    origin: str, headers: Mapping[str, str], methods: Iterable[str]
) -> dict[str, str]:
    """The answer to a preflight from a listed origin: what the route allows."""
    out = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        "Vary": "Origin",
    }
    requested = headers.get("Access-Control-Request-Headers")
    if requested:
        out["Access-Control-Allow-Headers"] = requested
    return out


def overridden_method(headers: Mapping[str, str], query: str) -> str | None:
    """A method some frameworks would run instead of the request's own, if any."""
    for name in METHOD_OVERRIDE_HEADERS:
        value = headers.get(name)
        if value is not None:
            return value.strip().upper()
    if "method" in query:  # `_method`, or `%5Fmethod`
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if unquote_plus(name) == "_method":
                return unquote_plus(value).strip().upper()
    return None

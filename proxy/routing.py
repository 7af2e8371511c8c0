"""Pure routing: which upstream a raw path belongs to, and the URL to forward to.

Everything works on the raw request target as the client sent it, so the path
reaches the upstream byte for byte (`%2F`, `%20`, `+` kept). The forwarded URL
is the upstream base URL followed by the remainder, which always starts with
`/` or is empty, so it can never leave the upstream's host or base path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus, urlsplit

from proxy.errors import BadRequest

# Segments that are dot-segments once percent-decoded (RFC 3986 §5.2.4).
_DOT_SEGMENT = re.compile(r"^(?:\.|%2e){1,2}$", re.IGNORECASE)
# Characters that have no business in a path: backslash (some servers treat it as
# `/`), NUL and other controls, whether raw or percent-encoded, and a fragment.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\#]|%(?:5c|00|0[1-9a-f]|1[0-9a-f]|7f)", re.IGNORECASE)
# Escapes some decoders turn into `.`, `/` or `\\`: overlong UTF-8 (`%c0%ae`,
# `%e0%80%ae`) and IIS's `%uXXXX`.
_SHADY_ESCAPE = re.compile(r"%(?:c0|c1|e0%[89]|f0%8)|%u[0-9a-f]{4}", re.IGNORECASE)
_SEPARATORS = re.compile(r"[/\\]")
_SECRET_PARAM = re.compile(
    r"token|key|secret|passw|pwd|auth|session|signature|sig$|^code$|credential",
    re.IGNORECASE,
)
REDACTED = "REDACTED"


@dataclass(frozen=True, slots=True)
class Target:
    """Where an upstream lives, split once at start-up."""

    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/api" — never a trailing slash

    @classmethod
    def from_url(cls, url: str) -> Target:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/"))

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def match_prefix(prefixes: Sequence[str], path: str) -> tuple[str, str] | None:
    """Longest prefix on segment boundaries: `/pay` never matches `/paymo`.

    `prefixes` must be sorted longest first; returns (prefix, remainder).
    """
    for prefix in prefixes:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if not rest or rest[0] == "/":
                return prefix, rest
    return None


def sort_prefixes(prefixes: Iterable[str]) -> list[str]:
    return sorted(prefixes, key=len, reverse=True)


def split_target(raw_target: str) -> tuple[str, str]:
    """Split an origin-form request target into raw path and raw query. A `#fragment`
    after the query is dropped (one in the path is refused by `check_remainder`)."""
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        # Absolute-form (`http://host/...`), authority-form (`host:443`),
        # asterisk-form, or a network-path reference: never forwarded.
        raise BadRequest("request target must be a path (origin-form)")
    path, _, query = raw_target.partition("?")
    if "#" in query:  # a fragment is never sent on, and must not hide what is appended
        query = query.partition("#")[0]
    return path, query


def check_remainder(remainder: str) -> None:
    """Refuse dot-segments and unsafe characters in the part we forward.

    "Dot-segment" is read the way the most forgiving upstream decoder would (SPEC §4):
    after dropping `;params` (Tomcat, Jetty, Spring), after percent-decoding once or
    twice, with an encoded `/` or `\\` counted as a separator; overlong UTF-8 and
    `%u` escapes are refused outright. A plain path (no `%`, no `;`) costs one split.
    """
    if _UNSAFE.search(remainder):
        raise BadRequest("path contains a forbidden character")
    if "%" not in remainder and ";" not in remainder:
        for segment in remainder.split("/"):
            if segment and _DOT_SEGMENT.match(segment):
                raise BadRequest("path must not contain . or .. segments")
        return
    once = unquote(remainder, errors="replace")
    if _SHADY_ESCAPE.search(remainder) or _SHADY_ESCAPE.search(once):
        raise BadRequest("path contains an overlong UTF-8 or %u escape")
    for form in (remainder, once, unquote(once, errors="replace")):
        for piece in _SEPARATORS.split(form):
            if piece.partition(";")[0] in (".", ".."):
                raise BadRequest("path must not contain . or .. segments")


def build_upstream_target(base_path: str, remainder: str, query: str) -> str:
    """The request target sent upstream: base path + remainder (+ query), as sent.

    `base_path` is "" or "/api" (no trailing slash); `remainder` is "" or starts
    with "/", so the result always starts with the base path.
    """
    path = base_path + remainder or "/"
    return f"{path}?{query}" if query else path


def strip_query_params(query: str, names: frozenset[str]) -> str:
    """Drop the named parameters; every other byte of the query is kept as sent."""
    if not query or not names:
        return query
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) not in names]
    return "&".join(kept)


def redact_query(target: str) -> str:
    """The request target for a log line, with secret-looking parameter values hidden."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        if eq and _SECRET_PARAM.search(unquote_plus(name)):
            parts.append(f"{name}={REDACTED}")
        else:
            parts.append(part)
    return f"{path}?{'&'.join(parts)}"


def rewrite_location(
    location: str, target: Target, prefix: str, strip: frozenset[str] = frozenset()
) -> str:
    """Map a redirect into the upstream back under the proxy's prefix, without the
    `strip` query parameters (the route's injected credential, its `strip_query`):
    an upstream that echoes its query into a redirect must not hand the client the
    credential."""
    rewritten = _under_prefix(location, target, prefix)
    if rewritten is None:
        return location
    if strip and "?" in rewritten:
        before, _, after = rewritten.partition("?")
        query, hash_, fragment = after.partition("#")
        query = strip_query_params(query, strip)
        rewritten = before + (f"?{query}" if query else "") + hash_ + fragment
    return rewritten


def _under_prefix(location: str, target: Target, prefix: str) -> str | None:
    if location.startswith("/") and not location.startswith("//"):
        path_and_rest = location
    else:
        parts = urlsplit(location)
        if not parts.scheme or not parts.netloc:
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        here = (parts.scheme.lower(), (parts.hostname or "").lower(), port)
        if here != (target.scheme, target.host, target.port):
            return None
        path_and_rest = location[location.index(parts.netloc) + len(parts.netloc) :] or "/"
        if not path_and_rest.startswith("/"):
            path_and_rest = "/" + path_and_rest
    base = target.base_path
    if not base:
        return prefix + path_and_rest
    if path_and_rest.startswith(base):
        rest = path_and_rest[len(base) :]
        if not rest or rest[0] in "/?#":
            return prefix + rest
    return None

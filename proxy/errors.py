"""The exception tree, and how each branch becomes the SPEC's JSON error.

    ProxyError                      -> JSON {"error": {"code", "message", "upstream"}}
    ├── BadRequest                  400 bad_request
    ├── UriTooLong                  414 uri_too_long (the HTTP parser refused the request line)
    ├── HeadersTooLarge             431 headers_too_large (... a header, or too many of them)
    ├── HostNotAllowed              403 host_not_allowed
    ├── OriginNotAllowed            403 origin_not_allowed
    ├── ProxyAuthRequired           407 proxy_auth_required
    ├── NoRoute                     404 no_route
    ├── MethodNotAllowed            405 method_not_allowed
    ├── RequestTimeout              408 request_timeout (the client's body stalled)
    ├── UpstreamUnreachable         502 upstream_unreachable
    ├── UpstreamTimeout             504 upstream_timeout
    ├── ShuttingDown                503 shutting_down (still waiting at the drain deadline)
    └── AuthError                   (token endpoint trouble)
        ├── AuthFailed              502 auth_failed
        └── AuthBackoff             503 auth_backoff (+ Retry-After)

    ConfigError                     exit 2; carries every problem with its dotted path

Messages are written by us, never copied from a secret-bearing source: an
`AuthFailed` carries the endpoint's status and at most 300 characters of its
body, which the token code has already scrubbed of configured secrets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


class ProxyError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, upstream: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"code": self.code, "message": self.message, "upstream": self.upstream}}
        ).encode()


class BadRequest(ProxyError):
    status, code = 400, "bad_request"


class UriTooLong(ProxyError):
    status, code = 414, "uri_too_long"


class HeadersTooLarge(ProxyError):
    status, code = 431, "headers_too_large"


class ShuttingDown(ProxyError):
    status, code = 503, "shutting_down"


class HostNotAllowed(ProxyError):
    status, code = 403, "host_not_allowed"


class OriginNotAllowed(ProxyError):
    status, code = 403, "origin_not_allowed"


class ProxyAuthRequired(ProxyError):
    status, code = 407, "proxy_auth_required"

    def headers(self) -> dict[str, str]:
        return {"Proxy-Authenticate": 'Bearer realm="authproxy"'}


class NoRoute(ProxyError):
    status, code = 404, "no_route"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"

    def __init__(self, message: str, upstream: str | None, allowed: tuple[str, ...]) -> None:
        super().__init__(message, upstream)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class RequestTimeout(ProxyError):
    """The client stopped sending its request body for longer than timeout.body."""

    status, code = 408, "request_timeout"


class UpstreamUnreachable(ProxyError):
    status, code = 502, "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status, code = 504, "upstream_timeout"


class AuthError(ProxyError):
    """The credential for an upstream could not be obtained."""


class AuthFailed(AuthError):
    status, code = 502, "auth_failed"

    def __init__(
        self,
        message: str,
        upstream: str | None = None,
        endpoint_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, upstream)
        self.endpoint_status = endpoint_status
        self.retry_after = retry_after  # from a 429/503 Retry-After: the backoff's floor


class AuthBackoff(AuthError):
    status, code = 503, "auth_backoff"

    def __init__(self, message: str, upstream: str | None, retry_after: float) -> None:
        super().__init__(message, upstream)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that cannot run; `problems` lists every reason at once."""

    def __init__(
        self,
        problems: list[Problem],
        *,
        files: frozenset[str] = frozenset(),
        secrets: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
        self.files = files  # the `${file:...}` paths it named, for `watch`
        self.secrets = secrets  # values it resolved where secrets live: redact them

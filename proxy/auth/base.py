"""What every auth scheme hands the forwarder, and the small protocol they satisfy."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from proxy.tokens.manager import Token as Token  # re-exported: the manager owns it


def basic_authorization(username: str, password: str) -> str:
    """An `Authorization: Basic` value (RFC 7617), UTF-8 as browsers and curl send it."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


@dataclass(frozen=True, slots=True)
class Credential:
    """What goes onto one forwarded request, prepared once per token."""

    headers: tuple[tuple[str, str], ...] = ()
    query: str = ""  # "name=value", already percent-encoded; "" for none
    token: Token | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Injection:
    """Where a token goes: a header built from a template, or a query parameter."""

    header: str | None = None
    template: str = "{token}"
    query: str | None = None

    def credential(self, token: Token) -> Credential:
        if self.header is not None:
            value = self.template.replace("{token}", token.value)
            return Credential(headers=((self.header, value),), token=token)
        query = f"{quote(self.query or '', safe='')}={quote(token.value, safe='')}"
        return Credential(query=query, token=token)


class Authenticator(Protocol):
    """One per upstream. Static schemes answer at once; token schemes may do I/O."""

    type_name: str
    injected_header: str | None
    injected_query: str | None
    refreshable: bool

    @property
    def last_error(self) -> str | None:
        """The latest token failure, for /-/status; never a secret."""
        ...

    async def credential(self) -> Credential: ...

    def invalidate(self, used: Credential) -> None:
        """The upstream refused `used` and the request cannot be replayed: just drop it."""
        ...

    async def rejected(self, used: Credential, status: int) -> Credential:
        """The upstream refused `used`: return a fresh credential (shared by all who saw it)."""
        ...

    def ready(self) -> bool:
        """False while a `prefetch` upstream has no token yet (for /-/ready)."""
        ...

    async def start(self) -> None:
        """Called once the app serves: fetch now if the config says `prefetch`."""
        ...

    async def close(self) -> None:
        """Called at shutdown, before the HTTP session closes: run logouts."""
        ...

    def status(self) -> dict[str, Any]:
        """Token state for /-/status: {"state", "expires_in"}."""
        ...

    def counters(self) -> dict[str, Any]:
        """For metrics: {"fetch_success", "fetch_failure", "ttl"}."""
        ...

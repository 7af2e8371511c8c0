"""Static schemes: a credential fixed at start-up, nothing to refresh, never a retry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from proxy.auth.base import Credential, basic_authorization
from proxy.config import BasicAuth, HeaderAuth, NoneAuth, QueryAuth


@dataclass(slots=True)
class StaticAuth:
    type_name: str
    cred: Credential
    injected_header: str | None = None
    injected_query: str | None = None
    refreshable: bool = False
    last_error: str | None = None

    async def credential(self) -> Credential:
        return self.cred

    def invalidate(self, used: Credential) -> None:
        return None

    async def rejected(self, used: Credential, status: int) -> Credential:
        return self.cred

    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"state": "none", "expires_in": None}

    def counters(self) -> dict[str, Any]:
        return {"fetch_success": 0, "fetch_failure": 0, "ttl": None}


def none_auth(cfg: NoneAuth) -> StaticAuth:
    return StaticAuth("none", Credential())


def header_auth(cfg: HeaderAuth) -> StaticAuth:
    cred = Credential(headers=((cfg.name, cfg.value.get_secret_value()),))
    return StaticAuth("header", cred, injected_header=cfg.name)


def basic_auth(cfg: BasicAuth) -> StaticAuth:
    value = basic_authorization(cfg.username.get_secret_value(), cfg.password.get_secret_value())
    return StaticAuth("basic", Credential(headers=(("Authorization", value),)))


def query_auth(cfg: QueryAuth) -> StaticAuth:
    value = f"{quote(cfg.param, safe='')}={quote(cfg.value.get_secret_value(), safe='')}"
    return StaticAuth("query", Credential(query=value), injected_query=cfg.param)

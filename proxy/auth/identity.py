"""The identity of a token flow: what decides that two upstreams hold the same token.

SPEC §8 promise 5 and §9: the resolved token request (login, token and refresh
URLs after defaults, method, query, body, scope, audience, `extra`, client-auth
style, TLS client identity) plus the secrets in it. Two upstreams with equal
identities share one token (the shared store's key derives from it); a reload
keeps an upstream's token manager exactly when its identity did not change.

`material` holds the secrets and never leaves the process: it is the input of
the shared store's key derivation (scrypt, then HKDF) and of `digest`, a
SHA-256 used only for in-memory comparison. Neither is ever logged or stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.auth.presets import resolve_login
from proxy.config import TokenAuthBase, Upstream

# What changes the token an endpoint hands out. Not `prefetch`, `refresh_before`,
# `inject` or `logout`: they change when or how a token is used, not which one.
_FLOW_FIELDS = ("request", "token", "expires_at", "expires_in", "lifetime", "refresh")


@dataclass(frozen=True, slots=True)
class AuthIdentity:
    digest: str  # sha256 hex of `material`: compare, never store
    material: bytes = field(repr=False)


def _reveal(node: Any) -> Any:
    """The config dump with every SecretStr replaced by its value (canonical JSON)."""
    if isinstance(node, dict):
        return {k: _reveal(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_reveal(v) for v in node]
    get = getattr(node, "get_secret_value", None)
    return get() if callable(get) else node


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def auth_identity(upstream: Upstream) -> AuthIdentity | None:
    """None for static auth types: they hold no token."""
    if not isinstance(upstream.auth, TokenAuthBase):
        return None
    login = resolve_login(upstream.auth, upstream.url.rstrip("/"))
    flow = _reveal(login.model_dump(include=set(_FLOW_FIELDS), by_alias=True))
    tls = upstream.tls
    client_cert = {
        name: _file_digest(getattr(tls, name, None)) for name in ("cert_file", "key_file")
    }
    material = json.dumps(
        {"flow": flow, "tls_verify": tls.verify, "client_cert": client_cert},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return AuthIdentity(hashlib.sha256(material).hexdigest(), material)

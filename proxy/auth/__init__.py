"""Auth schemes: the registry from a config `type` to the code that serves it.

Adding a scheme is a config model in `proxy.config` plus one entry here.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.auth import presets, static
from proxy.auth.base import Authenticator, Credential, Injection, Token
from proxy.auth.identity import auth_identity
from proxy.auth.login import LoginFlow, TokenAuth, TokenHttp
from proxy.config import TokenAuthBase, Upstream
from proxy.connector import Egress
from proxy.tokens import TokenManager, TokenStore

__all__ = ["Authenticator", "Credential", "Token", "build_authenticator"]

TOKEN_TIMEOUT_CAP = 30.0  # seconds: a token request's whole deadline at most

STATIC_TYPES: dict[str, Callable[[Any], static.StaticAuth]] = {
    "none": static.none_auth,
    "header": static.header_auth,
    "basic": static.basic_auth,
    "query": static.query_auth,
}


def build_authenticator(
    name: str,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    ssl_context: ssl.SSLContext | bool,
    secrets: frozenset[str],
    store: TokenStore | None = None,
    previous: Authenticator | None = None,
    *,
    egress: Egress | None = None,
) -> Authenticator:
    """`previous`: the authenticator this one replaces on a reload, whose token flow has
    the same identity: its token manager (token, refresh token, state) carries over."""
    auth = upstream.auth
    if auth.type in STATIC_TYPES:
        return STATIC_TYPES[auth.type](auth)
    assert isinstance(auth, TokenAuthBase)
    login = presets.resolve_login(auth, upstream.url.rstrip("/"))
    # The token timeout (SPEC §2): one total deadline for the whole request — DNS,
    # egress CONNECT, TLS, the answer — of connect + read, at most 30 s.
    total = min(upstream.timeout.connect + upstream.timeout.read, TOKEN_TIMEOUT_CAP)
    timeout = aiohttp.ClientTimeout(
        sock_connect=min(upstream.timeout.connect, total), sock_read=None, total=total
    )
    http = TokenHttp(session, name, timeout, ssl_context, secrets, egress or Egress())
    flow = LoginFlow(login, http)
    if isinstance(previous, TokenAuth):
        manager = previous.manager
        manager.use_source(flow)  # same token request; maybe a new TLS context or timeouts
    else:
        # The lock outlives one token request (the token timeout) by a second.
        lock_ttl = (timeout.total or 0.0) + 1.0
        slot = store.slot(auth_identity(upstream), name) if store is not None else None
        manager = TokenManager(
            name, flow, refresh_before=login.refresh_before, slot=slot, lock_ttl=lock_ttl
        )
    inject = login.inject
    injection = Injection(header=inject.header, template=inject.value, query=inject.query)
    return TokenAuth(auth.type, manager, flow, injection, prefetch=login.prefetch)

"""Fake primaERP API (seeds/primaerp-authentication.md).

``GET /v1/auth/login?apikey=K`` with Basic auth (user credentials, or a secret
key as the username with no password) returns a token and a refresh token with
``/Date(ms)/`` expiries. ``?token=`` authenticates resources until
``expiration``. ``GET /v1/auth/refreshtoken?apikey=K&refresh_token=R`` returns a
new pair; each refresh token works once.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .common import (
    ISSUED,
    FakeState,
    SeedFake,
    TokenCallKind,
    basic_credentials,
    begin_resource,
    begin_token_call,
    generic_token_failure,
    json_response,
    resource_answer,
    seed_app,
    start_seed,
    under,
)

__all__ = [
    "PRIMAERP_BASE",
    "PrimaerpState",
    "create_primaerp_app",
    "ms_date",
    "start_primaerp",
]

PRIMAERP_BASE = "/v1"


@dataclass
class PrimaerpState(FakeState):
    """primaERP credentials (demo defaults), refresh tokens and refresh knobs.

    ``refresh_tokens`` maps each unused refresh token to its expiry instant;
    a used one moves to ``used_refresh_tokens``. ``fail_refresh`` makes the
    refresh endpoint alone answer 401 so a test can see the proxy fall back to
    a full login.
    """

    apikey: str = "demo-primaerp-apikey"
    username: str = "demo"
    password: str = "demo-password"
    secret_key: str = "demo-primaerp-secret-key"
    refresh_lifetime: float = 7 * 24 * 3600.0
    fail_refresh: bool = False
    refresh_tokens: dict[str, float] = field(default_factory=dict)
    used_refresh_tokens: set[str] = field(default_factory=set)

    def credentials_ok(self, creds: tuple[str, str] | None) -> bool:
        """Username+password, or the secret key as username (password ignored)."""
        if creds is None:
            return False
        user, password = creds
        return (user == self.username and password == self.password) or user == self.secret_key

    def issue_refresh(self, token: str, expires_at: float) -> str:
        """Remember a new refresh token (here and in :data:`ISSUED`)."""
        self.refresh_tokens[token] = expires_at
        ISSUED.add(token)
        return token

    def revoke_all(self) -> None:
        """Revoke every access and refresh token issued so far."""
        super().revoke_all()
        self.revoked.update(self.refresh_tokens)


_STATE_KEY = web.AppKey("primaerp_state", PrimaerpState)


def ms_date(ms: int) -> str:
    """primaERP's (.NET-style) date: ``/Date(<ms since epoch>)/``."""
    return f"/Date({ms})/"


def _unauthorized(message: str = "Unauthorized") -> web.Response:
    return json_response({"error": "Unauthorized", "message": message}, 401)


def _issue_pair(state: PrimaerpState) -> dict[str, Any]:
    now = time.time()
    expiration_ms = math.ceil((now + state.lifetime) * 1000)
    refresh_ms = math.ceil((now + state.refresh_lifetime) * 1000)
    token = state.issue(str(uuid.uuid4()), expiration_ms / 1000)
    refresh = state.issue_refresh(str(uuid.uuid4()), refresh_ms / 1000)
    expiration = ms_date(expiration_ms)
    refresh_expiration = ms_date(refresh_ms)
    if state.token_failure == "past_expiry":
        expiration = ms_date(int((now - 3600) * 1000))
    elif state.token_failure == "nonsense_expiry":
        expiration = refresh_expiration = "/Date(banana)/"
    return {
        "token": token,
        "expiration": expiration,
        "refreshToken": refresh,
        "refreshExpiration": refresh_expiration,
    }


def _missing_field_body() -> dict[str, Any]:
    ms = int(time.time() * 1000) + 3_600_000
    return {"expiration": ms_date(ms), "refreshExpiration": ms_date(ms)}


async def _token_call_refused(
    request: web.Request, state: PrimaerpState, kind: TokenCallKind
) -> web.StreamResponse | None:
    """What login and refresh share: count the call, the failure switches, the API key."""
    await begin_token_call(request, state, kind)
    failure = await generic_token_failure(request, state, missing_field_body=_missing_field_body())
    if failure is not None:
        return failure
    if state.token_failure == "invalid_client" or request.query.get("apikey") != state.apikey:
        return _unauthorized("Invalid API key")
    return None


async def _login(request: web.Request, state: PrimaerpState) -> web.StreamResponse:
    refused = await _token_call_refused(request, state, "token")
    if refused is not None:
        return refused
    if not state.credentials_ok(basic_credentials(request)):
        return _unauthorized("Invalid credentials")
    return json_response(_issue_pair(state))


async def _refresh(request: web.Request, state: PrimaerpState) -> web.StreamResponse:
    refused = await _token_call_refused(request, state, "refresh")
    if refused is not None:
        return refused
    if state.fail_refresh:
        return _unauthorized("Invalid refresh token")
    refresh = request.query.get("refresh_token", "")
    expires_at = state.refresh_tokens.pop(refresh, None)
    if expires_at is None or refresh in state.revoked or time.time() >= expires_at:
        return _unauthorized("Invalid refresh token")
    state.used_refresh_tokens.add(refresh)
    return json_response(_issue_pair(state))


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    rest = request.match_info["tail"]
    if rest == "/auth/login" and request.method == "GET":
        return await _login(request, state)
    if rest == "/auth/refreshtoken" and request.method == "GET":
        return await _refresh(request, state)
    rec = await begin_resource(request, state)
    if state.always_401 or not state.is_valid(request.query.get("token")):
        return _unauthorized()
    parts = rest.strip("/").split("/")
    return await resource_answer(request, rec, rest, {"resource": parts[-1] or "v1", "data": []})


def create_primaerp_app(state: PrimaerpState) -> web.Application:
    """The primaERP fake, serving its API under ``/v1``."""
    return seed_app(_STATE_KEY, state, {under(PRIMAERP_BASE): _handle})


async def start_primaerp(
    state: PrimaerpState | None = None, host: str = "127.0.0.1", port: int = 0
) -> SeedFake[PrimaerpState]:
    """Serve a primaERP fake; ``.url`` is ``http://host:port/v1``."""
    state = state if state is not None else PrimaerpState()
    app = create_primaerp_app(state)
    return await start_seed(
        "primaerp", state, app, host, port, PRIMAERP_BASE, PRIMAERP_BASE + "/auth/login"
    )

"""Fake Paymo API (seeds/paymo-authentication.md).

Three documented ways in, all accepted on every resource under ``/api``:
Basic auth with email+password, Basic auth with the API key as username and
any password, and an ``X-Session`` header carrying a session id obtained from
``POST /api/sessions``. ``DELETE /api/sessions/<id>`` ends a session.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from .common import (
    FakeState,
    SeedFake,
    basic_credentials,
    begin_resource,
    begin_token_call,
    ceil_time,
    generic_token_failure,
    json_response,
    resource_answer,
    seed_app,
    start_seed,
    under,
)

__all__ = ["PAYMO_BASE", "PaymoState", "create_paymo_app", "paymo_time", "start_paymo"]

PAYMO_BASE = "/api"


@dataclass
class PaymoState(FakeState):
    """Paymo credentials (demo defaults) plus the sessions ended by DELETE."""

    email: str = "demo@example.com"
    password: str = "demo-password"
    api_key: str = "demo-paymo-api-key"
    user_id: int = 1234
    deleted_sessions: list[str] = field(default_factory=list)

    def basic_ok(self, creds: tuple[str, str] | None) -> bool:
        """Email+password, or the API key as username with any password."""
        if creds is None:
            return False
        user, password = creds
        return (user == self.email and password == self.password) or user == self.api_key


_STATE_KEY = web.AppKey("paymo_state", PaymoState)


def paymo_time(t: float) -> str:
    """ISO 8601 UTC with whole seconds and ``Z``, as Paymo writes it."""
    return datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unauthorized() -> web.Response:
    return json_response(
        {"message": "Unauthorized"},
        401,
        headers={"WWW-Authenticate": 'Basic realm="Paymo API"'},
    )


def _authorized(request: web.Request, state: PaymoState) -> bool:
    session = request.headers.get("X-Session")
    if session is not None and state.is_valid(session):
        return True
    return state.basic_ok(basic_credentials(request))


async def _create_session(request: web.Request, state: PaymoState) -> web.StreamResponse:
    await begin_token_call(request, state, "token")
    failure = await generic_token_failure(
        request, state, missing_field_body={"sessions": [{"ip": request.remote or ""}]}
    )
    if failure is not None:
        return failure
    if state.token_failure == "invalid_client" or not state.basic_ok(basic_credentials(request)):
        return _unauthorized()
    now = time.time()
    expires_at = float(ceil_time(now + state.lifetime))
    session_id = state.issue(secrets.token_hex(16), expires_at)
    expires_on: str = paymo_time(expires_at)
    if state.token_failure == "past_expiry":
        expires_on = paymo_time(now - 3600)
    elif state.token_failure == "nonsense_expiry":
        expires_on = "banana"
    created = paymo_time(now)
    return json_response(
        {
            "sessions": [
                {
                    "id": session_id,
                    "ip": request.remote or "",
                    "expires_on": expires_on,
                    "created_on": created,
                    "updated_on": created,
                    "user_id": state.user_id,
                }
            ]
        }
    )


async def _delete_session(
    request: web.Request, state: PaymoState, session_id: str
) -> web.StreamResponse:
    await begin_token_call(request, state, "logout")
    if not _authorized(request, state):
        return _unauthorized()
    if session_id not in state.tokens or session_id in state.deleted_sessions:
        return json_response({"message": "Session not found"}, 404)
    state.revoke(session_id)
    state.deleted_sessions.append(session_id)
    return json_response({})


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    rest = request.match_info["tail"]
    parts = rest.strip("/").split("/") if rest.strip("/") else []
    if parts and parts[0] == "sessions":
        if len(parts) == 1 and request.method == "POST":
            return await _create_session(request, state)
        if len(parts) == 2 and request.method == "DELETE":
            return await _delete_session(request, state, parts[1])
        return json_response({"message": "Method not allowed"}, 405)
    rec = await begin_resource(request, state)
    if state.always_401 or not _authorized(request, state):
        return _unauthorized()
    name = parts[0] if parts else "api"
    return await resource_answer(request, rec, rest, {name: []})


def create_paymo_app(state: PaymoState) -> web.Application:
    """The Paymo fake, serving its API under ``/api``."""
    return seed_app(_STATE_KEY, state, {under(PAYMO_BASE): _handle})


async def start_paymo(
    state: PaymoState | None = None, host: str = "127.0.0.1", port: int = 0
) -> SeedFake[PaymoState]:
    """Serve a Paymo fake; ``.url`` is ``http://host:port/api``."""
    state = state if state is not None else PaymoState()
    app = create_paymo_app(state)
    return await start_seed("paymo", state, app, host, port, PAYMO_BASE, PAYMO_BASE + "/sessions")

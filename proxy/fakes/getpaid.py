"""Fake getpaid API (seeds/getpaid-authentication.md), an OAuth 2.0 service.

``POST /oauth/token`` (client credentials grant, RFC 6749 §4.4) returns a
Bearer JWT carrying the granted ``scope``. The real token endpoint lives on a
separate auth host; here it shares the port with the API (served under
``/api``). Resources check the scope they need: a valid token without it gets
403 ``insufficient_scope``; a missing, invalid or expired token gets 401.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from .common import (
    FakeState,
    SeedFake,
    basic_credentials,
    bearer_token,
    begin_resource,
    begin_token_call,
    generic_token_failure,
    json_response,
    jwt_decode,
    jwt_encode,
    resource_answer,
    seed_app,
    start_seed,
    under,
)

__all__ = [
    "GETPAID_BASE",
    "GETPAID_TOKEN_PATH",
    "SCOPE_RULES",
    "GetpaidState",
    "create_getpaid_app",
    "start_getpaid",
]

GETPAID_BASE = "/api"
GETPAID_TOKEN_PATH = "/oauth/token"

#: First path segment under /api -> scopes any one of which grants access.
SCOPE_RULES: dict[str, frozenset[str]] = {
    "accounts": frozenset({"accounts:read_write", "accounts:read"}),
    "invoices": frozenset({"invoices:read_write"}),
}


@dataclass
class GetpaidState(FakeState):
    """OAuth client (demo defaults), audience and the scopes it may request.

    ``token_url`` is filled in by :func:`start_getpaid` once the port is known.
    """

    client_id: str = "demo-getpaid-client"
    client_secret: str = "demo-getpaid-secret"
    audience: str = "https://api.getpaid.io"
    allowed_scopes: str = "accounts:read_write invoices:read_write"
    issuer: str = "https://auth.getpaid.io/"
    token_url: str = ""

    def client_ok(self, client_id: str | None, client_secret: str | None) -> bool:
        return client_id == self.client_id and client_secret == self.client_secret


_STATE_KEY = web.AppKey("getpaid_state", GetpaidState)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="getpaid"'
    return json_response({"error": error, "error_description": description}, status, headers)


def _parse_body(request: web.Request, body: bytes) -> dict[str, Any] | None:
    """JSON (as documented) or form-encoded (as RFC 6749 specifies) body fields."""
    ctype = request.content_type
    try:
        if ctype == "application/json":
            data: Any = json.loads(body) if body else {}
            return data if isinstance(data, dict) else None
        if ctype == "application/x-www-form-urlencoded":
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (ValueError, UnicodeDecodeError):
        return None
    return None


async def _token(request: web.Request, state: GetpaidState) -> web.StreamResponse:
    rec = await begin_token_call(request, state, "token")
    failure = await generic_token_failure(
        request, state, missing_field_body={"token_type": "bearer", "expires_in": 3600}
    )
    if failure is not None:
        return failure
    if state.token_failure == "invalid_client":
        return _oauth_error(401, "invalid_client", "Unknown client or wrong client secret")
    fields = _parse_body(request, rec.body)
    if fields is None:
        return _oauth_error(400, "invalid_request", "Body must be JSON or form-encoded")

    basic = basic_credentials(request)
    if basic is not None:
        if "client_secret" in fields:
            return _oauth_error(400, "invalid_request", "Use only one client authentication method")
        # RFC 6749 §2.3.1 form-encodes id and secret before Basic; most
        # clients do not. Accept both.
        ok = state.client_ok(*basic) or state.client_ok(
            unquote_plus(basic[0]), unquote_plus(basic[1])
        )
        if "client_id" in fields and fields["client_id"] not in (basic[0], unquote_plus(basic[0])):
            ok = False
    else:
        ok = state.client_ok(fields.get("client_id"), fields.get("client_secret"))
    if not ok:
        return _oauth_error(401, "invalid_client", "Unknown client or wrong client secret")

    grant_type = fields.get("grant_type")
    if not grant_type:
        return _oauth_error(400, "invalid_request", "Missing required parameter: grant_type")
    if grant_type != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", f"Unsupported grant type {grant_type}")
    if fields.get("audience") != state.audience:
        return _oauth_error(400, "invalid_request", "Missing or unknown audience")

    allowed = state.allowed_scopes.split()
    requested_raw = fields.get("scope")
    if not isinstance(requested_raw, str):
        if requested_raw is not None:
            return _oauth_error(400, "invalid_request", "scope must be a string")
        requested_raw = ""
    requested = requested_raw.split() or allowed
    refused = [s for s in requested if s not in allowed]
    if refused:
        return _oauth_error(400, "invalid_scope", "Scope not allowed: " + " ".join(refused))

    now = time.time()
    expires_in = math.ceil(state.lifetime)
    exp = math.ceil(now + expires_in)
    claims: dict[str, Any] = {
        "iss": state.issuer,
        "sub": f"{state.client_id}@clients",
        "aud": state.audience,
        "iat": int(now),
        "exp": exp,
        "scope": " ".join(requested),
        "gty": "client-credentials",
        "jti": uuid.uuid4().hex,
    }
    expires_in_field: Any = expires_in
    if state.token_failure == "past_expiry":
        claims["iat"] = int(now) - 7200
        claims["exp"] = int(now) - 3600
        expires_in_field = -3600
    elif state.token_failure == "nonsense_expiry":
        claims["exp"] = "banana"
        expires_in_field = "banana"
    token = state.issue(jwt_encode(claims, state.jwt_key), float(exp))
    return json_response(
        {"access_token": token, "token_type": "bearer", "expires_in": expires_in_field},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def _bearer_error(status: int, error: str, description: str, scope: str = "") -> web.Response:
    challenge = f'Bearer error="{error}"'
    if scope:
        challenge += f', scope="{scope}"'
    return json_response(
        {"error": error, "error_description": description},
        status,
        headers={"WWW-Authenticate": challenge},
    )


async def _resource(request: web.Request, state: GetpaidState) -> web.StreamResponse:
    rec = await begin_resource(request, state)
    token = bearer_token(request)
    if state.always_401 or token is None:
        return _bearer_error(401, "invalid_token", "Missing or invalid access token")
    claims = jwt_decode(token, state.jwt_key)
    if claims is None or not state.is_valid(token):
        return _bearer_error(401, "invalid_token", "Invalid or expired access token")
    rest = request.match_info["tail"]
    first = rest.strip("/").split("/")[0]
    needed = SCOPE_RULES.get(first)
    granted = set(str(claims.get("scope", "")).split())
    if needed is not None and not (needed & granted):
        return _bearer_error(
            403, "insufficient_scope", "Token lacks the required scope", " ".join(sorted(needed))
        )
    return await resource_answer(request, rec, rest, {"data": [], "resource": first or "api"})


async def _handle_token(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    if request.method != "POST":
        return _oauth_error(405, "invalid_request", "Use POST")
    return await _token(request, state)


async def _handle_api(request: web.Request) -> web.StreamResponse:
    return await _resource(request, request.app[_STATE_KEY])


def create_getpaid_app(state: GetpaidState) -> web.Application:
    """The getpaid fake: API under ``/api``, token endpoint at ``/oauth/token``."""
    routes = {GETPAID_TOKEN_PATH: _handle_token, under(GETPAID_BASE): _handle_api}
    return seed_app(_STATE_KEY, state, routes)


async def start_getpaid(
    state: GetpaidState | None = None, host: str = "127.0.0.1", port: int = 0
) -> SeedFake[GetpaidState]:
    """Serve a getpaid fake; ``.url`` is ``.../api``, ``.token_url`` ``.../oauth/token``."""
    state = state if state is not None else GetpaidState()
    app = create_getpaid_app(state)
    fake = await start_seed("getpaid", state, app, host, port, GETPAID_BASE, GETPAID_TOKEN_PATH)
    state.token_url = fake.token_url
    return fake

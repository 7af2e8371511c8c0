"""Fake Didomi API (seeds/didomi-authentication.md).

``POST /v1/sessions`` with JSON ``{"type": "api-key", "key", "secret"}``
returns ``{"access_token": <JWT>}``; a problem authenticating is a 400 (the
docs say so: not 401). ``Authorization: Bearer <JWT>`` authenticates resources
until the JWT's ``exp``; without a valid token resources answer 401.
Error bodies follow Didomi's (Feathers) shape: ``{"name", "message", "code",
"className"}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .common import (
    FakeState,
    SeedFake,
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

__all__ = ["DIDOMI_BASE", "DidomiState", "create_didomi_app", "start_didomi"]

DIDOMI_BASE = "/v1"


@dataclass
class DidomiState(FakeState):
    """Didomi private API key and secret (demo defaults)."""

    key: str = "demo-didomi-key"
    secret: str = "demo-didomi-secret"
    subject: str = "demo-didomi-api-client"


_STATE_KEY = web.AppKey("didomi_state", DidomiState)


def _bad_request(message: str) -> web.Response:
    return json_response(
        {"name": "BadRequest", "message": message, "code": 400, "className": "bad-request"}, 400
    )


def _not_authenticated(message: str = "Invalid authentication information") -> web.Response:
    return json_response(
        {
            "name": "NotAuthenticated",
            "message": message,
            "code": 401,
            "className": "not-authenticated",
        },
        401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


async def _create_session(request: web.Request, state: DidomiState) -> web.StreamResponse:
    rec = await begin_token_call(request, state, "token")
    failure = await generic_token_failure(
        request, state, missing_field_body={"type": "api-key", "key": state.key}
    )
    if failure is not None:
        return failure
    if state.token_failure == "invalid_client":
        return _bad_request("Invalid API key or secret")
    try:
        payload: Any = json.loads(rec.body)
    except (ValueError, UnicodeDecodeError):
        return _bad_request("Body must be a JSON object")
    if not isinstance(payload, dict):
        return _bad_request("Body must be a JSON object")
    if payload.get("type") != "api-key":
        return _bad_request("Invalid authentication type")
    if payload.get("key") != state.key or payload.get("secret") != state.secret:
        return _bad_request("Invalid API key or secret")
    now = time.time()
    exp = math.ceil(now + state.lifetime)
    claims: dict[str, Any] = {
        "sub": state.subject,
        "iat": int(now),
        "exp": exp,
        "jti": uuid.uuid4().hex,
    }
    if state.token_failure == "past_expiry":
        claims["iat"] = int(now) - 7200
        claims["exp"] = int(now) - 3600
    elif state.token_failure == "nonsense_expiry":
        claims["exp"] = "banana"
    token = state.issue(jwt_encode(claims, state.jwt_key), float(exp))
    return json_response({"access_token": token})


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    rest = request.match_info["tail"]
    if rest == "/sessions" and request.method == "POST":
        return await _create_session(request, state)
    rec = await begin_resource(request, state)
    token = bearer_token(request)
    if state.always_401 or token is None:
        return _not_authenticated()
    if jwt_decode(token, state.jwt_key) is None or not state.is_valid(token):
        return _not_authenticated("jwt expired or invalid")
    parts = rest.strip("/").split("/")
    return await resource_answer(
        request, rec, rest, {"data": [], "resource": parts[0] or "v1", "total": 0}
    )


def create_didomi_app(state: DidomiState) -> web.Application:
    """The Didomi fake, serving its API under ``/v1``."""
    return seed_app(_STATE_KEY, state, {under(DIDOMI_BASE): _handle})


async def start_didomi(
    state: DidomiState | None = None, host: str = "127.0.0.1", port: int = 0
) -> SeedFake[DidomiState]:
    """Serve a Didomi fake; ``.url`` is ``http://host:port/v1``."""
    state = state if state is not None else DidomiState()
    app = create_didomi_app(state)
    return await start_seed(
        "didomi", state, app, host, port, DIDOMI_BASE, DIDOMI_BASE + "/sessions"
    )

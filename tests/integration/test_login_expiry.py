"""SPEC §3: expiry is taken, in this order, from `expires_at`, `expires_in`, a JWT `exp`
claim, then `lifetime` — pinned with a real token endpoint whose sources disagree."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.auth.login import LoginFlow, TokenHttp
from proxy.config import LoginAuth, parse_config
from proxy.fakes import RunningFake, serve

# Four different answers, in no sorted order, so every reordering picks a wrong one.
AT, IN, EXP, LIFETIME = 250.0, 100.0, 400.0, 175.0


def jwt(claims: dict[str, Any]) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.sig"


class TokenEndpoint:
    """Answers POST /login with whichever expiry sources the test asks for."""

    def __init__(self) -> None:
        self.sources: set[str] = set()

    async def login(self, _request: web.Request) -> web.Response:
        now = time.time()
        document: dict[str, Any] = {
            "access_token": jwt({"sub": "x", "exp": int(now + EXP)})
            if "jwt" in self.sources
            else "opaque-token-0c1d"
        }
        if "at" in self.sources:
            document["session"] = {"expires_on": now + AT}
        if "in" in self.sources:
            document["expires_in"] = IN
        return web.json_response(document)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[TokenEndpoint, RunningFake]]:
    state = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/login", state.login)
    async with await serve(app) as running:
        yield state, running


def login_auth(url: str) -> LoginAuth:
    auth = {
        "type": "login",
        "request": {"url": url + "/login", "json": {}},
        "token": "access_token",
        "expires_at": "session.expires_on",
        "expires_in": "expires_in",
        "lifetime": LIFETIME,
    }
    config = parse_config({"upstreams": {"api": {"url": url, "auth": auth}}}, env={})
    login = config.upstreams["api"].auth
    assert isinstance(login, LoginAuth)
    return login


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        pytest.param({"at", "in", "jwt"}, AT, id="expires_at-first"),
        pytest.param({"in", "jwt"}, IN, id="then-expires_in"),
        pytest.param({"at", "jwt"}, AT, id="expires_at-over-jwt"),
        pytest.param({"jwt"}, EXP, id="then-jwt-exp"),
        pytest.param(set(), LIFETIME, id="then-lifetime"),
    ],
)
async def test_expiry_sources_in_the_spec_order(
    endpoint: tuple[TokenEndpoint, RunningFake], sources: set[str], expected: float
) -> None:
    state, running = endpoint
    state.sources = sources
    async with aiohttp.ClientSession() as session:
        http = TokenHttp(session, "api", aiohttp.ClientTimeout(total=5), False, frozenset())
        flow = LoginFlow(login_auth(running.url), http)
        before = time.time()
        grant = await flow.fetch(None)
        after = time.time()
    assert grant.expires_at is not None
    # JWT exp is whole seconds; the others are read against the clock around the call.
    assert before + expected - 1 <= grant.expires_at <= after + expected + 0.01

"""The getpaid fake behaves as seeds/getpaid-authentication.md (and RFC 6749) describe."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote_plus

import aiohttp

from proxy.fakes import ISSUED, GetpaidState, SeedFake, jwt_decode, start_getpaid

from .helpers import basic, bearer, sleep_until

Getpaid = SeedFake[GetpaidState]


def grant(fake: Getpaid, **override: Any) -> dict[str, Any]:
    st = fake.state
    body: dict[str, Any] = {
        "client_id": st.client_id,
        "client_secret": st.client_secret,
        "audience": st.audience,
        "grant_type": "client_credentials",
        "scope": "accounts:read_write invoices:read_write",
    }
    body.update(override)
    return {k: v for k, v in body.items() if v is not None}


async def token_for(
    session: aiohttp.ClientSession, fake: Getpaid, **override: Any
) -> dict[str, Any]:
    async with session.post(fake.token_url, json=grant(fake, **override)) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
    return data


async def status_of(session: aiohttp.ClientSession, url: str, token: str | None) -> int:
    headers = {} if token is None else bearer(token)
    async with session.get(url, headers=headers) as r:
        return r.status


async def test_urls(getpaid: Getpaid) -> None:
    root = f"http://127.0.0.1:{getpaid.server.port}"
    assert getpaid.url == root + "/api"
    assert getpaid.token_url == root + "/oauth/token"
    assert getpaid.state.token_url == getpaid.token_url


async def test_client_credentials_grant(session: aiohttp.ClientSession, getpaid: Getpaid) -> None:
    before = time.time()
    data = await token_for(session, getpaid)
    assert set(data) == {"access_token", "token_type", "expires_in"}
    assert data["token_type"] == "bearer"
    assert data["expires_in"] == 60
    assert data["access_token"] in ISSUED
    claims = jwt_decode(data["access_token"], getpaid.state.jwt_key)
    assert claims is not None
    assert claims["scope"] == "accounts:read_write invoices:read_write"
    assert claims["aud"] == "https://api.getpaid.io"
    assert before + 60 <= claims["exp"] <= time.time() + 62
    assert getpaid.state.token_requests == 1


async def test_form_body_and_basic_client_auth(
    session: aiohttp.ClientSession, getpaid: Getpaid
) -> None:
    form = grant(getpaid)
    async with session.post(getpaid.token_url, data=form) as r:
        assert r.status == 200
        assert getpaid.state.token_calls[-1].header("Content-Type") == (
            "application/x-www-form-urlencoded"
        )
    st = getpaid.state
    body = grant(getpaid, client_id=None, client_secret=None)
    headers = basic(st.client_id, st.client_secret)
    async with session.post(getpaid.token_url, json=body, headers=headers) as r:
        assert r.status == 200
    async with session.post(getpaid.token_url, data=body, headers=headers) as r:
        assert r.status == 200
    # Secret both in Basic and in the body: two methods at once (RFC 6749 §2.3).
    async with session.post(getpaid.token_url, json=grant(getpaid), headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"


async def test_basic_with_form_encoded_credentials(session: aiohttp.ClientSession) -> None:
    state = GetpaidState(client_id="id with space", client_secret="s3cr:t+/é")
    async with await start_getpaid(state) as fake:
        body = grant(fake, client_id=None, client_secret=None)
        plain = basic(state.client_id, state.client_secret)
        encoded = basic(quote_plus(state.client_id), quote_plus(state.client_secret))
        for headers in (plain, encoded):
            async with session.post(fake.token_url, json=body, headers=headers) as r:
                assert r.status == 200
        async with session.post(fake.token_url, json=body, headers=basic("id", "x")) as r:
            assert r.status == 401


async def test_scope_defaults_to_all_allowed(
    session: aiohttp.ClientSession, getpaid: Getpaid
) -> None:
    data = await token_for(session, getpaid, scope=None)
    claims = jwt_decode(data["access_token"], getpaid.state.jwt_key)
    assert claims is not None
    assert set(claims["scope"].split()) == {"accounts:read_write", "invoices:read_write"}


async def test_token_endpoint_errors(session: aiohttp.ClientSession, getpaid: Getpaid) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        (grant(getpaid, client_secret="wrong"), 401, "invalid_client"),
        (grant(getpaid, client_id="someone-else"), 401, "invalid_client"),
        (grant(getpaid, client_id=None, client_secret=None), 401, "invalid_client"),
        (grant(getpaid, audience="https://api.sandbox.getpaid.io"), 400, "invalid_request"),
        (grant(getpaid, audience=None), 400, "invalid_request"),
        (grant(getpaid, grant_type="password"), 400, "unsupported_grant_type"),
        (grant(getpaid, grant_type=None), 400, "invalid_request"),
        (grant(getpaid, scope="accounts:read_write admin:all"), 400, "invalid_scope"),
    ]
    for body, status, error in cases:
        async with session.post(getpaid.token_url, json=body) as r:
            assert r.status == status, body
            data = await r.json()
            assert data["error"] == error, body
    async with session.post(
        getpaid.token_url, data=b"x", headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 400
    assert getpaid.state.token_requests == len(cases) + 1


async def test_scopes_are_enforced(session: aiohttp.ClientSession, getpaid: Getpaid) -> None:
    invoices_only = (await token_for(session, getpaid, scope="invoices:read_write"))["access_token"]
    both = (await token_for(session, getpaid))["access_token"]
    api = getpaid.url
    assert await status_of(session, api + "/invoices", invoices_only) == 200
    assert await status_of(session, api + "/invoices/42", invoices_only) == 200
    assert await status_of(session, api + "/something-else", invoices_only) == 200
    async with session.get(api + "/accounts", headers=bearer(invoices_only)) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "insufficient_scope"
    assert await status_of(session, api + "/accounts", both) == 200


async def test_read_only_scope_grants_accounts(session: aiohttp.ClientSession) -> None:
    state = GetpaidState(allowed_scopes="accounts:read invoices:read_write")
    async with await start_getpaid(state) as fake:
        token = (await token_for(session, fake, scope="accounts:read"))["access_token"]
        assert await status_of(session, fake.url + "/accounts", token) == 200
        assert await status_of(session, fake.url + "/invoices", token) == 403


async def test_missing_invalid_expired_token_is_401(session: aiohttp.ClientSession) -> None:
    async with await start_getpaid(GetpaidState(lifetime=1)) as fake:
        data = await token_for(session, fake)
        token = data["access_token"]
        assert data["expires_in"] == 1
        assert await status_of(session, fake.url + "/invoices", token) == 200
        assert await status_of(session, fake.url + "/invoices", None) == 401
        assert await status_of(session, fake.url + "/invoices", token + "x") == 401
        claims = jwt_decode(token, fake.state.jwt_key)
        assert claims is not None
        await sleep_until(float(claims["exp"]))
        assert await status_of(session, fake.url + "/invoices", token) == 401


async def test_revoke_and_always_401(session: aiohttp.ClientSession, getpaid: Getpaid) -> None:
    token = (await token_for(session, getpaid))["access_token"]
    getpaid.state.revoke_all()
    assert await status_of(session, getpaid.url + "/invoices", token) == 401
    fresh = (await token_for(session, getpaid))["access_token"]
    assert await status_of(session, getpaid.url + "/invoices", fresh) == 200
    getpaid.state.always_401 = True
    assert await status_of(session, getpaid.url + "/invoices", fresh) == 401

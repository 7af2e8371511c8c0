"""Hostile token endpoints and secrets in derived forms (issue 14, findings 3, 4, 5).

The token endpoint is a `ScriptedPeer` serving scripted bytes; the upstream is the
echo fake. Besides what each test asserts, the after-every-test scan (conftest)
looks for every secret — percent-encoded, JSON-escaped, inside base64 — in logs,
the proxy's own bodies and every `Location` a client received.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from tests.conftest import Echo, RunningProxy, StartProxy
from tests.integration.scripted_peer import READ, Step, scripted_peer

SECRET = "s3cr3t/pa+ss w0rd"  # `/`, `+` and a space: every encoding differs
CLIENT_ID = "client-id-7"
ENV = {"SECRET": SECRET}  # secrets come from the environment, as the SPEC says


def answer(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def token_json(token: str) -> bytes:
    return answer("200 OK", json.dumps({"access_token": token}).encode(), "Content-Type: x/json")


async def login_proxy(
    start_proxy: StartProxy,
    echo: Echo,
    url: str,
    inject: dict[str, str] | None = None,
) -> RunningProxy:
    auth: dict[str, Any] = {
        "type": "login",
        "request": {
            "url": url + "/token",
            "basic": {"username": CLIENT_ID, "password": "${SECRET}"},
        },
        "token": "access_token",
        "inject": inject or {"header": "X-Token", "value": "{token}"},
        "lifetime": 60,
    }
    upstreams = {"t": {"url": echo.url + "/base", "auth": auth}}
    return await start_proxy({"upstreams": upstreams}, env=ENV)


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, str, dict[str, Any]]:
    async with client.get(url, allow_redirects=False) as resp:
        text = await resp.text()
        document = json.loads(text) if resp.content_type == "application/json" else {}
        return resp.status, text, document


def secret_forms() -> list[str]:
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    return [SECRET, quote(SECRET, safe=""), quote_plus(SECRET), json.dumps(SECRET)[1:-1], basic]


def assert_no_secret(text: str) -> None:
    for form in secret_forms():
        assert form not in text, (form, text[:300])


# -- finding 4: what a token endpoint echoes goes through the scrubber ----------


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            [READ, answer("200 OK", b"<html>", f"Content-Type: text/html; x={SECRET}")],
            id="content-type-echoes-the-secret",
        ),
        pytest.param(
            [READ, answer("200 OK", b"<html>", f"Content-Type: text/{quote(SECRET, safe='')}")],
            id="content-type-echoes-it-percent-encoded",
        ),
        pytest.param(
            [
                READ,
                lambda head: answer(
                    "401 Unauthorized",
                    b"you sent " + head.split(b"Authorization: ", 1)[1].split(b"\r\n")[0],
                ),
            ],
            id="error-body-echoes-our-basic-header",
        ),
        pytest.param(
            [
                READ,
                lambda head: answer(
                    "400 Bad Request",
                    json.dumps(
                        {
                            "error": "invalid_client",
                            "error_description": "got "
                            + head.split(b"Authorization: Basic ", 1)[1].split(b"\r\n")[0].decode(),
                        }
                    ).encode(),
                ),
            ],
            id="oauth-error-echoes-the-basic-value",
        ),
        pytest.param(
            [READ, answer("500 Oops", json.dumps({"error": f"bad {SECRET}"}).encode())],
            id="json-escaped-secret-in-error",
        ),
        pytest.param(
            [READ, answer("500 Oops", ("x" * 290 + SECRET).encode())],
            id="secret-across-the-300-character-cut",
        ),
    ],
)
async def test_token_endpoint_text_is_scrubbed_of_every_form(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, script: list[Step]
) -> None:
    async with scripted_peer(script) as peer:
        proxy = await login_proxy(start_proxy, echo, peer.url)
        status, text, document = await get(client, proxy.url + "/t/x")
        assert status == 502 and document["error"]["code"] == "auth_failed"
        assert_no_secret(text)
        status, text, _ = await get(client, proxy.url + "/-/status")
        assert status == 200
        assert_no_secret(text)
    assert echo.state.requests == []


# -- finding 5: a token that cannot be sent, an answer that cannot be read -------


@pytest.mark.parametrize(
    ("token", "inject"),
    [
        pytest.param("abc\r\nX-Injected: 1", None, id="crlf-in-header-token"),
        pytest.param("abc\ndef", None, id="lf-in-header-token"),
        *[
            pytest.param(f"abc{ch}def", None, id=f"ctl-{ord(ch):02x}-in-header-token")
            for ch in "\x00\x0b\x0c\x7f\x1b"
        ],
        pytest.param("tök", None, id="non-ascii-in-header-token"),
        pytest.param("abc\ud800", {"query": "token"}, id="lone-surrogate-in-query-token"),
    ],
)
async def test_a_token_that_cannot_be_sent_is_auth_failed_with_backoff(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    token: str,
    inject: dict[str, str] | None,
) -> None:
    async with scripted_peer([READ, token_json(token)]) as peer:
        proxy = await login_proxy(start_proxy, echo, peer.url, inject)
        status, _, document = await get(client, proxy.url + "/t/x")
        assert status == 502, document
        assert document["error"]["code"] == "auth_failed"
        assert "cannot be sent" in document["error"]["message"]
        status, _, document = await get(client, proxy.url + "/t/y")
        assert status == 503 and document["error"]["code"] == "auth_backoff"
        assert len(peer.heads) == 1  # backing off: no second token request
    assert echo.state.requests == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested-json"),
        pytest.param(b'{"access_token": ' + b"[" * 50_000, id="deep-and-cut"),
        pytest.param(b'{"access_token": {"a": 1}}', id="token-is-an-object"),
        pytest.param(b"\xff\xfe\x00{", id="not-utf8"),
    ],
)
async def test_an_unreadable_answer_is_auth_failed_with_backoff(
    start_proxy: StartProxy, echo: Echo, client: aiohttp.ClientSession, body: bytes
) -> None:
    async with scripted_peer(
        [READ, answer("200 OK", body, "Content-Type: application/json")]
    ) as peer:
        proxy = await login_proxy(start_proxy, echo, peer.url)
        status, _, document = await get(client, proxy.url + "/t/x")
        assert status == 502, document
        assert document["error"]["code"] == "auth_failed"
        for _ in range(3):
            status, _, document = await get(client, proxy.url + "/t/y")
            assert status == 503 and document["error"]["code"] == "auth_backoff"
        assert len(peer.heads) == 1  # promise 2: one token call, not one per request


# -- finding 3: a query credential never reaches the client ----------------------


async def test_a_rewritten_location_loses_the_injected_and_stripped_params(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    location = f"/base/dir/?a=1&api_key={quote(SECRET, safe='')}&internal=x#top"
    redirect = answer("302 Found", b"", f"Location: {location}")
    async with scripted_peer() as peer:
        absolute = f"Location: {peer.url}/base/z?api%5Fkey={quote_plus(SECRET)}"
        peer.scripts.append([READ, redirect, READ, answer("302 Found", b"", absolute)])
        proxy = await start_proxy(
            {
                "upstreams": {
                    "q": {
                        "url": peer.url + "/base",
                        "auth": {"type": "query", "param": "api_key", "value": "${SECRET}"},
                        "strip_query": ["internal"],
                    }
                }
            },
            env=ENV,
        )
        async with client.get(proxy.url + "/q/go", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/q/dir/?a=1#top"
        async with client.get(proxy.url + "/q/go2", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/q/z"


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda s: quote(s, safe=""), id="percent-encoded"),
        pytest.param(quote_plus, id="plus-encoded"),
        pytest.param(lambda s: quote(s, safe="").lower(), id="lower-case-hex"),
    ],
)
async def test_the_access_log_redacts_a_secret_in_any_encoding(
    start_proxy: StartProxy,
    echo: Echo,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    encode: Any,
) -> None:
    proxy = await start_proxy(
        {
            "upstreams": {
                "h": {
                    "url": echo.url,
                    "auth": {"type": "header", "name": "X-Key", "value": "${SECRET}"},
                }
            }
        },
        env=ENV,
    )
    capsys.readouterr()
    async with client.get(proxy.url + "/h/x?note=" + encode(SECRET)) as resp:
        assert resp.status == 200
    out = capsys.readouterr().out
    assert "request_finished" in out
    assert_no_secret(out)
    assert encode(SECRET) not in out

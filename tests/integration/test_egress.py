"""SPEC §10 with a real forward proxy (Debian's tinyproxy) and TLS upstreams with a
private CA: CONNECT for HTTPS, absolute-form for plain HTTP, no_proxy exemptions,
proxy credentials, the token session through the proxy, and client certificates.

tinyproxy binds its outgoing connections to 127.0.0.3, so the peer address an
upstream saw tells a proxied request from a direct one."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartProxy
from tests.integration.egress_kit import (
    PROXY_EGRESS_ADDRESS,
    Pki,
    Recorder,
    alerting_tls_server,
    make_pki,
    recording_upstream,
    tinyproxy,
)
from tests.support.net import free_port

PROXY_USER, PROXY_PASSWORD = "egressuser", "egress-s3cret-pw"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[Recorder]:
    """HTTPS on 127.0.0.1 with a certificate for the name `localhost` only: a client
    that verified the proxy's address (127.0.0.1) instead would fail."""
    async with recording_upstream(pki.server_context("localhost"), name="localhost") as up:
        yield up


@pytest.fixture
async def http_upstream() -> AsyncIterator[Recorder]:
    async with recording_upstream() as up:
        yield up


def _route(url: str, **extra: Any) -> dict[str, Any]:
    return {"upstreams": {"api": {"url": url, **extra}}}


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_https_upstream_through_connect_verifies_the_upstream_name(
    tmp_path: Path,
    pki: Pki,
    tls_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    async with tinyproxy(tmp_path / "tp", connect_ports=(tls_upstream.port,)) as tp:
        proxy = await start_proxy(
            _route(tls_upstream.url, tls={"ca_file": str(pki.ca_file)}),
            env={"https_proxy": tp.url},
        )
        status, body = await _get(client, f"{proxy.url}/api/v1/items?q=1")
        assert status == 200, body
        assert body["path"] == "/v1/items?q=1"
        assert [s.peer for s in tls_upstream.seen] == [PROXY_EGRESS_ADDRESS]
        assert f"CONNECT localhost:{tls_upstream.port}" in tp.log()


async def test_plain_http_upstream_goes_as_absolute_form(
    tmp_path: Path, http_upstream: Recorder, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with tinyproxy(tmp_path / "tp", connect_ports=(443,)) as tp:
        proxy = await start_proxy(_route(http_upstream.url), env={"HTTP_PROXY": tp.url})
        for _ in range(2):  # the second one on a pooled connection to the proxy
            status, body = await _get(client, f"{proxy.url}/api/a%2Fb?x=1")
            assert status == 200, body
        seen = http_upstream.seen
        assert [s.peer for s in seen] == [PROXY_EGRESS_ADDRESS] * 2
        assert [s.path for s in seen] == ["/a%2Fb?x=1"] * 2  # byte for byte through the proxy
        assert "tinyproxy" in (seen[0].header("Via") or "")
        assert f"GET http://{http_upstream.url.split('//')[1]}/a%2Fb?x=1" in tp.log()


@pytest.mark.parametrize(
    "no_proxy",
    ["127.0.0.0/8", "127.0.0.1", "*", "example.test, .other.test,127.0.0.1/32", "::1,127.0.0.1:9"],
)
async def test_no_proxy_exempts_matching_hosts(
    no_proxy: str,
    http_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that is not there: never used
    proxy = await start_proxy(
        _route(http_upstream.url), env={"http_proxy": dead, "NO_PROXY": no_proxy}
    )
    status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 200, body
    assert [s.peer for s in http_upstream.seen] == ["127.0.0.1"]


async def test_no_proxy_that_does_not_match_leaves_the_proxy_in_place(
    tmp_path: Path, http_upstream: Recorder, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    async with tinyproxy(tmp_path / "tp", connect_ports=(443,)) as tp:
        proxy = await start_proxy(
            _route(http_upstream.url),
            # lowercase wins over uppercase; 10/8 and a suffix do not cover 127.0.0.1
            env={"http_proxy": tp.url, "no_proxy": "10.0.0.0/8,.0.0.1", "NO_PROXY": "*"},
        )
        status, _ = await _get(client, f"{proxy.url}/api/x")
        assert status == 200
        assert [s.peer for s in http_upstream.seen] == [PROXY_EGRESS_ADDRESS]


async def test_egress_proxy_none_and_url_override_the_environment(
    tmp_path: Path, http_upstream: Recorder, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with tinyproxy(tmp_path / "tp", connect_ports=(443,)) as tp:
        raw = {
            "egress_proxy": tp.url,  # top level: every upstream ...
            "upstreams": {
                "via": {"url": http_upstream.url},
                "direct": {"url": http_upstream.url, "egress_proxy": "none"},  # ... but this
            },
        }
        proxy = await start_proxy(raw, env={"http_proxy": dead})
        assert (await _get(client, f"{proxy.url}/via/1"))[0] == 200
        assert (await _get(client, f"{proxy.url}/direct/2"))[0] == 200
        peers = {s.path: s.peer for s in http_upstream.seen}
        assert peers == {"/1": PROXY_EGRESS_ADDRESS, "/2": "127.0.0.1"}


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_proxy_that_demands_credentials(
    scheme: str,
    tmp_path: Path,
    pki: Pki,
    tls_upstream: Recorder,
    http_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream = tls_upstream if scheme == "https" else http_upstream
    route = _route(upstream.url, tls={"ca_file": str(pki.ca_file)})
    variable = f"{scheme}_proxy"
    async with tinyproxy(
        tmp_path / "tp", connect_ports=(upstream.port,), basic_auth=(PROXY_USER, PROXY_PASSWORD)
    ) as tp:
        without = await start_proxy(route, env={variable: tp.url})
        status, body = await _get(client, f"{without.url}/api/x")
        assert status == 502
        assert body["error"]["code"] == "upstream_unreachable"
        assert "demands credentials (407" in body["error"]["message"]
        assert upstream.seen == []

        wrong = await start_proxy(
            route, env={variable: f"http://{PROXY_USER}:nope1234@{tp.url[7:]}"}
        )
        async with client.get(f"{wrong.url}/api/x") as resp:
            if scheme == "https":
                assert resp.status == 502
                message = (await resp.json())["error"]["message"]
                # tinyproxy answers wrong credentials with 401, not 407
                assert "refused the proxy credentials (401)" in message
            else:  # an absolute-form 401 could be the upstream's own: passed on
                assert resp.status == 401
                assert resp.headers["Server"].startswith("tinyproxy")
        assert upstream.seen == []

        with_creds = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{tp.url[7:]}"
        good = await start_proxy(route, env={variable: with_creds})
        for _ in range(2):
            status, body = await _get(client, f"{good.url}/api/x")
            assert status == 200, body
        assert good.config.secrets >= {PROXY_PASSWORD}
    assert [s.peer for s in upstream.seen] == [PROXY_EGRESS_ADDRESS] * 2
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    for seen in upstream.seen:  # the proxy's credentials never reach the upstream
        assert seen.header("Proxy-Authorization") is None
        text = repr(seen.headers) + seen.path
        assert PROXY_PASSWORD not in text and encoded not in text
    out = capsys.readouterr().out
    assert PROXY_PASSWORD not in out and encoded not in out
    assert "nope1234" not in out  # a wrong password is a secret too


async def test_a_proxy_that_refuses_the_connect_names_its_status(
    tmp_path: Path,
    pki: Pki,
    tls_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    async with tinyproxy(tmp_path / "tp", connect_ports=(443,)) as tp:  # not the upstream's
        proxy = await start_proxy(
            _route(tls_upstream.url, tls={"ca_file": str(pki.ca_file)}),
            env={"HTTPS_PROXY": tp.url},
        )
        status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 502
    message = body["error"]["message"]
    assert f"refused to CONNECT to localhost:{tls_upstream.port} (403" in message, message
    assert tls_upstream.seen == []


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_an_unreachable_proxy_is_a_clear_502(
    scheme: str,
    pki: Pki,
    tls_upstream: Recorder,
    http_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    upstream = tls_upstream if scheme == "https" else http_upstream
    port = free_port()
    proxy = await start_proxy(
        _route(upstream.url, tls={"ca_file": str(pki.ca_file)}),
        env={f"{scheme}_proxy": f"http://127.0.0.1:{port}"},
    )
    status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 502
    message = body["error"]["message"]
    assert f"egress proxy 127.0.0.1:{port} could not be reached" in message, message
    assert upstream.seen == []


async def test_the_token_session_goes_through_the_proxy_too(
    tmp_path: Path,
    pki: Pki,
    tls_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": f"{tls_upstream.url}/token",
        "client_id": "cid",
        "client_secret": "egress-client-secret",
    }
    route = _route(tls_upstream.url, auth=auth, tls={"ca_file": str(pki.ca_file)})
    async with tinyproxy(
        tmp_path / "tp",
        connect_ports=(tls_upstream.port,),
        basic_auth=(PROXY_USER, PROXY_PASSWORD),
    ) as tp:
        without = await start_proxy(route, env={"https_proxy": tp.url})
        status, body = await _get(client, f"{without.url}/api/x")
        assert status == 502
        assert body["error"]["code"] == "auth_failed"
        assert "demands credentials (407" in body["error"]["message"]
        assert tls_upstream.token_requests == 0

        with_creds = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{tp.url[7:]}"
        good = await start_proxy(route, env={"https_proxy": with_creds})
        status, body = await _get(client, f"{good.url}/api/x")
        assert status == 200, body
    token_call, api_call = tls_upstream.seen
    assert token_call.path == "/token" and token_call.peer == PROXY_EGRESS_ADDRESS
    assert api_call.header("Authorization") == "Bearer egress-issued-token"
    assert api_call.peer == PROXY_EGRESS_ADDRESS
    for seen in tls_upstream.seen:
        assert seen.header("Proxy-Authorization") is None
    assert PROXY_PASSWORD not in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_websockets_go_through_a_connect_tunnel(
    scheme: str,
    tmp_path: Path,
    pki: Pki,
    tls_upstream: Recorder,
    http_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    """Forward proxies relay upgrades only inside CONNECT (as browsers use them), so a
    plain ws:// upstream is tunnelled too, not sent as an absolute-form upgrade."""
    upstream = tls_upstream if scheme == "https" else http_upstream
    route = _route(upstream.url, tls={"ca_file": str(pki.ca_file)})
    async with tinyproxy(
        tmp_path / "tp", connect_ports=(upstream.port,), basic_auth=(PROXY_USER, PROXY_PASSWORD)
    ) as tp:
        with_creds = f"http://{PROXY_USER}:{PROXY_PASSWORD}@{tp.url[7:]}"
        proxy = await start_proxy(route, env={f"{scheme}_proxy": with_creds})
        async with client.ws_connect(f"{proxy.url}/api/ws") as ws:
            await ws.send_str("through the tunnel")
            assert (await ws.receive(timeout=5)).data == "through the tunnel"
        assert f"CONNECT {upstream.url.split('//')[1]}" in tp.log()
    (seen,) = upstream.seen
    assert seen.peer == PROXY_EGRESS_ADDRESS and seen.path == "/ws"
    assert seen.header("Proxy-Authorization") is None


# -- client certificates --------------------------------------------------------------


@pytest.fixture
async def mtls_upstream(pki: Pki) -> AsyncIterator[Recorder]:
    """HTTPS that demands a client certificate signed by the test CA."""
    ctx = pki.server_context("localhost", client_ca=pki.ca_file)
    async with recording_upstream(ctx, name="localhost") as up:
        yield up


@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_client_certificate_is_presented(
    encrypted: bool,
    pki: Pki,
    mtls_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    password = b"key-pass-1234" if encrypted else None
    cert_file, key_file = pki.issue("authproxy-client", client=True, password=password)
    tls: dict[str, Any] = {
        "ca_file": str(pki.ca_file),
        "cert_file": str(cert_file),
        "key_file": str(key_file),
    }
    if password:
        tls["key_password"] = password.decode()
    proxy = await start_proxy(_route(mtls_upstream.url, tls=tls))
    status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 200, body
    cert = mtls_upstream.seen[0].client_cert
    assert cert is not None and (("commonName", "authproxy-client"),) in cert["subject"]  # type: ignore[operator]


async def test_a_demanded_client_certificate_missing_is_a_clear_502(
    pki: Pki,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    ctx = pki.server_context("localhost", client_ca=pki.ca_file)
    with alerting_tls_server(ctx) as (port, handshake_errors):
        proxy = await start_proxy(
            _route(f"https://localhost:{port}", tls={"ca_file": str(pki.ca_file)})
        )
        status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    message = body["error"]["message"]
    assert "localhost demands a client certificate" in message, message
    assert "tls.cert_file" in message
    assert any("did not return a certificate" in e for e in handshake_errors), handshake_errors


async def test_client_certificate_through_the_egress_proxy(
    tmp_path: Path,
    pki: Pki,
    mtls_upstream: Recorder,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    cert_file, key_file = pki.issue("tunnelled-client", client=True)
    tls = {"ca_file": str(pki.ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
    async with tinyproxy(tmp_path / "tp", connect_ports=(mtls_upstream.port,)) as tp:
        proxy = await start_proxy(_route(mtls_upstream.url, tls=tls), env={"https_proxy": tp.url})
        status, body = await _get(client, f"{proxy.url}/api/x")
    assert status == 200, body
    assert mtls_upstream.seen[0].peer == PROXY_EGRESS_ADDRESS
    assert mtls_upstream.seen[0].client_cert is not None


# -- authproxy check / run -----------------------------------------------------------


def _authproxy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    environ = {k: v for k, v in environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env={**environ, **env},
        timeout=30,
    )


def test_check_names_the_egress_proxy_and_refuses_bad_client_certificates(
    tmp_path: Path, pki: Pki
) -> None:
    cert, _ = pki.issue("client", client=True)
    _, other_key = pki.issue("other", client=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstreams:\n"
        "  api: {url: https://api.example.test/v1}\n"
        "  near: {url: https://near.internal.test}\n"
    )
    env = {"HTTPS_PROXY": "http://u:check-pw-1@proxy.corp:3128", "NO_PROXY": ".internal.test"}
    ok = _authproxy("check", "-c", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        "/api -> https://api.example.test/v1 (none) via egress proxy proxy.corp:3128",
        "/near -> https://near.internal.test (none)",
    ]
    assert "check-pw-1" not in ok.stdout + ok.stderr

    config.write_text(
        "upstreams:\n"
        "  api:\n"
        "    url: https://api.example.test\n"
        f"    tls: {{cert_file: {cert}, key_file: {other_key}}}\n"
    )
    for command in ("check", "run"):
        bad = _authproxy(command, "-c", str(config), env={})
        assert bad.returncode == 2, bad.stderr
        assert "upstreams.api.tls: key_file: " in bad.stderr and "is not the key of" in bad.stderr
        assert "Traceback" not in bad.stderr

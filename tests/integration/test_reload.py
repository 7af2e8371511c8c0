"""Reload without a restart (SPEC §9), against the real `authproxy run` process.

Each test writes a config file, starts the proxy as the container does, changes
the file (or a secret file it names), sends SIGHUP (or, with `watch: true`,
nothing) and checks what the fakes received. Every secret of every version of
the files must stay out of the proxy's output.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.fakes import (
    ISSUED,
    DidomiState,
    PaymoState,
    SeedFake,
    start_didomi,
    start_paymo,
)

AUTHPROXY = Path(sys.executable).parent / "authproxy"
OLD_KEY, NEW_KEY = "reload-old-secret-4f1d", "reload-new-secret-9c2e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """`authproxy run` in a subprocess, its config file and its log."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.dir = tmp_path
        self.config_file = tmp_path / "config.yaml"
        self.write(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "proxy.log"
        self.bodies: list[str] = []
        env = {**os.environ, "AUTHPROXY_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        env.pop("AUTHPROXY_CONFIG", None)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(AUTHPROXY), "run", "-c", str(self.config_file), "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def write(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_file)

    def text(self) -> str:
        return self.log.read_text()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]
        return [r for r in records if name is None or r.get("event") == name]

    async def wait_for(self, name: str, count: int = 1, deadline_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        while True:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.poll() is None, f"proxy exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {name} #{count} in:\n{self.text()[-3000:]}"
            await asyncio.sleep(0.05)

    def attempts(self) -> int:
        return len(self.events("config_reloaded")) + len(self.events("config_reload_failed"))

    async def reload(self, config: dict[str, Any] | str | None = None) -> dict[str, Any]:
        """Write `config` (if given), send SIGHUP, return the outcome's log record."""
        if config is not None:
            self.write(config)
        before = self.attempts()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.attempts() <= before:
            assert self.proc.poll() is None, f"proxy exited on SIGHUP:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, "the reload never finished"
            await asyncio.sleep(0.05)
        records = [
            r for r in self.events() if r["event"] in ("config_reloaded", "config_reload_failed")
        ]
        return records[-1]

    async def ready(self) -> None:
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"proxy exited:\n{self.text()[-3000:]}"
                try:
                    async with session.get(self.url + "/-/ready") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("proxy never became ready")

    async def get(
        self, session: aiohttp.ClientSession, path: str
    ) -> tuple[int, dict[str, Any] | None]:
        async with session.get(self.url + path) as resp:
            body = await resp.text()
            try:
                document = json.loads(body)
            except ValueError:
                return resp.status, None
            if path.startswith("/-/") or (isinstance(document, dict) and "error" in document):
                self.bodies.append(body)  # the proxy's own answers, not the upstreams'
            return resp.status, document

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, 20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def assert_no_leaks(self, *secrets: str) -> None:
        output = self.text() + "\n".join(self.bodies)
        leaked = [s[:6] for s in {*secrets, *ISSUED} if len(s) >= 4 and s in output]
        assert not leaked, f"secrets in the proxy's output: {leaked}"
        assert "Traceback" not in self.text()


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Proxy] = []

    async def start(config: dict[str, Any]) -> Proxy:
        proxy = Proxy(tmp_path, {"shutdown_timeout": 5, **config})
        started.append(proxy)
        await proxy.ready()
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def didomi() -> AsyncIterator[SeedFake[DidomiState]]:
    async with await start_didomi(DidomiState(lifetime=600, secret=OLD_KEY)) as fake:
        yield fake


@pytest.fixture
async def paymo() -> AsyncIterator[SeedFake[PaymoState]]:
    async with await start_paymo(PaymoState(lifetime=600, api_key=OLD_KEY)) as fake:
        yield fake


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def didomi_upstream(fake: SeedFake[DidomiState], secret_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "url": fake.url,
        "auth": {"type": "didomi", "key": fake.state.key, "secret": f"${{file:{secret_file}}}"},
        **extra,
    }


def sent_secret(fake: SeedFake[DidomiState]) -> str:
    return str(json.loads(fake.state.token_calls[-1].body)["secret"])


async def test_rotated_secret_file_and_sighup(
    tmp_path: Path, launch: Any, didomi: SeedFake[DidomiState], client: aiohttp.ClientSession
) -> None:
    secret = tmp_path / "didomi-secret"
    secret.write_text(OLD_KEY + "\n")
    proxy = await launch({"upstreams": {"didomi": didomi_upstream(didomi, secret)}})
    assert (await proxy.get(client, "/didomi/properties"))[0] == 200
    # The API rotates the secret and ends the session: the old secret now fails there.
    didomi.state.secret = NEW_KEY
    didomi.state.revoke_all()
    status, body = await proxy.get(client, "/didomi/properties")
    assert status == 502 and body is not None and body["error"]["code"] == "auth_failed"
    assert sent_secret(didomi) == OLD_KEY
    secret.write_text(NEW_KEY + "\n")
    outcome = await proxy.reload()
    assert outcome["event"] == "config_reloaded"
    assert outcome["changed"] == ["didomi"]
    # A fresh token manager: no backoff inherited from the failure above.
    assert (await proxy.get(client, "/didomi/properties"))[0] == 200
    assert sent_secret(didomi) == NEW_KEY
    assert await proxy.stop() == 0
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


async def test_unchanged_auth_keeps_its_token_across_a_reload(
    tmp_path: Path,
    launch: Any,
    didomi: SeedFake[DidomiState],
    echo: Any,
    client: aiohttp.ClientSession,
) -> None:
    secret = tmp_path / "didomi-secret"
    secret.write_text(OLD_KEY)
    upstream = didomi_upstream(didomi, secret, headers={"X-Default": "one"})
    proxy = await launch({"upstreams": {"didomi": upstream}})
    assert (await proxy.get(client, "/didomi/properties"))[0] == 200
    assert didomi.state.token_requests == 1
    assert (await proxy.get(client, "/echo/x"))[0] == 404

    changed = didomi_upstream(didomi, secret, headers={"X-Default": "two"})
    config = {
        "shutdown_timeout": 5,
        "log": {"level": "warning"},  # logging applies too: no more access lines
        "listen": {"idle_timeout": 30},  # needs a restart: a warning, the rest applies
        "upstreams": {"didomi": changed, "echo": {"url": echo.url}},
    }
    outcome = await proxy.reload(config)
    assert outcome["event"] == "config_reloaded"
    assert outcome["added"] == ["echo"] and outcome["removed"] == []
    assert outcome["changed"] == ["didomi"]
    warning = await proxy.wait_for("config_restart_required")
    assert warning["settings"] == ["listen.idle_timeout"]
    access_lines = len(proxy.events("request_finished"))

    assert (await proxy.get(client, "/didomi/properties"))[0] == 200
    assert didomi.state.requests[-1].header("X-Default") == "two"
    assert didomi.state.token_requests == 1  # the token survived the reload
    status, _ = await proxy.get(client, "/echo/x")
    assert status == 200 and echo.state.requests[-1].raw_path == "/x"
    assert len(proxy.events("request_finished")) == access_lines

    async with client.get(proxy.url + "/-/metrics") as resp:
        metrics = await resp.text()
    assert 'authproxy_config_reloads_total{outcome="success"} 1.0' in metrics
    assert await proxy.stop() == 0
    proxy.assert_no_leaks(OLD_KEY)


async def test_a_removed_route_answers_no_route(
    tmp_path: Path, launch: Any, echo: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await launch({"upstreams": {"keep": {"url": echo.url}, "gone": {"url": echo.url}}})
    assert (await proxy.get(client, "/gone/x"))[0] == 200
    outcome = await proxy.reload({"upstreams": {"keep": {"url": echo.url}}})
    assert (outcome["added"], outcome["removed"], outcome["changed"]) == ([], ["gone"], [])
    status, body = await proxy.get(client, "/gone/x")
    assert status == 404 and body is not None and body["error"]["code"] == "no_route"
    assert "/keep" in body["error"]["message"] and "/gone" not in body["error"]["message"]
    assert (await proxy.get(client, "/keep/x"))[0] == 200


async def test_a_request_in_flight_finishes_on_its_configuration(
    tmp_path: Path, launch: Any, echo: Any, client: aiohttp.ClientSession
) -> None:
    proxy = await launch({"upstreams": {"slow": {"url": echo.url}}})
    pending = asyncio.create_task(proxy.get(client, "/slow/slow?seconds=2"))
    deadline = time.monotonic() + 5
    while echo.state.in_flight < 1:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        await asyncio.sleep(0.01)
    # The new configuration does not even have that route any more.
    outcome = await proxy.reload({"upstreams": {"other": {"url": echo.url}}})
    assert outcome["event"] == "config_reloaded"
    assert not pending.done()
    assert (await proxy.get(client, "/slow/x"))[0] == 404
    status, body = await pending
    assert status == 200 and body == {"slept": 2.0}


BROKEN: dict[str, tuple[str, str]] = {
    "broken YAML": ("upstreams: {a: [", "invalid YAML"),
    "unknown key": ("upstreams: {a: {url: 'http://127.0.0.1:1', colour: red}}", "a.colour"),
    "missing variable": (
        "upstreams: {a: {url: 'http://127.0.0.1:1', headers: {X: '${RELOAD_UNSET_VAR}'}}}",
        "RELOAD_UNSET_VAR",
    ),
    "missing file": (
        "upstreams: {a: {url: 'http://127.0.0.1:1', auth: {type: header, name: X, "
        "value: '${file:/nonexistent/reload-secret}'}}}",
        "/nonexistent/reload-secret",
    ),
    "empty file": ("", "upstreams: required"),
}


async def test_a_broken_file_keeps_the_old_configuration(
    tmp_path: Path, launch: Any, echo: Any, client: aiohttp.ClientSession
) -> None:
    good = {"upstreams": {"echo": {"url": echo.url}}}
    proxy = await launch(good)
    for kind, (text, named) in BROKEN.items():
        outcome = await proxy.reload(text)
        assert outcome["event"] == "config_reload_failed", kind
        assert any(named in problem for problem in outcome["problems"]), (kind, outcome)
        assert (await proxy.get(client, "/echo/x"))[0] == 200, kind
        status, body = await proxy.get(client, "/-/status")
        assert status == 200 and body is not None
        assert named in body["config"]["last_reload_error"], kind
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert f'authproxy_config_reloads_total{{outcome="failure"}} {len(BROKEN)}.0' in (
            await resp.text()
        )
    assert (await proxy.reload(good))["event"] == "config_reloaded"
    status, body = await proxy.get(client, "/-/status")
    assert body is not None and body["config"]["last_reload_error"] is None
    assert body["config"]["loaded_at"].endswith("Z")
    assert await proxy.stop() == 0


async def test_changed_paymo_credentials_log_the_old_session_out_once(
    tmp_path: Path, launch: Any, paymo: SeedFake[PaymoState], client: aiohttp.ClientSession
) -> None:
    key = tmp_path / "paymo-key"
    key.write_text(OLD_KEY)
    upstream = {"url": paymo.url, "auth": {"type": "paymo_session", "api_key": f"${{file:{key}}}"}}
    proxy = await launch({"upstreams": {"paymo": upstream}})
    assert (await proxy.get(client, "/paymo/me"))[0] == 200
    old_session = paymo.state.requests[-1].header("X-Session")
    assert old_session is not None and paymo.state.token_requests == 1

    paymo.state.api_key = NEW_KEY
    key.write_text(NEW_KEY)
    assert (await proxy.reload())["changed"] == ["paymo"]
    await proxy.wait_for("token_logout")
    assert paymo.state.deleted_sessions == [old_session]
    assert (await proxy.get(client, "/paymo/me"))[0] == 200
    new_session = paymo.state.requests[-1].header("X-Session")
    assert new_session not in (None, old_session)
    assert paymo.state.token_requests == 2
    assert await proxy.stop() == 0
    # Each session logged out exactly once: the old at the reload, the new at shutdown.
    assert paymo.state.deleted_sessions == [old_session, new_session]
    assert paymo.state.logout_requests == 2
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


async def test_a_replaced_session_is_logged_out_after_its_requests(
    tmp_path: Path,
    launch: Any,
    paymo: SeedFake[PaymoState],
    echo: Any,
    client: aiohttp.ClientSession,
) -> None:
    """A session whose upstream is slow (a `login` flow against Paymo's session API in
    front of the echo server): the logout waits until the request that uses it is done."""
    key = tmp_path / "paymo-key"
    key.write_text(OLD_KEY)

    def config(key_ref: str) -> dict[str, Any]:
        login = {
            "method": "POST",
            "url": paymo.url + "/sessions",
            "basic": {"username": key_ref, "password": "x"},
        }
        return {
            "shutdown_timeout": 5,
            "upstreams": {
                "slow": {
                    "url": echo.url,
                    "auth": {
                        "type": "login",
                        "request": login,
                        "token": "sessions.0.id",
                        "logout": {"method": "DELETE", "url": paymo.url + "/sessions/{token}"},
                        "inject": {"header": "X-Session", "value": "{token}"},
                    },
                }
            },
        }

    proxy = await launch(config(f"${{file:{key}}}"))
    pending = asyncio.create_task(proxy.get(client, "/slow/slow?seconds=1.5"))
    deadline = time.monotonic() + 5
    while echo.state.in_flight < 1:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        await asyncio.sleep(0.01)
    paymo.state.api_key = NEW_KEY
    key.write_text(NEW_KEY)
    assert (await proxy.reload())["changed"] == ["slow"]
    assert paymo.state.logout_requests == 0  # its request is still running
    assert (await pending)[0] == 200
    await proxy.wait_for("token_logout", deadline_s=3)
    assert paymo.state.logout_requests == 1
    assert await proxy.stop() == 0
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


def kubernetes_secret_volume(root: Path, name: str, value: str) -> Path:
    """The layout the kubelet writes: <name> -> ..data/<name>, ..data -> ..<timestamp>."""
    root.mkdir()
    version = root / "..2026_12_01_00_00_00.1"
    version.mkdir()
    (version / name).write_text(value)
    (root / "..data").symlink_to(version.name)
    (root / name).symlink_to(f"..data/{name}")
    return root / name


def rotate_kubernetes_secret(root: Path, name: str, value: str) -> None:
    """The kubelet's atomic update: a new timestamped directory, then a rename of ..data."""
    old = (root / "..data").readlink()
    version = root / "..2026_12_01_00_05_00.2"
    version.mkdir()
    (version / name).write_text(value)
    (root / "..data_tmp").symlink_to(version.name)
    (root / "..data_tmp").replace(root / "..data")
    for child in (root / old).iterdir():
        child.unlink()
    (root / old).rmdir()


async def test_watch_follows_a_kubernetes_secret_swap_without_a_signal(
    tmp_path: Path, launch: Any, didomi: SeedFake[DidomiState], client: aiohttp.ClientSession
) -> None:
    secret = kubernetes_secret_volume(tmp_path / "secret-volume", "secret", OLD_KEY)
    proxy = await launch({"watch": True, "upstreams": {"didomi": didomi_upstream(didomi, secret)}})
    assert (await proxy.get(client, "/didomi/properties"))[0] == 200
    didomi.state.secret = NEW_KEY
    didomi.state.revoke_all()
    rotate_kubernetes_secret(tmp_path / "secret-volume", "secret", NEW_KEY)
    rotated = time.monotonic()
    while True:
        status, _ = await proxy.get(client, "/didomi/properties")
        if status == 200:
            break
        assert time.monotonic() - rotated < 5, "the rotated secret was not picked up in 5 s"
        await asyncio.sleep(0.2)
    assert sent_secret(didomi) == NEW_KEY
    assert len(proxy.events("config_reloaded")) == 1
    assert await proxy.stop() == 0
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


async def test_watch_retries_a_file_that_vanished_mid_swap_without_a_log_loop(
    tmp_path: Path, launch: Any, echo: Any, client: aiohttp.ClientSession
) -> None:
    token = tmp_path / "token"
    token.write_text(OLD_KEY)
    upstream = {
        "url": echo.url,
        "auth": {"type": "header", "name": "X-Key", "value": f"${{file:{token}}}"},
    }
    proxy = await launch({"watch": True, "upstreams": {"echo": upstream}})
    token.unlink()
    await proxy.wait_for("config_reload_failed", deadline_s=5)
    await asyncio.sleep(2.5)  # two more polls: the file is still missing, nothing new
    assert len(proxy.events("config_reload_failed")) == 1
    assert (await proxy.get(client, "/echo/x"))[0] == 200
    assert echo.state.requests[-1].header("X-Key") == OLD_KEY
    token.write_text(NEW_KEY)
    await proxy.wait_for("config_reloaded", deadline_s=5)
    assert (await proxy.get(client, "/echo/x"))[0] == 200
    assert echo.state.requests[-1].header("X-Key") == NEW_KEY
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


async def test_a_replaced_session_waits_at_most_shutdown_timeout(
    tmp_path: Path,
    launch: Any,
    paymo: SeedFake[PaymoState],
    echo: Any,
    client: aiohttp.ClientSession,
) -> None:
    """A request that outlives `shutdown_timeout` does not keep the old session alive."""
    key = tmp_path / "paymo-key"
    key.write_text(OLD_KEY)
    login = {"url": paymo.url + "/sessions", "basic": {"username": f"${{file:{key}}}"}}
    config = {
        "shutdown_timeout": 1,
        "upstreams": {
            "slow": {
                "url": echo.url,
                "auth": {
                    "type": "login",
                    "request": login,
                    "token": "sessions.0.id",
                    "logout": {"method": "DELETE", "url": paymo.url + "/sessions/{token}"},
                    "inject": {"header": "X-Session", "value": "{token}"},
                },
            }
        },
    }
    proxy = await launch(config)
    pending = asyncio.create_task(proxy.get(client, "/slow/slow?seconds=4"))
    deadline = time.monotonic() + 5
    while echo.state.in_flight < 1:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        await asyncio.sleep(0.01)
    paymo.state.api_key = NEW_KEY
    key.write_text(NEW_KEY)
    reloaded = time.monotonic()
    assert (await proxy.reload(config))["changed"] == ["slow"]
    await proxy.wait_for("token_logout", deadline_s=3)
    assert time.monotonic() - reloaded < 3 and not pending.done()
    assert paymo.state.logout_requests == 1
    assert (await pending)[0] == 200
    proxy.assert_no_leaks(OLD_KEY, NEW_KEY)


async def test_watch_loads_a_rotated_ca_file(
    tmp_path: Path, launch: Any, client: aiohttp.ClientSession
) -> None:
    """cert-manager rotates the upstream's CA: the new `ca_file` is trusted, without a
    signal, for the connections made from then on."""
    from tests.integration.egress_kit import make_pki, recording_upstream

    old_ca, new_ca = make_pki(tmp_path / "old", "Old CA"), make_pki(tmp_path / "new", "New CA")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(*old_ca.issue("server", dns=("localhost",), ips=("127.0.0.1",)))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(old_ca.ca_file.read_bytes())
    async with recording_upstream(server) as upstream:
        tls = {"ca_file": str(ca_file)}
        proxy = await launch(
            {"watch": True, "upstreams": {"api": {"url": upstream.url, "tls": tls}}}
        )
        assert (await proxy.get(client, "/api/x"))[0] == 200
        ca_file.write_bytes(new_ca.ca_file.read_bytes())
        await proxy.wait_for("config_reloaded", deadline_s=5)
        # Trusting only the new CA now: the server's old certificate is refused...
        status, body = await proxy.get(client, "/api/x")
        assert status == 502 and body is not None, body
        # ...and once the server presents its new one, it is accepted.
        server.load_cert_chain(*new_ca.issue("server2", dns=("localhost",), ips=("127.0.0.1",)))
        assert (await proxy.get(client, "/api/x"))[0] == 200
        assert await proxy.stop() == 0

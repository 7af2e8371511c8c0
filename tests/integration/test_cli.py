"""`authproxy check` and `authproxy run` as a user runs them: real subprocesses.

A broken config must always end in exit code 2 and a list of problems, each
with its dotted path, and never in a Python traceback.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config
from proxy.server import tune_allocator
from tests.support import free_port, wait_until_sync

ECHO_URL = "http://127.0.0.1:9/api"  # never contacted: check and run do no I/O at start
VALID_UPSTREAMS = f"""
upstreams:
  e:
    url: {ECHO_URL}
"""


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without any AUTHPROXY_* the developer may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env.update(extra)
    return env


def authproxy(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env if env is not None else base_env(),
        timeout=30,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


# -- check: broken configs ---------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    yaml: str
    expected: tuple[str, ...]  # each must appear in stderr
    env: tuple[tuple[str, str], ...] = ()


BROKEN = {
    "missing-url": Broken(
        """
        upstreams:
          e: {auth: {type: none}}
        """,
        ("upstreams.e.url: required",),
    ),
    "unknown-top-level-key": Broken(
        VALID_UPSTREAMS + "bogus: 1\n",
        ("bogus: unknown key",),
    ),
    "unknown-event-loop": Broken(
        VALID_UPSTREAMS + "event_loop: tokio\n",
        ("event_loop:", "uvloop", "asyncio"),
    ),
    "unknown-upstream-key": Broken(
        f"""
        upstreams:
          e: {{url: "{ECHO_URL}", prefx: /x}}
        """,
        ("upstreams.e.prefx: unknown key",),
    ),
    "unknown-auth-key": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: v, nme: y}}
        """,
        ("upstreams.e.auth.nme: unknown key",),
    ),
    "unknown-auth-type": Broken(
        f"""
        upstreams:
          e: {{url: "{ECHO_URL}", auth: {{type: kerberos}}}}
        """,
        ("upstreams.e.auth:", "unknown auth type", "header", "oauth2_client_credentials"),
    ),
    "missing-auth-field": Broken(
        f"""
        upstreams:
          e: {{url: "{ECHO_URL}", auth: {{type: header, name: X-Api-Key}}}}
        """,
        ("upstreams.e.auth.value: required",),
    ),
    "unset-variable": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: "${{AUTHPROXY_TEST_UNSET}}"}}
        """,
        ("upstreams.e.auth.value:", "AUTHPROXY_TEST_UNSET", "not set"),
    ),
    "missing-file": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: "${{file:/nope}}"}}
        """,
        ("upstreams.e.auth.value:", "/nope"),
    ),
    "malformed-yaml": Broken(
        """
        upstreams:
          e: {url: [unclosed
        """,
        ("invalid YAML", "line"),
    ),
    "duplicate-yaml-key": Broken(
        VALID_UPSTREAMS + "upstreams: {}\n",
        ("duplicate key",),
    ),
    "port-too-big": Broken(
        VALID_UPSTREAMS + "listen: {port: 99999}\n",
        ("listen.port:", "65535"),
    ),
    "port-not-a-number": Broken(
        VALID_UPSTREAMS + "listen: {port: abc}\n",
        ("listen.port:", "integer"),
    ),
    "port-from-env-not-a-number": Broken(
        VALID_UPSTREAMS,
        ("AUTHPROXY_PORT (listen.port):", "integer"),
        env=(("AUTHPROXY_PORT", "abc"),),
    ),
    "log-level-from-env": Broken(
        VALID_UPSTREAMS,
        ("AUTHPROXY_LOG_LEVEL (log.level):",),
        env=(("AUTHPROXY_LOG_LEVEL", "loud"),),
    ),
    "host-with-port": Broken(
        VALID_UPSTREAMS + 'listen: {host: "127.0.0.1:8080"}\n',
        ("listen.host:", "port", "listen: {host: 127.0.0.1, port: 8080}"),
    ),
    "host-from-env-with-port": Broken(
        VALID_UPSTREAMS,
        ("AUTHPROXY_HOST (listen.host):", "port"),
        env=(("AUTHPROXY_HOST", "0.0.0.0:80"),),
    ),
    "host-is-a-path": Broken(
        VALID_UPSTREAMS + "listen: {host: /run/authproxy.sock}\n",
        ("listen.host:", "Unix socket", "listen.path"),
    ),
    "host-is-a-url": Broken(
        VALID_UPSTREAMS + 'listen: {host: "http://localhost"}\n',
        ("listen.host:", "not a URL"),
    ),
    "host-in-brackets": Broken(
        VALID_UPSTREAMS + 'listen: {host: "[::1]"}\n',
        ("listen.host:", "without brackets", "::1"),
    ),
    "unclosed-reference": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: "${{KEY"}}
        """,
        ("upstreams.e.auth.value:", "unclosed ${"),
        env=(("KEY", "k-123456"),),
    ),
    "empty-required-secret": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: "${{KEY}}"}}
        """,
        ("upstreams.e.auth.value:", "empty"),
        env=(("KEY", ""),),
    ),
    "empty-required-secret-by-default": Broken(
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: oauth2_client_credentials, token_url: "{ECHO_URL}/t",
                    client_id: me, client_secret: "${{SECRET:-}}"}}
        """,
        ("upstreams.e.auth.client_secret:", "empty"),
    ),
    "duplicate-prefix": Broken(
        f"""
        upstreams:
          one: {{url: "{ECHO_URL}", prefix: /same}}
          two: {{url: "{ECHO_URL}", prefix: /same/}}
        """,
        ("upstreams", "/same", "one", "two"),
    ),
    "bad-url-scheme": Broken(
        """
        upstreams:
          e: {url: "ftp://example.com/x"}
        """,
        ("upstreams.e.url:", "http"),
    ),
    "no-upstreams": Broken("listen: {port: 8080}\n", ("upstreams",)),
    "empty-file": Broken("", ("upstreams",)),
    "not-a-mapping": Broken("- a\n- b\n", ("mapping",)),
    "several-problems": Broken(
        f"""
        bogus: 1
        listen: {{port: 99999}}
        upstreams:
          a: {{auth: {{type: none}}}}
          b:
            url: {ECHO_URL}
            auth: {{type: basic, username: "${{AUTHPROXY_TEST_UNSET}}", extra: 1}}
          c: {{url: "{ECHO_URL}", auth: {{type: nope}}}}
        """,
        (
            "bogus: unknown key",
            "listen.port:",
            "upstreams.a.url: required",
            "upstreams.b.auth.username:",
            "AUTHPROXY_TEST_UNSET",
            "upstreams.b.auth.extra: unknown key",
            "upstreams.c.auth:",
        ),
    ),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_check_reports_broken_config(tmp_path: Path, case: Broken) -> None:
    config = write(tmp_path / "config.yaml", case.yaml)
    result = authproxy("check", "-c", str(config), env=base_env(**dict(case.env)))
    assert result.returncode == 2, result
    assert_no_traceback(result)
    for fragment in case.expected:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
    assert str(config) in result.stderr  # which file the problems are about
    assert result.stdout == ""


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, PEM, made with openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_check_loads_ca_file_as_run_will(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    der = tmp_path / "cert.der"
    subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)],
        check=True, timeout=30,
    )  # fmt: skip
    for bad in (der, key, write(tmp_path / "empty.pem", "")):
        config = write(
            tmp_path / "config.yaml",
            f"upstreams:\n  e: {{url: 'https://127.0.0.1:9', tls: {{ca_file: '{bad}'}}}}\n",
        )
        for command in ("check", "run"):
            result = authproxy(command, "-c", str(config))
            assert result.returncode == 2, (bad, command, result)
            assert_no_traceback(result)
            assert "upstreams.e.tls.ca_file:" in result.stderr, result.stderr
            assert "no PEM certificate" in result.stderr, result.stderr
    config = write(
        tmp_path / "config.yaml",
        f"upstreams:\n  e: {{url: 'https://127.0.0.1:9', tls: {{ca_file: '{cert}'}}}}\n",
    )
    assert authproxy("check", "-c", str(config)).returncode == 0


def test_check_names_the_byte_offset_of_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(VALID_UPSTREAMS.encode() + b"# caf\xe9\n")
    result = authproxy("check", "-c", str(config))
    assert result.returncode == 2
    assert_no_traceback(result)
    offset = len(VALID_UPSTREAMS.encode()) + len(b"# caf")
    assert "not UTF-8" in result.stderr and f"byte {offset}" in result.stderr, result.stderr


def test_check_warns_about_a_secret_written_into_the_file(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yaml",
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: literal-key-0f3a}}
          f:
            url: {ECHO_URL}
            auth: {{type: basic, username: "${{USER}}", password: "${{file:{tmp_path}/pw}}"}}
        """,
    )
    (tmp_path / "pw").write_text("pw-from-file\n")
    result = authproxy("check", "-c", str(config), env=base_env(USER="someone"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert "upstreams.e.auth.value" in warnings[0] and "${VAR}" in warnings[0]
    assert "literal-key-0f3a" not in result.stdout + result.stderr


def test_check_lists_every_problem_of_several(tmp_path: Path) -> None:
    case = BROKEN["several-problems"]
    config = write(tmp_path / "config.yaml", case.yaml)
    result = authproxy("check", "-c", str(config))
    problems = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(problems) >= 6, result.stderr
    # One problem per line, each starting with its dotted path.
    assert all(": " in p for p in problems), problems


@pytest.mark.parametrize("url", [ECHO_URL.replace("/api", "/a pi"), ECHO_URL + "\\n"])
def test_check_rejects_url_with_whitespace(tmp_path: Path, url: str) -> None:
    config = write(tmp_path / "config.yaml", f'upstreams:\n  e: {{url: "{url}"}}\n')
    result = authproxy("check", "-c", str(config))
    assert result.returncode == 2
    assert "upstreams.e.url" in result.stderr


def test_check_rejects_header_value_with_newline(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "s3cret-value\n\n")  # one newline survives
    config = write(
        tmp_path / "config.yaml",
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: header, name: X-Api-Key, value: "${{file:{secret}}}"}}
        """,
    )
    result = authproxy("check", "-c", str(config))
    assert result.returncode == 2
    assert "upstreams.e.auth.value" in result.stderr


# -- check: valid configs, where the config comes from --------------------------------

VALID = """
upstreams:
  paymo:
    url: https://app.paymoapp.com/api
    auth: {type: paymo_session, api_key: "${PAYMO_KEY}"}
  e:
    prefix: /echo/v1
    url: http://127.0.0.1:9/base
    auth: {type: header, name: X-Api-Key, value: "${ECHO_KEY}"}
  plain:
    url: http://127.0.0.1:9
"""
VALID_LINES = [
    "/paymo -> https://app.paymoapp.com/api (paymo_session)",
    "/echo/v1 -> http://127.0.0.1:9/base (header)",
    "/plain -> http://127.0.0.1:9 (none)",
]
VALID_ENV = {"PAYMO_KEY": "paymo-key-0a9f", "ECHO_KEY": "echo-key-77c2"}


def test_check_valid_config_prints_routes(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", VALID)
    result = authproxy("check", "-c", str(config), env=base_env(**VALID_ENV))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == VALID_LINES
    assert_no_traceback(result)
    for secret in VALID_ENV.values():
        assert secret not in result.stdout + result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = authproxy("check", "-c", str(missing))
    assert result.returncode == 2
    assert_no_traceback(result)
    assert str(missing) in result.stderr
    assert "No such file" in result.stderr


def test_check_without_c_and_without_default_file(tmp_path: Path) -> None:
    result = authproxy("check", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "config.yaml" in result.stderr


def test_check_uses_config_yaml_in_cwd(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", VALID)
    result = authproxy("check", cwd=tmp_path, env=base_env(**VALID_ENV))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == VALID_LINES


def test_check_uses_authproxy_config_env(tmp_path: Path) -> None:
    config = write(tmp_path / "elsewhere.yaml", VALID)
    write(tmp_path / "config.yaml", "not: [valid")  # must not be the one read
    env = base_env(AUTHPROXY_CONFIG=str(config), **VALID_ENV)
    result = authproxy("check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == VALID_LINES


def test_check_flag_beats_authproxy_config_env(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", VALID)
    env = base_env(AUTHPROXY_CONFIG=str(tmp_path / "missing.yaml"), **VALID_ENV)
    result = authproxy("check", "-c", str(good), env=env)
    assert result.returncode == 0, result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (("frobnicate",), ("run", "--port", "abc"), ()):
        result = authproxy(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert_no_traceback(result)
        assert "usage" in result.stderr.lower()


# -- ${file:...} ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("s3cret-value", "s3cret-value"),
        ("s3cret-value\n", "s3cret-value"),
        ("s3cret-value\n\n", "s3cret-value\n"),
        ("multi\nline\n", "multi\nline"),
    ],
)
def test_file_interpolation_strips_one_trailing_newline(
    tmp_path: Path, content: str, expected: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(content)
    config = write(
        tmp_path / "config.yaml",
        f"""
        upstreams:
          e:
            url: {ECHO_URL}
            auth: {{type: basic, username: user, password: "${{file:{secret}}}"}}
        """,
    )
    loaded = load_config(str(config), env={})
    auth: Any = loaded.upstreams["e"].auth
    assert auth.password.get_secret_value() == expected


def test_file_interpolation_through_check(tmp_path: Path) -> None:
    (tmp_path / "url").write_text(ECHO_URL + "\n")
    config = write(
        tmp_path / "config.yaml", f'upstreams:\n  e: {{url: "${{file:{tmp_path}/url}}"}}\n'
    )
    result = authproxy("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"/e -> {ECHO_URL} (none)"]


# -- run -------------------------------------------------------------------------


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line.strip()]

    def listen(self) -> str:
        """The address from the `proxy_started` line (waits for it, bounded)."""

        def started() -> str | None:
            assert self.process.poll() is None, self.stderr.read_text()
            for record in self.records():
                if record.get("event") == "proxy_started":
                    listen: str = record["listen"]
                    return listen
            return None

        listen = wait_until_sync(started, 15, what="the proxy to log proxy_started")
        assert listen is not None
        return listen

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)


@pytest.fixture
def run_proxy(tmp_path: Path) -> Iterator[Any]:
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        out, err = tmp_path / f"run{len(started)}.out", tmp_path / f"run{len(started)}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", *args, "--log-format", "json"],
                stdout=stdout,
                stderr=stderr,
                env=env if env is not None else base_env(),
            )
        running = Running(process, out, err)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/-/health", timeout=5) as resp:
        assert resp.status == 200
        body: dict[str, Any] = json.loads(resp.read())
        return body


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def test_run_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", BROKEN["several-problems"].yaml)
    result = authproxy("run", "-c", str(config))
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "upstreams.a.url: required" in result.stderr
    assert "listen.port:" in result.stderr


def test_run_missing_config_exits_2(tmp_path: Path) -> None:
    result = authproxy("run", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "nope.yaml" in result.stderr


def test_run_stops_cleanly_on_sigterm(tmp_path: Path, run_proxy: Any) -> None:
    port = free_port()
    config = write(tmp_path / "config.yaml", VALID_UPSTREAMS + f"listen: {{port: {port}}}\n")
    running = run_proxy("-c", str(config))
    assert running.listen() == f"http://127.0.0.1:{port}"
    assert health(f"http://127.0.0.1:{port}") == {"status": "ok"}
    assert running.stop() == 0
    events = [r["event"] for r in running.records()]
    assert events[-1] == "proxy_stopped"
    assert "Traceback" not in running.stdout.read_text() + running.stderr.read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_pad_applies_on_glibc() -> None:
    assert tune_allocator() is True


@pytest.mark.parametrize(
    ("setting", "loop"),
    [("", "uvloop"), ("event_loop: uvloop\n", "uvloop"), ("event_loop: asyncio\n", "asyncio")],
    ids=["default", "uvloop", "asyncio"],
)
def test_run_serves_on_the_configured_event_loop(
    tmp_path: Path, run_proxy: Any, setting: str, loop: str
) -> None:
    port = free_port()
    config = write(
        tmp_path / "config.yaml", VALID_UPSTREAMS + f"listen: {{port: {port}}}\n" + setting
    )
    running = run_proxy("-c", str(config))
    running.listen()
    assert health(f"http://127.0.0.1:{port}") == {"status": "ok"}
    assert running.stop() == 0
    started = next(r for r in running.records() if r["event"] == "proxy_started")
    assert started["event_loop"] == loop


@pytest.mark.parametrize(
    ("env_port", "flag_port", "winner"),
    [
        pytest.param(False, False, "file", id="file"),
        pytest.param(False, True, "flag", id="flag-beats-file"),
        pytest.param(True, False, "env", id="env-beats-file"),
        pytest.param(True, True, "flag", id="flag-beats-env"),
    ],
)
def test_port_precedence(
    tmp_path: Path, run_proxy: Any, env_port: bool, flag_port: bool, winner: str
) -> None:
    ports = {"file": free_port(), "env": free_port(), "flag": free_port()}
    assert len(set(ports.values())) == 3
    config = write(
        tmp_path / "config.yaml", VALID_UPSTREAMS + f"listen: {{port: {ports['file']}}}\n"
    )
    args = ["-c", str(config)]
    if flag_port:
        args += ["--port", str(ports["flag"])]
    env = base_env(AUTHPROXY_PORT=str(ports["env"])) if env_port else base_env()
    running = run_proxy(*args, env=env)
    assert running.listen() == f"http://127.0.0.1:{ports[winner]}"
    assert health(f"http://127.0.0.1:{ports[winner]}") == {"status": "ok"}
    for name, port in ports.items():
        if name != winner:
            assert refused(port), f"something listens on the {name} port"
    assert running.stop() == 0


def test_host_flag_beats_file(tmp_path: Path, run_proxy: Any) -> None:
    port = free_port()
    config = write(
        tmp_path / "config.yaml",
        VALID_UPSTREAMS + f"listen: {{host: 127.0.0.3, port: {port}}}\nallowed_hosts: ['*']\n",
    )
    running = run_proxy("-c", str(config), "--host", "127.0.0.2")
    assert running.listen() == f"http://127.0.0.2:{port}"
    assert health(f"http://127.0.0.2:{port}") == {"status": "ok"}
    assert refused(port, "127.0.0.3")
    assert running.stop() == 0


def test_start_up_line_names_a_url_for_ipv6(tmp_path: Path, run_proxy: Any) -> None:
    port = free_port()
    config = write(
        tmp_path / "config.yaml",
        VALID_UPSTREAMS + f'listen: {{host: "::1", port: {port}}}\n',
    )
    running = run_proxy("-c", str(config))
    url = running.listen()
    assert url == f"http://[::1]:{port}"
    assert health(url) == {"status": "ok"}  # a URL urllib can open as printed
    assert running.stop() == 0

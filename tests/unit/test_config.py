"""Config validation: every problem at once, each with its dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    HeaderAuth,
    LoginAuth,
    PaymoSession,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return [str(p) for p in info.value.problems]


def up(**fields: Any) -> dict[str, Any]:
    return {"upstreams": {"api": {"url": "https://api.example.com/v1", **fields}}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"upstreams": {"api": {}}}, "upstreams.api.url: required"),
        (up(bogus=1), "upstreams.api.bogus: unknown key"),
        ({**up(), "lisen": {}}, "lisen: unknown key"),
        (up(auth={"type": "nope"}), "upstreams.api.auth: unknown auth type"),
        (up(auth={"name": "X"}), "upstreams.api.auth: type: required"),
        (up(auth={"type": "header", "name": "X"}), "upstreams.api.auth.value: required"),
        (
            up(auth={"type": "header", "name": "X", "value": "v", "extra": 1}),
            "upstreams.api.auth.extra: unknown key",
        ),
        (
            up(
                auth={
                    "type": "oauth2_client_credentials",
                    "token_url": "https://t",
                    "client_id": "a",
                }
            ),
            "upstreams.api.auth.client_secret: required",
        ),
        (
            up(auth={"type": "paymo_session"}),
            "upstreams.api.auth: needs api_key, or email and password",
        ),
        (
            up(auth={"type": "header", "name": "X", "value": "${NOPE}"}),
            "environment variable NOPE is not set",
        ),
        (up(url="ftp://x"), "upstreams.api.url: URL must be http:// or https://"),
        (up(url="https://x/y?q=1"), "must not carry a query"),
        (up(prefix="nope"), "upstreams.api.prefix: must start with /"),
        (up(prefix="/-/x"), "reserved"),
        (up(retry_statuses=[200]), "upstreams.api.retry_statuses.0"),
        (up(max_replay_body=-1), "upstreams.api.max_replay_body"),
        (up(timeout={"read": 0}), "upstreams.api.timeout.read"),
        (up(tls={"ca_file": "/nonexistent.pem"}), "upstreams.api.tls.ca_file: file not found"),
        ({**up(), "listen": {"port": 99999}}, "listen.port"),
        ({**up(), "listen": {"port": "abc"}}, "listen.port"),
        ({**up(), "log": {"format": "xml"}}, "log.format"),
        ({"upstreams": {}}, "upstreams"),
        ([1, 2], "mapping"),
    ],
)
def test_each_problem_names_its_path(raw: Any, expected: str) -> None:
    found = problems(raw)
    assert any(expected in p for p in found), found


def test_all_problems_reported_at_once() -> None:
    raw = {
        "listen": {"port": 70000},
        "typo": True,
        "upstreams": {
            "a": {"url": "https://a", "auth": {"type": "basic"}},
            "b": {"prefix": "/a", "url": "https://b"},
            "c": {"url": "${MISSING}"},
        },
    }
    found = problems(raw)
    assert len(found) >= 4
    joined = "\n".join(found)
    for fragment in (
        "listen.port",
        "typo: unknown key",
        "upstreams.a.auth.username: required",
        "shares the prefix /a",
        "MISSING",
    ):
        assert fragment in joined


def test_interpolation_forms(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    config = parse_config(
        up(
            headers={"X-A": "${A}", "X-B": "${B:-fallback}", "X-C": "pre-${A}-post"},
            auth={"type": "header", "name": "X-Key", "value": f"${{file:{secret_file}}}"},
        ),
        env={"A": "alpha"},
    )
    upstream = config.upstreams["api"]
    assert upstream.headers == {"X-A": "alpha", "X-B": "fallback", "X-C": "pre-alpha-post"}
    assert isinstance(upstream.auth, HeaderAuth)
    assert upstream.auth.value.get_secret_value() == "from-file"
    assert "from-file" in config.secrets


def test_missing_file_reference() -> None:
    found = problems(up(auth={"type": "header", "name": "X", "value": "${file:/no/such/file}"}))
    assert found == [
        "upstreams.api.auth.value: cannot read /no/such/file: No such file or directory"
    ]


def test_secrets_never_in_problem_messages() -> None:
    found = problems(
        up(auth={"type": "header", "name": "X", "value": "${S}", "oops": "x"}),
        env={"S": "hunter2-secret"},
    )
    assert all("hunter2" not in p for p in found)


def test_env_overrides_and_flag_overrides() -> None:
    env = {"AUTHPROXY_PORT": "9001", "AUTHPROXY_HOST": "0.0.0.0", "AUTHPROXY_LOG_LEVEL": "DEBUG"}
    config = parse_config({**up(), "listen": {"port": 1234}}, env=env)
    assert (config.listen.host, config.listen.port, config.log.level) == ("0.0.0.0", 9001, "debug")
    config = parse_config(up(), env=env, overrides={"listen.port": 9002, "listen.host": None})
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9002)


def test_plain_http_token_url_needs_opt_in() -> None:
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": "http://auth.example.com/t",
        "client_id": "a",
        "client_secret": "b",
    }
    assert any("plain http://" in p for p in problems(up(auth=auth)))
    parse_config(up(auth={**auth, "allow_insecure_token_url": True}), env={})
    parse_config(up(auth={**auth, "token_url": "http://127.0.0.1:9/t"}), env={})


def test_paymo_requires_one_credential_form() -> None:
    assert problems(
        up(auth={"type": "paymo_session", "api_key": "k", "email": "e", "password": "p"})
    )
    config = parse_config(up(auth={"type": "paymo_session", "email": "e", "password": "p"}), env={})
    assert isinstance(config.upstreams["api"].auth, PaymoSession)


def test_login_type_defaults() -> None:
    config = parse_config(
        up(
            auth={
                "type": "login",
                "request": {"url": "https://api.example.com/login", "json": {"k": "v"}},
                "token": "data.token",
            }
        ),
        env={},
    )
    auth = config.upstreams["api"].auth
    assert isinstance(auth, LoginAuth)
    assert auth.request.method == "POST"
    assert auth.inject.header == "Authorization"
    assert auth.inject.value == "Bearer {token}"


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  a: {url: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad), env={})
    assert "invalid YAML: line" in str(info.value)
    dup = tmp_path / "dup.yaml"
    dup.write_text("upstreams:\n  a: {url: 'https://a'}\n  a: {url: 'https://b'}\n")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(str(dup), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"), env={})


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "config.example.yaml"
    env = {
        name: f"value-of-{name.lower()}"
        for name in (
            "PAYMO_API_KEY",
            "PRIMAERP_API_KEY",
            "PRIMAERP_USERNAME",
            "PRIMAERP_PASSWORD",
            "DIDOMI_KEY",
            "DIDOMI_SECRET",
            "GETPAID_CLIENT_ID",
            "GETPAID_CLIENT_SECRET",
            "EXAMPLE_USERNAME",
            "EXAMPLE_PASSWORD",
        )
    }
    config = load_config(str(example), env=env)
    types = {u.auth.type for u in config.upstreams.values()}
    assert {"paymo_session", "primaerp", "didomi", "oauth2_client_credentials", "login"} <= types


# -- token endpoints over plain HTTP (SPEC: allow_insecure_token_url) ----------------


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config(raw, env=env or {})
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def oauth2(token_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "api": {
                "url": "https://api.example.com/v1",
                "auth": {
                    "type": "oauth2_client_credentials",
                    "token_url": token_url,
                    "client_id": "client",
                    "client_secret": "${SECRET}",
                    **extra,
                },
            }
        }
    }


def _insecure(problems: list[str]) -> bool:
    return any(p.startswith("upstreams.api") and "allow_insecure_token_url" in p for p in problems)


@pytest.mark.parametrize(
    ("token_url", "extra", "insecure"),
    [
        ("http://auth.example.com/token", {}, True),
        ("http://auth.example.com:8080/token", {}, True),
        ("http://10.0.0.5/token", {}, True),
        ("http://0.0.0.0/token", {}, True),
        ("http://localhost.evil.com/token", {}, True),
        ("http://127.0.0.1/token", {}, False),
        ("http://127.0.0.1:9999/oauth/token", {}, False),
        ("http://127.1.2.3/token", {}, False),
        ("http://localhost/token", {}, False),
        ("http://LOCALHOST:8081/token", {}, False),
        ("http://[::1]:9/token", {}, False),
        ("https://auth.example.com/token", {}, False),
        ("http://auth.example.com/token", {"allow_insecure_token_url": True}, False),
        pytest.param("http://127.evil.com/token", {}, True),
        pytest.param("http://127.0.0.1.nip.io/token", {}, True),
    ],
)
def test_plain_http_token_url(token_url: str, extra: dict[str, Any], insecure: bool) -> None:
    problems = problems_of(oauth2(token_url, **extra), {"SECRET": "client-secret-1234"})
    if insecure:
        assert _insecure(problems), problems
        assert all("client-secret-1234" not in p for p in problems)
    else:
        assert problems == []


_PRESETS: dict[str, dict[str, Any]] = {
    "paymo_session": {"type": "paymo_session", "api_key": "${SECRET}"},
    "didomi": {"type": "didomi", "key": "key-1", "secret": "${SECRET}"},
    "primaerp": {"type": "primaerp", "api_key": "key-1", "secret_key": "${SECRET}"},
}


@pytest.mark.parametrize("kind", sorted(_PRESETS))
@pytest.mark.parametrize(
    ("url", "extra", "insecure"),
    [
        ("http://api.example.com/v1", {}, True),
        ("http://api.example.com:8080", {}, True),
        ("http://127.0.0.1:9000/v1", {}, False),
        ("http://localhost:9000/v1", {}, False),
        ("https://api.example.com/v1", {}, False),
        ("http://api.example.com/v1", {"allow_insecure_token_url": True}, False),
    ],
)
def test_default_login_url_derived_from_a_plain_http_upstream(
    kind: str, url: str, extra: dict[str, Any], insecure: bool
) -> None:
    raw = {"upstreams": {"api": {"url": url, "auth": {**_PRESETS[kind], **extra}}}}
    problems = problems_of(raw, {"SECRET": "preset-secret-5678"})
    if insecure:
        assert _insecure(problems), problems
        assert all("preset-secret-5678" not in p for p in problems)
    else:
        assert problems == []


@pytest.mark.parametrize(
    ("overrides", "insecure"),
    [
        ({"login_url": "https://auth.example.com/sessions"}, False),
        ({"login_url": "http://auth.example.com/sessions"}, True),
    ],
)
def test_explicit_login_url_decides_for_presets(overrides: dict[str, Any], insecure: bool) -> None:
    raw = {
        "upstreams": {
            "api": {
                "url": "http://api.example.com/v1",
                "auth": {**_PRESETS["didomi"], **overrides},
            }
        }
    }
    assert _insecure(problems_of(raw, {"SECRET": "preset-secret-5678"})) == insecure


@pytest.mark.parametrize(
    ("login_url", "refresh_url", "insecure"),
    [
        ("https://a.example.com/login", "https://a.example.com/refresh", False),
        ("http://a.example.com/login", "https://a.example.com/refresh", True),
        ("https://a.example.com/login", "http://a.example.com/refresh", True),
    ],
)
def test_login_type_checks_login_and_refresh_urls(
    login_url: str, refresh_url: str, insecure: bool
) -> None:
    auth = {
        "type": "login",
        "request": {"url": login_url, "json": {"secret": "${SECRET}"}},
        "token": "access_token",
        "refresh": {"token": "refresh_token", "request": {"url": refresh_url}},
    }
    raw = {"upstreams": {"api": {"url": "https://api.example.com", "auth": auth}}}
    assert _insecure(problems_of(raw, {"SECRET": "login-secret-9012"})) == insecure


def test_insecure_token_url_problem_never_shows_a_password() -> None:
    raw = oauth2("http://svc:${PASSWORD}@auth.example.com/token")
    problems = problems_of(raw, {"SECRET": "client-secret-1234", "PASSWORD": "url-pass-3456"})
    # Credentials in a URL are refused outright, and the problem never repeats them.
    assert any("user:password@" in p for p in problems), problems
    assert all("url-pass-3456" not in p for p in problems), problems


@pytest.mark.parametrize("entry", ["*", "http://localhost:3000/app", "localhost:3000", "ftp://x"])
def test_allowed_origins_entries_must_be_origins(entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"allowed_origins": [entry], "upstreams": {"e": {"url": "http://x"}}})
    assert "allowed_origins" in str(caught.value)


# -- interpolation, pinned by the mutation run (tests/README.md) ---------------------------


def test_interpolation_problems_name_their_path(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1"
    latin1.write_bytes(b"caf\xe9")
    raw = {
        "allowed_hosts": ["localhost", "${HOST}"],
        "upstreams": {
            "api": {
                "url": "https://api.example.com",
                "headers": {"X-A": "${1BAD}", "X-B": "${OPEN"},
                "auth": {"type": "header", "name": "X", "value": f"${{file:{latin1}}}"},
            }
        },
    }
    assert problems(raw) == [
        "allowed_hosts.1: environment variable HOST is not set",
        "upstreams.api.headers.X-A: bad reference ${1BAD}",
        "upstreams.api.headers.X-B: unclosed ${ (write ${VAR}, ${VAR:-default} or ${file:/path})",
        f"upstreams.api.auth.value: {latin1} is not UTF-8 (byte 3)",
    ]


def test_interpolation_in_lists_and_lower_case_names(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("no-newline-at-end")
    config = parse_config(
        {
            "allowed_hosts": ["localhost", "${host_name}"],
            "upstreams": {
                "api": {
                    "url": "https://api.example.com",
                    "auth": {"type": "header", "name": "X", "value": f"${{file:{token}}}"},
                }
            },
        },
        env={"host_name": "proxy.internal"},
    )
    assert config.allowed_hosts == ["localhost", "proxy.internal"]
    auth = config.upstreams["api"].auth
    assert isinstance(auth, HeaderAuth)
    assert auth.value.get_secret_value() == "no-newline-at-end"  # only a final \n goes


def test_only_values_under_auth_become_secrets_for_redaction() -> None:
    """Interpolated values under `auth` (even plain JSON bodies) are redacted from logs;
    the rest (a URL from the environment, say) are not secrets."""
    raw = {
        "upstreams": {
            "api": {
                "url": "${UPSTREAM_URL}",
                "headers": {"X-Tenant": "${TENANT}"},
                "auth": {
                    "type": "login",
                    "request": {
                        "url": "https://api.example.com/login",
                        "json": {"user": "fixed-user", "secret": "${LOGIN_SECRET}"},
                    },
                    "token": "access_token",
                },
            }
        }
    }
    env = {
        "UPSTREAM_URL": "https://api.example.com/v1",
        "TENANT": "tenant-42",
        "LOGIN_SECRET": "login-secret-77",
    }
    secrets = parse_config(raw, env=env).secrets
    assert "login-secret-77" in secrets
    assert not {"https://api.example.com/v1", "tenant-42", "fixed-user"} & secrets

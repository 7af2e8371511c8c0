"""The egress matcher and the TLS file checks (SPEC §10, §2 `tls`): pure, no network."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.auth.identity import auth_identity
from proxy.config import Upstream, parse_config
from proxy.connector import Egress, NoProxy, ProxyEnv, parse_proxy_url
from proxy.errors import ConfigError
from tests.integration.egress_kit import make_pki


@pytest.mark.parametrize(
    ("no_proxy", "host", "exempt"),
    [
        ("*", "anything.test", True),
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", True),
        (".example.com", "api.example.com", True),
        ("*.example.com", "api.example.com", True),
        ("example.com", "badexample.com", False),
        ("example.com", "example.com.evil.test", False),
        ("EXAMPLE.com", "Api.Example.COM", True),
        ("example.com:8443", "example.com", True),  # ports are ignored
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("192.168.1.7", "192.168.1.7", True),
        ("192.168.1.7", "192.168.1.8", False),
        ("fd00::/8", "fd12::1", True),
        ("::1", "[::1]", True),
        ("[::1]:8080", "::1", True),
        ("a.test, b.test  c.test", "c.test", True),
        ("", "example.com", False),
        ("10.0.0.0/8", "10.example.com", False),  # a CIDR never matches a name
    ],
)
def test_no_proxy_entries(no_proxy: str, host: str, exempt: bool) -> None:
    assert NoProxy.parse(no_proxy).matches(host) is exempt


@given(st.ip_addresses(v=4))
@example(ipaddress.IPv4Address("127.255.255.255"))
@example(ipaddress.IPv4Address("128.0.0.0"))
def test_a_cidr_matches_exactly_its_addresses(address: ipaddress.IPv4Address) -> None:
    matcher = NoProxy.parse("127.0.0.0/8")
    assert matcher.matches(str(address)) is (str(address).split(".")[0] == "127")


def test_lowercase_wins_and_uppercase_is_read_when_lowercase_is_unset() -> None:
    env = ProxyEnv.from_env(
        {
            "https_proxy": "http://low:1",
            "HTTPS_PROXY": "http://up:2",
            "HTTP_PROXY": "http://up:3",
            "NO_PROXY": "skip.test",
        }
    )
    assert env.https is not None and env.https.address == "low:1"
    assert env.http is not None and env.http.address == "up:3"
    assert env.proxy_for("https", "api.test") == env.https
    assert env.proxy_for("http", "api.test") == env.http
    assert env.proxy_for("https", "x.skip.test") is None


def test_an_explicit_egress_proxy_overrides_the_environment() -> None:
    env = ProxyEnv.from_env({"https_proxy": "http://env:1", "no_proxy": "*"})
    explicit = parse_proxy_url("http://mine:3128")
    assert Egress(env).proxy_for("https", "a.test") is None  # no_proxy=*
    assert Egress(env, overridden=True, explicit=explicit).proxy_for("https", "a.test") == explicit
    assert Egress(env, overridden=True).proxy_for_url("https://a.test/x") is None  # none


def test_proxy_url_credentials_are_kept_out_of_repr_and_address() -> None:
    proxy = parse_proxy_url("http://us%40er:p%3Ass-word@Proxy.Corp:8080")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp",
        8080,
        "us@er",
        "p:ss-word",
    )
    assert "p:ss-word" not in repr(proxy) and proxy.address == "proxy.corp:8080"
    assert proxy.authorization.startswith("Basic ")
    assert {"p:ss-word", "us@er:p:ss-word", proxy.authorization[6:]} <= proxy.secret_forms()
    assert parse_proxy_url("proxy.corp:3128").address == "proxy.corp:3128"  # curl's default
    assert parse_proxy_url("http://proxy.corp").port == 80


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://proxy.corp:443", "https:// egress proxy is not supported"),
        ("socks5://proxy.corp:1080", "SOCKS egress proxy is not supported"),
        ("socks5h://proxy.corp:1080", "SOCKS egress proxy is not supported"),
        ("ftp://proxy.corp", "must be an http:// URL"),
        ("http://proxy.corp:99999", "bad port"),
        ("http://proxy.corp/path", "without a path"),
        ("http://", "no host"),
    ],
)
def test_bad_proxy_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_proxy_url(url)


def _problems(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return [str(p) for p in info.value.problems]


def test_egress_config_errors_name_their_path() -> None:
    raw = {
        "egress_proxy": "socks5://p:1080",
        "upstreams": {"a": {"url": "https://a.test", "egress_proxy": "https://secret:pw@p:443"}},
    }
    problems = _problems(raw)
    assert any(p.startswith("egress_proxy: ") and "SOCKS" in p for p in problems), problems
    assert any(p.startswith("upstreams.a.egress_proxy: ") for p in problems), problems
    assert not any("pw" in p for p in problems)  # the URL (and its password) is not echoed


def test_a_bad_proxy_variable_is_reported_naming_it() -> None:
    problems = _problems(
        {"upstreams": {"a": {"url": "https://a.test"}}}, env={"HTTPS_PROXY": "socks5://p:1"}
    )
    assert problems == ["HTTPS_PROXY: a SOCKS egress proxy is not supported; use an http:// proxy"]


def test_proxy_passwords_join_the_redaction_set() -> None:
    config = parse_config(
        {
            "egress_proxy": "http://u:top-level-pw@p:1",
            "upstreams": {"a": {"url": "https://a.test", "egress_proxy": "http://v:own-pw@q:2"}},
        },
        env={"http_proxy": "http://w:env-pw@r:3"},
    )
    assert {"top-level-pw", "own-pw", "env-pw", "u:top-level-pw"} <= config.secrets


# -- TLS files -------------------------------------------------------------------------


def _tls_problems(tls: dict[str, Any]) -> list[str]:
    return _problems({"upstreams": {"a": {"url": "https://a.test", "tls": tls}}})


def test_client_certificate_files_are_loaded_by_check(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cert, key = pki.issue("client", client=True)
    other_cert, other_key = pki.issue("other", client=True)
    locked_cert, locked_key = pki.issue("locked", client=True, password=b"right-pw")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + os.urandom(64))
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(key.read_bytes())
    unreadable.chmod(0)

    def one(tls: dict[str, Any]) -> str:
        problems = _tls_problems(tls)
        assert len(problems) == 1, problems
        return problems[0]

    ok = parse_config(
        {
            "upstreams": {
                "a": {
                    "url": "https://a.test",
                    "tls": {"cert_file": str(cert), "key_file": str(key)},
                }
            }
        },
        env={},
    )
    assert ok.upstreams["a"].tls.cert_file == str(cert)
    missing = one({"cert_file": str(tmp_path / "nope.crt"), "key_file": str(key)})
    assert missing.startswith("upstreams.a.tls.cert_file: file not found"), missing
    assert one({"cert_file": str(garbage), "key_file": str(key)}).startswith(
        "upstreams.a.tls.cert_file: "
    )
    assert "no PEM certificate" in one({"cert_file": str(der), "key_file": str(key)})
    assert "no PEM private key" in one({"cert_file": str(cert), "key_file": str(cert)})
    if os.geteuid() != 0:
        assert "cannot read" in one({"cert_file": str(cert), "key_file": str(unreadable)})
    mismatch = one({"cert_file": str(cert), "key_file": str(other_key)})
    assert mismatch.startswith("upstreams.a.tls: key_file: ") and "is not the key of" in mismatch
    assert "set key_password" in one({"cert_file": str(locked_cert), "key_file": str(locked_key)})
    wrong = one(
        {"cert_file": str(locked_cert), "key_file": str(locked_key), "key_password": "wrong-pw"}
    )
    assert "wrong key_password" in wrong
    assert "need cert_file" in one({"key_file": str(key)})
    assert "no PEM certificate" in one({"ca_file": str(garbage)})
    del other_cert


def test_the_identity_includes_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    first = pki.issue("first", client=True)
    second = pki.issue("second", client=True)
    auth = {"type": "paymo_session", "api_key": "k1"}

    def digest(files: tuple[Path, Path] | None) -> str:
        tls = {} if files is None else {"cert_file": str(files[0]), "key_file": str(files[1])}
        identity = auth_identity(
            Upstream.model_validate({"url": "https://x.test", "auth": auth, "tls": tls})
        )
        assert identity is not None
        return identity.digest

    assert len({digest(None), digest(first), digest(second)}) == 3
    assert digest(first) == digest(first)


def test_a_proxy_password_written_into_the_file_is_warned_about() -> None:
    config = parse_config(
        {
            "egress_proxy": "http://u:literal-pw@p:1",
            "upstreams": {
                "a": {"url": "https://a.test", "egress_proxy": "http://u:${PW}@q:2"},
                "b": {"url": "https://b.test", "egress_proxy": "http://nopassword@q:2"},
            },
        },
        env={"PW": "from-env-pw"},
    )
    assert [w.path for w in config.warnings] == ["egress_proxy"]

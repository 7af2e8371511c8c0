"""The pure parts of reloading: what is watched, what counts as a change, what needs a
restart, and which upstreams keep their token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.config import Config, parse_config
from proxy.reload import _same_identity, fingerprint, restart_only_changes, watched_files

DIDOMI = {"url": "https://api.test/v1", "auth": {"type": "didomi", "key": "k", "secret": "s1"}}


def _config(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config({"upstreams": {"d": DIDOMI}, **raw}, env=env or {})


def test_fingerprint_follows_symlinks_and_marks_missing_files(tmp_path: Path) -> None:
    for version, text in (("v1", "old"), ("v2", "new")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "secret").write_text(text)
    (tmp_path / "..data").symlink_to("v1")
    link = tmp_path / "secret"
    link.symlink_to("..data/secret")
    before = fingerprint([str(link), str(tmp_path / "missing")])
    assert before[str(tmp_path / "missing")] is None
    (tmp_path / "..data_tmp").symlink_to("v2")
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")  # the kubelet's swap
    after = fingerprint([str(link)])
    assert before[str(link)] is not None and after[str(link)] != before[str(link)]


def test_watched_files_are_the_config_its_file_references_and_tls_files(tmp_path: Path) -> None:
    secret, ca = tmp_path / "secret", tmp_path / "ca.pem"
    secret.write_text("s1")
    ca.write_text("not checked here")
    upstream = {
        **DIDOMI,
        "auth": {**DIDOMI["auth"], "secret": f"${{file:{secret}}}"},  # type: ignore[dict-item]
    }
    config = parse_config({"upstreams": {"d": upstream}}, env={})
    assert config.files == {str(secret)}
    config_with_ca = config.model_copy(
        update={
            "upstreams": {
                "d": config.upstreams["d"].model_copy(
                    update={
                        "tls": config.upstreams["d"].tls.model_copy(update={"ca_file": str(ca)})
                    }
                )
            }
        }
    )
    assert watched_files("/etc/authproxy.yaml", config_with_ca) == {
        "/etc/authproxy.yaml",
        str(secret),
        str(ca),
    }


def test_restart_only_changes_name_the_settings_that_cannot_apply_live() -> None:
    old = _config({"listen": {"port": 8080}})
    assert restart_only_changes(old, _config({"listen": {"port": 9090}})) == ["listen.port"]
    assert restart_only_changes(old, _config({"workers": 2})) == ["workers"]
    # A rotated inbound token is a credential: it applies without a restart.
    token = _config({"listen": {"port": 8080, "require_token": "t0ken-rotated"}})
    assert restart_only_changes(old, token) == []
    assert restart_only_changes(old, _config({"log": {"level": "debug"}})) == []


def test_only_a_changed_token_flow_loses_its_token() -> None:
    old = _config({}).upstreams["d"]
    headers = _config({}).upstreams["d"].model_copy(update={"headers": {"X-A": "b"}})
    assert _same_identity(old, headers)
    rotated = parse_config(
        {"upstreams": {"d": {**DIDOMI, "auth": {**DIDOMI["auth"], "secret": "s2"}}}},  # type: ignore[dict-item]
        env={},
    ).upstreams["d"]
    assert not _same_identity(old, rotated)
    static = parse_config({"upstreams": {"n": {"url": "http://127.0.0.1:1"}}}, env={}).upstreams[
        "n"
    ]
    assert _same_identity(static, static) and not _same_identity(old, static)

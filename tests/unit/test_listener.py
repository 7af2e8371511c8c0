"""`listen.path` / `listen.mode` in the config, and `bind_unix` (SPEC §10)."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.listener import bind_unix

UPSTREAMS = {"upstreams": {"api": {"url": "http://127.0.0.1:9"}}}


def _listen(
    listen: dict[str, Any],
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    return parse_config({"listen": listen, **UPSTREAMS}, env=env or {}, overrides=overrides).listen


@pytest.mark.parametrize(
    ("mode", "expected"), [("0600", 0o600), ("660", 0o660), ("0o640", 0o640), (0o666, 0o666)]
)
def test_mode_is_octal(mode: Any, expected: int) -> None:
    assert _listen({"path": "/tmp/a.sock", "mode": mode}).mode == expected


def test_yaml_0600_is_octal_and_600_is_refused() -> None:
    raw = yaml.safe_load("listen: {path: /tmp/a.sock, mode: 0660}")
    assert parse_config({**raw, **UPSTREAMS}, env={}).listen.mode == 0o660
    with pytest.raises(ConfigError) as info:
        _listen({"path": "/tmp/a.sock", "mode": 600})  # YAML's 600 is decimal
    assert "listen.mode" in str(info.value) and "0600" in str(info.value)


def test_path_with_host_or_port_in_the_file_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        _listen({"path": "/tmp/a.sock", "port": 8080})
    assert "listen: give path (a Unix socket) or host and port, not both" in str(info.value)


def test_host_or_port_from_flags_or_environment_replace_the_path() -> None:
    assert _listen({"path": "/tmp/a.sock"}).path == "/tmp/a.sock"
    assert _listen({"path": "/tmp/a.sock"}, overrides={"listen.port": 9000}).path is None
    from_env = _listen({"path": "/tmp/a.sock"}, env={"AUTHPROXY_HOST": "127.0.0.1"})
    assert from_env.path is None and from_env.host == "127.0.0.1"


def test_bind_unix_mode_stale_live_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(str(path))
    crashed.close()  # left behind, nobody listening
    sock, owned = bind_unix(str(path), 0o640)
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o640
        with pytest.raises(OSError, match="another process is listening on it"):
            bind_unix(str(path))
        assert path.exists()
    finally:
        sock.close()
    owned.remove()
    assert not path.exists()


def test_removal_spares_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first, first_file = bind_unix(str(path))
    first.close()
    second, second_file = bind_unix(str(path))  # replaced the stale one
    try:
        first_file.remove()  # the first owner exits late: not its file any more
        assert path.exists()
    finally:
        second.close()
        second_file.remove()
    assert not path.exists()


def test_a_file_that_is_not_a_socket_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep")
    with pytest.raises(OSError, match="exists and is not a socket"):
        bind_unix(str(path))
    assert path.read_text() == "keep"

"""`authproxy check` validates `token_store` without connecting (SPEC §8 promise 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import free_port

AUTHPROXY = Path(sys.executable).parent / "authproxy"


def check(tmp_path: Path, token_store: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstreams:\n  e:\n    url: http://127.0.0.1:9\ntoken_store: {token_store}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY_")}
    env["REDIS_URL"] = f"redis://:check-pass-4e1d@127.0.0.1:{free_port()}/0"  # nobody listens
    return subprocess.run(
        [str(AUTHPROXY), "check", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_accepts_a_redis_store_it_cannot_reach(tmp_path: Path) -> None:
    result = check(tmp_path, "{type: redis, url: '${REDIS_URL}', timeout: 1}")
    assert result.returncode == 0, result.stderr
    assert "check-pass-4e1d" not in result.stdout + result.stderr


def test_check_reports_a_bad_store_with_its_path(tmp_path: Path) -> None:
    result = check(tmp_path, "{type: redis, url: 'memcached://h', timeout: -1}")
    assert result.returncode == 2
    assert "token_store.url: must be redis://" in result.stderr
    assert "token_store.timeout:" in result.stderr
    assert "Traceback" not in result.stderr

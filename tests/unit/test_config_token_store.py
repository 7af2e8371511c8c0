"""The `token_store` section (SPEC §8): validated without connecting, its URL a secret."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError

UPSTREAMS = {"e": {"url": "http://127.0.0.1:9"}}


def problems(token_store: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstreams": UPSTREAMS, "token_store": token_store}, env={})
    return [str(p) for p in info.value.problems]


def test_defaults_to_memory() -> None:
    config = parse_config({"upstreams": UPSTREAMS}, env={})
    assert config.token_store.type == "memory"
    assert (config.token_store.key_prefix, config.token_store.timeout) == ("authproxy", 2.0)


@pytest.mark.parametrize(
    ("token_store", "expected"),
    [
        ({"type": "redis"}, "token_store: url: required for type: redis"),
        ({"type": "valkey", "url": "redis://h"}, "token_store.type: Input should be"),
        ({"type": "redis", "url": "http://h:6379"}, "token_store.url: must be redis://"),
        ({"type": "redis", "url": "redis://:pw@/0"}, "token_store.url: needs a host"),
        ({"type": "redis", "url": "redis://h:port"}, "token_store.url: port must be a number"),
        ({"type": "redis", "url": "unix://"}, "token_store.url: needs a socket path"),
        ({"type": "redis", "url": "redis://h", "timeout": 0}, "token_store.timeout:"),
        ({"type": "redis", "url": "redis://h", "key_prefix": "a b"}, "token_store.key_prefix:"),
        ({"type": "redis", "url": "redis://h", "ttl": 5}, "token_store.ttl: unknown key"),
    ],
)
def test_each_problem_names_its_path(token_store: dict[str, Any], expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(token_store)), problems(token_store)


def test_the_url_and_its_password_are_secrets_never_repeated() -> None:
    url = "rediss://user:redis-pass-9f8e@redis.internal:6380/2"
    config = parse_config(
        {"upstreams": UPSTREAMS, "token_store": {"type": "redis", "url": "${REDIS_URL}"}},
        env={"REDIS_URL": url},
    )
    assert {url, "redis-pass-9f8e"} <= config.secrets
    assert "redis-pass-9f8e" not in repr(config.token_store)
    found = problems({"type": "redis", "url": "http://user:redis-pass-9f8e@h"})
    assert not any("redis-pass-9f8e" in p for p in found)

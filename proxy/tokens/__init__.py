"""Tokens: the manager that holds them and the stores they are shared through.

manager.py  TokenManager (cache, single flight, compare-and-refresh, backoff) and Token
store.py    the async store protocol every store implements, and the memory store
redis.py    the shared store on Redis (one token per identity across a deployment)
sealing.py  key names and AES-GCM for what the Redis store holds
"""

from __future__ import annotations

from proxy.config import TokenStoreConfig
from proxy.tokens.manager import Grant, Token, TokenManager, TokenSource
from proxy.tokens.store import MemoryTokenStore, TokenStore

__all__ = [
    "Grant",
    "MemoryTokenStore",
    "Token",
    "TokenManager",
    "TokenSource",
    "TokenStore",
    "build_store",
]


def build_store(cfg: TokenStoreConfig) -> TokenStore:
    """The store a config asks for; nothing connects until `start()`."""
    if cfg.type == "redis" and cfg.url is not None:
        from proxy.tokens.redis import RedisTokenStore

        return RedisTokenStore(cfg.url.get_secret_value(), cfg.key_prefix, cfg.timeout)
    return MemoryTokenStore()

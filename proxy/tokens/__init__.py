"""Tokens: the manager that holds them and the stores they are shared through."""

from __future__ import annotations

from proxy.tokens.manager import Grant, MemoryTokenStore, TokenManager, TokenSource, TokenStore

__all__ = ["Grant", "MemoryTokenStore", "TokenManager", "TokenSource", "TokenStore"]

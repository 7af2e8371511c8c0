"""The auth identity (SPEC §8 promise 5): same credentials share, others never do."""

from __future__ import annotations

from typing import Any

from proxy.auth.identity import auth_identity
from proxy.config import Upstream


def _ident(auth: dict[str, Any], **extra: Any) -> str:
    identity = auth_identity(
        Upstream.model_validate({"url": "https://x.test/api", "auth": auth, **extra})
    )
    assert identity is not None
    return identity.digest


OAUTH: dict[str, Any] = {
    "type": "oauth2_client_credentials",
    "token_url": "https://t.test/token",
    "client_id": "id",
    "client_secret": "s1",
}


def test_name_prefix_headers_and_timing_do_not_change_it() -> None:
    base = _ident({"type": "paymo_session", "api_key": "k1"})
    assert base == _ident(
        {"type": "paymo_session", "api_key": "k1", "prefetch": True, "refresh_before": 5},
        prefix="/elsewhere",
        headers={"Accept": "application/json"},
    )


def test_secret_scope_audience_extra_and_client_auth_change_it() -> None:
    base = _ident(OAUTH)
    variants: list[dict[str, Any]] = [
        {**OAUTH, "client_secret": "s2"},
        {**OAUTH, "scope": "read"},
        {**OAUTH, "audience": "aud"},
        {**OAUTH, "extra": {"resource": "r"}},
        {**OAUTH, "client_auth": "basic"},
        {**OAUTH, "token_url": "https://t.test/other"},
    ]
    digests = {_ident(v) for v in variants}
    assert base not in digests
    assert len(digests) == len(variants)


def test_default_urls_resolve_against_the_upstream() -> None:
    auth = {"type": "primaerp", "api_key": "a", "secret_key": "s"}
    explicit = {
        **auth,
        "login_url": "https://x.test/api/auth/login",
        "refresh_url": "https://x.test/api/auth/refreshtoken",
    }
    assert _ident(auth) == _ident(explicit)


def test_static_auth_has_none_and_material_is_hidden() -> None:
    assert auth_identity(Upstream.model_validate({"url": "https://x.test"})) is None
    identity = auth_identity(Upstream.model_validate({"url": "https://x.test", "auth": OAUTH}))
    assert identity is not None
    assert "s1" not in repr(identity)

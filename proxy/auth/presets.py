"""The named token types, each expressed as a general `login` config.

One place says what Paymo, primaERP, Didomi and an OAuth2 client-credentials
server expect; the machinery that talks to them is the same `LoginFlow`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

from proxy.config import (
    BasicCredentials,
    Didomi,
    Inject,
    LoginAuth,
    OAuth2ClientCredentials,
    PaymoSession,
    Primaerp,
    RefreshSpec,
    RequestSpec,
    TokenAuthBase,
    TokenAuthConfig,
)

# Paymo accepts an API key as the Basic username with "any text" as the password.
PAYMO_KEY_PASSWORD = "X"


def _common(cfg: TokenAuthConfig) -> dict[str, Any]:
    return {"prefetch": cfg.prefetch, "refresh_before": cfg.refresh_before}


def paymo_session(cfg: PaymoSession, base_url: str) -> LoginAuth:
    if cfg.api_key is not None:
        basic = BasicCredentials(
            username=cfg.api_key.get_secret_value(), password=PAYMO_KEY_PASSWORD
        )
    else:
        password = cfg.password.get_secret_value() if cfg.password else ""
        basic = BasicCredentials(username=cfg.email or "", password=password)
    return LoginAuth(
        type="login",
        request=RequestSpec(
            method="POST", url=cfg.login_url or f"{base_url}/sessions", basic=basic
        ),
        token="sessions.0.id",
        expires_at="sessions.0.expires_on",
        logout=RequestSpec(method="DELETE", url=f"{base_url}/sessions/{{token}}"),
        inject=Inject(header="X-Session", value="{token}"),
        **_common(cfg),
    )


def primaerp(cfg: Primaerp, base_url: str) -> LoginAuth:
    api_key = cfg.api_key.get_secret_value()
    if cfg.secret_key is not None:
        basic = BasicCredentials(username=cfg.secret_key.get_secret_value(), password="")
    else:
        password = cfg.password.get_secret_value() if cfg.password else ""
        basic = BasicCredentials(username=cfg.username or "", password=password)
    return LoginAuth(
        type="login",
        request=RequestSpec(
            method="GET",
            url=cfg.login_url or f"{base_url}/auth/login",
            basic=basic,
            query={"apikey": api_key},
        ),
        token="token",
        expires_at="expiration",
        refresh=RefreshSpec(
            token="refreshToken",
            expires_at="refreshExpiration",
            request=RequestSpec(
                method="GET",
                url=cfg.refresh_url or f"{base_url}/auth/refreshtoken",
                query={"apikey": api_key, "refresh_token": "{refresh_token}"},
            ),
        ),
        inject=Inject(query="token"),
        **_common(cfg),
    )


def didomi(cfg: Didomi, base_url: str) -> LoginAuth:
    body = {
        "type": "api-key",
        "key": cfg.key.get_secret_value(),
        "secret": cfg.secret.get_secret_value(),
    }
    return LoginAuth.model_validate(
        {
            "type": "login",
            "request": {
                "method": "POST",
                "url": cfg.login_url or f"{base_url}/sessions",
                "json": body,
            },
            "token": "access_token",
            "inject": {"header": "Authorization", "value": "Bearer {token}"},
            **_common(cfg),
        }
    )


def oauth2_client_credentials(cfg: OAuth2ClientCredentials, base_url: str) -> LoginAuth:
    secret = cfg.client_secret.get_secret_value()
    fields: dict[str, str] = {"grant_type": "client_credentials"}
    basic = None
    if cfg.client_auth == "body":
        fields |= {"client_id": cfg.client_id, "client_secret": secret}
    elif cfg.client_auth == "basic":
        basic = {"username": cfg.client_id, "password": secret}
    else:  # RFC 6749 §2.3.1: form-encode both before Basic
        basic = {"username": quote_plus(cfg.client_id), "password": quote_plus(secret)}
    if cfg.audience is not None:
        fields["audience"] = cfg.audience
    if cfg.scope is not None:
        fields["scope"] = cfg.scope
    fields |= cfg.extra
    body_key = "json" if cfg.body_format == "json" else "form"
    return LoginAuth.model_validate(
        {
            "type": "login",
            "request": {"method": "POST", "url": cfg.token_url, "basic": basic, body_key: fields},
            "token": "access_token",
            "expires_in": "expires_in",
            "inject": {"header": "Authorization", "value": "Bearer {token}"},
            **_common(cfg),
        }
    )


# Every token type becomes a general `login` config; `login` itself passes through.
TOKEN_TYPES: dict[str, Callable[[Any, str], LoginAuth]] = {
    "login": lambda cfg, _base: cfg,
    "oauth2_client_credentials": oauth2_client_credentials,
    "paymo_session": paymo_session,
    "primaerp": primaerp,
    "didomi": didomi,
}


def resolve_login(auth: TokenAuthBase, base_url: str) -> LoginAuth:
    """The general `login` form of any token type, with its defaults filled in."""
    return TOKEN_TYPES[auth.type](auth, base_url)  # type: ignore[attr-defined]

"""`authproxy demo`: the four fake seed APIs on loopback, the proxy in front of them.

Needs no network and no config file. Tokens live `lifetime` seconds (30 by
default) so someone watching the log sees a refresh happen within a minute.
"""

from __future__ import annotations

import sys
from typing import Any

from proxy.config import parse_config
from proxy.fakes import Fakes, run_fakes
from proxy.logs import configure_logging
from proxy.server import serve


def demo_config(fakes: Fakes, *, host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
    """A config document serving the four fakes through their presets."""
    paymo, primaerp, didomi, getpaid = (
        fakes.paymo.state,
        fakes.primaerp.state,
        fakes.didomi.state,
        fakes.getpaid.state,
    )
    return {
        "listen": {"host": host, "port": port},
        "upstreams": {
            "paymo": {
                "url": fakes.paymo.url,
                "headers": {"Accept": "application/json"},
                "auth": {"type": "paymo_session", "api_key": paymo.api_key},
            },
            "primaerp": {
                "url": fakes.primaerp.url,
                "auth": {
                    "type": "primaerp",
                    "api_key": primaerp.apikey,
                    "username": primaerp.username,
                    "password": primaerp.password,
                },
            },
            "didomi": {
                "url": fakes.didomi.url,
                "auth": {"type": "didomi", "key": didomi.key, "secret": didomi.secret},
            },
            "getpaid": {
                "url": fakes.getpaid.url,
                "auth": {
                    "type": "oauth2_client_credentials",
                    "token_url": fakes.getpaid.token_url,
                    "client_id": getpaid.client_id,
                    "client_secret": getpaid.client_secret,
                    "audience": getpaid.audience,
                    "scope": getpaid.allowed_scopes,
                    "body_format": "json",
                },
            },
        },
    }


def _banner(port: int) -> str:
    base = f"http://localhost:{port}"
    return f"""
authproxy demo: four fake APIs behind the proxy at {base} (Ctrl-C stops everything)

  curl {base}/paymo/clients              # Paymo: session via POST /sessions, X-Session
  curl {base}/primaerp/time/projects     # primaERP: login, ?token=, refresh token
  curl {base}/didomi/properties          # Didomi: JWT from POST /sessions
  curl {base}/getpaid/accounts           # getpaid: OAuth2 client credentials (JSON)
  curl {base}/-/status                   # token state per upstream (no secrets)

Each answer's "echo" shows what reached the fake API: the credential the proxy
added. Tokens live a short while, so the log shows them being refreshed.
"""


async def run_demo(*, host: str = "127.0.0.1", port: int = 8080, lifetime: float = 30.0) -> None:
    async with run_fakes(lifetime=lifetime) as fakes:
        config = parse_config(demo_config(fakes, host=host, port=port), env={})
        configure_logging(config.log.level, config.log.format, config.secrets)

        def ready(bound_port: int) -> None:
            print(_banner(bound_port), file=sys.stderr, flush=True)

        await serve(config, on_ready=ready)

"""The general `login` flow, which every token type is built on, and its Authenticator.

`LoginFlow` knows how to talk to a token endpoint (log in, refresh, log out)
and how to read its answer; `TokenAuth` puts a `TokenManager` in front of it
and turns tokens into credentials. Failures become `AuthFailed` with a message
we wrote: the endpoint's status and, for error answers, at most 300 scrubbed
characters of what it said — never a secret or an issued token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDictProxy

from proxy import __version__
from proxy.auth.base import Credential, Injection, Token, basic_authorization
from proxy.auth.expiry import ExpiryError, dig, jwt_expiry, parse_expires_at, parse_expires_in
from proxy.config import LoginAuth, RequestSpec
from proxy.connector import (
    Egress,
    EgressError,
    proxy_reply_error,
    proxy_unreachable,
)
from proxy.errors import AuthBackoff, AuthFailed
from proxy.failures import explain
from proxy.logs import Redactor
from proxy.tokens import Grant, TokenManager

log = structlog.get_logger("authproxy.auth")

MAX_TOKEN_BODY = 256 * 1024
USER_AGENT = f"authproxy/{__version__}"
SNIPPET = 300
CONFIG_ERRORS = frozenset(
    {"invalid_client", "invalid_grant", "unauthorized_client", "invalid_scope"}
)


@dataclass(frozen=True, slots=True)
class TokenHttp:
    """The transport a flow is handed: the app's session plus this upstream's limits."""

    session: aiohttp.ClientSession
    upstream: str
    timeout: aiohttp.ClientTimeout
    ssl: ssl.SSLContext | bool
    secrets: frozenset[str]
    # Which egress proxy each token URL goes through (SPEC §10): passed per request,
    # not aiohttp's trust_env (no CIDRs in no_proxy, and it reads ~/.netrc).
    egress: Egress = field(default_factory=Egress)

    async def call(
        self,
        spec: RequestSpec,
        what: str,
        fill: dict[str, str],
        extra_headers: tuple[tuple[str, str], ...] = (),
        extra_query: str = "",
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        url = spec.url
        for key, value in fill.items():
            url = url.replace("{" + key + "}", quote(value, safe=""))
        if extra_query:
            url += ("&" if "?" in url else "?") + extra_query
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        headers.update({k: _fill(v, fill) for k, v in spec.headers.items()})
        headers.update(extra_headers)
        kwargs: dict[str, Any] = {}
        if spec.query:
            kwargs["params"] = {k: _fill(v, fill) for k, v in spec.query.items()}
        if spec.basic is not None:
            headers["Authorization"] = basic_authorization(spec.basic.username, spec.basic.password)
        # Content-Type is explicit: the shared session never invents headers.
        if spec.json_body is not None:
            kwargs["json"] = _fill_json(spec.json_body, fill)
            headers.setdefault("Content-Type", "application/json")
        elif spec.form is not None:
            kwargs["data"] = {k: _fill(v, fill) for k, v in spec.form.items()}
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        started = time.perf_counter()
        egress = self.egress.proxy_for_url(url)
        if egress is not None:
            # Credentials ride in the proxy URL: aiohttp sends them to the proxy alone
            # (on CONNECT, or on an absolute-form request), never to the endpoint.
            kwargs["proxy"] = egress.url_with_credentials
        try:
            async with self.session.request(
                spec.method,
                url,
                headers=headers,
                allow_redirects=False,
                timeout=self.timeout,
                ssl=self.ssl,
                auto_decompress=True,
                **kwargs,
            ) as resp:
                if resp.status == 407 and egress is not None and not url.startswith("https"):
                    raise _egress_failed(
                        proxy_reply_error(egress, 407, resp.reason or "", urlsplit(url).netloc),
                        what,
                        self,
                    )
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_TOKEN_BODY:
                        raise AuthFailed(
                            f"{what} for {self.upstream} answered {resp.status} with a body "
                            f"over {MAX_TOKEN_BODY // 1024} KiB",
                            self.upstream,
                            resp.status,
                        )
                log.debug(
                    "token_request",
                    upstream=self.upstream,
                    what=what,
                    method=spec.method,
                    # The template, not the filled URL: a logout URL holds the token.
                    endpoint=spec.url.partition("?")[0],
                    endpoint_status=resp.status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )
                return resp.status, resp.headers, bytes(body)
        except TimeoutError:
            raise AuthFailed(f"{what} for {self.upstream} timed out", self.upstream) from None
        except aiohttp.ClientHttpProxyError as exc:
            assert egress is not None
            target = urlsplit(url).netloc.rpartition("@")[2]
            raise _egress_failed(
                proxy_reply_error(egress, exc.status, exc.message, target), what, self
            ) from None
        except aiohttp.ClientProxyConnectionError as exc:
            assert egress is not None
            reason = exc.strerror or type(exc.os_error).__name__
            raise _egress_failed(proxy_unreachable(egress, reason), what, self) from None
        except aiohttp.ClientError as exc:
            why = _explain(exc, url)
            if why is None:
                raise AuthFailed(
                    f"{what} for {self.upstream} unreachable ({type(exc).__name__})",
                    self.upstream,
                ) from None
            raise AuthFailed(f"{what} for {self.upstream} failed: {why}", self.upstream) from None

    def scrub(self, text: str) -> str:
        """Every form of every secret out (percent-, +-, JSON-encoded, in base64, as an
        endpoint echoing our `Authorization: Basic` would show it); forms made once."""
        return _redactor(self.secrets).scrub(text)


@functools.lru_cache(maxsize=64)
def _redactor(secrets: frozenset[str]) -> Redactor:
    return Redactor(secrets)


# A header value may hold visible ASCII and spaces only (RFC 9110 §5.5, and what
# every upstream's parser accepts); anything else in a token would split the
# request, reach the upstream raw, or fail on every request for its whole life.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


def _explain(exc: aiohttp.ClientError, url: str) -> str | None:
    """What failed (proxy.failures), in the words the upstream client uses too."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    why = explain(exc, host, port)
    if why is not None:
        return why
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return f"malformed answer from {host}:{port} ({type(exc).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{host}:{port} closed the connection before its answer"
    return None


def _egress_failed(exc: EgressError, what: str, http: TokenHttp) -> AuthFailed:
    return AuthFailed(f"{what} for {http.upstream} failed: {exc}", http.upstream)


def _fill(value: str, fill: dict[str, str]) -> str:
    for key, replacement in fill.items():
        value = value.replace("{" + key + "}", replacement)
    return value


def _fill_json(node: Any, fill: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _fill(node, fill)
    if isinstance(node, dict):
        return {k: _fill_json(v, fill) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_json(v, fill) for v in node]
    return node


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    value = headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    return None


def refused(exc: AuthFailed) -> bool:
    """The endpoint answered, and said no (4xx: `invalid_grant`, an unknown token)."""
    return exc.endpoint_status is not None and 400 <= exc.endpoint_status < 500


class LoginFlow:
    """A `TokenSource` for any API with a login endpoint (SPEC §3, type `login`)."""

    def __init__(self, cfg: LoginAuth, http: TokenHttp) -> None:
        self.cfg = cfg
        self.http = http

    async def fetch(self, previous: Token | None) -> Grant:
        refresh = self.cfg.refresh
        if refresh is not None and previous is not None and previous.refresh_token:
            try:
                return await self._exchange(
                    refresh.request, "refresh", {"refresh_token": previous.refresh_token}
                )
            except AuthFailed as exc:
                if not refused(exc):
                    # A timeout, a network error or a 5xx: the endpoint is failing, and a
                    # login now would only make the client wait a second token timeout.
                    raise
                # The refresh token was refused (used once already, expired): a full
                # login is the cure, at once.
                log.info("token_refresh_failed", upstream=self.http.upstream, error=exc.message)
        return await self._exchange(self.cfg.request, "login", {})

    async def _exchange(self, spec: RequestSpec, via: str, fill: dict[str, str]) -> Grant:
        what = "token endpoint" if via == "login" else "refresh endpoint"
        status, headers, body = await self.http.call(spec, what, fill)
        upstream = self.http.upstream
        if not 200 <= status < 300:
            detail, error_code = self._describe_error(body)
            if error_code in CONFIG_ERRORS:
                log.error(
                    "token_config_problem",
                    upstream=upstream,
                    endpoint_status=status,
                    error_code=error_code,
                    hint="check the credentials and scopes in this upstream's auth section",
                )
            retry_after = _retry_after(headers) if status in (429, 503) else None
            raise AuthFailed(
                f"{what} for {upstream} answered {status}" + (f": {detail}" if detail else ""),
                upstream,
                status,
                retry_after,
            )
        try:
            return self._read_grant(what, status, headers, body, via)
        except AuthFailed:
            raise
        except Exception as exc:  # RecursionError (deep JSON), and anything unforeseen
            raise AuthFailed(
                f"{what} for {upstream} answered {status} with an answer that cannot be read "
                f"({type(exc).__name__})",
                upstream,
                status,
            ) from None

    def _read_grant(
        self, what: str, status: int, headers: CIMultiDictProxy[str], body: bytes, via: str
    ) -> Grant:
        """The token, its refresh token and expiry out of a 2xx answer, or AuthFailed."""
        upstream = self.http.upstream
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            ctype = self.http.scrub(headers.get("Content-Type", "unknown type"))[:100]
            raise AuthFailed(
                f"{what} for {upstream} answered {status} with a body that is not JSON ({ctype})",
                upstream,
                status,
            ) from None
        value = dig(document, self.cfg.token)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise AuthFailed(
                f"{what} for {upstream} answered {status} without a token at '{self.cfg.token}'",
                upstream,
                status,
            )
        problem = self._unsendable(value)
        if problem:
            raise AuthFailed(
                f"{what} for {upstream} answered {status} with a token that cannot be sent "
                f"({problem})",
                upstream,
                status,
            )
        refresh_token = refresh_expires_at = None
        if self.cfg.refresh is not None:
            found = dig(document, self.cfg.refresh.token)
            # One we could not send (a lone surrogate) is as good as none: log in again.
            usable = isinstance(found, str) and found and _HEADER_SAFE.fullmatch(found)
            refresh_token = found if usable else None
        try:
            expires_at = self._expiry(document, value)
            refresh_expires_at = self._refresh_expiry(document)
        except ExpiryError as exc:
            raise AuthFailed(
                f"{what} for {upstream} answered {status} with an unreadable expiry: {exc}",
                upstream,
                status,
            ) from None
        return Grant(value, expires_at, refresh_token, via, status, refresh_expires_at)

    def _refresh_expiry(self, document: Any) -> float | None:
        refresh = self.cfg.refresh
        if refresh is None or refresh.expires_at is None:
            return None
        raw = dig(document, refresh.expires_at)
        return None if raw is None else parse_expires_at(raw)

    def _unsendable(self, token: str) -> str | None:
        """Why this token cannot go where `inject` puts it (None: it can)."""
        inject = self.cfg.inject
        if inject.header is not None:
            if not _HEADER_SAFE.fullmatch(inject.value.replace("{token}", token)):
                return "a header value must be visible ASCII: control or non-ASCII characters"
            return None
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            return "not encodable as UTF-8 for the query"
        return None

    def _expiry(self, document: Any, token: str) -> float | None:
        """Expiry in the SPEC's order: expires_at, expires_in, JWT exp, lifetime."""
        cfg = self.cfg
        if cfg.expires_at is not None and (raw := dig(document, cfg.expires_at)) is not None:
            return parse_expires_at(raw)
        if cfg.expires_in is not None and (raw := dig(document, cfg.expires_in)) is not None:
            return time.time() + parse_expires_in(raw)
        if (exp := jwt_expiry(token)) is not None:
            return exp
        if cfg.lifetime is not None:
            return time.time() + cfg.lifetime
        return None

    def _describe_error(self, body: bytes) -> tuple[str, str | None]:
        text = body.decode("utf-8", "replace")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            document = None
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            code = document["error"]
            description = document.get("error_description")
            detail = code + (f" ({description})" if isinstance(description, str) else "")
            # Scrubbed whole, then cut: a cut first could leave half a secret behind.
            return self.http.scrub(detail)[:SNIPPET], self.http.scrub(code)[:100]
        snippet = " ".join(text.split())
        return self.http.scrub(snippet)[:SNIPPET], None

    async def logout(self, credential: Credential) -> None:
        spec = self.cfg.logout
        token = credential.token
        if spec is None or token is None:
            return
        try:
            status, _, _ = await self.http.call(
                spec,
                "logout endpoint",
                {"token": token.value},
                extra_headers=credential.headers,
                extra_query=credential.query,
            )
        except AuthFailed as exc:
            log.warning("token_logout_failed", upstream=self.http.upstream, error=exc.message)
            return
        log.info("token_logout", upstream=self.http.upstream, endpoint_status=status)


class TokenAuth:
    """An Authenticator backed by a TokenManager; credentials are built once per token."""

    refreshable = True
    injected_query: str | None

    def __init__(
        self,
        type_name: str,
        manager: TokenManager,
        flow: LoginFlow,
        injection: Injection,
        prefetch: bool,
    ) -> None:
        self.type_name = type_name
        self.manager = manager
        self.flow = flow
        self.injection = injection
        self.injected_header = injection.header
        self.injected_query = injection.query
        self.prefetch = prefetch
        self._ready = not prefetch
        self._cached: Credential | None = None

    def _credential_for(self, token: Token) -> Credential:
        cached = self._cached
        if cached is not None and cached.token is token:
            return cached
        self._cached = cred = self.injection.credential(token)
        return cred

    async def credential(self) -> Credential:
        return self._credential_for(await self.manager.get())

    def invalidate(self, used: Credential) -> None:
        if used.token is not None:
            self.manager.invalidate(used.token)

    async def rejected(self, used: Credential, status: int) -> Credential:
        if used.token is None:
            return await self.credential()
        return self._credential_for(await self.manager.rejected(used.token, status))

    def ready(self) -> bool:
        # Once a token was obtained, a later failure does not turn ready off (SPEC §4).
        if not self._ready and self.manager.status()["state"] == "valid":
            self._ready = True
        return self._ready

    async def start(self) -> None:
        """`prefetch`: fetch now and, after a failure, again when its backoff ends,
        until one succeeds. Runs once the port is open; cancelled at shutdown."""
        while not self.ready():
            try:
                await self.manager.get()
            except AuthBackoff as exc:
                await asyncio.sleep(exc.retry_after)
            except AuthFailed:
                pass  # logged by the manager; the backoff it started paces the next try

    async def close(self) -> None:
        # A token request still in flight at shutdown is abandoned, not awaited: a
        # hanging endpoint must not hold the stop up (SPEC §1).
        self.manager.abandon()
        token = self.manager.current()
        if token is None or self.flow.cfg.logout is None:
            return
        if token.shared:
            # Other processes may be using this session (SPEC §8 promise 9).
            log.info("logout_skipped", upstream=self.flow.http.upstream, reason="shared")
            return
        await self.flow.logout(self._credential_for(token))

    @property
    def last_error(self) -> str | None:
        return self.manager.last_error

    def status(self) -> dict[str, Any]:
        return self.manager.status()

    def counters(self) -> dict[str, Any]:
        manager = self.manager
        return {
            "fetch_success": manager.fetch_success,
            "fetch_failure": manager.fetch_failure,
            "ttl": manager.status()["expires_in"],
        }

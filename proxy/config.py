"""Loading the YAML config: interpolation, overrides, validation into frozen objects.

Every problem is collected and reported at once with its dotted path
(`upstreams.paymo.auth.client_id: required`), so a user fixes a config in one
round instead of one error per run. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.browsers import normalize_origin
from proxy.connector import (
    Egress,
    EgressProxy,
    ProxyEnv,
    TLSFileError,
    check_pem,
    parse_proxy_url,
    tls_context,
)
from proxy.errors import ConfigError, Problem

DEFAULT_CONFIG_PATH = "config.yaml"
ENV_OVERRIDES = {
    "AUTHPROXY_HOST": "listen.host",
    "AUTHPROXY_PORT": "listen.port",
    "AUTHPROXY_LOG_FORMAT": "log.format",
    "AUTHPROXY_LOG_LEVEL": "log.level",
    "AUTHPROXY_WORKERS": "workers",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_METHOD = re.compile(r"^[A-Z]+$")
_CTL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls except horizontal tab
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field-name


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str, *, what: str = "URL") -> str:
    if _CTL_OR_SPACE.search(value):
        raise ValueError(f"{what} must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be http:// or https:// with a host")
    if "@" in parts.netloc:
        raise ValueError(f"{what} must not carry user:password@ (credentials belong in auth)")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not carry a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"{what} has a bad port") from exc
    return value


UrlStr = Annotated[str, AfterValidator(_check_url)]


def _check_header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError("not a valid header name")
    return value


def _check_header_value(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(text, str) and _CTL.search(text):
        # A newline here would split the header (or make every request fail).
        raise ValueError("must not contain control characters such as newlines")
    return value


HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]


def _not_empty(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        # Most often a ${VAR} whose variable is set but empty: a login that can only fail.
        raise ValueError("must not be empty (is its environment variable or file empty?)")
    return value


# A secret the scheme cannot work without: empty is a config error, not a login that fails.
RequiredSecret = Annotated[SecretStr, AfterValidator(_not_empty)]
SecretHeaderValue = Annotated[RequiredSecret, AfterValidator(_check_header_value)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name like 127.evil.com is not loopback


def _is_insecure_remote(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and not _is_loopback(parts.hostname or "")


# -- auth ------------------------------------------------------------------


class NoneAuth(Strict):
    type: Literal["none"] = "none"


class HeaderAuth(Strict):
    type: Literal["header"]
    name: HeaderName
    value: SecretHeaderValue


class BasicAuth(Strict):
    type: Literal["basic"]
    username: RequiredSecret
    password: SecretStr = SecretStr("")


class QueryAuth(Strict):
    type: Literal["query"]
    param: str = Field(min_length=1)
    value: RequiredSecret


class TokenAuthBase(Strict):
    prefetch: bool = False
    refresh_before: NonNegativeFloat = 60.0
    allow_insecure_token_url: bool = False


class OAuth2ClientCredentials(TokenAuthBase):
    type: Literal["oauth2_client_credentials"]
    token_url: UrlStr
    client_id: str = Field(min_length=1)
    client_secret: RequiredSecret
    scope: str | None = None
    audience: str | None = None
    client_auth: Literal["body", "basic", "basic_urlencoded"] = "body"
    body_format: Literal["form", "json"] = "form"
    extra: dict[str, str] = Field(default_factory=dict)


class PaymoSession(TokenAuthBase):
    type: Literal["paymo_session"]
    api_key: RequiredSecret | None = None
    email: str | None = None
    password: RequiredSecret | None = None
    login_url: UrlStr | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> Self:
        if self.api_key is None and (self.email is None or self.password is None):
            raise ValueError("needs api_key, or email and password")
        if self.api_key is not None and (self.email is not None or self.password is not None):
            raise ValueError("give api_key or email+password, not both")
        return self


class Primaerp(TokenAuthBase):
    type: Literal["primaerp"]
    api_key: RequiredSecret
    username: str | None = None
    password: RequiredSecret | None = None
    secret_key: RequiredSecret | None = None
    login_url: UrlStr | None = None
    refresh_url: UrlStr | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> Self:
        user = self.username is not None or self.password is not None
        if user == (self.secret_key is not None):
            raise ValueError("needs username and password, or secret_key (exactly one)")
        if user and (self.username is None or self.password is None):
            raise ValueError("username and password go together")
        return self


class Didomi(TokenAuthBase):
    type: Literal["didomi"]
    key: RequiredSecret
    secret: RequiredSecret
    login_url: UrlStr | None = None


class BasicCredentials(Strict):
    username: str
    password: str = ""


class RequestSpec(Strict):
    """One HTTP call of a login flow; `{token}`/`{refresh_token}` are filled in."""

    method: str = "POST"
    url: str
    basic: BasicCredentials | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    json_body: dict[str, Any] | None = Field(default=None, alias="json")
    form: dict[str, str] | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if not _METHOD.match(value.upper()):
            raise ValueError("not an HTTP method")
        return value.upper()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # A template may hold {token}; check the URL with it filled in.
        _check_url(value.replace("{token}", "t").replace("{refresh_token}", "t"))
        return value

    @model_validator(mode="after")
    def _one_body(self) -> Self:
        if self.json_body is not None and self.form is not None:
            raise ValueError("give json or form, not both")
        return self


class RefreshSpec(Strict):
    token: str = Field(min_length=1)
    request: RequestSpec
    # Optional: where the refresh token's own expiry is (a shared store keeps the
    # entry that long, SPEC §8.6); same formats as the token's expires_at.
    expires_at: str | None = None


class Inject(Strict):
    header: HeaderName | None = None
    value: HeaderValue = "Bearer {token}"
    query: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.header is None) == (self.query is None):
            raise ValueError("give exactly one of header or query")
        if self.header is not None and "{token}" not in self.value:
            raise ValueError("value must contain {token}")
        return self


class LoginAuth(TokenAuthBase):
    type: Literal["login"]
    request: RequestSpec
    token: str = Field(min_length=1)
    expires_at: str | None = None
    expires_in: str | None = None
    lifetime: PositiveFloat | None = None
    refresh: RefreshSpec | None = None
    logout: RequestSpec | None = None
    inject: Inject = Inject(header="Authorization")


AuthConfig = Annotated[
    NoneAuth
    | HeaderAuth
    | BasicAuth
    | QueryAuth
    | OAuth2ClientCredentials
    | PaymoSession
    | Primaerp
    | Didomi
    | LoginAuth,
    Field(discriminator="type"),
]
TokenAuthConfig = OAuth2ClientCredentials | PaymoSession | Primaerp | Didomi | LoginAuth
AUTH_TYPE_NAMES = (
    "none",
    "header",
    "basic",
    "query",
    "oauth2_client_credentials",
    "paymo_session",
    "primaerp",
    "didomi",
    "login",
)


def token_urls(auth: AuthConfig, base_url: str) -> list[str]:
    """Every endpoint a token type will call, for the plain-HTTP check."""
    base = base_url.rstrip("/")
    match auth:
        case OAuth2ClientCredentials():
            return [auth.token_url]
        case PaymoSession():
            return [auth.login_url or f"{base}/sessions"]
        case Primaerp():
            return [
                auth.login_url or f"{base}/auth/login",
                auth.refresh_url or f"{base}/auth/refreshtoken",
            ]
        case Didomi():
            return [auth.login_url or f"{base}/sessions"]
        case LoginAuth():
            urls = [auth.request.url]
            if auth.refresh:
                urls.append(auth.refresh.request.url)
            return urls
    return []


# -- upstreams and the whole file -------------------------------------------


class Timeout(Strict):
    connect: PositiveFloat = 10.0  # also the longest wait for a pooled connection
    read: PositiveFloat = 300.0  # upstream silence, and the whole wait for its head
    body: PositiveFloat = 60.0  # client silence while sending its request body (nginx)
    send: PositiveFloat = 60.0  # the longest a client may leave the response unread


class TLS(Strict):
    """Trust (`verify`, `ca_file`) and the client certificate (`cert_file`, `key_file`,
    `key_password`). Validation loads the files the way `run` will (proxy.connector),
    so a bad one is a config error with its dotted path, never a traceback."""

    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: SecretStr | None = None

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _loads(cls, value: str | None) -> str | None:
        # Loaded exactly as the upstream client and the token session will load it,
        # so `check` finds what would otherwise stop `run`.
        if value is None:
            return None
        if not Path(value).is_file():
            raise ValueError(f"file not found: {value}")
        try:
            ssl.create_default_context(cafile=value)
        except ssl.SSLError:
            raise ValueError(
                f"no PEM certificate in {value} (a DER file or a key? "
                "convert with: openssl x509 -inform DER -in FILE -out FILE.pem)"
            ) from None
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value

    @field_validator("key_file")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            _pem_or_error(value, "private key")
        return value

    @model_validator(mode="after")
    def _loadable(self) -> Self:
        if self.cert_file is None and (self.key_file or self.key_password):
            raise ValueError("key_file and key_password need cert_file")
        try:
            self.context()
        except TLSFileError as exc:
            # Name the key: pydantic reports an "after" check at the model's path.
            raise ValueError(f"{exc.field}: {exc}") from None
        return self

    def context(self) -> ssl.SSLContext | bool:
        """The SSLContext `run` uses for the upstream and its token endpoints."""
        password = self.key_password.get_secret_value() if self.key_password else None
        return tls_context(self.verify, self.ca_file, self.cert_file, self.key_file, password)


def _pem_or_error(path: str, kind: str) -> None:
    try:
        check_pem(path, kind, "")
    except TLSFileError as exc:
        raise ValueError(str(exc)) from None


def _check_egress_proxy(value: str | None) -> str | None:
    if value is None or value.strip().lower() == "none":
        return value
    parse_proxy_url(value)  # ValueError says what is wrong, without echoing the URL
    return value


EgressProxyStr = Annotated[str | None, AfterValidator(_check_egress_proxy)]


class Upstream(Strict):
    prefix: str | None = None
    url: UrlStr
    auth: AuthConfig = NoneAuth()
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    strip_headers: list[str] = Field(default_factory=list)
    strip_query: list[str] = Field(default_factory=list)
    allow_methods: list[str] | None = None
    retry_statuses: list[Annotated[int, Field(ge=400, le=599)]] = Field(
        default_factory=lambda: [401]
    )
    max_replay_body: NonNegativeInt = 1_048_576
    timeout: Timeout = Timeout()
    # Connections (active + idle) open to this upstream; default: its share of the
    # top-level pool_size, so one upstream's stalls cannot starve the others.
    pool_size: int | None = Field(default=None, ge=1, le=100_000)
    tls: TLS = TLS()
    # An http:// proxy URL or `none`; unset: the top level's, then the environment's.
    egress_proxy: EgressProxyStr = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/"):
            raise ValueError("must start with /")
        value = value.rstrip("/")
        if not value:
            raise ValueError("must not be / alone")
        segments = value.split("/")[1:]
        if any(s in ("", ".", "..") or "%" in s or "?" in s or "#" in s for s in segments):
            raise ValueError("must be plain path segments")
        if segments[0] == "-":
            raise ValueError("/-/ is reserved for the admin endpoints")
        return value

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        upper = [m.upper() for m in value]
        bad = [m for m in upper if not _METHOD.match(m)]
        if bad:
            raise ValueError(f"not HTTP methods: {', '.join(bad)}")
        return upper

    @model_validator(mode="after")
    def _plain_http_token_url(self) -> Self:
        if isinstance(self.auth, TokenAuthBase) and not self.auth.allow_insecure_token_url:
            for url in token_urls(self.auth, self.url):
                if _is_insecure_remote(url):
                    raise ValueError(
                        f"auth: token endpoint {url} is plain http:// to a non-loopback host; "
                        "use https or set auth.allow_insecure_token_url: true"
                    )
        return self


_HOSTNAME = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$"
)
_HOST_PORT = re.compile(r"^\[?([^\[\]]*?)\]?:(\d+)$")


def _check_listen_host(value: str) -> str:
    """A host to bind: an IP address or a name. Says what to write instead otherwise."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if _HOSTNAME.match(value):
        return value
    if value.startswith(("/", "./", "~")):
        raise ValueError(
            "a path is not a host; to listen on a Unix socket, use listen.path: " + value
        )
    if "://" in value:
        raise ValueError("not a URL: write only the host, e.g. host: localhost")
    if value.startswith("[") and value.endswith("]"):
        raise ValueError(f"write an IPv6 address without brackets: host: {value[1:-1]!r}")
    if (hp := _HOST_PORT.match(value)) and (value.count(":") == 1 or value.startswith("[")):
        host, port = hp.groups()
        raise ValueError(
            f"a port does not belong in host; write listen: {{host: {host}, port: {port}}}"
        )
    raise ValueError(
        "not an IP address or host name (0.0.0.0 listens on every IPv4 address, :: on all)"
    )


class Listen(Strict):
    host: Annotated[str, AfterValidator(_check_listen_host)] = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # A Unix socket instead of host:port (kubectl proxy --unix-socket), and its mode.
    path: str | None = None
    mode: int = 0o600
    require_token: SecretStr | None = None
    # A connection must complete a request within this long of opening (slowloris)
    # and may idle this long between requests: nginx's 60 s header / 75 s keep-alive.
    idle_timeout: PositiveFloat = 75.0

    @field_validator("require_token", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        # `${PROXY_TOKEN:-}` left unset means "no inbound token", not "the empty token".
        return None if value == "" else value

    @field_validator("path", mode="before")
    @classmethod
    def _empty_path_is_off(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        # YAML reads 0600 as octal already; "0600", "600" and "0o600" are octal too.
        if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip()):
            return int(value.strip().removeprefix("0o"), 8)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o777:
            raise ValueError('a file mode such as 0600 (quote it: "0600")')
        return value

    @model_validator(mode="after")
    def _path_or_port(self) -> Self:
        if self.path is not None and {"host", "port"} & self.model_fields_set:
            raise ValueError("give path (a Unix socket) or host and port, not both")
        if not 0 <= self.mode <= 0o777:
            raise ValueError("mode must be a file mode such as 0600")
        return self


class Admin(Strict):
    """A second listener with only /-/health, /-/ready and /-/metrics (Envoy's admin
    port): reachable by probes and Prometheus from outside the pod, with no Host
    allow-list and no `require_token` — it reveals nothing and forwards nothing."""

    host: str = "0.0.0.0"
    port: int = Field(default=9901, ge=0, le=65535)


class Log(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


REDIS_SCHEMES = ("redis", "rediss", "unix")


class TokenStoreConfig(Strict):
    """Where tokens live (SPEC §8): each process's memory, or a shared Redis."""

    type: Literal["memory", "redis"] = "memory"
    url: SecretStr | None = None  # may hold credentials: a secret
    key_prefix: str = Field(default="authproxy", min_length=1, max_length=64)
    timeout: PositiveFloat = Field(default=2.0, le=30.0)

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if _CTL_OR_SPACE.search(value):
            raise ValueError("no spaces or control characters")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        # The message never repeats the URL: it may carry a password.
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError("must be redis://, rediss:// or unix://")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("needs a host: redis://[user:password@]host:port/db")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("needs a socket path: unix:///path/to/redis.sock")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("port must be a number") from None
        return value

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Self:
        if self.type == "redis" and self.url is None:
            raise ValueError("url: required for type: redis")
        return self


class Config(Strict):
    listen: Listen = Listen()
    admin: Admin | None = None
    allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    allowed_origins: list[str] = Field(default_factory=list)
    log: Log = Log()
    shutdown_timeout: NonNegativeFloat = 10.0
    # Seconds to keep serving (Connection: close, /-/ready 503) after SIGTERM before
    # the drain: Envoy's drain, for an app that outlives its sidecar's signal.
    shutdown_delay: NonNegativeFloat = 0.0
    # Largest number of upstream connections kept open (all upstreams together).
    pool_size: int = Field(default=256, ge=1, le=100_000)
    # The event loop: uvloop when installed (auto), or asyncio's own as a fallback.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Serving processes behind one listening socket (SPEC §8, proxy/supervisor.py).
    workers: int = Field(default=1, ge=1, le=256)
    # Reload when the config file, a file it names or a TLS file changes (SPEC §9).
    watch: bool = False
    upstreams: dict[str, Upstream] = Field(min_length=1)
    # An http:// proxy URL or `none` for every upstream; unset: the environment's.
    egress_proxy: EgressProxyStr = None
    token_store: TokenStoreConfig = TokenStoreConfig()
    # Every configured secret value, for the log redaction processor; never rendered.
    _secrets: frozenset[str] = PrivateAttr(default=frozenset())
    # What `check` warns about (a secret written into the file), each with its path.
    _warnings: tuple[Problem, ...] = PrivateAttr(default=())
    # https_proxy / http_proxy / no_proxy as the process found them (parse_config).
    _proxy_env: ProxyEnv = PrivateAttr(default=ProxyEnv())
    # Every path a `${file:...}` named, for `watch` (SPEC §9).
    _files: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """Entries are `scheme://host[:port]`, kept normalised (lower case, no default
        port) so the per-request check is one set lookup; `*` would undo the defence."""
        normal = []
        for entry in value:
            origin = normalize_origin(entry) if entry != "*" else None
            if origin is None:
                raise ValueError(
                    f"{entry!r} is not an origin: use scheme://host[:port] (no path, no *)"
                )
            normal.append(origin)
        return normal

    @field_validator("event_loop")
    @classmethod
    def _installed(cls, value: str) -> str:
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed; use auto or asyncio")
        return value

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return self._warnings

    @property
    def files(self) -> frozenset[str]:
        """The files `${file:...}` references read, in the order of no importance."""
        return self._files

    def prefix_of(self, name: str) -> str:
        return self.upstreams[name].prefix or f"/{name}"

    def egress_for(self, name: str) -> Egress:
        """Upstream `name`'s egress policy: its `egress_proxy`, the top level's, or
        else the environment's (SPEC §10)."""
        value = self.upstreams[name].egress_proxy or self.egress_proxy
        if value is None:
            return Egress(self._proxy_env)
        if value.strip().lower() == "none":
            return Egress(self._proxy_env, overridden=True)
        return Egress(self._proxy_env, overridden=True, explicit=parse_proxy_url(value))

    def egress_proxies(self) -> list[EgressProxy]:
        """Every egress proxy this config may use (for the redaction set)."""
        found = [p for p in (self._proxy_env.https, self._proxy_env.http) if p is not None]
        for value in [self.egress_proxy, *(u.egress_proxy for u in self.upstreams.values())]:
            if value is not None and value.strip().lower() != "none":
                found.append(parse_proxy_url(value))
        return found


# -- loading ----------------------------------------------------------------

_REF = re.compile(r"\$\{([^}]*)\}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of duplicate keys silently; we refuse them."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, str(index)))


def _interpolate(
    raw: Any,
    env: Mapping[str, str],
    problems: list[Problem],
    secrets: set[str],
    interpolated: set[tuple[str, ...]],
    files: set[str] | None = None,
) -> Any:
    """Replace `${VAR}`, `${VAR:-default}` and `${file:/path}` in every string value;
    `interpolated` collects the paths of the values that held a reference."""

    def resolve(value: str, path: tuple[str, ...]) -> str:
        dotted = ".".join(path)

        def one(match: re.Match[str]) -> str:
            ref = match.group(1)
            if ref.startswith("file:"):
                file_path = ref[5:]
                if files is not None:
                    files.add(file_path)
                try:
                    text = Path(file_path).read_text()
                except OSError as exc:
                    problems.append(Problem(dotted, f"cannot read {file_path}: {exc.strerror}"))
                    return ""
                except UnicodeDecodeError as exc:
                    problems.append(Problem(dotted, f"{file_path} is not UTF-8 (byte {exc.start})"))
                    return ""
                return text[:-1] if text.endswith("\n") else text
            name, sep, default = ref.partition(":-")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                problems.append(Problem(dotted, f"bad reference ${{{ref}}}"))
                return ""
            if name in env:
                return env[name]
            if sep:
                return default
            problems.append(Problem(dotted, f"environment variable {name} is not set"))
            return ""

        if "${" in _REF.sub("", value):
            problems.append(
                Problem(dotted, "unclosed ${ (write ${VAR}, ${VAR:-default} or ${file:/path})")
            )
            return ""
        interpolated.add(path)
        result = _REF.sub(one, value)
        if result != value and _holds_secrets(path) and result:
            secrets.add(result)
        return result

    def visit(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v, (*path, str(i))) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            return resolve(node, path)
        return node

    return visit(raw, ())


def _holds_secrets(path: tuple[str, ...]) -> bool:
    return "auth" in path or path in (("listen", "require_token"), ("token_store", "url"))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[leaf] = value


def _tcp_replaces_path(raw: dict[str, Any], dotted: str) -> None:
    """`--host`/`--port` (or their variables) replace `listen.path` with TCP (SPEC §10)."""
    listen = raw.get("listen")
    if dotted in ("listen.host", "listen.port") and isinstance(listen, dict):
        listen.pop("path", None)


def _check_upstream_names(raw: dict[str, Any], problems: list[Problem]) -> None:
    """Names and prefixes, checked on the raw document so they are reported even
    when an upstream has other problems too."""
    upstreams = raw.get("upstreams")
    if not isinstance(upstreams, dict):
        return
    seen: dict[str, str] = {}
    for name, body in upstreams.items():
        name = str(name)
        if not _NAME.match(name):
            problems.append(Problem(f"upstreams.{name}", "bad name: letters, digits, _ . - only"))
        prefix = body.get("prefix") if isinstance(body, dict) else None
        prefix = (prefix.rstrip("/") if isinstance(prefix, str) else None) or f"/{name}"
        if prefix in seen:
            problems.append(
                Problem(f"upstreams.{name}", f"shares the prefix {prefix} with {seen[prefix]}")
            )
        seen.setdefault(prefix, name)


def _problem_from_pydantic(error: Mapping[str, Any]) -> Problem:
    loc = [str(part) for part in error["loc"]]
    # A discriminated union puts the tag into the location: auth.<type>.field.
    for i in range(len(loc) - 1):
        if loc[i] == "auth" and loc[i + 1] in AUTH_TYPE_NAMES:
            del loc[i + 1]
            break
    kind = error["type"]
    if kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "union_tag_invalid":
        message = f"unknown auth type; expected one of: {', '.join(AUTH_TYPE_NAMES)}"
    elif kind == "union_tag_not_found":
        message = "type: required"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return Problem(".".join(loc), message)


def collect_secrets(config: Config) -> set[str]:
    """Every SecretStr value in the config (the redaction set's typed half)."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, SecretStr):
            value = node.get_secret_value()
            if value:
                found.add(value)
        elif isinstance(node, BaseModel):
            for field in type(node).model_fields:
                visit(getattr(node, field))
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list | tuple):
            for value in node:
                visit(value)

    visit(config)
    return found


def parse_config(
    raw: Any,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate an already-parsed document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[Problem] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem("", "the config must be a mapping (key: value) at the top")])
    secrets: set[str] = set()
    interpolated: set[tuple[str, ...]] = set()
    files: set[str] = set()
    raw = _interpolate(raw, env, problems, secrets, interpolated, files)
    # A value that came from the environment or the command line is reported under
    # its source's name: the file has nothing wrong at that path.
    sources: dict[str, str] = {}
    for variable, dotted in ENV_OVERRIDES.items():
        if env.get(variable):
            _set_dotted(raw, dotted, env[variable])
            sources[dotted] = f"{variable} ({dotted})"
            _tcp_replaces_path(raw, dotted)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
            sources[dotted] = f"the command line ({dotted})"
            _tcp_replaces_path(raw, dotted)
    _check_upstream_names(raw, problems)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # A reference that failed to resolve already has its problem; its empty
        # stand-in value would only add a second, confusing one at the same path.
        unresolved = {p.path for p in problems}
        for error in exc.errors():
            problem = _problem_from_pydantic(error)
            if problem.path in sources:
                problem = Problem(sources[problem.path], problem.message)
            if problem.path not in unresolved:
                problems.append(problem)
        config = None
    try:
        proxy_env = ProxyEnv.from_env(env)
    except ValueError as exc:
        variable, _, message = str(exc).removeprefix("environment variable ").partition(": ")
        problems.append(Problem(variable, message))
        proxy_env = ProxyEnv()
    if problems or config is None:
        # A reload that fails still watches the files it tried to read, and still
        # redacts the values it resolved (they may be new secrets).
        raise ConfigError(
            problems, files=frozenset(files), secrets=frozenset(s for s in secrets if len(s) >= 4)
        )
    config._proxy_env = proxy_env
    secrets |= collect_secrets(config)
    for egress in config.egress_proxies():
        secrets |= egress.secret_forms()
    if config.token_store.url is not None:
        # The password alone too: a redis error or a log may show just that part.
        password = urlsplit(config.token_store.url.get_secret_value()).password
        if password:
            secrets.add(password)
    config._secrets = frozenset(s for s in secrets if len(s) >= 4)
    config._warnings = tuple(
        Problem(
            ".".join(path),
            "a secret written into the config file; use ${VAR} or ${file:/path} instead",
        )
        for path, value in [*_secret_fields(config), *_egress_passwords(config)]
        if value and path not in interpolated
    )
    config._files = frozenset(files)
    return config


def _egress_passwords(config: Config) -> Iterator[tuple[tuple[str, ...], str]]:
    """The egress proxy URLs that carry a password, with their paths (for the
    literal-secret warning: the URL is a plain string, not a SecretStr)."""
    fields: list[tuple[tuple[str, ...], str | None]] = [(("egress_proxy",), config.egress_proxy)]
    fields += [
        (("upstreams", n, "egress_proxy"), u.egress_proxy) for n, u in config.upstreams.items()
    ]
    for path, value in fields:
        if value is not None and value.strip().lower() != "none":
            yield path, parse_proxy_url(value).password


def _secret_fields(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every SecretStr in the config, with its path in the file."""
    if isinstance(node, SecretStr):
        yield path, node.get_secret_value()
    elif isinstance(node, BaseModel):
        for name, field in type(node).model_fields.items():
            yield from _secret_fields(getattr(node, name), (*path, field.alias or name))
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _secret_fields(value, (*path, str(key)))


def resolve_config_path(path: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return path or env.get("AUTHPROXY_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(
    path: str,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            [Problem("", f"cannot read config file {path}: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        message = f"{path} is not UTF-8: byte {exc.start} is 0x{byte:02x}; save it as UTF-8"
        raise ConfigError([Problem("", message)]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("", f"{path}: invalid YAML: {where}{problem}")]) from None
    return parse_config(raw, env=env, overrides=overrides)

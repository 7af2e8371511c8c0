"""The network on the way out (SPEC §10): which egress proxy a connection takes, the
CONNECT tunnel through it, and the TLS contexts (private CAs, client certificates).

Both the lean upstream client and the token session use this one module, so one
matcher decides for every connection the proxy makes:

* `ProxyEnv.from_env` reads `https_proxy` / `http_proxy` / `no_proxy` as curl does
  (lowercase wins; the uppercase name is read when the lowercase one is unset).
  aiohttp's `trust_env` is not used: it knows no CIDR ranges and reads ~/.netrc.
* `Egress` is one upstream's policy: an explicit `egress_proxy:` (a URL or `none`)
  overrides the environment for the upstream and its token endpoints; otherwise
  the environment decides per destination (`no_proxy` host suffixes, `*`, IPs, CIDRs).
  It is consulted once per destination at start-up, never per request.
* `open_tunnel` asks the egress proxy to `CONNECT` to an HTTPS upstream; TLS to the
  upstream (its hostname verified, SNI sent) then runs inside the tunnel.
  Plain-HTTP upstreams go to the proxy as absolute-form requests (the client's job).
* `tls_context` builds the one SSLContext per upstream; `authproxy check` calls the
  same loaders (`check_pem`, `tls_context`), so a bad file is a config error, not a
  traceback at `run`.

Proxy credentials are secrets: `EgressProxy.secret_forms` lists every form of them
for the redactor, `repr` never shows them, and errors name only `host:port`.
It imports nothing of ours: clients call it; it calls nothing of theirs.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = [
    "Egress",
    "EgressError",
    "EgressProxy",
    "NoProxy",
    "OutboundError",
    "ProxyEnv",
    "TLSFileError",
    "check_pem",
    "client_certificate_demanded",
    "open_tunnel",
    "parse_proxy_url",
    "proxy_reply_error",
    "proxy_unreachable",
    "tls_context",
]

MAX_CONNECT_REPLY: Final = 16 * 1024  # bytes of a CONNECT answer's head we accept
_CTL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


class OutboundError(ConnectionError):
    """A connection failure whose message is written for a person: what failed and
    what to change, never a credential. The forwarder shows it as it is."""


class EgressError(OutboundError):
    """The egress proxy would not, or could not, carry the connection."""


def client_certificate_demanded(exc: BaseException | None, host: str) -> OutboundError | None:
    """The upstream's TLS alert "certificate required" (TLS 1.3 sends it after the
    handshake, so it arrives as the connection's loss), or None for anything else."""
    if isinstance(exc, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(exc.reason or ""):
        return OutboundError(
            f"{host} demands a client certificate (TLS alert: certificate required); "
            "set tls.cert_file and tls.key_file"
        )
    return None


# -- the proxy URL ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An `http://[user:pass@]host:port` egress proxy."""

    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    # "Basic …" for Proxy-Authorization, or "" without credentials.
    authorization: str = field(default="", repr=False)

    @property
    def address(self) -> str:
        """host:port, for messages and logs (never the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        """The URL aiohttp is handed (it derives Proxy-Authorization from it). Secret."""
        if not self.authorization:
            return f"http://{self.address}"
        user = quote(self.username, safe="")
        password = quote(self.password, safe="")
        return f"http://{user}:{password}@{self.address}"

    def secret_forms(self) -> set[str]:
        """Every form the credentials could take in text: for the redactor."""
        if not self.authorization:
            return set()
        pair = f"{self.username}:{self.password}"
        forms = {self.password, pair, self.authorization.split(" ", 1)[1]}
        forms.add(self.url_with_credentials.split("//", 1)[1].rsplit("@", 1)[0])
        return {f for f in forms if f}


def parse_proxy_url(value: str) -> EgressProxy:
    """An egress proxy from its URL; ValueError says what is wrong (without the URL,
    which may carry a password)."""
    if _CTL_OR_SPACE.search(value):
        raise ValueError("proxy URL must not contain spaces or control characters")
    if "://" not in value:
        value = "http://" + value  # curl's default scheme for a proxy
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError("an https:// egress proxy is not supported; use its http:// address")
    if scheme.startswith("socks"):
        raise ValueError("a SOCKS egress proxy is not supported; use an http:// proxy")
    if scheme != "http":
        raise ValueError("egress proxy must be an http:// URL (or none)")
    if not parts.hostname:
        raise ValueError("egress proxy URL has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("egress proxy URL must be http://[user:pass@]host:port, without a path")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("egress proxy URL has a bad port") from None
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    authorization = ""
    if username or password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    return EgressProxy(parts.hostname.lower(), port, username, password, authorization)


# -- no_proxy ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoProxy:
    """`no_proxy`: `*`, host names (a name matches itself and its subdomains; a
    leading `.` or `*.` is ignored), IP addresses and CIDR ranges. Ports are ignored."""

    everything: bool = False
    names: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        names: list[str] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        everything = False
        for raw in text.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                everything = True
                continue
            try:
                networks.append(ipaddress.ip_network(_strip_port(entry), strict=False))
                continue
            except ValueError:
                pass
            name = _strip_port(entry).removeprefix("*").lstrip(".").rstrip(".")
            if name:
                names.append(name)
        return cls(everything, tuple(names), tuple(networks))

    def matches(self, host: str) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(host == n or host.endswith("." + n) for n in self.names)
        return any(address in net for net in self.networks) or host in self.names


def _strip_port(entry: str) -> str:
    if entry.startswith("["):  # [::1]:8080 or [::1]
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:  # host:port (an IPv6 address has more colons)
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host
    return entry


# -- the environment and one upstream's policy ---------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """What the environment says, read once at start-up."""

    https: EgressProxy | None = None
    http: EgressProxy | None = None
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyEnv:
        """Raises ValueError naming the variable when one holds a bad proxy URL."""

        def read(name: str) -> tuple[str, str]:
            lower = env.get(name)
            if lower is not None and lower.strip():
                return name, lower.strip()
            upper = env.get(name.upper())
            if upper is not None and upper.strip():
                return name.upper(), upper.strip()
            return name, ""

        proxies: list[EgressProxy | None] = []
        for name in ("https_proxy", "http_proxy"):
            variable, value = read(name)
            if not value:
                proxies.append(None)
                continue
            try:
                proxies.append(parse_proxy_url(value))
            except ValueError as exc:
                raise ValueError(f"environment variable {variable}: {exc}") from None
        return cls(proxies[0], proxies[1], NoProxy.parse(read("no_proxy")[1]))

    def proxy_for(self, scheme: str, host: str) -> EgressProxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.no_proxy.matches(host):
            return None
        return proxy


@dataclass(frozen=True, slots=True)
class Egress:
    """One upstream's egress policy: `explicit` (from `egress_proxy:`, None for
    `none`) when `overridden`, else the environment per destination."""

    env: ProxyEnv = ProxyEnv()
    overridden: bool = False
    explicit: EgressProxy | None = None

    def proxy_for(self, scheme: str, host: str) -> EgressProxy | None:
        if self.overridden:
            return self.explicit
        return self.env.proxy_for(scheme, host)

    def proxy_for_url(self, url: str) -> EgressProxy | None:
        parts = urlsplit(url)
        return self.proxy_for(parts.scheme.lower(), parts.hostname or "")


# -- the CONNECT tunnel -------------------------------------------------------------


def proxy_reply_error(proxy: EgressProxy, status: int, reason: str, target: str) -> EgressError:
    """What to tell a person when the egress proxy answered `status` instead of
    carrying the connection to `target`."""
    if status == 407 or (status == 401 and proxy.authorization):  # tinyproxy says 401
        if proxy.authorization:
            return EgressError(
                f"egress proxy {proxy.address} refused the proxy credentials ({status}); "
                "check the user:password in egress_proxy or https_proxy/http_proxy"
            )
        return EgressError(
            f"egress proxy {proxy.address} demands credentials (407 Proxy Authentication "
            "Required); give them as http://user:pass@host:port in egress_proxy or "
            "https_proxy/http_proxy"
        )
    text = f"{status} {reason}".strip()
    return EgressError(
        f"egress proxy {proxy.address} refused to CONNECT to {target} ({text}); "
        "its allow-list may not include this host or port, or set no_proxy / "
        "egress_proxy: none for it"
    )


def proxy_unreachable(proxy: EgressProxy, reason: str) -> EgressError:
    return EgressError(
        f"egress proxy {proxy.address} could not be reached ({reason}); "
        "check https_proxy/http_proxy or egress_proxy"
    )


class _ConnectReply(asyncio.Protocol):
    """Reads the head of the proxy's answer to CONNECT, and nothing more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[bytes] = loop.create_future()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.done.done():  # bytes after the head, before our TLS hello: not a tunnel
            self.buffer += data
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            self.done.set_result(head)
        elif len(self.buffer) > MAX_CONNECT_REPLY:
            self.done.set_exception(EgressError("egress proxy sent an oversized CONNECT answer"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                EgressError("egress proxy closed the connection before answering CONNECT")
            )


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: EgressProxy, host: str, port: int
) -> asyncio.Transport:
    """A TCP transport to `host:port` through the proxy's CONNECT, ready for TLS.
    The caller bounds the wait; errors are `EgressError` with a message for a person."""
    reply = _ConnectReply(loop)
    try:
        transport, _ = await loop.create_connection(lambda: reply, proxy.host, proxy.port)
    except OSError as exc:
        raise proxy_unreachable(proxy, exc.strerror or type(exc).__name__) from None
    target = _authority(host, port)
    lines = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if proxy.authorization:
        lines += f"Proxy-Authorization: {proxy.authorization}\r\n"
    try:
        transport.write((lines + "\r\n").encode("ascii"))
        head = await reply.done
        status, reason = _status_of(head)
        if not 200 <= status < 300:
            raise proxy_reply_error(proxy, status, reason, target)
        if reply.buffer:
            raise EgressError(f"egress proxy {proxy.address} sent data after its CONNECT answer")
    except BaseException:
        transport.abort()
        raise
    return transport


def _status_of(head: bytes) -> tuple[int, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (len(code) == 3 and code.isdigit()):
        raise EgressError("egress proxy sent a malformed answer to CONNECT")
    return int(code), reason.strip()


# -- TLS ----------------------------------------------------------------------------


class TLSFileError(ValueError):
    """A TLS file that cannot be used; `field` is the config key it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_PEM_MARKERS: Final = {
    "certificate": (b"-----BEGIN CERTIFICATE-----",),
    "private key": (
        b"-----BEGIN PRIVATE KEY-----",
        b"-----BEGIN RSA PRIVATE KEY-----",
        b"-----BEGIN EC PRIVATE KEY-----",
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
    ),
}


def check_pem(path: str, kind: str, field: str) -> None:
    """The file exists, is readable, and holds a PEM `kind` ("certificate" or
    "private key"): the error a person can act on, not OpenSSL's."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSFileError(field, f"file not found: {path}") from None
    except IsADirectoryError:
        raise TLSFileError(field, f"is a directory, not a file: {path}") from None
    except OSError as exc:
        raise TLSFileError(field, f"cannot read {path}: {exc.strerror}") from None
    if not any(marker in data for marker in _PEM_MARKERS[kind]):
        raise TLSFileError(field, f"{path} holds no PEM {kind} (-----BEGIN ...-----)")


def tls_context(
    verify: bool,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    key_password: str | None = None,
) -> ssl.SSLContext | bool:
    """The SSLContext for one upstream and its token endpoints, made once.
    `True` means the system's default trust with nothing else (clients share one),
    `False` no verification and no client certificate."""
    if verify and ca_file is None and cert_file is None:
        return True
    if not verify and cert_file is None:
        return False
    if ca_file is not None:
        check_pem(ca_file, "certificate", "ca_file")
        try:  # with a cafile, the system's trust is not loaded: the private CA replaces it
            ctx = ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:
            raise TLSFileError(
                "ca_file", f"{ca_file} is not a usable CA file ({exc.reason})"
            ) from None
    else:
        ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        _load_client_cert(ctx, cert_file, key_file, key_password)
    return ctx


def _load_client_cert(
    ctx: ssl.SSLContext, cert_file: str, key_file: str | None, key_password: str | None
) -> None:
    check_pem(cert_file, "certificate", "cert_file")
    key_path = key_file or cert_file
    if key_file is not None:
        check_pem(key_file, "private key", "key_file")
    _diagnose_key(cert_file, key_path, key_password)
    secret = key_password or ""
    try:
        # A password callback, so OpenSSL never prompts on the terminal.
        ctx.load_cert_chain(cert_file, key_file, password=lambda: secret)
    except ssl.SSLError as exc:
        raise TLSFileError(
            "cert_file", f"cannot load the client certificate ({exc.reason or exc})"
        ) from None


def _diagnose_key(cert_file: str, key_path: str, key_password: str | None) -> None:
    """The reason OpenSSL would only call "PEM lib": an encrypted key without (or with
    the wrong) key_password, or a key that is not the certificate's."""
    key_data = Path(key_path).read_bytes()
    if not any(marker in key_data for marker in _PEM_MARKERS["private key"]):
        raise TLSFileError("key_file", f"required: {cert_file} holds no private key")
    password = key_password.encode() if key_password is not None else None
    try:
        key = serialization.load_pem_private_key(key_data, password)
    except TypeError:
        if password is None:
            raise TLSFileError(
                "key_password", "the private key is encrypted: set key_password"
            ) from None
        raise TLSFileError("key_password", "given, but the private key is not encrypted") from None
    except ValueError:
        if password is not None:
            raise TLSFileError("key_password", "wrong key_password for the private key") from None
        raise TLSFileError("key_file", f"{key_path} holds no usable private key") from None
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except ValueError:
        raise TLSFileError("cert_file", f"{cert_file} holds no usable certificate") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise TLSFileError("key_file", f"{key_path} is not the key of {cert_file}")

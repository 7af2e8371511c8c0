"""Real parts for the egress tests: a private CA and its certificates (cryptography),
Debian's tinyproxy started and stopped by PID, and a recording upstream that sees
who connected (so a test can tell a proxied request from a direct one)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.fakes.common import websocket_echo
from tests.support.net import free_port

TINYPROXY = "/usr/bin/tinyproxy"
# tinyproxy binds its outgoing connections here (`Bind`): an upstream that sees this
# peer address was reached through the proxy, never directly (the proxy uses 127.0.0.1).
PROXY_EGRESS_ADDRESS = "127.0.0.3"


# -- a private CA ---------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and the files a test points the config (and the servers) at."""

    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_file: Path

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        password: bytes | None = None,
    ) -> tuple[Path, Path]:
        """A leaf certificate and its key, signed by this CA: (cert_file, key_file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.dir / f"{name}.crt"
        key_file = self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        return cert_file, key_file

    def server_context(
        self, name: str = "localhost", *, client_ca: Path | None = None
    ) -> ssl.SSLContext:
        cert_file, key_file = self.issue(name, dns=(name,))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(client_ca))
        return ctx


def make_pki(directory: Path, name: str = "Test CA") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca_file = directory / f"{name.replace(' ', '-')}.pem"
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(directory, key, cert, ca_file)


# -- tinyproxy ------------------------------------------------------------------------


@dataclass
class Tinyproxy:
    port: int
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _spawn_tinyproxy(
    directory: Path, connect_ports: tuple[int, ...], basic_auth: tuple[str, str] | None
) -> tuple[int, Path, subprocess.Popen[bytes]]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = directory / "tinyproxy.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        f"Bind {PROXY_EGRESS_ADDRESS}",
        "Timeout 30",
        "MaxClients 50",
        f'LogFile "{log_file}"',
        "LogLevel Info",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    conf = directory / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [TINYPROXY, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return port, log_file, process


@asynccontextmanager
async def tinyproxy(
    directory: Path, *, connect_ports: tuple[int, ...], basic_auth: tuple[str, str] | None = None
) -> AsyncIterator[Tinyproxy]:
    """tinyproxy in the foreground (-d) on a free loopback port, stopped by its PID."""
    port, log_file, process = _spawn_tinyproxy(directory, connect_ports, basic_auth)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("tinyproxy did not start listening") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield Tinyproxy(port, log_file, process)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


# -- a recording upstream -------------------------------------------------------------


@dataclass
class Seen:
    peer: str
    method: str
    path: str
    headers: list[tuple[str, str]]
    client_cert: dict[str, object] | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Recorder:
    url: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    token_requests: int = 0


@asynccontextmanager
async def recording_upstream(
    ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1", name: str = "127.0.0.1"
) -> AsyncIterator[Recorder]:
    """Answers every path with 200 and what it saw; POST /token issues a token;
    /ws is a WebSocket echo."""
    recorder = Recorder("")

    async def handle(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")[0] if request.transport else ""
        cert = None
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is not None:
            cert = ssl_object.getpeercert() or None
        recorder.seen.append(
            Seen(peer, request.method, request.raw_path, _raw_headers(request), cert)
        )
        if request.path.endswith("/ws"):
            return await websocket_echo(request)
        if request.path.endswith("/token"):
            recorder.token_requests += 1
            return web.json_response({"access_token": "egress-issued-token", "expires_in": 3600})
        return web.json_response({"ok": True, "path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
        await site.start()
        port = int(runner.addresses[0][1])
        scheme = "https" if ssl_context is not None else "http"
        recorder.url = f"{scheme}://{name}:{port}"
        recorder.port = port
        yield recorder
    finally:
        await runner.cleanup()


def _raw_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


@contextmanager
def alerting_tls_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, list[str]]]:
    """A TLS server on blocking sockets, for handshakes that must fail the way nginx's
    do: OpenSSL sends its alert (asyncio's server closes without sending it). Yields
    (port, the handshake errors it saw); it never answers HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    errors: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()  # TLS 1.3: the client certificate is checked here
                tls.recv(1024)
            except OSError as exc:
                errors.append(str(exc))
                with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                    _linger(raw)
            finally:
                tls.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), errors
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _linger(conn: socket.socket) -> None:
    """Read what the client sent until it hangs up (nginx's lingering close), so the
    alert is not overtaken by a reset that makes the client's kernel drop it."""
    try:
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    except OSError:
        pass

"""Shared machinery for the fake upstream APIs.

The fakes stand in for real services in the test-suite and in ``authproxy demo``.
They depend on aiohttp and the standard library only, so they can never hide a
bug by sharing code with the proxy they are testing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_args

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from .didomi import DidomiState
    from .getpaid import GetpaidState
    from .paymo import PaymoState
    from .primaerp import PrimaerpState

__all__ = [
    "CHUNK_SIZE",
    "ISSUED",
    "TOKEN_FAILURE_MODES",
    "FakeState",
    "Fakes",
    "RecordedRequest",
    "RunningFake",
    "SeedFake",
    "TokenFailure",
    "basic_credentials",
    "echo_dict",
    "jwt_decode",
    "jwt_encode",
    "jwt_unverified_claims",
    "pattern_chunks",
    "pattern_sha256",
    "record_request",
    "run_fakes",
    "serve",
    "stream_pattern",
    "websocket_echo",
]

#: Every secret any fake ever hands out (tokens, session ids, refresh tokens,
#: JWTs). The test-suite scans proxy output (logs, error bodies, /-/status) for
#: these strings to prove that no credential leaks. The only module-level
#: mutable state in the fakes, on purpose.
ISSUED: set[str] = set()

#: Size of one chunk of every streamed body: big enough to be realistic, small
#: enough that streaming never holds more than this in memory.
CHUNK_SIZE = 64 * 1024

#: The repeated content of streamed bodies. Deterministic so that a test can
#: compute the expected digest of ``n`` bytes without receiving them twice.
_PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)

TokenFailure = Literal[
    "500",
    "429",
    "503",
    "html",
    "nonjson",
    "missing_field",
    "huge",
    "hang",
    "past_expiry",
    "nonsense_expiry",
    "invalid_client",
    "reset",
]
TOKEN_FAILURE_MODES: frozenset[str] = frozenset(get_args(TokenFailure))

#: Modes whose answer depends on the API's own response format; each fake
#: handles them itself (the generic helper returns ``None`` for them).
API_SPECIFIC_FAILURES: frozenset[str] = frozenset(
    {"past_expiry", "nonsense_expiry", "invalid_client"}
)

#: Largest request body a seed fake accepts (it keeps bodies for assertions).
SEED_MAX_BODY = 16 * 1024 * 1024

#: Size of the ``"huge"`` token-endpoint answer.
HUGE_BODY_SIZE = 10 * 1024 * 1024


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """What one request looked like on arrival, so tests can assert on it.

    ``headers`` keeps the raw order and duplicates (a dict would hide both).
    The seed fakes keep the whole ``body``; the echo server keeps only
    ``body_len`` and ``body_sha256`` (``body`` stays empty) so that huge uploads
    never sit in memory.
    """

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_len: int = 0
    body_sha256: str = ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``None``."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in arrival order."""
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


def raw_header_list(request: web.BaseRequest) -> list[tuple[str, str]]:
    """Headers exactly as received, decoded the way aiohttp decodes them."""
    return [
        (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
        for k, v in request.raw_headers
    ]


async def record_request(request: web.BaseRequest) -> RecordedRequest:
    """Read the (small) body and capture the request as received."""
    body = await request.read()
    return RecordedRequest(
        method=request.method,
        raw_path=request.raw_path,
        headers=raw_header_list(request),
        body=body,
        body_len=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


def echo_dict(rec: RecordedRequest) -> dict[str, Any]:
    """The ``"echo"`` object every resource answer carries."""
    return {
        "method": rec.method,
        "raw_path": rec.raw_path,
        "headers": [[k, v] for k, v in rec.headers],
        "body_len": rec.body_len,
    }


# --------------------------------------------------------------------------- state


@dataclass
class FakeState:
    """What every fake API shares: knobs for tests and counters to assert on.

    Tokens are checked against the server-side table ``tokens`` (token -> the
    wall-clock instant it stops working), so a revoked or expired token fails
    even when it is a well-signed JWT, and a token issued in ``past_expiry``
    mode still works although its expiry fields claim otherwise.
    """

    lifetime: float = 3600.0
    token_requests: int = 0
    refresh_requests: int = 0
    logout_requests: int = 0
    resource_requests: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    token_calls: list[RecordedRequest] = field(default_factory=list)
    token_failure: str | None = None
    retry_after: int = 2
    token_delay: float = 0.0
    always_401: bool = False
    tokens: dict[str, float] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    jwt_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def issue(self, token: str, expires_at: float) -> str:
        """Remember a newly issued credential (here and in :data:`ISSUED`)."""
        self.tokens[token] = expires_at
        ISSUED.add(token)
        return token

    def is_valid(self, token: str | None, now: float | None = None) -> bool:
        """True if ``token`` was issued here, is not revoked and not expired."""
        if not token:
            return False
        expires_at = self.tokens.get(token)
        if expires_at is None or token in self.revoked:
            return False
        return (time.time() if now is None else now) < expires_at

    def revoke(self, token: str) -> None:
        """Make ``token`` fail with 401 from now on, even before its expiry."""
        self.revoked.add(token)

    def revoke_all(self) -> None:
        """Revoke every credential issued so far (later ones still work)."""
        self.revoked.update(self.tokens)


# --------------------------------------------------------------------------- helpers


def ceil_time(t: float) -> int:
    """Round an instant UP to whole seconds, so a token lives at least its lifetime."""
    return math.ceil(t)


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response with a compact, stable encoding."""
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def basic_credentials(request: web.BaseRequest) -> tuple[str, str] | None:
    """Decode ``Authorization: Basic ...`` into (username, password), or ``None``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or ``None``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def pattern_chunks(n: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield ``n`` bytes of the repeated pattern, one chunk at a time."""
    remaining = n
    while remaining > 0:
        size = min(chunk_size, remaining, len(_PATTERN))
        yield _PATTERN[:size]
        remaining -= size


def pattern_sha256(n: int) -> str:
    """The sha256 hex digest of the first ``n`` pattern bytes (for assertions)."""
    digest = hashlib.sha256()
    for chunk in pattern_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


async def stream_pattern(
    request: web.BaseRequest,
    n: int,
    *,
    content_length: bool = True,
    content_type: str = "application/octet-stream",
) -> web.StreamResponse:
    """Stream ``n`` pattern bytes without ever building them in memory."""
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    if content_length:
        resp.content_length = n
    else:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    try:
        for chunk in pattern_chunks(n):
            await resp.write(chunk)
        await resp.write_eof()
    except ConnectionError:
        # The client went away mid-body (tests of aborted downloads): nothing to do.
        pass
    return resp


# --------------------------------------------------------------------------- JWT (HS256)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_encode(claims: Mapping[str, Any], key: bytes) -> str:
    """Encode ``claims`` as a compact HS256 JWT (RFC 7519) signed with ``key``."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def jwt_unverified_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT without checking its signature (what a client can see)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(_b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_decode(token: str, key: bytes) -> dict[str, Any] | None:
    """Verify an HS256 JWT's header and signature; return its claims or ``None``.

    Expiry is deliberately not checked here: the fakes check it against their
    token table (see :class:`FakeState`).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url_decode(parts[0]))
        signature = _b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return None
    return jwt_unverified_claims(token)


# --------------------------------------------------------------------------- token endpoints

TokenCallKind = Literal["token", "refresh", "logout"]


async def begin_token_call(
    request: web.BaseRequest, state: FakeState, kind: TokenCallKind
) -> RecordedRequest:
    """Count and record a login/refresh/logout call, then apply ``token_delay``.

    Counting happens first so that failed and delayed calls are counted too.
    """
    if kind == "token":
        state.token_requests += 1
    elif kind == "refresh":
        state.refresh_requests += 1
    else:
        state.logout_requests += 1
    rec = await record_request(request)
    state.token_calls.append(rec)
    if kind != "logout" and state.token_delay > 0:
        await asyncio.sleep(state.token_delay)
    return rec


async def _huge_body(request: web.BaseRequest) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        await resp.write(b'{"padding": "')
        sent = 0
        filler = b"x" * CHUNK_SIZE
        while sent < HUGE_BODY_SIZE:
            await resp.write(filler)
            sent += len(filler)
        await resp.write(b'"}')
        await resp.write_eof()
    except ConnectionError:
        pass  # the client gave up reading, as a careful one should
    return resp


async def generic_token_failure(
    request: web.BaseRequest,
    state: FakeState,
    *,
    missing_field_body: Mapping[str, Any],
) -> web.StreamResponse | None:
    """Answer according to ``state.token_failure``, if it is an API-neutral mode.

    Returns ``None`` when there is no failure to simulate, or when the mode
    (``past_expiry``, ``nonsense_expiry``, ``invalid_client``) needs the
    calling fake's own response format.
    """
    mode = state.token_failure
    if mode is None or mode in API_SPECIFIC_FAILURES:
        return None
    if mode == "500":
        return json_response({"error": "internal_error", "message": "simulated failure"}, 500)
    if mode in ("429", "503"):
        return json_response(
            {"error": "temporarily_unavailable", "message": "simulated " + mode},
            int(mode),
            headers={"Retry-After": str(state.retry_after)},
        )
    if mode == "html":
        return web.Response(
            text="<html><body><h1>Service Unavailable</h1>Maintenance</body></html>",
            content_type="text/html",
        )
    if mode == "nonjson":
        return web.Response(body=b"this is {not json", content_type="application/json")
    if mode == "missing_field":
        return json_response(missing_field_body)
    if mode == "huge":
        return await _huge_body(request)
    if mode == "hang":
        # Never answer: only the client's timeout can end this. Cancelled when
        # the client disconnects (``handler_cancellation``) or the fake stops.
        await asyncio.sleep(3600)
        return json_response({"error": "hang ended"}, 500)
    if mode == "reset":
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Nothing reaches the client: the connection is already gone.
        return web.Response(status=500)
    raise ValueError(f"unknown token_failure mode {mode!r}; expected one of {TOKEN_FAILURE_MODES}")


# --------------------------------------------------------------------------- serving


@dataclass
class RunningFake:
    """A started aiohttp app on a loopback port. ``url`` is the server root."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop accepting, cancel whatever still hangs, release the port."""
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningFake:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningFake:
    """Start ``app`` on ``host:port`` (0 = any free port) and return its handle.

    Handlers are cancelled when their client disconnects, and shutdown waits at
    most one second, so ``hang``/``slow`` endpoints never delay teardown.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return RunningFake(runner=runner, host=host, port=bound_port)


S = TypeVar("S", bound=FakeState)


@dataclass
class SeedFake(Generic[S]):
    """One running seed API.

    ``url`` is the API base URL to configure as the upstream ``url``;
    ``token_url`` is where credentials are exchanged (login / token endpoint).
    """

    name: str
    state: S
    server: RunningFake
    url: str
    token_url: str

    async def close(self) -> None:
        await self.server.close()

    async def __aenter__(self) -> SeedFake[S]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def seed_app(key: web.AppKey[S], state: S, routes: Mapping[str, Handler]) -> web.Application:
    """A seed fake's app: its state under ``key``; every method on each path pattern
    goes to that pattern's handler."""
    app = web.Application(client_max_size=SEED_MAX_BODY)
    app[key] = state
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    return app


def under(base: str) -> str:
    """The route pattern for ``base`` and everything below it."""
    return base + "{tail:(/.*)?}"


async def start_seed(
    name: str, state: S, app: web.Application, host: str, port: int, base: str, token_path: str
) -> SeedFake[S]:
    """Serve a seed fake; ``.url`` is ``http://host:port`` + ``base``, ``.token_url``
    the same origin + ``token_path``."""
    server = await serve(app, host, port)
    return SeedFake(name, state, server, server.url + base, server.url + token_path)


@dataclass
class Fakes:
    """The four seed fakes started together by :func:`run_fakes`."""

    paymo: SeedFake[PaymoState]
    primaerp: SeedFake[PrimaerpState]
    didomi: SeedFake[DidomiState]
    getpaid: SeedFake[GetpaidState]

    def all(self) -> list[SeedFake[Any]]:
        return [self.paymo, self.primaerp, self.didomi, self.getpaid]


@contextlib.asynccontextmanager
async def run_fakes(lifetime: float = 3600.0, host: str = "127.0.0.1") -> AsyncIterator[Fakes]:
    """Start all four seed fakes (demo credentials, given token lifetime)."""
    # Imported here: those modules import this one.
    from .didomi import DidomiState, start_didomi
    from .getpaid import GetpaidState, start_getpaid
    from .paymo import PaymoState, start_paymo
    from .primaerp import PrimaerpState, start_primaerp

    async with contextlib.AsyncExitStack() as stack:
        paymo = await stack.enter_async_context(
            await start_paymo(PaymoState(lifetime=lifetime), host=host)
        )
        primaerp = await stack.enter_async_context(
            await start_primaerp(PrimaerpState(lifetime=lifetime), host=host)
        )
        didomi = await stack.enter_async_context(
            await start_didomi(DidomiState(lifetime=lifetime), host=host)
        )
        getpaid = await stack.enter_async_context(
            await start_getpaid(GetpaidState(lifetime=lifetime), host=host)
        )
        yield Fakes(paymo=paymo, primaerp=primaerp, didomi=didomi, getpaid=getpaid)


# --------------------------------------------------------------------------- resources


async def begin_resource(request: web.BaseRequest, state: FakeState) -> RecordedRequest:
    """Count and record a resource request (before any auth check, so 401s count)."""
    state.resource_requests += 1
    rec = await record_request(request)
    state.requests.append(rec)
    return rec


def stream_size(rest: str) -> int | None:
    """``n`` if the path under the base is ``stream/<n>``, else ``None``."""
    head, _, tail = rest.strip("/").partition("/")
    if head == "stream" and tail.isdigit():
        return int(tail)
    return None


async def websocket_echo(request: web.BaseRequest) -> web.StreamResponse:
    """A WebSocket that echoes every frame, text or binary. Text commands:
    ``close`` closes from this side; ``send <n>`` sends ``n`` pattern bytes in
    binary frames, then the text ``sent <n>``; ``push <n> <seconds>`` sends ``n``
    text frames ``push <i>`` that far apart (a server that only talks);
    ``stall <seconds>`` reads nothing for that long (a server that falls behind)."""
    ws = web.WebSocketResponse(max_msg_size=SEED_MAX_BODY)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is not WSMsgType.TEXT:
            break
        elif msg.data == "close":
            await ws.close(code=WSCloseCode.OK, message=b"asked to")
        elif msg.data.startswith("send ") and msg.data[5:].isdigit():
            n = int(msg.data[5:])
            for chunk in pattern_chunks(n):
                await ws.send_bytes(chunk)
            await ws.send_str(f"sent {n}")
        elif msg.data.startswith("stall "):
            await asyncio.sleep(float(msg.data[6:]))
        elif msg.data.startswith("push "):
            count, pause = msg.data.split()[1:]
            for i in range(int(count)):
                await asyncio.sleep(float(pause))
                await ws.send_str(f"push {i}")
        else:
            await ws.send_str(msg.data)
    return ws


async def resource_answer(
    request: web.BaseRequest, rec: RecordedRequest, rest: str, data: Mapping[str, Any]
) -> web.StreamResponse:
    """The answer of an authenticated resource: a WebSocket echo at ``ws``, a
    pattern stream at ``stream/<n>``, or JSON + echo."""
    if rest.strip("/") == "ws" and request.headers.get("Upgrade", "").lower() == "websocket":
        return await websocket_echo(request)
    n = stream_size(rest)
    if n is not None and request.method in ("GET", "HEAD"):
        return await stream_pattern(request, n)
    body = dict(data)
    body["echo"] = echo_dict(rec)
    return json_response(body)

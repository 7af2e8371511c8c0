"""A generic, unauthenticated upstream for the proxy-core tests.

It shows exactly what reached it (method, raw path, raw headers, body digest)
and can produce the awkward responses a proxy must pass through: big and
chunked bodies, redirects, any status, slow answers, gzip, hop-by-hop headers,
repeated headers, and a 401 that goes away on retry.

**Dispatch rule.** Every path is served, whatever base path precedes the
interesting part, so the proxy can be tested with or without an upstream base
path. The raw path (without the query) is split on ``/``, each segment is
percent-decoded and empty segments are dropped; then, first match wins:

1. any segment is ``echo`` -> echo (so ``/base/echo/status/500`` echoes);
2. the last segment is ``upload``, ``redirect``, ``slow``, ``slowbody``,
   ``gzip``, ``hop``, ``cookie`` or ``status-401-once`` -> that endpoint;
3. the second-to-last segment is ``bytes``, ``chunked`` or ``status`` and the
   last one is its argument -> that endpoint;
4. anything else -> echo.

Every request's body is consumed as a stream and only its length and sha256
are kept, so uploads of any size use constant memory.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .common import (
    RecordedRequest,
    json_response,
    raw_header_list,
    stream_pattern,
)

__all__ = ["EchoState", "create_echo_app", "echo_endpoint"]

_LAST_SEGMENT_ENDPOINTS = frozenset(
    {"upload", "redirect", "slow", "slowbody", "gzip", "hop", "cookie", "status-401-once"}
)
_ARG_ENDPOINTS = frozenset({"bytes", "chunked", "status"})


@dataclass
class EchoState:
    """What the echo upstream saw.

    ``requests`` holds one :class:`RecordedRequest` per request, with
    ``body`` always empty and ``body_len``/``body_sha256`` filled in.
    ``seen_401_keys`` are the ``X-Test-Key`` values already answered 401 by
    ``status-401-once``. ``in_flight``/``max_in_flight`` count concurrent
    requests (useful for draining and concurrency tests).
    """

    requests: list[RecordedRequest] = field(default_factory=list)
    seen_401_keys: set[str] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0


_STATE_KEY = web.AppKey("echo_state", EchoState)


def echo_endpoint(raw_path: str) -> tuple[str, str | None]:
    """Apply the dispatch rule: (endpoint name, argument or ``None``)."""
    path = raw_path.split("?", 1)[0]
    segments = [unquote(s) for s in path.split("/") if s]
    if "echo" in segments:
        return "echo", None
    if segments and segments[-1] in _LAST_SEGMENT_ENDPOINTS:
        return segments[-1], None
    if len(segments) >= 2 and segments[-2] in _ARG_ENDPOINTS:
        return segments[-2], segments[-1]
    return "echo", None


async def _consume(request: web.Request) -> tuple[int, str]:
    """Read the body chunk by chunk, keeping only its length and digest."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _float_param(request: web.Request, name: str, default: float) -> float | None:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        return None
    return value if value >= 0 else None


def _bad(message: str) -> web.Response:
    return json_response({"error": "bad_request", "message": message}, 400)


def _count(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    return int(text)


async def _dispatch(
    request: web.Request, state: EchoState, rec: RecordedRequest
) -> web.StreamResponse:
    name, arg = echo_endpoint(request.raw_path)

    if name == "echo":
        return json_response(
            {
                "method": rec.method,
                "raw_path": rec.raw_path,
                "headers": [[k, v] for k, v in rec.headers],
                "body_len": rec.body_len,
                "body_sha256": rec.body_sha256,
            }
        )

    if name in ("bytes", "chunked"):
        n = _count(arg)
        if n is None:
            return _bad(f"{name}/<n> needs a non-negative integer")
        return await stream_pattern(request, n, content_length=(name == "bytes"))

    if name == "status":
        code = _count(arg)
        if code is None or not 200 <= code <= 599:
            return _bad("status/<code> needs a code between 200 and 599")
        if code in (204, 304):
            return web.Response(status=code)
        return json_response({"status": code}, code)

    if name == "upload":
        if request.method not in ("POST", "PUT"):
            return json_response({"error": "method_not_allowed"}, 405)
        return json_response({"body_len": rec.body_len, "body_sha256": rec.body_sha256})

    if name == "redirect":
        status = _count(request.query.get("status", "302"))
        if status is None or not 300 <= status <= 399:
            return _bad("status must be a 3xx code")
        location = request.query.get("to", "/")
        return web.Response(status=status, headers={"Location": location})

    if name == "slow":
        seconds = _float_param(request, "seconds", 1.0)
        if seconds is None:
            return _bad("seconds must be a non-negative number")
        await asyncio.sleep(seconds)
        return json_response({"slept": seconds})

    if name == "slowbody":
        seconds = _float_param(request, "seconds", 1.0)
        if seconds is None:
            return _bad("seconds must be a non-negative number")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(b"first chunk\n")
            await asyncio.sleep(seconds)
            await resp.write(b"rest of the body\n")
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    if name == "gzip":
        payload = json.dumps({"compressed": True, "message": "hello from gzip"}).encode()
        return web.Response(
            body=gzip.compress(payload, mtime=0),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    if name == "hop":
        # aiohttp's server sends every one of these as set (checked with a raw
        # socket), including Connection, Upgrade and Trailer.
        resp = web.Response(text="hop-by-hop headers attached\n")
        resp.headers["Connection"] = "close, X-Hop"
        resp.headers["X-Hop"] = "1"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Trailer"] = "X-T"
        resp.headers["Upgrade"] = "h2c"
        resp.headers["Proxy-Connection"] = "keep-alive"
        resp.headers["X-Normal"] = "yes"
        return resp

    if name == "cookie":
        resp = json_response({"cookies": 2})
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        return resp

    # status-401-once
    key = request.headers.get("X-Test-Key", "")
    if key not in state.seen_401_keys:
        state.seen_401_keys.add(key)
        return json_response(
            {"error": "unauthorized", "key": key},
            401,
            headers={"WWW-Authenticate": 'Bearer realm="echo"'},
        )
    body: dict[str, Any] = {"ok": True, "key": key}
    return json_response(body)


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        body_len, body_sha256 = await _consume(request)
        rec = RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=raw_header_list(request),
            body_len=body_len,
            body_sha256=body_sha256,
        )
        state.requests.append(rec)
        return await _dispatch(request, state, rec)
    finally:
        state.in_flight -= 1


def create_echo_app(state: EchoState) -> web.Application:
    """The echo upstream: one catch-all route, dispatched by :func:`echo_endpoint`."""
    app = web.Application()
    app[_STATE_KEY] = state
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app

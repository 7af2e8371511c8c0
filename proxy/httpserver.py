"""aiohttp's low-level HTTP server, made to answer like the rest of the proxy.

Two things aiohttp's `web.Server` does not do, and why they live here:

* What its parser refuses never reaches a handler: `RequestHandler.handle_error`
  answers it with a plain-text 400. `ProxyRequestHandler` answers JSON instead
  (SPEC §4) — 414 `uri_too_long` for a request line over `MAX_LINE`, 431
  `headers_too_large` for a header over `MAX_FIELD` or more than `MAX_HEADERS`
  of them, 400 `bad_request` for the rest — and writes the access line. Both
  overflows raise `LineTooLong`; only the limit it names tells them apart, so
  the two limits differ. Our own bugs that escape the handler become a 500
  `internal_error`, logged with the traceback.
* The drain (`proxy.server.ProxyRunner.stop`) needs to know which requests are
  in flight and to make new ones close their connection: `ProxyServer.in_flight`
  maps each handler task to its request, and `closing` marks every request that
  arrives afterwards `Connection: close`.

Tested against aiohttp 3.14 (pinned in pyproject.toml): `handle_error`'s
signature and `RawRequestMessage._replace` are what this relies on.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.errors import BadRequest, HeadersTooLarge, ProxyError, UriTooLong
from proxy.logs import ACCESS

log = structlog.get_logger("authproxy")

# Request ids: unique per process start (random prefix) and per request (counter);
# a uuid4 per request costs a getrandom() call for no gain.
new_request_id = map(f"{secrets.token_hex(8)}-{{:x}}".format, itertools.count(1)).__next__

MAX_LINE = 8190  # the request line (nginx: large_client_header_buffers 8k) -> 414
MAX_FIELD = 8191  # one header, name and value (differs from MAX_LINE: see above) -> 431
MAX_HEADERS = 100  # more -> 431

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _refusal(exc: BaseException | None, message: str | None) -> ProxyError:
    """The SPEC's error for what the parser refused."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_LINE:
            return UriTooLong(f"the request line is longer than {MAX_LINE} bytes")
        return HeadersTooLarge(f"a request header is longer than {MAX_FIELD} bytes")
    text = message or (str(exc) if exc is not None else "")
    if "Too many headers" in text:
        return HeadersTooLarge(f"more than {MAX_HEADERS} request headers")
    # The parser's own words name what was wrong; the raw bytes it quotes are cut off.
    reason = text.partition(":")[0].strip().rstrip(".") or "malformed request"
    return BadRequest(f"malformed HTTP request ({reason[:100]})")


class ProxyRequestHandler(RequestHandler):
    """One client connection. Only `handle_error` differs from aiohttp's."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for an answer
            raise ConnectionError("response already started; cannot send an error")
        request_id = request.headers.get("X-Request-ID", "")
        if not request_id or len(request_id) > 128 or not request_id.isprintable():
            request_id = new_request_id()
        error: ProxyError
        if status == 500:
            log.error("request_failed", request_id=request_id, exc_info=exc)
            error = ProxyError("internal error; see the proxy log")
        elif status == 504:
            error = ProxyError("internal error: a timeout escaped the handler")
        else:
            error = _refusal(exc, message)
        body = error.body()
        response = web.Response(
            status=error.status,
            body=body,
            content_type="application/json",
            headers={"X-Request-ID": request_id},
        )
        response.force_close()
        parsed = status == 500 or status == 504
        ACCESS.emit(
            request.method if parsed else "-",
            request.raw_path[:2048] if parsed else "-",
            None,
            error.status,
            0.0,
            len(body),
            False,
            request_id,
            error.code,
        )
        return response


class ProxyServer(web.Server):
    """`web.Server` that builds `ProxyRequestHandler`s and tracks in-flight requests."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        in_flight: dict[asyncio.Task[Any], web.BaseRequest] = {}

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            in_flight[task] = request
            try:
                return await handler(request)
            finally:
                del in_flight[task]

        super().__init__(tracked, request_factory=self._new_request, **kwargs)
        self.in_flight = in_flight  # handler task -> its request, for the drain
        self.closing = False  # every new request gets Connection: close

    def _new_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if self.closing:
            message = message._replace(should_close=True)
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)

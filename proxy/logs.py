"""structlog set-up: JSON lines off a TTY, console on one, secrets redacted last.

Nothing in the proxy logs headers or bodies; the redaction processor is the
second line of defence, replacing any configured secret that still finds its
way into a value (an exception message, an upstream's error text).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "REDACTED"


class Redactor:
    """Replaces every registered secret in string values. Secrets accumulate per process."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if s)
        if self._secrets:
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None else text

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        pattern = self._pattern
        if pattern is None:
            return event_dict
        for key, value in event_dict.items():
            if isinstance(value, str) and pattern.search(value):
                event_dict[key] = pattern.sub(REDACTED, value)
        return event_dict


REDACTOR = Redactor()


class LineWriter:
    """Collects rendered lines and writes them to stdout once per event-loop turn.

    Under load many requests finish in one turn of the loop; one write and one
    flush for all of them instead of a syscall per line. Outside a running loop
    (start-up, `check`) every line is written at once. The stream is looked up
    when writing, so output goes wherever `sys.stdout` points now (test capture).
    """

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._scheduled = False

    def write(self, line: str) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        out: TextIO = sys.stdout
        out.write("\n".join(lines) + "\n")
        out.flush()


WRITER = LineWriter()
atexit.register(WRITER.flush)


class StdoutLogger:
    """structlog's output end: every rendered line goes through the `WRITER`."""

    def msg(self, message: str) -> None:
        WRITER.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class AccessLog:
    """The one line per request, rendered without structlog's processor chain.

    The keys, their order and the timestamp format are exactly what structlog's
    JSONRenderer produces for the same event, so consumers see one format; the
    difference is cost: this runs on every request. In console format (a human
    at a TTY) the line goes through structlog as usual.
    """

    __slots__ = ("_fast", "_second", "_stamp")

    def __init__(self) -> None:
        self._fast = False
        self._second = -1
        self._stamp = ""

    def configure(self, fast: bool) -> None:
        self._fast = fast

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"

    def emit(
        self,
        method: str,
        path: str,
        upstream: str | None,
        status: int,
        duration_ms: float,
        nbytes: int,
        retried: bool,
        request_id: str,
    ) -> None:
        if not self._fast:
            _access_structlog.info(
                "request_finished",
                method=method,
                path=path,
                upstream=upstream,
                status=status,
                duration_ms=duration_ms,
                bytes=nbytes,
                retried=retried,
                request_id=request_id,
            )
            return
        path = REDACTOR.scrub(path)
        WRITER.write(
            f'{{"method": {_json_str(method)}, "path": {_json_str(path)}, '
            f'"upstream": {"null" if upstream is None else _json_str(upstream)}, '
            f'"status": {status}, "duration_ms": {duration_ms!r}, "bytes": {nbytes}, '
            f'"retried": {"true" if retried else "false"}, '
            f'"request_id": {_json_str(request_id)}, "event": "request_finished", '
            f'"level": "info", "timestamp": "{self._timestamp()}"}}'
        )


_json_str = json.encoder.encode_basestring_ascii
_access_structlog = structlog.get_logger("authproxy.access")
ACCESS = AccessLog()


def _stdout_logger(*_args: Any) -> StdoutLogger:
    return StdoutLogger()


class _StdlibBridge(logging.Handler):
    """aiohttp reports protocol errors (malformed requests, resets) through stdlib
    logging with full tracebacks; we keep one structured line, no traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        structlog.get_logger(record.name).log(
            record.levelno if error is None else logging.INFO,
            "http_protocol_error" if error is not None else "library_message",
            message=record.getMessage()[:500],
            error=type(error).__name__ if error is not None else None,
            detail=str(error).splitlines()[0][:300] if error is not None and str(error) else None,
        )


def configure_logging(level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    REDACTOR.add(secrets)
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    ACCESS.configure(fast=fmt == "json" and level != "error" and level != "warning")
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    bridge = _StdlibBridge()
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.client"):
        library = logging.getLogger(name)
        library.handlers = [bridge]
        library.propagate = False
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks as plain text, never with local variables (they hold tokens).
            structlog.processors.format_exc_info,
            REDACTOR,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )

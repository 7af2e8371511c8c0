"""structlog set-up: JSON lines off a TTY, console on one, secrets redacted last.

Nothing in the proxy logs headers or bodies; the redaction processor is the
second line of defence, replacing any configured secret that still finds its
way into a value (an exception message, an upstream's error text).
"""

from __future__ import annotations

import logging
import re
import sys
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


class StdoutLogger:
    """Writes each rendered line to the *current* `sys.stdout`.

    Looking the stream up per call (instead of binding it once) keeps output
    going to wherever stdout points now, which is what test capture needs.
    """

    def msg(self, message: str) -> None:
        out: TextIO = sys.stdout
        out.write(message + "\n")
        out.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


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

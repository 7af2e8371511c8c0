"""structlog set-up: JSON lines off a TTY, console on one, secrets redacted last.

Nothing in the proxy logs headers or bodies; the redaction processor is the
second line of defence, replacing any configured secret that still finds its
way into a value (an exception message, an upstream's error text).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "REDACTED"
# The key of the `credential` fingerprints in `request_debug` (SPEC §5): drawn at
# random once per process — by the supervisor, which hands it to its workers in
# this variable, so a fingerprint means the same in every worker.
FINGERPRINT_KEY_ENV = "AUTHPROXY_FINGERPRINT_KEY"


def _fingerprint_key() -> bytes:
    inherited = os.environ.get(FINGERPRINT_KEY_ENV, "")
    try:
        key = bytes.fromhex(inherited)
    except ValueError:
        key = b""
    return key if len(key) >= 16 else secrets.token_bytes(32)


_FINGERPRINT_KEY = _fingerprint_key()


def fingerprint(value: str) -> str:
    """8 hex digits that change exactly when `value` does; worthless outside the process."""
    digest = hmac.new(_FINGERPRINT_KEY, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return digest.hexdigest()[:8]


def derived_forms(secret: str) -> set[str]:
    """Every form a secret takes on its way through HTTP and JSON: as is, percent-
    encoded (upper and lower hex, `/` kept or not), `+`-encoded, JSON-escaped, and
    inside any base64 (`Authorization: Basic base64(id:secret)`, `base64(secret:)`):
    the characters of its encoding that do not depend on its neighbours, at each of
    the three byte alignments, so every `id:` before it and `:pw` after it is covered."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe="/"), quote_plus(secret)}
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), f) for f in list(forms)}
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    forms.add(json.dumps(secret)[1:-1].replace("/", "\\/"))
    raw = secret.encode("utf-8", "surrogateescape")
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        first = -(-8 * offset // 6)  # the first character made of secret bits only
        last = (8 * (offset + len(raw))) // 6  # one past the last such character
        core = encoded[first:last]
        if len(core) >= 4:
            forms.add(core)
            forms.add(core.replace("+", "-").replace("/", "_"))  # base64url
    return {f for f in forms if f}


class Redactor:
    """Replaces every registered secret, in every derived form, in string values.
    Secrets accumulate per process; their forms are computed once, when added."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if s} - self._secrets
        if not new:
            return
        self._secrets |= new
        forms = set().union(*(derived_forms(s) for s in self._secrets))
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(f) for f in ordered))

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return text
        text = pattern.sub(REDACTED, text)
        if "%" in text or "+" in text:
            # A mix of encodings no list of forms covers (`s3cr3t/pa%2Bss+w0rd`, as a
            # client library re-quotes a query): look again decoded, and if a secret
            # is there, show the decoded text with it redacted.
            for decoded in (unquote(text), unquote_plus(text)):
                if decoded != text and pattern.search(decoded):
                    return pattern.sub(REDACTED, decoded)
        return text

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if self._pattern is None:
            return event_dict
        for key, value in event_dict.items():
            if isinstance(value, str):
                scrubbed = self.scrub(value)
                if scrubbed is not value:
                    event_dict[key] = scrubbed
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
        # Set in the workers of `run --workers N`, which share one stdout: each write
        # is whole lines of at most this many bytes, so a pipe (PIPE_BUF) never
        # interleaves two workers' lines. None: one write per batch.
        self.max_write: int | None = None
        # Called once when stdout fails for good (EIO/EPIPE: the terminal closed).
        self.on_output_lost: Callable[[], None] | None = None

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
        try:
            self._write(out, lines)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EPIPE):
                raise
            self._output_lost(out)

    def _write(self, out: TextIO, lines: list[str]) -> None:
        if self.max_write is None:
            out.write("\n".join(lines) + "\n")
            out.flush()
            return
        chunk: list[str] = []
        size = 0
        for line in lines:
            n = len(line.encode()) + 1
            if chunk and size + n > self.max_write:
                out.write("\n".join(chunk) + "\n")
                out.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += n
        out.write("\n".join(chunk) + "\n")
        out.flush()

    def _output_lost(self, out: TextIO) -> None:
        """Nobody reads our output any more: send it to /dev/null from now on (so no
        later write, nor the interpreter's exit, fails again) and say so once."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # not a real file (test capture): nothing to redirect
            pass
        callback, self.on_output_lost = self.on_output_lost, None
        if callback is not None:
            callback()


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

    __slots__ = ("_fast", "_second", "_stamp", "debug")

    def __init__(self) -> None:
        self._fast = False
        self._second = -1
        self._stamp = ""
        self.debug = False  # log.level is debug: forwarding adds `request_debug`

    def configure(self, fast: bool, debug: bool) -> None:
        self._fast = fast
        self.debug = debug

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
        error: str | None = None,
        aborted: bool = False,
        bytes_up: int | None = None,
    ) -> None:
        """`error`: the SPEC §4 code of a request the proxy refused or could not
        complete; `aborted`: the response was cut mid-body; `bytes_up`: the bytes a
        client sent through a WebSocket relay. Each key appears only when it applies."""
        if not self._fast:
            extra: dict[str, Any] = {}
            if error is not None:
                extra["error"] = error
            if aborted:
                extra["aborted"] = True
            if bytes_up is not None:
                extra["bytes_up"] = bytes_up
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
                **extra,
            )
            return
        path = REDACTOR.scrub(path)
        tail = ""
        if error is not None:
            tail += f'"error": {_json_str(error)}, '
        if aborted:
            tail += '"aborted": true, '
        if bytes_up is not None:
            tail += f'"bytes_up": {bytes_up}, '
        WRITER.write(
            f'{{"method": {_json_str(method)}, "path": {_json_str(path)}, '
            f'"upstream": {"null" if upstream is None else _json_str(upstream)}, '
            f'"status": {status}, "duration_ms": {duration_ms!r}, "bytes": {nbytes}, '
            f'"retried": {"true" if retried else "false"}, '
            f'"request_id": {_json_str(request_id)}, {tail}"event": "request_finished", '
            f'"level": "info", "timestamp": "{self._timestamp()}"}}'
        )


_json_str = json.encoder.encode_basestring_ascii
_access_structlog = structlog.get_logger("authproxy.access")
ACCESS = AccessLog()


class ConsoleLines:
    """The console format, for a person at a terminal (SPEC §5):

        12:04:31.207  GET /paymo/clients → 200  paymo  4.2 ms  268 B  request_id=…

    An access line leads with what a person scans for — method, path, status,
    route, time, size — then the other keys as key=value in a stable order. Other
    events read `HH:MM:SS.mmm  level  event  upstream  key=value …`. Colours only
    on a TTY.
    """

    LEAD = ("method", "path", "status", "upstream", "duration_ms", "bytes")
    HIDDEN = frozenset({"event", "level", "timestamp", "logger"})

    def __init__(self, colors: bool) -> None:
        self._colors = colors

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._colors else text

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> str:
        stamp = _clock(event_dict.get("timestamp"))
        event = str(event_dict.get("event", ""))
        level = str(event_dict.get("level", "info"))
        if event == "request_finished":
            status = event_dict.get("status")
            code = "32" if isinstance(status, int) and status < 400 else "31"
            route = event_dict.get("upstream")
            head = (
                f"{stamp}  {event_dict.get('method')} {event_dict.get('path')} → "
                f"{self._paint(code, str(status))}  {route if route is not None else '-'}  "
                f"{event_dict.get('duration_ms')} ms  {event_dict.get('bytes')} B"
            )
            skip = set(self.LEAD)
        else:
            colour = {"warning": "33", "error": "31", "critical": "31"}.get(level, "36")
            head = f"{stamp}  {self._paint(colour, f'{level:<7}')}  {self._paint('1', event)}"
            if "upstream" in event_dict:
                head += f"  {event_dict['upstream']}"
            skip = {"upstream"}
        rest = [
            f"{key}={_console_value(value)}"
            for key, value in event_dict.items()
            if key not in self.HIDDEN and key not in skip and key != "exception"
        ]
        line = "  ".join([head, *rest]) if rest else head
        if "exception" in event_dict:
            line += "\n" + str(event_dict["exception"])
        return line


def _clock(timestamp: Any) -> str:
    """`HH:MM:SS.mmm` of structlog's ISO timestamp, in UTC as the JSON lines are."""
    text = str(timestamp or "")
    _, sep, rest = text.partition("T")
    return rest[:12] if sep else time.strftime("%H:%M:%S")


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value)
    return json.dumps(value, default=str)


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


# The chain every structlog logger uses, changed in place by `configure_logging`:
# loggers cache a reference to it on first use, so a reload's new renderer reaches them.
_PROCESSORS: list[structlog.typing.Processor] = []
_LEVEL_ALIASES = {
    logging.DEBUG: ("debug",),
    logging.INFO: ("info", "msg"),
    logging.WARNING: ("warning", "warn"),
    logging.ERROR: ("error",),
    logging.CRITICAL: ("critical", "fatal"),
}


def _nop(*_args: Any, **_kw: Any) -> None:
    return None


async def _anop(*_args: Any, **_kw: Any) -> None:
    return None


class _ReloadableLevel(structlog.make_filtering_bound_logger(logging.NOTSET)):  # type: ignore[misc]
    """structlog's filtering logger (a level below the minimum costs one `return None`),
    with the minimum kept on the class: cached loggers follow a reload's new level."""

    min_level = logging.INFO

    def log(self, level: int, event: str, *args: Any, **kw: Any) -> Any:
        if level < type(self).min_level:
            return None
        return super().log(level, event, *args, **kw)


def _set_level(level: int) -> None:
    cls = _ReloadableLevel
    cls.min_level = level
    for value, names in _LEVEL_ALIASES.items():
        for name in names:
            for attr, nop in ((name, _nop), (f"a{name}", _anop)):
                if value < level:
                    setattr(cls, attr, nop)
                elif attr in cls.__dict__:
                    delattr(cls, attr)


def configure_logging(level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Set up (or, on a reload, change) the level, the format and the redaction set."""
    REDACTOR.add(secrets)
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    ACCESS.configure(
        fast=fmt == "json" and level != "error" and level != "warning", debug=level == "debug"
    )
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = ConsoleLines(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    bridge = _StdlibBridge()
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.client"):
        library = logging.getLogger(name)
        library.handlers = [bridge]
        library.propagate = False
    _PROCESSORS[:] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks as plain text, never with local variables (they hold tokens).
        structlog.processors.format_exc_info,
        REDACTOR,
        renderer,
    ]
    _set_level(logging.getLevelNamesMapping()[level.upper()])
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=_ReloadableLevel,
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )

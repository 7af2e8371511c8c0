"""What failed, in words a user can act on (SPEC §4).

`explain(exc, host, port)` turns the exception of a failed connection or exchange
into one sentence — DNS lookup failed, connection refused, TLS certificate not
trusted (for which host, and what to set), client certificate demanded,
connection reset — or None when it is none of these. The upstream client and the
token session both use it, so a cause reads the same wherever it happens. Pure:
no I/O, no logging; it looks through an exception's causes (aiohttp wraps the
OS error it got).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator

from proxy.connector import client_certificate_demanded

_REFUSED = f"[Errno {errno.ECONNREFUSED}]"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it, innermost first where aiohttp names it (`os_error`,
    `certificate_error`): the OS's own error says most."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for name in ("certificate_error", "os_error"):
            inner = getattr(current, name, None)
            if isinstance(inner, BaseException) and id(inner) not in seen:
                seen.add(id(inner))
                yield inner
        yield current
        current = current.__cause__ or current.__context__


def explain(exc: BaseException, host: str, port: int) -> str | None:
    """One sentence saying what failed, or None for a cause this does not know."""
    for cause in _chain(exc):
        reason = getattr(cause, "reason", None)  # aiohttp's SSL errors have none
        if reason is not None:
            demanded = client_certificate_demanded(cause, host)
            if demanded is not None:
                return str(demanded)
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or reason or "verification failed"
            return (
                f"TLS certificate not trusted for {host} ({why}); "
                "set tls.ca_file to the CA that issued it"
            )
        if isinstance(cause, socket.gaierror):
            return f"DNS lookup failed for {host} ({cause.strerror or cause})"
        if isinstance(cause, OSError):
            if cause.errno == errno.ECONNREFUSED or (
                cause.errno is None and _REFUSED in str(cause)  # every address refused
            ):
                return f"connection refused by {host}:{port} (is it listening on that port?)"
            if cause.errno == errno.ECONNRESET:
                return f"connection reset by {host}:{port}"
        if isinstance(cause, ssl.SSLError) and reason is not None:
            return f"TLS handshake with {host} failed ({reason})"
    return None

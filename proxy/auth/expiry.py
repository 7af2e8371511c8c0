"""Pure: reading expiry out of token responses, in every form the seed APIs use.

Absolute times come back as epoch seconds (wall clock); the token manager turns
them into monotonic deadlines once, when the token arrives.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

_MS_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
# Epoch values above this are milliseconds (year 5138 in seconds; 1973 in ms).
_MS_THRESHOLD = 1e11


class ExpiryError(ValueError):
    """An expiry value we cannot read; the message never includes the value."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_expires_at(value: Any) -> float:
    """ISO 8601, epoch seconds or milliseconds, or `/Date(ms)/` → epoch seconds."""
    number = _number(value)
    if number is not None:
        if not math.isfinite(number) or number <= 0:
            raise ExpiryError("absolute expiry is not a positive finite number")
        return number / 1000.0 if number > _MS_THRESHOLD else number
    if not isinstance(value, str):
        raise ExpiryError("absolute expiry is neither a number nor a string")
    text = value.strip()
    if match := _MS_DATE.match(text):
        # The optional offset in /Date(ms+hhmm)/ is informational; ms is UTC epoch.
        return int(match.group(1)) / 1000.0
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ExpiryError("absolute expiry is not ISO 8601, epoch or /Date(ms)/") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_expires_in(value: Any) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ExpiryError("expires_in is not a non-negative number of seconds")
    return number


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (epoch seconds), or None if `token` is not a JWT with one.

    The signature is not checked: the upstream does that; we only need to know
    when to stop using the token.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict) or claims.get("exp") is None:
        return None
    exp = _number(claims["exp"])
    if exp is None or not math.isfinite(exp):
        # A JWT that states an expiry we cannot read: refuse it rather than
        # treat it as never expiring.
        raise ExpiryError("the JWT's exp claim is not a number")
    return exp


def dig(document: Any, path: str) -> Any:
    """Follow a dotted path (`sessions.0.id`) into parsed JSON; None when absent."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is None:
            return None
    return node

"""Credentials on the wire and the proxy's own JSON errors."""

from __future__ import annotations

from typing import Any

import aiohttp

from proxy.fakes import RecordedRequest


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header to send."""
    return {"Authorization": "Bearer " + token}


def bearer_of(record: RecordedRequest) -> str:
    """The bearer token a recorded upstream request carried (exactly one Authorization)."""
    (value,) = record.header_values("Authorization")
    return value.removeprefix("Bearer ")


def error_shape(document: Any) -> dict[str, Any]:
    """The SPEC's error body, exactly: ``{"error": {"code", "message", "upstream"}}``.

    Returns the inner ``error`` object."""
    assert isinstance(document, dict), document
    assert set(document) == {"error"}, document
    error = document["error"]
    assert isinstance(error, dict), document
    assert set(error) == {"code", "message", "upstream"}, document
    assert isinstance(error["code"], str), document
    assert isinstance(error["message"], str), document
    assert error["message"], document
    return error


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The proxy's own error answer: JSON, the SPEC's shape, a request id."""
    assert resp.content_type == "application/json", resp.content_type
    error = error_shape(await resp.json())
    assert resp.headers.get("X-Request-ID")
    return error

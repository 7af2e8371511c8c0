"""The browser decisions (proxy.browsers) without a network: origins, Fetch Metadata,
method overrides, and the derived forms the redactor knows a secret by."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest

from proxy.browsers import allowed_origin, normalize_origin, overridden_method
from proxy.errors import OriginNotAllowed
from proxy.logs import Redactor

LISTED = frozenset({"http://localhost:3000", "http://localhost:8080"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://localhost:3000", "http://localhost:3000"),
        ("HTTP://LocalHost:3000", "http://localhost:3000"),
        ("http://localhost:80", "http://localhost"),
        ("https://x.example:443", "https://x.example"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://localhost:3000/", None),
        ("http://localhost:3000/app", None),
        ("http://user@localhost:3000", None),
        ("localhost:3000", None),
        ("null", None),
        ("*", None),
        ("ftp://x", None),
        ("http://localhost:99999", None),
    ],
)
def test_normalize_origin(value: str, expected: str | None) -> None:
    assert normalize_origin(value) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Sec-Fetch-Site": "none"}, None),
        ({"Origin": "http://localhost:3000"}, "http://localhost:3000"),
        (
            {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "cross-site"},
            "http://localhost:3000",
        ),
        ({"Sec-Fetch-Site": "same-origin", "Host": "localhost:8080"}, None),  # listed, no CORS
        ({"Sec-Fetch-Site": "same-origin", "Host": "localhost:9999"}, OriginNotAllowed),
        ({"Sec-Fetch-Site": "same-origin"}, OriginNotAllowed),
        ({"Sec-Fetch-Site": "same-site"}, OriginNotAllowed),
        ({"Sec-Fetch-Site": "cross-site"}, OriginNotAllowed),
        ({"Origin": "http://localhost:3001"}, OriginNotAllowed),
        ({"Origin": "null", "Sec-Fetch-Site": "none"}, OriginNotAllowed),
    ],
)
def test_allowed_origin(headers: dict[str, str], expected: object) -> None:
    if expected is OriginNotAllowed:
        with pytest.raises(OriginNotAllowed):
            allowed_origin(headers, LISTED)
    else:
        assert allowed_origin(headers, LISTED) == expected


def test_nothing_listed_refuses_every_page() -> None:
    with pytest.raises(OriginNotAllowed):
        allowed_origin({"Sec-Fetch-Site": "same-origin", "Host": "localhost"}, frozenset())


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({}, "", None),
        ({"X-HTTP-Method-Override": "delete"}, "", "DELETE"),
        ({"X-HTTP-Method": " PUT "}, "", "PUT"),
        ({"X-Method-Override": "PATCH"}, "", "PATCH"),
        ({}, "a=1&_method=delete", "DELETE"),
        ({}, "%5Fmethod=POST", "POST"),
        ({}, "_methods=POST&x_method=PUT", None),
    ],
)
def test_overridden_method(headers: dict[str, str], query: str, expected: str | None) -> None:
    assert overridden_method(headers, query) == expected


@pytest.mark.parametrize("secret", ["s3cr3t/pa+ss w0rd", "abcd", "ünïcode-sécret", "x" * 61])
@pytest.mark.parametrize("user", ["", "i", "id", "client", "longer-client-id"])
def test_the_redactor_knows_every_derived_form(secret: str, user: str) -> None:
    redactor = Redactor([secret])
    forms = [
        secret,
        quote(secret, safe=""),
        quote(secret, safe="").lower(),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(f"{user}:{secret}".encode()).decode(),
        base64.b64encode(f"{secret}:".encode()).decode(),
        base64.urlsafe_b64encode(f"{user}:{secret}".encode()).decode(),
    ]
    for form in forms:
        scrubbed = redactor.scrub(f"before {form} after")
        assert "REDACTED" in scrubbed, form
        # What is left of a base64 form reveals at most one byte of the secret.
        left = scrubbed.replace("before ", "").replace(" after", "").split("REDACTED")
        assert all(len(piece) <= max(4, len(user) * 4 // 3 + 4) for piece in left), form

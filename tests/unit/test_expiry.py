from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.auth.expiry import ExpiryError, dig, jwt_expiry, parse_expires_at, parse_expires_in


def _jwt(claims: object) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.sig"


@given(st.integers(min_value=10**9, max_value=4 * 10**9))
@example(1393858439)
def test_every_absolute_form_means_the_same_instant(epoch: int) -> None:
    iso = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    forms = [
        epoch,
        str(epoch),
        epoch * 1000,
        f"/Date({epoch * 1000})/",
        iso,
        f"/Date({epoch * 1000}+0100)/",
        float(epoch),
    ]
    assert {parse_expires_at(f) for f in forms} == {float(epoch)}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2015-02-16T13:54:41Z", 1424094881.0),
        ("2015-02-16T13:54:41+00:00", 1424094881.0),
        ("2015-02-16T14:54:41+01:00", 1424094881.0),
        ("2015-02-16T13:54:41", 1424094881.0),  # naive: UTC
        ("/Date(1393858439151)/", 1393858439.151),
    ],
)
def test_seed_formats(value: str, expected: float) -> None:
    assert parse_expires_at(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", ["banana", "", None, True, [], {}, -5, 0, "nan", "inf", "/Date(x)/"]
)
def test_nonsense_absolute_expiry(value: object) -> None:
    with pytest.raises(ExpiryError) as info:
        parse_expires_at(value)
    assert str(value) not in str(info.value) or str(value) in ("", "0")


@pytest.mark.parametrize(
    ("value", "expected"), [(3600, 3600.0), ("60", 60.0), (1.5, 1.5), (0, 0.0)]
)
def test_expires_in(value: object, expected: float) -> None:
    assert parse_expires_in(value) == expected


@pytest.mark.parametrize("value", ["soon", -1, None, "nan", True])
def test_bad_expires_in(value: object) -> None:
    with pytest.raises(ExpiryError):
        parse_expires_in(value)


def test_jwt_exp() -> None:
    assert jwt_expiry(_jwt({"exp": 1700000000})) == 1700000000.0
    assert jwt_expiry(_jwt({"sub": "x"})) is None
    assert jwt_expiry(_jwt(["not", "a", "dict"])) is None
    assert jwt_expiry("opaque-session-id") is None
    assert jwt_expiry("a.!!!.c") is None
    with pytest.raises(ExpiryError):
        jwt_expiry(_jwt({"exp": "banana"}))


def test_dig() -> None:
    doc = {"sessions": [{"id": "s1", "expires_on": "x"}], "a": {"b": 0}}
    assert dig(doc, "sessions.0.id") == "s1"
    assert dig(doc, "sessions.1.id") is None
    assert dig(doc, "a.b") == 0
    assert dig(doc, "a.b.c") is None
    assert dig([], "x") is None

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

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


# -- pinned by the mutation run (tests/README.md) ------------------------------------------


def test_expiry_errors_say_what_is_wrong() -> None:
    """These messages reach the 502 a user reads ("... with an unreadable expiry: ...")."""
    cases: list[tuple[Callable[[Any], float | None], object, str]] = [
        (parse_expires_at, -5, "absolute expiry is not a positive finite number"),
        (parse_expires_at, [], "absolute expiry is neither a number nor a string"),
        (parse_expires_at, "soon", "absolute expiry is not ISO 8601, epoch or /Date(ms)/"),
        (parse_expires_in, "soon", "expires_in is not a non-negative number of seconds"),
        (jwt_expiry, _jwt({"exp": "banana"}), "the JWT's exp claim is not a number"),
    ]
    for parse, value, message in cases:
        with pytest.raises(ExpiryError) as info:
            parse(value)
        assert str(info.value) == message


def test_absolute_expiry_boundaries() -> None:
    assert parse_expires_at(1) == 1.0  # positive: read (the manager then calls it expired)
    assert parse_expires_at(0.5) == 0.5
    assert parse_expires_at(1e11) == 1e11  # the threshold itself is still seconds
    assert parse_expires_at(1e11 + 1) == pytest.approx(1e8)


def test_naive_iso_times_are_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert parse_expires_at("2015-02-16T13:54:41") == 1424094881.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("pad", range(12))
def test_jwt_exp_whatever_the_base64_padding(pad: int) -> None:
    # Payload lengths of every residue mod 4 (and mod 5): padding is added as needed.
    assert jwt_expiry(_jwt({"exp": 1700000000, "p": "x" * pad})) == 1700000000.0

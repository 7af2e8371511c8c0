"""What the Redis store holds: sealed values and key names (SPEC §8 promise 6)."""

from __future__ import annotations

import time

from proxy.tokens import sealing
from proxy.tokens.sealing import VERSION, sealer_for
from proxy.tokens.store import Record

MATERIAL = b'{"flow":{"request":{"basic":{"password":"hunter2-secret"}}}}'
RECORD = Record("token-value-123", 1.0, 2.0, "refresh-value-456", 3.0)


def test_a_sealed_record_opens_only_with_its_own_identity() -> None:
    mine, other = sealer_for(MATERIAL, "authproxy"), sealer_for(MATERIAL + b" ", "authproxy")
    sealed = mine.seal(RECORD)
    assert mine.open(sealed) == RECORD
    assert other.open(sealed) is None  # another secret: a miss, not an error
    assert sealer_for(MATERIAL, "other-prefix").open(sealed) is None


def test_sealed_bytes_reveal_nothing_and_never_repeat() -> None:
    sealer = sealer_for(MATERIAL, "authproxy")
    first, second = sealer.seal(RECORD), sealer.seal(RECORD)
    assert first != second  # a random nonce each time
    assert first[0] == VERSION and len(first) > 1 + 12 + 16
    for part in (b"token-value-123", b"refresh-value-456", b"hunter2"):
        assert part not in first
    assert "hunter2" not in sealer.name and len(sealer.name) == 32
    int(sealer.name, 16)  # hex: the key name is derived, not the identity


def test_tampering_another_version_or_another_name_is_a_miss() -> None:
    sealer = sealer_for(MATERIAL, "authproxy")
    sealed = bytearray(sealer.seal(RECORD))
    flipped = bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1])
    assert sealer.open(flipped) is None
    assert sealer.open(bytes([VERSION + 1]) + bytes(sealed[1:])) is None
    assert sealer.open(b"") is None and sealer.open(b"\x01short") is None
    # The key name is the associated data: a value moved under another key does not open.
    moved = sealing.Sealer("0" * 32, sealer.aead)
    assert moved.open(bytes(sealed)) is None


def test_scrypt_runs_once_per_identity_per_process() -> None:
    material = b"a fresh identity " + str(time.time()).encode()
    started = time.perf_counter()
    first = sealer_for(material, "authproxy")
    stretched = time.perf_counter() - started
    started = time.perf_counter()
    assert sealer_for(material, "authproxy") is first
    cached = time.perf_counter() - started
    assert stretched > 0.01  # memory-hard: a guess costs real time
    assert cached < stretched / 10


def test_an_entry_lives_as_long_as_its_longest_part() -> None:
    assert Record("t", 0, 10, "r", 100).lives_until() == 100
    assert Record("t", 0, 10).lives_until() == 10
    assert Record(None, failures=2, backoff_until=50).lives_until() == 50
    assert Record("t", 0, 10, failures=1, backoff_until=30).lives_until() == 30
    assert Record("t", 0, None).lives_until() is None

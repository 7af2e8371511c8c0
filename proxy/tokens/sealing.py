"""What the Redis store holds, sealed: key names and values reveal nothing (SPEC §8.6).

    master   = scrypt(identity material, salt = "authproxy token store:" + key prefix)
                                                                   once per process
    key name = HKDF(master, info="authproxy token-store name v1")  hex, in the Redis key
    aead key = HKDF(master, info="authproxy token-store aead v1")  AES-256-GCM
    value    = version byte ‖ 96-bit random nonce ‖ AES-GCM(record JSON, aad = key name)

The identity material holds the upstream's secrets; a password is low-entropy,
so plain HKDF would let anyone who reads Redis brute-force it offline: scrypt
(memory-hard, ~50-100 ms) makes every guess expensive. It runs once per identity
per process, at start-up, never on the hot path. A value that does not open
(another secret, another version, tampering) is a miss, never an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from proxy.tokens.store import Record

VERSION = 1
# scrypt's interactive-login parameters: 16 MiB and ~50-100 ms per derivation.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
NONCE_BYTES = 12
_NAME_INFO = b"authproxy token-store name v1"
_AEAD_INFO = b"authproxy token-store aead v1"


@dataclass(frozen=True, slots=True)
class Sealer:
    name: str  # hex: the per-identity part of every Redis key
    aead: AESGCM = field(repr=False)

    def seal(self, record: Record) -> bytes:
        plain = json.dumps(asdict(record), separators=(",", ":")).encode()
        nonce = os.urandom(NONCE_BYTES)
        return bytes([VERSION]) + nonce + self.aead.encrypt(nonce, plain, self.name.encode())

    def open(self, sealed: bytes) -> Record | None:
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[0] != VERSION:
            return None
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            plain = self.aead.decrypt(nonce, body, self.name.encode())
            return Record(**json.loads(plain))
        except (InvalidTag, ValueError, TypeError):
            return None


_CACHE: dict[tuple[bytes, bytes], Sealer] = {}


def sealer_for(material: bytes, salt: str) -> Sealer:
    """The sealer for one identity: scrypt once per process, then from the cache."""
    key = (material, b"authproxy token store:" + salt.encode())
    found = _CACHE.get(key)
    if found is None:
        master = Scrypt(salt=key[1], length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(material)
        name = _hkdf(master, _NAME_INFO, 16).hex()
        found = _CACHE[key] = Sealer(name, AESGCM(_hkdf(master, _AEAD_INFO, 32)))
    return found


def _hkdf(master: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)

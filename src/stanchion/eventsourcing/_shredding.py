"""Crypto-shredding: encrypt personal data per subject; forget the subject by deleting its key.

Events are never rewritten, so personal data must not sit in them in the
clear. Encrypt each personal field with the data subject's own key before
recording it; to honour an erasure request, delete the key: every copy of the
ciphertext (events, backups, read models built from them) becomes unreadable
at once, and the audit trail keeps its shape.

The cipher uses only the standard library: HMAC-SHA256 as a PRF in counter
mode for the keystream, then HMAC-SHA256 over nonce and ciphertext
(encrypt-then-MAC, independent subkeys, 128-bit random nonce, 128-bit tag).
Tokens are ``"shred:v1:" + urlsafe base64``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any, final

import msgspec

from stanchion.errors import ConfigError
from stanchion.eventsourcing._api import EventStore

__all__ = ["CryptoShredder"]

_PREFIX = "shred:v1:"


def _subkeys(key: bytes) -> tuple[bytes, bytes]:
    return (
        hmac.new(key, b"stanchion-shred-enc", hashlib.sha256).digest(),
        hmac.new(key, b"stanchion-shred-mac", hashlib.sha256).digest(),
    )


def _keystream(key: bytes, nonce: bytes, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(out[:size])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@final
class CryptoShredder:
    """Per-subject encryption keys kept in the event store's database.

    Example::

        shredder = CryptoShredder(store)
        email = await shredder.encrypt("customer-42", "ann@example.com")
        await store.append("customer-42", [NewEvent("Registered", {"email": email})])
        await shredder.decrypt("customer-42", email)   # "ann@example.com"
        await shredder.forget("customer-42")           # erasure request
        await shredder.decrypt("customer-42", email)   # None: shredded

    .. versionadded:: 0.1
    """

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder().decode

    async def encrypt(self, subject: str, value: Any) -> str:
        """Encrypt a JSON-able ``value`` with ``subject``'s key (created on first use)."""
        backend = self._store._backend
        key = await backend.get_key(subject)
        if key is None:
            key = await backend.put_key(subject, os.urandom(32))
        enc, mac = _subkeys(key)
        nonce = os.urandom(16)
        plain = self._encode(value)
        cipher = _xor(plain, _keystream(enc, nonce, len(plain))) if plain else b""
        tag = hmac.new(mac, nonce + cipher, hashlib.sha256).digest()[:16]
        return _PREFIX + base64.urlsafe_b64encode(nonce + cipher + tag).decode()

    async def decrypt(self, subject: str, token: str) -> Any:
        """The value, or ``None`` when the subject's key has been deleted.

        Raises:
            ConfigError: the token is malformed or was not made with this key.
        """
        if not isinstance(token, str) or not token.startswith(_PREFIX):
            raise ConfigError("not a crypto-shredding token (expected 'shred:v1:...')")
        key = await self._store._backend.get_key(subject)
        if key is None:
            return None
        blob = base64.urlsafe_b64decode(token[len(_PREFIX) :])
        nonce, cipher, tag = blob[:16], blob[16:-16], blob[-16:]
        enc, mac = _subkeys(key)
        expect = hmac.new(mac, nonce + cipher, hashlib.sha256).digest()[:16]
        if len(blob) < 32 or not hmac.compare_digest(tag, expect):
            raise ConfigError(f"token does not belong to subject {subject!r} (or was altered)")
        plain = _xor(cipher, _keystream(enc, nonce, len(cipher))) if cipher else b""
        return self._decode(plain)

    async def forget(self, subject: str) -> None:
        """Delete ``subject``'s key: its encrypted data can never be read again."""
        await self._store._backend.delete_key(subject)

    async def is_forgotten(self, subject: str) -> bool:
        """True when ``subject`` has no key (never had one, or it was deleted)."""
        return await self._store._backend.get_key(subject) is None

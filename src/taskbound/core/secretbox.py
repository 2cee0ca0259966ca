"""Secrets at rest (DESIGN.md §6): AES-256-GCM under a key-encryption key (KEK).

Signing keys and upstream credentials are stored as :class:`SecretBox` blobs. The KEK comes
from the environment or a file at the edge (STYLE.md rule 5) and is handed in as bytes.
Blob format, version 1: ``0x01 || nonce (12 bytes) || ciphertext || tag (16 bytes)``, with
the caller's ``aad`` (for example the row's id and purpose) bound by GCM (NIST SP 800-38D)
so that a blob cannot be moved to another row.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from taskbound.errors import DecryptionFailed

__all__ = ["KEK_BYTES", "SecretBox", "generate_kek", "parse_kek"]

#: A KEK is an AES-256 key.
KEK_BYTES: Final = 32
_VERSION: Final = b"\x01"
_NONCE_BYTES: Final = 12  # 96-bit nonces, SP 800-38D §8.2.2 (random construction)
_TAG_BYTES: Final = 16
_HEX: Final = re.compile(r"[0-9A-Fa-f]{64}")
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class SecretBox:
    """AES-256-GCM with random 96-bit nonces. With random nonces a key must not seal more
    than 2^32 messages (SP 800-38D §8.3); secrets at rest stay far below that."""

    __slots__ = ("_aead",)

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, bytes | bytearray) or len(kek) != KEK_BYTES:
            raise ValueError("the KEK must be exactly 32 bytes")
        self._aead = AESGCM(bytes(kek))

    def __repr__(self) -> str:
        return "SecretBox(<kek>)"

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Seal ``plaintext``, authenticating ``aad`` too, as a version-1 blob."""
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """Open a blob sealed with the same KEK and ``aad``.

        Any failure (unknown version, truncation, tampering, wrong KEK or ``aad``) raises
        :class:`~taskbound.errors.DecryptionFailed`.
        """
        if not isinstance(blob, bytes | bytearray):
            raise DecryptionFailed(internal="blob is not bytes")
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise DecryptionFailed(internal="blob too short")
        if blob[:1] != _VERSION:
            raise DecryptionFailed(internal=f"unknown blob version {blob[0]}")
        nonce = bytes(blob[1 : 1 + _NONCE_BYTES])
        try:
            return self._aead.decrypt(nonce, bytes(blob[1 + _NONCE_BYTES :]), aad)
        except InvalidTag:
            raise DecryptionFailed(internal="authentication failed") from None


def parse_kek(text: str) -> bytes:
    """A KEK from text: 64 hex digits, or base64url or standard base64 (padding optional)
    of exactly 32 bytes. Surrounding whitespace is ignored. ``ValueError`` otherwise; the
    message never repeats the input."""
    value = "".join(text.split())
    if _HEX.fullmatch(value):
        return bytes.fromhex(value)
    if _BASE64.fullmatch(value):
        alphabet = None
    elif _BASE64URL.fullmatch(value):
        alphabet = b"-_"
    else:
        raise ValueError("the KEK is not hex or base64 text")
    unpadded = value.rstrip("=")
    padded = unpadded + "=" * (-len(unpadded) % 4)
    try:
        key = base64.b64decode(padded, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the KEK is not valid base64") from None
    if len(key) != KEK_BYTES:
        raise ValueError(f"the KEK must decode to {KEK_BYTES} bytes, not {len(key)}")
    return key


def generate_kek() -> str:
    """A new random KEK as base64url text (no padding)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEK_BYTES)).rstrip(b"=").decode("ascii")

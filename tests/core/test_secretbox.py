"""Secrets at rest: AES-256-GCM blobs under a KEK, and KEK parsing."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from taskbound.core.secretbox import KEK_BYTES, SecretBox, generate_kek, parse_kek
from taskbound.errors import DecryptionFailed

KEK = bytes(range(32))
AAD = b"signing_key:kid-1"


def test_round_trip_and_format() -> None:
    box = SecretBox(KEK)
    blob = box.encrypt(b"secret", aad=AAD)
    assert blob[0] == 1
    assert len(blob) == 1 + 12 + len(b"secret") + 16
    assert box.decrypt(blob, aad=AAD) == b"secret"
    # The format is plain AES-256-GCM: any implementation can open it.
    assert AESGCM(KEK).decrypt(blob[1:13], blob[13:], AAD) == b"secret"


def test_nonces_are_fresh() -> None:
    box = SecretBox(KEK)
    blobs = {box.encrypt(b"same", aad=AAD) for _ in range(50)}
    assert len(blobs) == 50


def test_empty_plaintext() -> None:
    box = SecretBox(KEK)
    assert box.decrypt(box.encrypt(b"", aad=b""), aad=b"") == b""


@pytest.mark.parametrize("kek", [b"", b"x" * 31, b"x" * 33, "x" * 32, None])
def test_kek_must_be_32_bytes(kek: Any) -> None:
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        SecretBox(kek)


def test_repr_hides_kek() -> None:
    assert KEK.hex() not in repr(SecretBox(KEK))


def _flip(blob: bytes, index: int) -> bytes:
    data = bytearray(blob)
    data[index] ^= 1
    return bytes(data)


@pytest.mark.parametrize(
    ("mutate", "aad", "kek", "reason"),
    [
        (lambda b: b, b"other-row", KEK, "authentication failed"),
        (lambda b: b, AAD, bytes(32), "authentication failed"),
        (lambda b: _flip(b, 0), AAD, KEK, "unknown blob version"),
        (lambda b: _flip(b, 5), AAD, KEK, "authentication failed"),
        (lambda b: _flip(b, 14), AAD, KEK, "authentication failed"),
        (lambda b: _flip(b, -1), AAD, KEK, "authentication failed"),
        (lambda b: b[:-1], AAD, KEK, "authentication failed"),
        (lambda b: b[:28], AAD, KEK, "too short"),
        (lambda b: b"", AAD, KEK, "too short"),
        (lambda b: b + b"\x00", AAD, KEK, "authentication failed"),
        (lambda b: "text", AAD, KEK, "not bytes"),
    ],
)
def test_decrypt_failures(mutate: Any, aad: bytes, kek: bytes, reason: str) -> None:
    blob = SecretBox(KEK).encrypt(b"upstream-token", aad=AAD)
    with pytest.raises(DecryptionFailed) as info:
        SecretBox(kek).decrypt(mutate(blob), aad=aad)
    assert reason in info.value.internal
    assert info.value.code == "decryption_failed"


KEY_BYTES = bytes(range(100, 132))
KEY_B64 = base64.b64encode(KEY_BYTES).decode()


@pytest.mark.parametrize(
    "text",
    [
        KEY_BYTES.hex(),
        KEY_BYTES.hex().upper(),
        base64.urlsafe_b64encode(KEY_BYTES).decode(),
        base64.urlsafe_b64encode(KEY_BYTES).decode().rstrip("="),
        base64.b64encode(KEY_BYTES).decode(),
        base64.b64encode(KEY_BYTES).decode().rstrip("="),
        "  " + KEY_BYTES.hex() + "\n",
        base64.b64encode(KEY_BYTES).decode()[:20]
        + "\n"
        + base64.b64encode(KEY_BYTES).decode()[20:],
    ],
)
def test_parse_kek(text: str) -> None:
    assert parse_kek(text) == KEY_BYTES


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not hex or base64"),
        ("zz" * 32, "decode to 32 bytes, not 48"),
        ("#" * 64, "not hex or base64"),
        (KEY_BYTES.hex()[:-2], "decode to 32 bytes"),
        (base64.b64encode(KEY_BYTES[:31]).decode(), "decode to 32 bytes"),
        (base64.b64encode(KEY_BYTES + b"x").decode(), "decode to 32 bytes"),
        (base64.b64encode(b"\xfb" * 32).decode() + "-", "not hex or base64"),
        ("A" * 43 + "===", "not hex or base64"),
        ("A", "not valid base64"),
        ("é" * 43, "not hex or base64"),
    ],
)
def test_parse_kek_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_kek(text)
    assert text.strip() == "" or text not in str(info.value)


def test_generate_kek() -> None:
    text = generate_kek()
    assert len(text) == 43
    assert "=" not in text
    assert len(parse_kek(text)) == KEK_BYTES
    assert generate_kek() != text

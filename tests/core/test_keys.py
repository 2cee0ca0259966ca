"""Keys, JWK thumbprints (RFC 7638) and key rings (RFC 7517 §5)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, OKPKey

from taskbound.core.keys import (
    MAX_KEYS,
    KeyRing,
    PrivateKey,
    generate_key,
    jwk_thumbprint,
    parse_public_jwk,
    private_key_from_bytes,
    private_key_to_bytes,
    public_jwk,
)

from ._crypto import b64, key, public_members, rsa_native

VECTORS = Path(__file__).parent.parent / "vectors" / "wycheproof"

RFC_EXAMPLES = json.loads((VECTORS.parent / "rfc_examples.json").read_text())
THUMBPRINTS = RFC_EXAMPLES["thumbprints"]
RFC7638_JWK: dict[str, str] = THUMBPRINTS[0]["jwk"]
RFC7638_THUMBPRINT: str = THUMBPRINTS[0]["thumbprint"]
RFC8037_JWK: dict[str, str] = THUMBPRINTS[1]["jwk"]
RFC8037_THUMBPRINT: str = THUMBPRINTS[1]["thumbprint"]


def ec_jwk(crv: str = "P-256") -> dict[str, str]:
    return {k: v for k, v in ECKey.generate_key(crv).as_dict().items() if k != "d"}


def rsa_public(bits: int = 2048) -> dict[str, str]:
    numbers = rsa_native(bits).public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": b64(n), "e": b64(numbers.e.to_bytes(3, "big"))}


def roca_modulus_jwk() -> dict[str, Any]:
    """The ROCA key of wycheproof's json_web_key_test.json (tcId 7)."""
    data = json.loads((VECTORS / "json_web_key_test.json").read_text())
    for group in data["testGroups"]:
        if group["comment"] == "jws_rsa_roca_key":
            return dict(group["public"]["keys"][0])
    raise AssertionError("ROCA vector missing")


# --- generation and storage -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_generate_key_names_key_by_thumbprint(alg: str) -> None:
    k = generate_key(alg)
    assert k.alg == alg
    assert k.kid == jwk_thumbprint(public_jwk(k))
    assert k.key.is_private
    assert isinstance(k.key, OKPKey if alg == "EdDSA" else ECKey)


@pytest.mark.parametrize("alg", ["RS256", "HS256", "none", "ES384", "Ed25519", "", "es256"])
def test_generate_key_refuses_other_algorithms(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported signing algorithm"):
        generate_key(alg)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_private_key_bytes_round_trip(alg: str) -> None:
    k = generate_key(alg)
    data = private_key_to_bytes(k)
    loaded = private_key_from_bytes(data, alg)
    assert loaded.kid == k.kid
    assert loaded.alg == alg
    assert public_jwk(loaded) == public_jwk(k)
    assert json.loads(data)["d"]


def test_private_key_repr_hides_secret() -> None:
    k = key("EdDSA")
    text = repr(k)
    assert json.loads(private_key_to_bytes(k))["d"] not in text
    assert k.kid in text


def _tamper(alg: str, edit: str) -> bytes:
    k = key(alg)
    jwk = json.loads(private_key_to_bytes(k))
    other = json.loads(private_key_to_bytes(key(alg, 1)))
    if edit == "other_public":
        jwk["x"] = other["x"]
    elif edit == "no_d":
        del jwk["d"]
    elif edit == "bad_d":
        jwk["d"] = "!!"
    elif edit == "kty":
        jwk["kty"] = "RSA"
    return json.dumps(jwk).encode()


@pytest.mark.parametrize(
    ("data", "alg", "reason"),
    [
        (b"not json", "EdDSA", "not JSON"),
        (b"[]", "EdDSA", "not a JSON object"),
        (b"\xff", "ES256", "not JSON"),
        (None, "EdDSA", "not JSON"),
        ("ed-as-ec", "ES256", "is not a EC/P-256 key"),
        ("ec-as-ed", "EdDSA", "is not a OKP/Ed25519 key"),
        ("no_d", "EdDSA", "no private member"),
        ("bad_d", "ES256", "invalid private key|not a base64url"),
        ("other_public", "EdDSA", "do not match"),
        ("other_public", "ES256", "invalid private key|do not match"),
        ("kty", "ES256", "is not a EC/P-256 key"),
        (b"{}", "RS256", "unsupported signing algorithm"),
    ],
)
def test_private_key_from_bytes_rejects(data: Any, alg: str, reason: str) -> None:
    if data == "ed-as-ec":
        data = private_key_to_bytes(key("EdDSA"))
    elif data == "ec-as-ed":
        data = private_key_to_bytes(key("ES256"))
    elif isinstance(data, str):
        data = _tamper(alg, data)
    with pytest.raises(ValueError, match=reason):
        private_key_from_bytes(data, alg)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_public_jwk_has_exactly_public_members(alg: str) -> None:
    jwk = public_jwk(key(alg))
    expected = {"kty", "crv", "x", "kid", "alg", "use"} | ({"y"} if alg == "ES256" else set())
    assert set(jwk) == expected
    assert jwk["use"] == "sig"
    assert all(isinstance(v, str) for v in jwk.values())


# --- thumbprints ----------------------------------------------------------------------


@pytest.mark.parametrize("case", THUMBPRINTS, ids=[c["rfc"] for c in THUMBPRINTS])
def test_thumbprint_matches_rfc_examples(case: dict[str, Any]) -> None:
    assert jwk_thumbprint(case["jwk"]) == case["thumbprint"]


def test_thumbprint_ignores_private_members() -> None:
    """RFC 7638 §3.2.1: a private key has the thumbprint of its public half."""
    jwk = {**RFC8037_JWK, "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}
    assert jwk_thumbprint(jwk) == RFC8037_THUMBPRINT


def test_thumbprint_uses_canonical_base64urluint() -> None:
    """A leading zero octet in ``n`` is not part of the Base64urlUInt (RFC 7518 §2)."""
    n = base64.urlsafe_b64decode(RFC7638_JWK["n"] + "==")
    assert jwk_thumbprint({**RFC7638_JWK, "n": b64(b"\x00" + n)}) == RFC7638_THUMBPRINT


def _off_curve() -> dict[str, str]:
    jwk = ec_jwk()
    y = bytearray(base64.urlsafe_b64decode(jwk["y"] + "="))
    y[-1] ^= 1
    return {**jwk, "y": b64(bytes(y))}


@pytest.mark.parametrize(
    ("jwk", "reason"),
    [
        ({"kty": "oct", "k": "AAAA"}, "unsupported key type"),
        ({"kty": "EC", "crv": "P-256", "x": "AAAA"}, "'y' is not"),
        ({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}, "must be 32 bytes"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "unsupported EC curve"),
        ({"kty": "OKP", "crv": "X25519", "x": "AAAA"}, "unsupported OKP curve"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}, "must be 32 bytes"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AA=="}, "not a base64url"),
        ({"kty": "RSA", "n": "AQAB"}, "'e' is not"),
        ([], "JSON object"),
        ("jwk", "JSON object"),
        ({}, "unsupported key type"),
    ],
)
def test_thumbprint_rejects_unsupported_or_malformed(jwk: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        jwk_thumbprint(jwk)


def test_parse_public_jwk_rejects_private_members() -> None:
    with pytest.raises(ValueError, match="private members: d"):
        parse_public_jwk({**RFC8037_JWK, "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"})


def test_parse_public_jwk_rejects_point_off_curve() -> None:
    with pytest.raises(ValueError, match="invalid EC key"):
        parse_public_jwk(_off_curve())


# --- key rings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jwk", "alg"),
    [
        (RFC8037_JWK, "EdDSA"),
        (ec_jwk("P-256"), "ES256"),
        (ec_jwk("P-384"), "ES384"),
        (ec_jwk("P-521"), "ES512"),
        (RFC7638_JWK | {"alg": None}, "RS256"),
    ],
)
def test_from_jwks_infers_alg_and_names_key_by_thumbprint(jwk: dict[str, Any], alg: str) -> None:
    jwk = {k: v for k, v in jwk.items() if k not in ("alg", "kid")}
    ring = KeyRing.from_jwks({"keys": [jwk]})
    kid = jwk_thumbprint(jwk)
    assert ring.kids() == {kid}
    registered = ring.get(kid)
    assert registered is not None
    assert registered[0] == alg
    assert not registered[1].is_private


def test_from_jwks_keeps_declared_alg_and_kid() -> None:
    ring = KeyRing.from_jwks({"keys": [RFC7638_JWK | {"alg": "PS256"}]})
    assert ring.kids() == {"2011-04-29"}
    assert ring.get("2011-04-29") is not None
    assert ring.get("2011-04-29")[0] == "PS256"  # type: ignore[index]
    assert ring.get("other") is None


def test_from_jwks_accepts_spiffe_bundle_use() -> None:
    bundle = {
        "keys": [
            {**public_members(key("ES256")), "kid": "svid", "use": "jwt-svid"},
            {**public_members(key("ES256", 1)), "kid": "x509", "use": "x509-svid"},
        ],
        "spiffe_sequence": 7,
    }
    ring = KeyRing.from_jwks(bundle)
    assert ring.kids() == {"svid"}
    assert ring.skipped == (("x509", "use is 'x509-svid', not a signature key"),)


def _many(n: int) -> list[dict[str, str]]:
    jwk = public_members(key("EdDSA"))
    return [{**jwk, "kid": f"k{i}"} for i in range(n)]


@pytest.mark.parametrize(
    ("jwks", "reason"),
    [
        ([], "JSON object"),
        ({}, "'keys' array"),
        ({"keys": {}}, "'keys' array"),
        ({"keys": _many(MAX_KEYS + 1)}, "more than 100"),
        ({"keys": ["x"]}, "not a JSON object"),
        ({"keys": [{**RFC8037_JWK, "d": "AAAA"}]}, "private or secret members: d"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}, "members: k"),
        ({"keys": [RFC7638_JWK | {"p": "AA", "q": "AA"}]}, "members: p, q"),
        ({"keys": [RFC8037_JWK | {"kid": "a"}, RFC7638_JWK | {"kid": "a"}]}, "duplicate kid"),
        ({"keys": [ec_jwk("P-384") | {"alg": "ES256"}]}, "does not fit a EC/P-384 key"),
        ({"keys": [ec_jwk("P-256") | {"alg": "RS256"}]}, "does not fit a EC/P-256 key"),
        ({"keys": [RFC8037_JWK | {"alg": "ES256"}]}, "does not fit a OKP/Ed25519 key"),
        ({"keys": [_off_curve()]}, "invalid EC key"),
        ({"keys": [rsa_public(1024)]}, "RSA key too small: 1024"),
        ({"keys": [RFC7638_JWK | {"e": "Aw"}]}, "exponent not acceptable: 3"),
        ({"keys": [RFC7638_JWK | {"e": "AQ"}]}, "exponent not acceptable: 1"),
        ({"keys": [roca_modulus_jwk()]}, "ROCA"),
        ({"keys": [RFC8037_JWK | {"kid": 7}]}, "kid must be"),
        ({"keys": [RFC8037_JWK | {"kid": ""}]}, "kid must be"),
        ({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}, "must be 32 bytes"),
    ],
)
def test_from_jwks_rejects(jwks: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        KeyRing.from_jwks(jwks)


@pytest.mark.parametrize(
    ("jwk", "reason"),
    [
        (RFC8037_JWK | {"use": "enc"}, "use is 'enc'"),
        (RFC8037_JWK | {"use": ["sig"]}, "not a signature key"),
        (RFC8037_JWK | {"key_ops": ["sign"]}, "does not allow 'verify'"),
        (RFC8037_JWK | {"key_ops": "verify"}, "does not allow 'verify'"),
        (RFC7638_JWK | {"alg": "RSA-OAEP"}, "encryption algorithm"),
        (RFC8037_JWK | {"alg": "ES521"}, "unsupported signature algorithm: 'ES521'"),
        (RFC8037_JWK | {"alg": "HS256"}, "unsupported signature algorithm: 'HS256'"),
        ({"kty": "OKP", "crv": "X25519", "x": "AAAA"}, "unsupported OKP curve"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "unsupported EC curve"),
        ({"kty": "AKP", "alg": "ML-DSA-44", "pub": "AAAA"}, "unsupported key type: 'AKP'"),
    ],
)
def test_from_jwks_skips_keys_it_cannot_use(jwk: dict[str, Any], reason: str) -> None:
    ring = KeyRing.from_jwks({"keys": [jwk, RFC8037_JWK | {"kid": "good"}]})
    assert ring.kids() == {"good"}
    assert len(ring.skipped) == 1
    assert reason in ring.skipped[0][1]


def test_roca_check_passes_ordinary_moduli() -> None:
    for bits in (2048, 3072):
        KeyRing.from_jwks({"keys": [rsa_public(bits)]})
    KeyRing.from_jwks({"keys": [RFC7638_JWK]})


def test_from_private_and_to_jwks_round_trip() -> None:
    keys: list[PrivateKey] = [key("EdDSA"), key("ES256"), key("EdDSA")]
    ring = KeyRing.from_private(keys)
    assert ring.kids() == {key("EdDSA").kid, key("ES256").kid}
    assert len(ring) == 2
    jwks = ring.to_jwks()
    for jwk in jwks["keys"]:
        assert "d" not in jwk
        assert jwk["use"] == "sig"
    again = KeyRing.from_jwks(jwks)
    assert again.kids() == ring.kids()
    for kid in ring.kids():
        assert again.get(kid) is not None
        assert ring.get(kid) is not None
        assert again.get(kid)[0] == ring.get(kid)[0]  # type: ignore[index]
    assert again.to_jwks() == jwks
    assert "KeyRing(kids=" in repr(ring)

"""Signing keys, public JWKs and verification key rings.

Implements the key handling of JSON Web Key (RFC 7517), the key types of RFC 7518 §6 and
RFC 8037 §2, and JWK thumbprints (RFC 7638). Keys are named by their RFC 7638 thumbprint
(DESIGN.md §4). Every algorithm decision here follows RFC 8725 §3.1: a key is registered
with exactly one algorithm, and a verifier only ever uses a key for that algorithm.

Pure: no I/O, no clock. Randomness is used only to generate new private keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey
from joserfc.jwk import thumbprint as _rfc7638_thumbprint
from joserfc.util import urlsafe_b64decode, urlsafe_b64encode

__all__ = [
    "MAX_KEYS",
    "SIGNING_ALGORITHMS",
    "VERIFICATION_ALGORITHMS",
    "KeyRing",
    "PrivateKey",
    "algorithm_key",
    "generate_key",
    "jwk_thumbprint",
    "parse_public_jwk",
    "private_key_from_bytes",
    "private_key_to_bytes",
    "public_jwk",
]

#: Algorithms taskbound signs with (DESIGN.md §4): Ed25519 by default, P-256 available.
SIGNING_ALGORITHMS: Final = frozenset({"EdDSA", "ES256"})

# Asymmetric JWS algorithms (RFC 7518 §3, RFC 8037 §3.1, RFC 9864 §2) and the only key type
# and curve each may be used with. HMAC and "none" are deliberately absent: a verifier that
# cannot be handed a symmetric algorithm cannot be tricked into the HS256-with-a-public-key
# confusion (RFC 8725 §2.1).
_ALGORITHM_KEYS: Final[Mapping[str, tuple[str, str | None]]] = {
    "EdDSA": ("OKP", "Ed25519"),
    "Ed25519": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
}

#: Every algorithm a verifier in taskbound can be configured to accept.
VERIFICATION_ALGORITHMS: Final = frozenset(_ALGORITHM_KEYS)

#: The most keys one JWK Set may carry; a bigger set is refused rather than trusted.
MAX_KEYS: Final = 100

# RFC 7518 §6.2.2, §6.3.2, §6.4 and RFC 8037 §2: members that hold secret material.
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# Key-management algorithms of JWE (RFC 7518 §4): a key registered for one of these is an
# encryption key that a JWK Set may legitimately publish next to its signing keys.
_ENCRYPTION_ALGORITHMS: Final = frozenset(
    {
        "RSA1_5",
        "RSA-OAEP",
        "RSA-OAEP-256",
        "RSA-OAEP-384",
        "RSA-OAEP-512",
        "A128KW",
        "A192KW",
        "A256KW",
        "dir",
        "ECDH-ES",
        "ECDH-ES+A128KW",
        "ECDH-ES+A192KW",
        "ECDH-ES+A256KW",
        "A128GCMKW",
        "A192GCMKW",
        "A256GCMKW",
        "PBES2-HS256+A128KW",
        "PBES2-HS384+A192KW",
        "PBES2-HS512+A256KW",
    }
)

# "sig" is RFC 7517 §4.2; "jwt-svid" is what a SPIFFE trust bundle uses for the keys that
# sign JWT-SVIDs (SPIFFE Trust Domain and Bundle §4.2.2).
_SIGNATURE_USES: Final = frozenset({"sig", "jwt-svid"})

_COORDINATE_BYTES: Final[Mapping[str, int]] = {"P-256": 32, "P-384": 48, "P-521": 66}
_ED25519_KEY_BYTES: Final = 32

# RSA bounds: 2048 bits is the floor of RFC 7518 §3.3; the ceiling bounds verification cost.
# The exponent range is FIPS 186-5 §A.1.1 (odd, 2^16 < e < 2^256).
_RSA_MIN_BITS: Final = 2048
_RSA_MAX_BITS: Final = 8192
_RSA_MIN_EXPONENT: Final = 65537
_RSA_MAX_EXPONENT_BITS: Final = 256

_MAX_KID_LENGTH: Final = 256
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_decode(value: object, member: str) -> bytes:
    """Decode a base64url member without padding, strictly (RFC 7515 §2, RFC 7517 §3)."""
    if not isinstance(value, str) or not value or _B64URL.fullmatch(value) is None:
        raise ValueError(f"JWK member {member!r} is not a base64url string")
    try:
        return urlsafe_b64decode(value.encode("ascii"))
    except ValueError as exc:
        raise ValueError(f"JWK member {member!r} is not canonical base64url") from exc


def _b64url(data: bytes) -> str:
    return urlsafe_b64encode(data).decode("ascii")


def _uint(value: object, member: str) -> int:
    """A Base64urlUInt (RFC 7518 §2). Leading zero octets are tolerated on input because
    some issuers emit them; the canonical form is used for thumbprints."""
    data = _b64url_decode(value, member)
    return int.from_bytes(data, "big")


def _uint_b64(number: int) -> str:
    return _b64url(number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big"))


# ROCA (CVE-2017-15361): RSA moduli from the vulnerable Infineon library are products of
# primes of the form k*M + (65537^a mod M). So n mod r lies in the subgroup generated by
# 65537 modulo every small prime r dividing M. A random modulus passes that test for all of
# the primes below with negligible probability (Nemec et al., CCS 2017, §2.3).
_ROCA_PRIMES: Final = (
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73,
    79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
)  # fmt: skip


def _subgroup(generator: int, modulus: int) -> frozenset[int]:
    members = {1}
    value = generator % modulus
    while value not in members:
        members.add(value)
        value = value * generator % modulus
    return frozenset(members)


_ROCA_SUBGROUPS: Final = tuple((r, _subgroup(65537, r)) for r in _ROCA_PRIMES)


def _has_roca_fingerprint(modulus: int) -> bool:
    return all(modulus % r in group for r, group in _ROCA_SUBGROUPS)


def _check_rsa(n: int, e: int) -> None:
    bits = n.bit_length()
    if bits < _RSA_MIN_BITS:
        raise ValueError(f"RSA key too small: {bits} bits < {_RSA_MIN_BITS}")
    if bits > _RSA_MAX_BITS:
        raise ValueError(f"RSA key too large: {bits} bits > {_RSA_MAX_BITS}")
    if n % 2 == 0:
        raise ValueError("RSA modulus is even")
    if e % 2 == 0 or e < _RSA_MIN_EXPONENT or e.bit_length() > _RSA_MAX_EXPONENT_BITS:
        raise ValueError(f"RSA public exponent not acceptable: {e}")
    if _has_roca_fingerprint(n):
        raise ValueError("RSA modulus has the ROCA fingerprint (CVE-2017-15361)")


def _public_members(jwk: Mapping[str, Any]) -> dict[str, str]:
    """The RFC 7638 §3.2 required public members of ``jwk``, validated and canonical."""
    kty = jwk.get("kty")
    if kty == "OKP":
        crv = jwk.get("crv")
        if crv != "Ed25519":
            raise ValueError(f"unsupported OKP curve: {crv!r}")
        x = _b64url_decode(jwk.get("x"), "x")
        if len(x) != _ED25519_KEY_BYTES:
            raise ValueError("Ed25519 public key must be 32 bytes")
        return {"crv": crv, "kty": kty, "x": _b64url(x)}
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _COORDINATE_BYTES:
            raise ValueError(f"unsupported EC curve: {crv!r}")
        size = _COORDINATE_BYTES[crv]
        x = _b64url_decode(jwk.get("x"), "x")
        y = _b64url_decode(jwk.get("y"), "y")
        # RFC 7518 §6.2.1.2/§6.2.1.3: coordinates are full-length octet strings; an
        # alternative length would be a second spelling of the same key.
        if len(x) != size or len(y) != size:
            raise ValueError(f"EC coordinates for {crv} must be {size} bytes")
        return {"crv": crv, "kty": kty, "x": _b64url(x), "y": _b64url(y)}
    if kty == "RSA":
        n = _uint(jwk.get("n"), "n")
        e = _uint(jwk.get("e"), "e")
        _check_rsa(n, e)
        return {"e": _uint_b64(e), "kty": kty, "n": _uint_b64(n)}
    raise ValueError(f"unsupported key type: {kty!r}")


def _import_public(members: Mapping[str, str]) -> ECKey | OKPKey | RSAKey:
    try:
        key = JWKRegistry.import_key(dict(members))
    except (JoseError, ValueError, TypeError) as exc:
        # e.g. an EC point that is not on the curve (invalid-curve attacks)
        raise ValueError(f"invalid {members.get('kty')} key: {exc}") from None
    if isinstance(key, ECKey | OKPKey | RSAKey) and not key.is_private:
        return key
    raise ValueError("not an asymmetric public key")


def parse_public_jwk(jwk: Mapping[str, Any]) -> tuple[dict[str, str], ECKey | OKPKey | RSAKey]:
    """Validate a public JWK and import it (RFC 7517 §4, RFC 7518 §6, RFC 8037 §2).

    Returns the canonical public members (exactly those RFC 7638 hashes) and the joserfc
    public key. Raises ``ValueError`` when the JWK carries private members, is of an
    unsupported type or curve, is malformed, or is a weak RSA key.
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("a JWK must be a JSON object")
    private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
    if private:
        raise ValueError(f"JWK has private members: {', '.join(private)}")
    members = _public_members(jwk)
    return members, _import_public(members)


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of ``jwk``, base64url without padding.

    Only the required public members are hashed (RFC 7638 §3.2), so a private JWK has the
    thumbprint of its public half. Raises ``ValueError`` for unsupported or malformed keys.
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("a JWK must be a JSON object")
    public = {k: v for k, v in jwk.items() if k not in _PRIVATE_MEMBERS}
    members, _ = parse_public_jwk(public)
    return _thumbprint(members)


def _thumbprint(members: Mapping[str, str]) -> str:
    return _rfc7638_thumbprint(dict(members), "sha256")


@dataclass(frozen=True)
class PrivateKey:
    """A private signing key, named by the RFC 7638 thumbprint of its public JWK."""

    kid: str
    alg: str
    key: OKPKey | ECKey

    def __repr__(self) -> str:
        # Never let the private scalar reach a log through a repr.
        return f"PrivateKey(kid={self.kid!r}, alg={self.alg!r})"


def _expected_key(alg: str) -> tuple[str, str]:
    if alg not in SIGNING_ALGORITHMS:
        raise ValueError(f"unsupported signing algorithm: {alg!r}")
    kty, crv = _ALGORITHM_KEYS[alg]
    assert crv is not None
    return kty, crv


_CURVE_NAMES: Final[Mapping[str, str]] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}


def _public_of(key: OKPKey | ECKey) -> dict[str, str]:
    """The public members derived from the key material itself. joserfc's ``as_dict``
    echoes the members a key was imported from, which for a tampered private JWK need not
    belong to its ``d``."""
    native = key.public_key
    if isinstance(native, Ed25519PublicKey):
        raw = native.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return _public_members({"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)})
    if isinstance(native, EllipticCurvePublicKey) and native.curve.name in _CURVE_NAMES:
        crv = _CURVE_NAMES[native.curve.name]
        size = _COORDINATE_BYTES[crv]
        numbers = native.public_numbers()
        return _public_members(
            {
                "kty": "EC",
                "crv": crv,
                "x": _b64url(numbers.x.to_bytes(size, "big")),
                "y": _b64url(numbers.y.to_bytes(size, "big")),
            }
        )
    raise ValueError("not an Ed25519 or NIST-curve key")


def generate_key(alg: str) -> PrivateKey:
    """A fresh signing key: ``EdDSA`` (Ed25519, RFC 8037 §3.1) or ``ES256`` (P-256, RFC 7518
    §3.4). The ``kid`` is the RFC 7638 thumbprint of the public key."""
    kty, crv = _expected_key(alg)
    key: OKPKey | ECKey
    if kty == "OKP":
        key = OKPKey.generate_key("Ed25519", private=True)
    else:
        key = ECKey.generate_key(crv, private=True)
    return PrivateKey(kid=_thumbprint(_public_of(key)), alg=alg, key=key)


def private_key_to_bytes(key: PrivateKey) -> bytes:
    """The private JWK (RFC 7517 §4, RFC 7518 §6.2.2, RFC 8037 §2) as UTF-8 JSON.

    The result is secret: callers encrypt it before it is stored (DESIGN.md §6).
    """
    members = {**_public_of(key.key), "d": key.key.as_dict(private=True)["d"]}
    return json.dumps(members, sort_keys=True, separators=(",", ":")).encode("utf-8")


def private_key_from_bytes(data: bytes, alg: str) -> PrivateKey:
    """Load a key written by :func:`private_key_to_bytes` for ``alg``.

    Checks that the key type and curve match ``alg`` and that the public members belong to
    the private scalar, then recomputes the ``kid``. Raises ``ValueError`` otherwise.
    """
    kty, crv = _expected_key(alg)
    try:
        jwk = json.loads(data)
    except (ValueError, TypeError) as exc:
        raise ValueError("private key is not JSON") from exc
    if not isinstance(jwk, dict):
        raise ValueError("private key is not a JSON object")
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        raise ValueError(f"private key is not a {kty}/{crv} key as {alg} needs")
    if not isinstance(jwk.get("d"), str):
        raise ValueError("private key has no private member 'd'")
    claimed = _public_members({k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y")})
    members = {k: jwk[k] for k in ("kty", "crv", "x", "y", "d") if k in jwk}
    try:
        key = JWKRegistry.import_key(members)
    except (JoseError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid private key: {exc}") from None
    if not isinstance(key, OKPKey | ECKey) or not key.is_private:
        raise ValueError("not a private key")
    derived = _public_of(key)
    if derived != claimed:
        raise ValueError("public members do not match the private key")
    return PrivateKey(kid=_thumbprint(derived), alg=alg, key=key)


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public JWK of ``key`` as published in a JWKS (RFC 7517 §4, §5): key members,
    ``kid``, ``alg`` and ``use: sig``. Never includes private members."""
    return {**_public_of(key.key), "kid": key.kid, "alg": key.alg, "use": "sig"}


def _infer_alg(members: Mapping[str, str]) -> str:
    kty = members["kty"]
    if kty == "OKP":
        return "EdDSA"
    if kty == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[members["crv"]]
    return "RS256"


@dataclass(frozen=True)
class _Entry:
    alg: str
    key: ECKey | OKPKey | RSAKey
    jwk: Mapping[str, str]


class KeyRing:
    """Verification keys by ``kid``, each registered with exactly one algorithm.

    A verifier selects a key only by the token's ``kid`` and only for the algorithm the key
    is registered with (RFC 8725 §3.1); keys are never taken from the token itself.
    """

    __slots__ = ("_entries", "skipped")

    def __init__(
        self, entries: Mapping[str, _Entry], skipped: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._entries: dict[str, _Entry] = dict(entries)
        #: Keys of the source JWK Set that are not signature-verification keys, as
        #: ``(kid or position, reason)``, so that the caller can log what was left out.
        self.skipped = skipped

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeyRing:
        """Build a ring from a JWK Set (RFC 7517 §5).

        Refused with ``ValueError``: a set that is not ``{"keys": [...]}``, holds more than
        :data:`MAX_KEYS` keys, holds any key with private or symmetric members (RFC 7517 §9.2:
        a public set must not carry secrets), repeats a ``kid``, or holds a malformed or weak
        key of a supported type, or a key whose ``alg`` contradicts its type or curve.

        Left out and listed in :attr:`skipped` (RFC 7517 §5: keys that cannot be used are
        ignored): keys whose ``use`` or ``key_ops`` say they are not for verifying
        signatures, keys registered for a JWE algorithm, and keys of a type, curve or JWS
        algorithm taskbound does not implement.

        A key without ``kid`` is named by its RFC 7638 thumbprint. Without ``alg`` the
        algorithm is inferred: OKP/Ed25519 -> EdDSA, EC P-256/P-384/P-521 -> ES256/ES384/
        ES512, RSA -> RS256.
        """
        if not isinstance(jwks, Mapping):
            raise ValueError("a JWK Set must be a JSON object")
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise ValueError("a JWK Set needs a 'keys' array")
        if len(keys) > MAX_KEYS:
            raise ValueError(f"JWK Set has {len(keys)} keys, more than {MAX_KEYS}")
        entries: dict[str, _Entry] = {}
        skipped: list[tuple[str, str]] = []
        for position, jwk in enumerate(keys):
            if not isinstance(jwk, Mapping):
                raise ValueError(f"key #{position} is not a JSON object")
            label = str(jwk.get("kid", f"#{position}"))
            private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
            if private:
                raise ValueError(f"key {label}: private or secret members: {', '.join(private)}")
            reason = _unusable(jwk)
            if reason is not None:
                skipped.append((label, reason))
                continue
            try:
                entry = _entry_from_jwk(jwk)
            except _Unsupported as exc:
                skipped.append((label, str(exc)))
                continue
            except ValueError as exc:
                raise ValueError(f"key {label}: {exc}") from None
            kid = entry.jwk["kid"]
            if kid in entries:
                raise ValueError(f"duplicate kid: {kid!r}")
            entries[kid] = entry
        return cls(entries, tuple(skipped))

    @classmethod
    def from_private(cls, keys: Iterable[PrivateKey]) -> KeyRing:
        """The verification ring for our own signing keys (current and retiring)."""
        entries: dict[str, _Entry] = {}
        for key in keys:
            jwk = public_jwk(key)
            _, public = parse_public_jwk(
                {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y")}
            )
            entries[key.kid] = _Entry(alg=key.alg, key=public, jwk=jwk)
        return cls(entries)

    def get(self, kid: str) -> tuple[str, Any] | None:
        """``(alg, joserfc public key)`` registered for ``kid``, or ``None``."""
        entry = self._entries.get(kid)
        if entry is None:
            return None
        return entry.alg, entry.key

    def kids(self) -> frozenset[str]:
        return frozenset(self._entries)

    def to_jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517 §5) with ``kid``, ``alg`` and ``use`` on every key."""
        return {"keys": [dict(entry.jwk) for entry in self._entries.values()]}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing(kids={sorted(self._entries)!r})"


class _Unsupported(ValueError):
    """A well-formed key that taskbound cannot use; RFC 7517 §5 says to ignore it."""


def _unusable(jwk: Mapping[str, Any]) -> str | None:
    """Why ``jwk`` is not a signature-verification key, per its own metadata."""
    use = jwk.get("use")
    if use is not None and not (isinstance(use, str) and use in _SIGNATURE_USES):
        return f"use is {use!r}, not a signature key"
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return f"key_ops {key_ops!r} does not allow 'verify'"
    alg = jwk.get("alg")
    if isinstance(alg, str) and alg in _ENCRYPTION_ALGORITHMS:
        return f"alg {alg!r} is an encryption algorithm"
    return None


def _entry_from_jwk(jwk: Mapping[str, Any]) -> _Entry:
    kty = jwk.get("kty")
    if kty not in ("OKP", "EC", "RSA"):
        raise _Unsupported(f"unsupported key type: {kty!r}")
    crv = jwk.get("crv")
    if kty == "OKP" and crv != "Ed25519":
        raise _Unsupported(f"unsupported OKP curve: {crv!r}")
    if kty == "EC" and not (isinstance(crv, str) and crv in _COORDINATE_BYTES):
        raise _Unsupported(f"unsupported EC curve: {crv!r}")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in VERIFICATION_ALGORITHMS):
        raise _Unsupported(f"unsupported signature algorithm: {alg!r}")
    members, public = parse_public_jwk(jwk)
    if alg is None:
        alg = _infer_alg(members)
    else:
        need_kty, need_crv = _ALGORITHM_KEYS[alg]
        if members["kty"] != need_kty or (need_crv is not None and members["crv"] != need_crv):
            have = f"{members['kty']}/{members.get('crv', '-')}"
            raise ValueError(f"alg {alg} does not fit a {have} key")
    kid = jwk.get("kid")
    if kid is None:
        kid = _thumbprint(members)
    elif not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH:
        raise ValueError("kid must be a non-empty string of at most 256 characters")
    return _Entry(alg=alg, key=public, jwk={**members, "kid": kid, "alg": alg, "use": "sig"})


def algorithm_key(alg: str) -> tuple[str, str | None]:
    """The key type and curve (``None`` for RSA) an asymmetric JWS ``alg`` requires."""
    return _ALGORITHM_KEYS[alg]

"""The one JWS verification path every taskbound verifier uses.

Compact serialization only (RFC 7515 §7.1), checked the way RFC 8725 §3 asks: the algorithm
comes from local configuration and the key's registration, never from the token alone; the
key is selected by ``kid`` from a trusted :class:`~taskbound.core.keys.KeyRing` (or, for DPoP,
from the proof's own ``jwk`` header, RFC 9449 §4.3); ``none``, HMAC, ``crit`` and
key-carrying headers are refused; the ``typ`` is explicit (RFC 8725 §3.11).

joserfc does the cryptography and the encodings: its strict base64url codec (which refuses
padding, foreign characters and non-canonical trailing bits), its JWK import and its JWS
algorithm objects. The three segments are split here rather than by
``joserfc.jws.deserialize_compact`` because that accepts duplicate JSON members (RFC 7515 §5.2
lets a verifier keep the last one, a parser differential we refuse), caps headers at 512
bytes (too small for an RSA ``jwk`` in a DPoP proof) and emits joserfc's RFC 9864
``SecurityWarning`` on every EdDSA verification.

Every failure raises :class:`Rejected` with a precise reason; the verifiers turn it into the
error of their protocol. No exception from joserfc, ``json`` or ``base64`` leaves this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry, serialize_compact
from joserfc.util import urlsafe_b64decode

from taskbound.core.keys import VERIFICATION_ALGORITHMS, KeyRing, PrivateKey, algorithm_key

__all__ = [
    "CompactJWS",
    "Rejected",
    "TypRule",
    "audience_contains",
    "check_alg",
    "check_header",
    "check_validity",
    "decode_claims",
    "numeric_date",
    "parse_compact",
    "require_aware",
    "require_str",
    "sign_compact",
    "verify_signature",
    "verify_with_keyring",
]

# RFC 7515 §4.1.2-§4.1.6 (and x5t, which only names a certificate: harmless, so allowed):
# headers that would let the token choose or deliver its own verification key.
_KEY_HEADERS: Final = ("jwk", "jku", "x5u", "x5c")

_MAX_KID_LENGTH: Final = 256


class Rejected(Exception):
    """A JWS or its claims failed a check; ``reason`` says exactly which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CompactJWS:
    """A structurally valid compact JWS whose signature has NOT been checked yet."""

    header: Mapping[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


@dataclass(frozen=True)
class TypRule:
    """Accepted ``typ`` values, compared per RFC 7515 §4.1.9 (case-insensitive media types,
    ``application/`` prefix optional)."""

    allowed: frozenset[str]
    required: bool


def require_aware(now: datetime) -> None:
    """Naive datetimes are a programming error, not a token error (DESIGN.md invariant 5)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def _decode_segment(segment: str, name: str) -> bytes:
    try:
        return urlsafe_b64decode(segment.encode("ascii"))
    except (ValueError, UnicodeError):
        raise Rejected(f"malformed {name}: not canonical base64url") from None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    """Strict JSON (RFC 8259): UTF-8, no duplicate members (RFC 7515 §5.2, RFC 7519 §4), no
    NaN/Infinity, no lone surrogates; the top level must be an object."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
        # A lone surrogate ("\ud800") decodes fine but cannot be stored or re-encoded.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError) as exc:
        raise Rejected(f"malformed {name}: {exc}") from None
    if not isinstance(value, dict):
        raise Rejected(f"malformed {name}: not a JSON object")
    return value


def parse_compact(raw: object, *, max_length: int) -> CompactJWS:
    """Split and decode a compact JWS (RFC 7515 §7.1, §5.2 steps 1-4) without trusting it.

    The length cap is applied before any parsing.
    """
    if not isinstance(raw, str):
        raise Rejected("not a string")
    if len(raw) > max_length:
        raise Rejected(f"too long: {len(raw)} > {max_length} characters")
    if not raw:
        raise Rejected("empty")
    parts = raw.split(".")
    if len(parts) != 3:
        # A JWE (5 parts) or the JSON serialization (RFC 7515 §7.2) ends here.
        raise Rejected(f"not a compact JWS: {len(parts)} segments")
    header_segment, payload_segment, signature_segment = parts
    if not header_segment:
        raise Rejected("malformed header: empty")
    if not signature_segment:
        raise Rejected("missing signature")
    header = _json_object(_decode_segment(header_segment, "header"), "header")
    payload = _decode_segment(payload_segment, "payload")
    signature = _decode_segment(signature_segment, "signature")
    return CompactJWS(
        header=header,
        payload=payload,
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
    )


def decode_claims(token: CompactJWS) -> dict[str, Any]:
    """The payload as a JWT Claims Set (RFC 7519 §7.2 step 10): a strict JSON object."""
    return _json_object(token.payload, "claims")


def _normalise_typ(value: str) -> str:
    lowered = value.lower()
    prefix = "application/"
    if lowered.startswith(prefix) and "/" not in lowered[len(prefix) :]:
        return lowered[len(prefix) :]
    return lowered


def check_alg(header: Mapping[str, Any], algorithms: Collection[str]) -> str:
    """RFC 8725 §3.1/§3.2: ``alg`` must be present, not ``none``, on the allow-list and an
    asymmetric algorithm taskbound implements."""
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise Rejected("missing alg")
    if alg.lower() == "none":
        raise Rejected("alg none")
    names = (algorithms,) if isinstance(algorithms, str) else tuple(algorithms)
    if alg not in names:
        raise Rejected(f"alg not allowed: {alg}")
    if alg not in VERIFICATION_ALGORITHMS:
        raise Rejected(f"alg not supported: {alg}")
    return alg


def check_header(header: Mapping[str, Any], typ: TypRule, *, key_headers: bool = False) -> None:
    """``crit`` (RFC 7515 §4.1.11: we understand no extension, so any ``crit`` is fatal),
    RFC 7797 ``b64``, key-carrying headers unless ``key_headers``, and ``typ``."""
    if "crit" in header:
        raise Rejected("crit header not supported")
    if "b64" in header:
        raise Rejected("b64 header not supported")
    if not key_headers:
        for name in _KEY_HEADERS:
            if name in header:
                raise Rejected(f"header not allowed: {name}")
    value = header.get("typ")
    if value is None:
        if typ.required:
            raise Rejected("missing typ")
        return
    if not isinstance(value, str) or _normalise_typ(value) not in typ.allowed:
        raise Rejected(f"wrong typ: {value!r}")


def verify_signature(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """The signature primitive of every verifier: joserfc's JWS algorithm object for ``alg``
    (RFC 7518 §3, RFC 8037 §3.1), after checking that ``key`` has the type and curve ``alg``
    requires. Any failure, including a library error, is ``False``."""
    if alg not in VERIFICATION_ALGORITHMS:
        return False
    kty, crv = algorithm_key(alg)
    if getattr(key, "key_type", None) != kty:
        return False
    if crv is not None and getattr(key, "curve_name", None) != crv:
        return False
    model = JWSRegistry.algorithms.get(alg)
    if model is None:
        return False
    try:
        model.check_key(key)
        return bool(model.verify(signing_input, signature, key))
    except (JoseError, ValueError, TypeError):
        return False


def verify_with_keyring(
    token: CompactJWS, *, keys: KeyRing, algorithms: Collection[str], typ: TypRule
) -> tuple[str, str]:
    """Verify ``token`` with the key its ``kid`` names in ``keys`` (RFC 7515 §5.2 steps 5-8,
    RFC 8725 §3.1): ``alg`` on the allow-list AND equal to the key's registered algorithm.

    Returns ``(alg, kid)``.
    """
    alg = check_alg(token.header, algorithms)
    check_header(token.header, typ)
    kid = token.header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Rejected("missing kid")
    if len(kid) > _MAX_KID_LENGTH:
        raise Rejected("kid too long")
    registered = keys.get(kid)
    if registered is None:
        raise Rejected("unknown kid")
    key_alg, key = registered
    if key_alg != alg:
        raise Rejected(f"alg does not match key: token {alg}, key {key_alg}")
    if not verify_signature(alg, key, token.signing_input, token.signature):
        raise Rejected("bad signature")
    return alg, kid


def numeric_date(
    claims: Mapping[str, Any], name: str, *, required: bool, integer: bool
) -> datetime | None:
    """A NumericDate claim (RFC 7519 §2) as an aware UTC datetime. ``integer`` demands whole
    seconds, as taskbound mints them."""
    value = claims.get(name)
    if value is None:
        if required:
            raise Rejected(f"missing {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(f"{name} is not a number")
    if integer and not isinstance(value, int):
        raise Rejected(f"{name} is not an integer")
    if not math.isfinite(value) or value < 0:
        raise Rejected(f"{name} out of range")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise Rejected(f"{name} out of range") from None


def check_validity(
    claims: Mapping[str, Any],
    *,
    now: datetime,
    leeway: timedelta,
    require_nbf: bool,
    require_iat: bool,
    integer: bool,
) -> tuple[datetime, datetime | None, datetime | None]:
    """``exp`` (required), ``nbf`` and ``iat`` against ``now`` with ``leeway`` (RFC 7519 §4.1.4,
    §4.1.5, §4.1.6). Returns ``(exp, nbf, iat)``."""
    exp = numeric_date(claims, "exp", required=True, integer=integer)
    nbf = numeric_date(claims, "nbf", required=require_nbf, integer=integer)
    iat = numeric_date(claims, "iat", required=require_iat, integer=integer)
    assert exp is not None
    # Every comparison shifts ``now``, never the claim: a claim near datetime.max plus the
    # leeway would overflow.
    if now - leeway >= exp:
        raise Rejected("expired")
    if nbf is not None and now + leeway < nbf:
        raise Rejected("not yet valid")
    if iat is not None and now + leeway < iat:
        raise Rejected("issued in the future")
    return exp, nbf, iat


def require_str(claims: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = claims.get(name)
    if value is None:
        raise Rejected(f"missing {name}")
    if not isinstance(value, str):
        raise Rejected(f"{name} is not a string")
    if not value and not allow_empty:
        raise Rejected(f"{name} is empty")
    return value


def audience_contains(claims: Mapping[str, Any], audience: str) -> None:
    """RFC 7519 §4.1.3: ``aud`` is a string or an array of strings that must name us."""
    aud = claims.get("aud")
    if aud is None:
        raise Rejected("missing aud")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values:
        raise Rejected("aud is not a string or a non-empty array")
    if not all(isinstance(v, str) for v in values):
        raise Rejected("aud has a non-string member")
    if audience not in values:
        raise Rejected("audience mismatch")


def _encode_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def sign_compact(header: Mapping[str, Any], claims: Mapping[str, Any], key: PrivateKey) -> str:
    """Sign ``claims`` as a compact JWS (RFC 7515 §5.1) with joserfc, pinned to ``key.alg``."""
    if header.get("alg") != key.alg:
        raise ValueError("header alg must be the key's algorithm")
    return serialize_compact(dict(header), _encode_json(claims), key.key, algorithms=[key.alg])

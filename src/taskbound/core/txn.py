"""Transaction tokens (IETF draft-ietf-oauth-transaction-tokens-10): the signed context of
one call that the gateway hands to the tool it forwards the call to.

A Txn-Token is a short-lived JWT (§7, header ``typ: txntoken+jwt``) whose ``aud`` names the
trust domain it is valid in (for taskbound: the tool's audience, or the audience of the
tool's own authorization server), ``txn`` the transaction (the task's chain), ``sub`` the
principal (the task's agent), ``scope`` the purpose, ``tctx`` the immutable transaction
context and ``rctx`` the request's environment; ``req_wl`` names the workload that made it.
It travels in the ``Txn-Token`` HTTP header (§10.1), never in ``Authorization``.

:func:`verify_txn_token` checks everything in one call, the way every verifier here does
(RFC 8725 §3): algorithm pinned by configuration and equal to the key's, key by ``kid``
from a trusted key ring only, ``typ`` txntoken+jwt, exact ``iss``, ``aud`` one string equal
to the expected audience, ``exp``/``iat`` with leeway, a bounded lifetime and a size cap.
Any failure is an :class:`InvalidTxnToken` whose ``internal`` names the exact reason.

Pure: no clock, no randomness (the caller passes ``now`` and the ``jti``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from taskbound.core import jws
from taskbound.core.clock import to_epoch
from taskbound.core.keys import KeyRing, PrivateKey
from taskbound.errors import InvalidToken

__all__ = [
    "MAX_LENGTH",
    "MAX_LIFETIME",
    "TXN_TOKEN_HEADER",
    "TXN_TOKEN_TYPE",
    "TYP",
    "InvalidTxnToken",
    "TxnToken",
    "mint_txn_token",
    "verify_txn_token",
]

#: The JWT ``typ`` header of a Txn-Token (draft §7.1).
TYP: Final = "txntoken+jwt"
#: The HTTP header a Txn-Token travels in (draft §10.1).
TXN_TOKEN_HEADER: Final = "Txn-Token"  # noqa: S105 - a header name, not a secret
#: The RFC 8693 token type identifier of a Txn-Token (draft §9.1, §14.1).
TXN_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:txn_token"  # noqa: S105 - a URN, not a secret
#: Txn-Tokens live "on the order of minutes or less" (draft §5): taskbound never mints or
#: accepts one whose lifetime is longer than this.
MAX_LIFETIME: Final = timedelta(minutes=10)
#: The largest Txn-Token minted or accepted (it rides in an HTTP header).
MAX_LENGTH: Final = 8192

_TYP_RULE: Final = jws.TypRule(allowed=frozenset({TYP}), required=True)


class InvalidTxnToken(InvalidToken):
    """A Txn-Token failed verification (forged, expired, foreign, malformed: one answer)."""

    code = "invalid_txn_token"
    default_detail = "the transaction token is not valid"


@dataclass(frozen=True)
class TxnToken:
    """What a verified Txn-Token says (draft §7.2)."""

    issuer: str
    audience: str
    txn: str
    subject: str
    scope: str
    requesting_workload: str  # req_wl
    issued_at: datetime
    expires_at: datetime
    kid: str
    tctx: Mapping[str, Any] = field(default_factory=dict)
    rctx: Mapping[str, Any] = field(default_factory=dict)
    jti: str | None = None


def _epoch(name: str, when: datetime) -> int:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return to_epoch(when)


def mint_txn_token(
    *,
    issuer: str,
    audience: str,
    txn: str,
    subject: str,
    scope: str,
    tctx: Mapping[str, Any],
    rctx: Mapping[str, Any],
    now: datetime,
    ttl: timedelta,
    key: PrivateKey,
    requesting_workload: str | None = None,
    jti: str | None = None,
) -> str:
    """Sign a Txn-Token with ``key`` (draft §7).

    Header: ``alg`` (the key's), ``typ: txntoken+jwt``, ``kid``. Payload: ``iss``, ``aud``
    (one string), ``iat``, ``exp`` = ``now`` + ``ttl`` (whole seconds), ``txn``, ``sub``,
    ``scope``, ``req_wl`` (``requesting_workload``, default the issuer), ``tctx``, ``rctx``
    and, when given, ``jti`` — pass a fresh random one so no two tokens are alike.
    """
    for name, value in (
        ("issuer", issuer),
        ("audience", audience),
        ("txn", txn),
        ("subject", subject),
        ("scope", scope),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"a Txn-Token needs a non-empty {name}")
    if not timedelta(0) < ttl <= MAX_LIFETIME:
        raise ValueError(f"a Txn-Token lives more than 0 s and at most {MAX_LIFETIME}")
    if not isinstance(tctx, Mapping) or not isinstance(rctx, Mapping):
        raise ValueError("tctx and rctx must be JSON objects")
    issued = _epoch("now", now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "iat": issued,
        "exp": issued + int(ttl.total_seconds()),
        "txn": txn,
        "sub": subject,
        "scope": scope,
        "req_wl": requesting_workload or issuer,
        # Detached from the caller's objects, and refused now if JSON cannot carry them.
        "tctx": json.loads(json.dumps(dict(tctx), allow_nan=False)),
        "rctx": json.loads(json.dumps(dict(rctx), allow_nan=False)),
    }
    if jti is not None:
        payload["jti"] = jti
    token = jws.sign_compact({"alg": key.alg, "typ": TYP, "kid": key.kid}, payload, key)
    if len(token) > MAX_LENGTH:
        raise ValueError(f"the Txn-Token would be {len(token)} characters, above {MAX_LENGTH}")
    return token


def verify_txn_token(
    raw: str,
    *,
    keys: KeyRing,
    issuer: str,
    audience: str,
    algorithms: Collection[str],
    now: datetime,
    leeway: timedelta,
    max_length: int = MAX_LENGTH,
    max_lifetime: timedelta = MAX_LIFETIME,
) -> TxnToken:
    """Verify a Txn-Token completely (draft §10.2, RFC 8725 §3) and return what it says.

    In order: length cap; compact JWS; ``alg`` on ``algorithms``; no ``crit``/``jwk``/``jku``/
    ``x5u``/``x5c``; ``typ`` txntoken+jwt; key by ``kid`` from ``keys`` only, registered for
    that same ``alg``; signature; exact ``iss``; ``aud`` a single string equal to
    ``audience``; ``exp`` and ``iat`` (whole seconds) with ``leeway``; a lifetime of at most
    ``max_lifetime``; ``txn``, ``sub``, ``scope``, ``req_wl`` strings; ``tctx``/``rctx``
    objects when present.

    Raises :class:`InvalidTxnToken` with a precise ``internal`` reason.
    """
    jws.require_aware(now)
    try:
        token = jws.parse_compact(raw, max_length=max_length)
        _, kid = jws.verify_with_keyring(token, keys=keys, algorithms=algorithms, typ=_TYP_RULE)
        claims = jws.decode_claims(token)
        return _txn_claims(
            claims,
            kid=kid,
            issuer=issuer,
            audience=audience,
            now=now,
            leeway=leeway,
            max_lifetime=max_lifetime,
        )
    except jws.Rejected as exc:
        raise InvalidTxnToken(internal=exc.reason) from None


def _txn_claims(
    claims: Mapping[str, Any],
    *,
    kid: str,
    issuer: str,
    audience: str,
    now: datetime,
    leeway: timedelta,
    max_lifetime: timedelta,
) -> TxnToken:
    if jws.require_str(claims, "iss") != issuer:
        raise jws.Rejected("issuer mismatch")
    aud = claims.get("aud")
    if aud is None:
        raise jws.Rejected("missing aud")
    if not isinstance(aud, str):
        # One token, one trust domain (draft §7.2: "MUST NOT be accepted outside" it).
        raise jws.Rejected("aud is not a single string")
    if aud != audience:
        raise jws.Rejected("audience mismatch")
    exp, _, iat = jws.check_validity(
        claims, now=now, leeway=leeway, require_nbf=False, require_iat=True, integer=True
    )
    assert iat is not None
    if exp <= iat:
        raise jws.Rejected("exp is not after iat")
    if exp - iat > max_lifetime:
        raise jws.Rejected(f"lifetime above {int(max_lifetime.total_seconds())} s")
    txn = jws.require_str(claims, "txn")
    subject = jws.require_str(claims, "sub")
    scope = jws.require_str(claims, "scope")
    requesting_workload = jws.require_str(claims, "req_wl")
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not jti):
        raise jws.Rejected("jti is not a non-empty string")
    contexts: dict[str, dict[str, Any]] = {}
    for name in ("tctx", "rctx"):
        value = claims.get(name, {})
        if not isinstance(value, dict):
            raise jws.Rejected(f"{name} is not an object")
        contexts[name] = value
    return TxnToken(
        issuer=issuer,
        audience=aud,
        txn=txn,
        subject=subject,
        scope=scope,
        requesting_workload=requesting_workload,
        issued_at=iat,
        expires_at=exp,
        kid=kid,
        tctx=contexts["tctx"],
        rctx=contexts["rctx"],
        jti=jti,
    )

"""People signing in to the web UI: the pure parts (docs/ui.md).

* OpenID Connect, authorization code flow with PKCE (RFC 7636, ``S256``): :func:`pkce_pair`
  and :func:`verify_id_token`, which validates an ID token as OpenID Connect Core §3.1.3.7
  asks (exact ``iss``, ``aud`` containing the client id and ``azp`` when there are several
  audiences, ``alg`` on the allow-list and the key's own, key by ``kid`` from the
  provider's JWK Set only, ``exp``, ``nonce`` equal to the one sent) and names the person
  by a configured claim.
* Local passwords: :func:`check_new_password` (the length rules; hashing is Argon2id in
  the adapter).
* Session and anti-forgery tokens: :func:`new_token` and :func:`token_hash`; the cookie
  holds the token, the store only its SHA-256.

Pure: no I/O; time and keys are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from taskbound.core import jws
from taskbound.core.keys import KeyRing

__all__ = [
    "MAX_PASSWORD",
    "MIN_PASSWORD",
    "SignInRejected",
    "SignedInPerson",
    "check_new_password",
    "new_token",
    "pkce_pair",
    "token_hash",
    "verify_id_token",
]

MIN_PASSWORD: Final = 12
#: Long enough for any passphrase, short enough that hashing it costs nothing extra.
MAX_PASSWORD: Final = 256
_TYP: Final = jws.TypRule(allowed=frozenset({"jwt"}), required=False)


class SignInRejected(Exception):
    """An ID token or a password that does not pass; ``reason`` is for operators only."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class SignedInPerson:
    """Who an ID token names: its issuer and subject, and the value of the claim that maps
    the person to an owner."""

    issuer: str
    subject: str
    name: str
    expires_at: datetime


def new_token() -> str:
    """A fresh random token: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a session token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``code_verifier`` and its ``S256`` ``code_challenge`` (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)  # 64 characters, within 43..128
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_new_password(password: str) -> None:
    """``ValueError`` unless ``password`` is :data:`MIN_PASSWORD` to :data:`MAX_PASSWORD`
    characters with no control characters (NIST SP 800-63B §5.1.1.2: length, not
    composition rules)."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"a password has at most {MAX_PASSWORD} characters")
    if any(not ch.isprintable() for ch in password):
        raise ValueError("a password may not contain control characters")


def verify_id_token(
    raw: str,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    keys: KeyRing,
    algorithms: Collection[str],
    name_claim: str,
    now: datetime,
    leeway: timedelta,
    max_length: int = 16_384,
) -> SignedInPerson:
    """The person an ID token names, or :class:`SignInRejected`."""
    jws.require_aware(now)
    if not nonce:
        raise ValueError("nonce must be non-empty")
    try:
        token = jws.parse_compact(raw, max_length=max_length)
        jws.verify_with_keyring(token, keys=keys, algorithms=algorithms, typ=_TYP)
        claims = jws.decode_claims(token)
        if jws.require_str(claims, "iss") != issuer:
            raise jws.Rejected("issuer mismatch")
        jws.audience_contains(claims, client_id)
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
            raise jws.Rejected("several audiences and azp is not this client")
        if "azp" in claims and claims["azp"] != client_id:
            raise jws.Rejected("azp is another client")
        expires_at, _, _ = jws.check_validity(
            claims, now=now, leeway=leeway, require_nbf=False, require_iat=True, integer=False
        )
        got = claims.get("nonce")
        if not isinstance(got, str) or not secrets.compare_digest(got, nonce):
            raise jws.Rejected("nonce mismatch")
        subject = jws.require_str(claims, "sub")
        name = _name(claims, name_claim)
    except jws.Rejected as exc:
        raise SignInRejected(str(exc)) from None
    return SignedInPerson(issuer=issuer, subject=subject, name=name, expires_at=expires_at)


def _name(claims: Mapping[str, Any], claim: str) -> str:
    value = claims.get(claim)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise jws.Rejected(f"claim {claim} is missing or not a short string")
    if claim == "email" and claims.get("email_verified") is False:
        raise jws.Rejected("the email address is not verified")
    return value

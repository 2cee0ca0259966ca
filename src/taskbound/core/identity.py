"""Workload identity: SPIFFE IDs, JWT-SVIDs and OIDC tokens mapped to SPIFFE IDs.

An agent proves what it is (DESIGN.md §3.2) with a JWT-SVID checked against its trust
domain's bundle (SPIFFE JWT-SVID §3, §4), or with an OIDC ID token from a configured issuer
(OpenID Connect Core §3.1.3.7) whose claims are mapped to a SPIFFE ID by an
:class:`OIDCRule`. Both verifiers share the JWS path of :mod:`taskbound.core.jws`. Failures
raise :class:`~taskbound.errors.InvalidIdentity` with a precise ``internal`` reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from joserfc.util import urlsafe_b64decode

from taskbound.core import jws
from taskbound.core.clock import to_epoch
from taskbound.core.keys import VERIFICATION_ALGORITHMS, KeyRing, PrivateKey
from taskbound.errors import InvalidIdentity

__all__ = [
    "OIDCRule",
    "SpiffeId",
    "WorkloadIdentity",
    "mint_jwt_svid",
    "parse_spiffe_id",
    "unverified_issuer",
    "verify_jwt_svid",
    "verify_oidc_token",
]

_SCHEME: Final = "spiffe://"
_MAX_SPIFFE_ID_BYTES: Final = 2048
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT: Final = re.compile(r"[A-Za-z0-9._-]+")
# JWT-SVID §2.3 and OIDC: "JWT" or "JOSE" when present. Refusing every other typ keeps an
# access token or a DPoP proof from being replayed as an identity token (RFC 8725 §3.11).
_TYP: Final = jws.TypRule(allowed=frozenset({"jwt", "jose"}), required=False)
_PLACEHOLDER: Final = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class SpiffeId:
    """A SPIFFE ID (SPIFFE-ID §2): ``spiffe://<trust_domain><path>``; ``path`` is empty or
    starts with ``/``."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse ``value`` per SPIFFE-ID §2 (and §2.3 for the length limit).

    Scheme exactly ``spiffe``; a trust domain of lower-case letters, digits, ``.``, ``-``,
    ``_`` (so no port, userinfo, upper case or percent-encoding); path segments of letters,
    digits, ``.``, ``-``, ``_``, none empty, ``.`` or ``..``; no trailing ``/``; no query or
    fragment; at most 2048 bytes. Raises ``ValueError`` saying what is wrong.
    """
    if not isinstance(value, str):
        raise ValueError("SPIFFE ID must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > _MAX_SPIFFE_ID_BYTES:
        raise ValueError("SPIFFE ID longer than 2048 bytes")
    if not value.startswith(_SCHEME):
        raise ValueError("SPIFFE ID must start with 'spiffe://'")
    rest = value[len(_SCHEME) :]
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain:
        raise ValueError("SPIFFE ID has no trust domain")
    if _TRUST_DOMAIN.fullmatch(trust_domain) is None:
        raise ValueError("trust domain may only hold lower-case letters, digits, '.', '-' and '_'")
    if not slash:
        return SpiffeId(trust_domain=trust_domain, path="")
    for segment in path.split("/"):
        if not segment:
            raise ValueError("SPIFFE ID path has an empty segment or a trailing '/'")
        if segment in (".", ".."):
            raise ValueError("SPIFFE ID path has a '.' or '..' segment")
        if _PATH_SEGMENT.fullmatch(segment) is None:
            raise ValueError(
                "SPIFFE ID path segments may only hold letters, digits, '.', '-' and '_'"
            )
    return SpiffeId(trust_domain=trust_domain, path=f"/{path}")


@dataclass(frozen=True)
class WorkloadIdentity:
    """Who the caller is, once its workload credential has been verified."""

    spiffe_id: str
    method: Literal["jwt-svid", "oidc"]
    issuer: str
    subject: str
    expires_at: datetime


def _fail(exc: jws.Rejected) -> InvalidIdentity:
    return InvalidIdentity(internal=exc.reason)


def verify_jwt_svid(
    raw: str,
    *,
    bundles: Mapping[str, KeyRing],
    audience: str,
    algorithms: Collection[str],
    now: datetime,
    leeway: timedelta,
    max_length: int = 8192,
) -> WorkloadIdentity:
    """Validate a JWT-SVID (SPIFFE JWT-SVID §2, §3, §4).

    ``bundles`` maps a trust domain name (``example.org``, no scheme) to its JWT bundle.
    The unverified ``sub`` only selects the bundle of its trust domain; the key is then
    found by ``kid`` in that bundle alone, so one trust domain can never sign for another.
    ``alg`` must be on ``algorithms`` and be the key's registered algorithm; ``jwk``/``jku``/
    ``x5u``/``x5c``/``crit`` and ``none`` are refused; ``typ`` is absent, JWT or JOSE; ``aud``
    (string or array) contains ``audience``; ``exp`` is required; ``nbf``/``iat`` when present
    are checked with ``leeway``.
    """
    jws.require_aware(now)
    try:
        token = jws.parse_compact(raw, max_length=max_length)
        jws.check_alg(token.header, algorithms)
        jws.check_header(token.header, _TYP)
        claims = jws.decode_claims(token)
        subject = jws.require_str(claims, "sub")
        try:
            spiffe_id = parse_spiffe_id(subject)
        except ValueError as exc:
            raise jws.Rejected(f"sub is not a SPIFFE ID: {exc}") from None
        bundle = bundles.get(spiffe_id.trust_domain)
        if bundle is None:
            raise jws.Rejected(f"no bundle for trust domain {spiffe_id.trust_domain}")
        jws.verify_with_keyring(token, keys=bundle, algorithms=algorithms, typ=_TYP)
        jws.audience_contains(claims, audience)
        expires_at, _, _ = jws.check_validity(
            claims, now=now, leeway=leeway, require_nbf=False, require_iat=False, integer=False
        )
        issuer = claims.get("iss", f"{_SCHEME}{spiffe_id.trust_domain}")
        if not isinstance(issuer, str):
            raise jws.Rejected("iss is not a string")
    except jws.Rejected as exc:
        raise _fail(exc) from None
    return WorkloadIdentity(
        spiffe_id=str(spiffe_id),
        method="jwt-svid",
        issuer=issuer,
        subject=subject,
        expires_at=expires_at,
    )


def _claim_path(text: str) -> tuple[str, ...]:
    path = tuple(text.split("/"))
    if not all(path):
        raise ValueError(f"claim path {text!r} has an empty segment")
    return path


def _parse_template(template: str) -> tuple[str | tuple[str, ...], ...]:
    """Split a template into literals and claim paths; ``ValueError`` if malformed."""
    pieces: list[str | tuple[str, ...]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        pieces.append(template[position : match.start()])
        pieces.append(_claim_path(match.group(1)))
        position = match.end()
    pieces.append(template[position:])
    for piece in pieces:
        if isinstance(piece, str) and ("{" in piece or "}" in piece):
            raise ValueError("unbalanced '{' or '}' in spiffe_id_template")
    if not template.startswith(_SCHEME):
        raise ValueError("spiffe_id_template must start with 'spiffe://'")
    return tuple(pieces)


@dataclass(frozen=True)
class OIDCRule:
    """How one OIDC issuer's tokens become SPIFFE IDs.

    ``spiffe_id_template`` holds ``{a/b/c}`` placeholders, each a path through nested claim
    objects (``{kubernetes.io/namespace}`` reads ``claims["kubernetes.io"]["namespace"]``).
    ``required_claims`` maps claim paths of the same syntax to the exact string each must
    hold. The rule is checked when it is built, so a bad configuration fails at start-up.
    """

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    spiffe_id_template: str
    required_claims: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("OIDC rule needs an issuer")
        if not self.audience:
            raise ValueError("OIDC rule needs an audience")
        if isinstance(self.algorithms, str) or not self.algorithms:
            raise ValueError("OIDC rule needs a tuple of algorithms")
        unsupported = sorted(set(self.algorithms) - VERIFICATION_ALGORITHMS)
        if unsupported:
            raise ValueError(f"OIDC rule names unsupported algorithms: {unsupported}")
        _parse_template(self.spiffe_id_template)
        for name, expected in self.required_claims.items():
            _claim_path(name)
            if not isinstance(expected, str):
                raise ValueError(f"required claim {name!r} must map to a string")


def _lookup(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for segment in path:
        if not isinstance(value, dict) or segment not in value:
            raise jws.Rejected(f"missing claim {'/'.join(path)}")
        value = value[segment]
    return value


def _spiffe_id_from(template: str, claims: Mapping[str, Any]) -> SpiffeId:
    out: list[str] = []
    for piece in _parse_template(template):
        if isinstance(piece, str):
            out.append(piece)
            continue
        value = _lookup(claims, piece)
        name = "/".join(piece)
        # Each value fills one path segment: refuse '/', '..', '%' and friends so that a
        # claim cannot climb out of its place in the SPIFFE ID (path injection).
        if not isinstance(value, str) or _PATH_SEGMENT.fullmatch(value) is None:
            raise jws.Rejected(f"claim {name} is not a usable SPIFFE ID segment")
        if value in (".", ".."):
            raise jws.Rejected(f"claim {name} is a dot segment")
        out.append(value)
    try:
        return parse_spiffe_id("".join(out))
    except ValueError as exc:
        raise jws.Rejected(f"mapped SPIFFE ID is invalid: {exc}") from None


def verify_oidc_token(
    raw: str,
    *,
    rule: OIDCRule,
    keys: KeyRing,
    now: datetime,
    leeway: timedelta,
    max_length: int = 8192,
) -> WorkloadIdentity:
    """Validate an OIDC ID token (OpenID Connect Core §3.1.3.7, RFC 8725 §3) and map it to a
    SPIFFE ID with ``rule``.

    ``iss`` exactly ``rule.issuer``; ``aud`` contains ``rule.audience``; ``alg`` on
    ``rule.algorithms`` and the key's registered algorithm; key by ``kid`` from ``keys``
    only; ``exp`` required, ``nbf``/``iat`` with ``leeway``; ``sub`` present; every
    ``required_claims`` entry an exact string match; the template's values each a single
    safe path segment and the result a valid SPIFFE ID.
    """
    jws.require_aware(now)
    try:
        token = jws.parse_compact(raw, max_length=max_length)
        jws.verify_with_keyring(token, keys=keys, algorithms=rule.algorithms, typ=_TYP)
        claims = jws.decode_claims(token)
        if jws.require_str(claims, "iss") != rule.issuer:
            raise jws.Rejected("issuer mismatch")
        jws.audience_contains(claims, rule.audience)
        expires_at, _, _ = jws.check_validity(
            claims, now=now, leeway=leeway, require_nbf=False, require_iat=False, integer=False
        )
        subject = jws.require_str(claims, "sub")
        for name, expected in rule.required_claims.items():
            path = _claim_path(name)
            if _lookup(claims, path) != expected:
                raise jws.Rejected(f"claim {name} does not have the required value")
        spiffe_id = _spiffe_id_from(rule.spiffe_id_template, claims)
    except jws.Rejected as exc:
        raise _fail(exc) from None
    return WorkloadIdentity(
        spiffe_id=str(spiffe_id),
        method="oidc",
        issuer=rule.issuer,
        subject=subject,
        expires_at=expires_at,
    )


def mint_jwt_svid(
    key: PrivateKey, *, spiffe_id: str, audience: str, now: datetime, ttl: timedelta, jti: str
) -> str:
    """The development issuer (DESIGN.md §3.2): a JWT-SVID (SPIFFE JWT-SVID §2, §3) with
    header ``alg``, ``kid``, ``typ: JWT`` and claims ``sub``, ``aud`` (array of one),
    ``iat``, ``exp``, ``jti``."""
    jws.require_aware(now)
    parse_spiffe_id(spiffe_id)
    if not audience:
        raise ValueError("a JWT-SVID needs an audience")
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    if not jti:
        raise ValueError("a JWT-SVID needs a jti")
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    claims = {
        "sub": spiffe_id,
        "aud": [audience],
        "iat": to_epoch(now),
        "exp": to_epoch(now + ttl),
        "jti": jti,
    }
    return jws.sign_compact(header, claims, key)


def unverified_issuer(raw: str, *, max_length: int = 8192) -> str | None:
    """The ``iss`` claim of a compact JWT, NOT verified: only to route the token to the
    verifier configured for that issuer, which then checks everything. ``None`` when the
    token is unreadable or has no string ``iss``."""
    if not isinstance(raw, str) or len(raw) > max_length:
        return None
    parts = raw.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(urlsafe_b64decode(parts[1].encode("ascii")))
    except (ValueError, RecursionError, UnicodeError):
        return None
    if not isinstance(claims, dict):
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None

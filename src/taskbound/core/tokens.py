"""taskbound credentials: JWT access tokens per RFC 9068, one tool, one tier, one task.

A credential is an RFC 9068 access token (``typ: at+jwt``) whose audience is exactly one
tool (RFC 8707), whose scope is exactly one ``<tool>:<tier>`` with the matching RFC 9396
``authorization_details`` entry, and which is sender-constrained to a DPoP key by
``cnf.jkt`` (RFC 9449 §6.1). :func:`verify_credential` checks all of it in one call
(STYLE.md rule 2); any failure is an opaque :class:`~taskbound.errors.InvalidToken` whose
``internal`` names the exact reason.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from taskbound.core import jws
from taskbound.core.clock import to_epoch
from taskbound.core.keys import KeyRing, PrivateKey
from taskbound.core.model import Tier
from taskbound.errors import InvalidToken

__all__ = [
    "AUTHORIZATION_DETAILS_TYPE",
    "CredentialClaims",
    "mint_credential",
    "verify_credential",
]

#: The RFC 9396 ``type`` of taskbound's authorization details entry.
AUTHORIZATION_DETAILS_TYPE: Final = "taskbound_tool"

# RFC 9068 §2.1: "at+jwt" (the "application/" prefix is optional, RFC 7515 §4.1.9).
_TYP: Final = jws.TypRule(allowed=frozenset({"at+jwt"}), required=True)
_JKT: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url SHA-256, RFC 7638 §3
# RFC 6749 §3.3 scope-token characters, minus the ':' that separates tool and tier.
_TOOL: Final = re.compile(r"[\x21\x23-\x39\x3b-\x5b\x5d-\x7e]+")
_DETAIL_MEMBERS: Final = frozenset({"type", "tool", "tier", "actions", "constraints"})
# The deepest delegation chain a credential may carry (configuration sets a lower bound).
MAX_CHAIN: Final = 8


@dataclass(frozen=True)
class CredentialClaims:
    """What a credential says (RFC 9068 §2.2 plus taskbound's claims).

    Times are whole seconds on the wire; :func:`mint_credential` truncates sub-second parts.
    """

    issuer: str
    subject: str  # the agent's SPIFFE ID
    audience: str  # exactly one tool's audience URI (RFC 8707)
    client_id: str  # = the agent's SPIFFE ID; RFC 9068 §2.2 requires it
    jti: str
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    task_id: str
    owner_id: str
    purpose: str
    constraints: Mapping[str, Any]
    tool: str
    tier: Tier
    actions: tuple[str, ...]
    jkt: str
    # The transaction id every credential and audit record of the task's chain shares.
    txn: str | None = None
    # Delegation (RFC 8693 §4.1): the acting agents, the current actor first (the nested
    # ``act`` claims), and the jtis of the credentials this one was exchanged from, its
    # parent first (``tb_parents``). Empty for a credential issued at task start.
    actors: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    # RFC 8693 §4.4: the one party allowed to exchange this credential, when named.
    may_act: str | None = None
    # The break-glass exception this credential relies on (``tb_exc``), if any.
    exception: str | None = None

    @property
    def holder(self) -> str:
        """The agent holding the credential: the current actor, or the task's agent."""
        return self.actors[0] if self.actors else self.subject

    @property
    def depth(self) -> int:
        return len(self.actors)

    @property
    def scope(self) -> str:
        """The single RFC 6749 §3.3 scope token: ``<tool>:<tier>``."""
        return f"{self.tool}:{Tier(self.tier).value}"


def _epoch(name: str, when: datetime) -> int:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return to_epoch(when)


def mint_credential(claims: CredentialClaims, key: PrivateKey) -> str:
    """Sign ``claims`` as an RFC 9068 access token with ``key``.

    Header: ``alg``, ``typ: at+jwt``, ``kid`` (RFC 9068 §2.1). Payload: ``iss``, ``sub``,
    ``aud`` (one string), ``client_id``, ``jti``, ``iat``, ``nbf``, ``exp`` (RFC 9068 §2.2),
    ``scope`` (§2.2.3), ``authorization_details`` (RFC 9396 §2), ``cnf.jkt`` (RFC 9449 §6.1),
    and taskbound's ``tsk`` (task id), ``owner`` and ``intent`` (purpose).
    """
    tier = Tier(claims.tier)
    if not claims.audience:
        raise ValueError("a credential needs an audience")
    if _TOOL.fullmatch(claims.tool) is None:
        raise ValueError(f"tool name not usable in a scope: {claims.tool!r}")
    if _JKT.fullmatch(claims.jkt) is None:
        raise ValueError("jkt must be a base64url SHA-256 thumbprint")
    actions = list(claims.actions)
    if not all(isinstance(a, str) and a for a in actions) or len(set(actions)) != len(actions):
        raise ValueError("actions must be distinct non-empty names")
    header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    payload = {
        "iss": claims.issuer,
        "sub": claims.subject,
        "aud": claims.audience,
        "client_id": claims.client_id,
        "jti": claims.jti,
        "iat": _epoch("issued_at", claims.issued_at),
        "nbf": _epoch("not_before", claims.not_before),
        "exp": _epoch("expires_at", claims.expires_at),
        "scope": f"{claims.tool}:{tier.value}",
        "authorization_details": [
            {
                "type": AUTHORIZATION_DETAILS_TYPE,
                "tool": claims.tool,
                "tier": tier.value,
                "actions": actions,
                "constraints": dict(claims.constraints),
            }
        ],
        "cnf": {"jkt": claims.jkt},
        "tsk": claims.task_id,
        "owner": claims.owner_id,
        "intent": claims.purpose,
    }
    if claims.txn is not None:
        payload["txn"] = claims.txn
    if len(claims.actors) != len(claims.parents):
        raise ValueError("every actor of a delegation chain has one parent credential")
    if len(claims.actors) > MAX_CHAIN:
        raise ValueError(f"a delegation chain is at most {MAX_CHAIN} deep")
    if claims.actors:
        act: dict[str, Any] | None = None
        for actor in reversed(claims.actors):
            act = {"sub": actor} if act is None else {"sub": actor, "act": act}
        payload["act"] = act
        payload["tb_parents"] = list(claims.parents)
    if claims.may_act is not None:
        payload["may_act"] = {"sub": claims.may_act}
    if claims.exception is not None:
        payload["tb_exc"] = claims.exception
    return jws.sign_compact(header, payload, key)


def verify_credential(
    raw: str,
    *,
    keys: KeyRing,
    issuer: str,
    audiences: Collection[str],
    algorithms: Collection[str],
    now: datetime,
    leeway: timedelta,
    max_length: int = 8192,
) -> CredentialClaims:
    """Verify a credential completely (RFC 9068 §4, RFC 8725 §3) and return its claims.

    In order: length cap; compact JWS; ``alg`` on ``algorithms``; no ``crit``/``jwk``/``jku``/
    ``x5u``/``x5c``; ``typ`` at+jwt; key by ``kid`` from ``keys`` only, registered for that
    same ``alg``; signature; exact ``iss``; ``aud`` a single string in ``audiences``;
    ``exp``/``nbf``/``iat`` with ``leeway``; every claim present with its type; ``cnf.jkt``;
    ``authorization_details`` consistent with ``scope``.

    Raises :class:`~taskbound.errors.InvalidToken` with a precise ``internal`` reason.
    """
    jws.require_aware(now)
    try:
        token = jws.parse_compact(raw, max_length=max_length)
        jws.verify_with_keyring(token, keys=keys, algorithms=algorithms, typ=_TYP)
        claims = jws.decode_claims(token)
        return _credential_claims(
            claims, issuer=issuer, audiences=audiences, now=now, leeway=leeway
        )
    except jws.Rejected as exc:
        raise InvalidToken(internal=exc.reason) from None


def _credential_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audiences: Collection[str],
    now: datetime,
    leeway: timedelta,
) -> CredentialClaims:
    if jws.require_str(claims, "iss") != issuer:
        raise jws.Rejected("issuer mismatch")
    aud = claims.get("aud")
    if aud is None:
        raise jws.Rejected("missing aud")
    if not isinstance(aud, str):
        # RFC 8707 §2 + DESIGN.md §3.4: one credential, one destination.
        raise jws.Rejected("aud is not a single string")
    accepted = (audiences,) if isinstance(audiences, str) else tuple(audiences)
    if aud not in accepted:
        raise jws.Rejected("audience mismatch")
    exp, nbf, iat = jws.check_validity(
        claims, now=now, leeway=leeway, require_nbf=True, require_iat=True, integer=True
    )
    assert nbf is not None
    assert iat is not None
    subject = jws.require_str(claims, "sub")
    client_id = jws.require_str(claims, "client_id")
    jti = jws.require_str(claims, "jti")
    task_id = jws.require_str(claims, "tsk")
    owner_id = jws.require_str(claims, "owner")
    purpose = jws.require_str(claims, "intent", allow_empty=True)
    jkt = _confirmation(claims)
    tool, tier, actions, constraints = _authorization(claims)
    txn = claims.get("txn")
    if txn is not None and (not isinstance(txn, str) or not txn):
        raise jws.Rejected("txn is not a non-empty string")
    actors, parents = _delegation(claims)
    may_act = None
    if "may_act" in claims:
        member = claims["may_act"]
        if not isinstance(member, dict) or set(member) != {"sub"}:
            raise jws.Rejected("may_act must be an object with sub only")
        may_act = jws.require_str(member, "sub")
    exception = claims.get("tb_exc")
    if exception is not None and (not isinstance(exception, str) or not exception):
        raise jws.Rejected("tb_exc is not a non-empty string")
    return CredentialClaims(
        issuer=issuer,
        subject=subject,
        audience=aud,
        client_id=client_id,
        jti=jti,
        issued_at=iat,
        not_before=nbf,
        expires_at=exp,
        task_id=task_id,
        owner_id=owner_id,
        purpose=purpose,
        constraints=constraints,
        tool=tool,
        tier=tier,
        actions=actions,
        jkt=jkt,
        txn=txn,
        actors=actors,
        parents=parents,
        may_act=may_act,
        exception=exception,
    )


def _delegation(claims: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """RFC 8693 §4.1 nested ``act`` (current actor outermost) and the parallel
    ``tb_parents`` (the credential each hop was exchanged from), both or neither."""
    act = claims.get("act")
    parents = claims.get("tb_parents")
    if act is None and parents is None:
        return (), ()
    actors: list[str] = []
    while act is not None:
        if not isinstance(act, dict) or not set(act) <= {"sub", "act"}:
            raise jws.Rejected("act must be an object with sub and an optional act")
        actors.append(jws.require_str(act, "sub"))
        if len(actors) > MAX_CHAIN:
            raise jws.Rejected("delegation chain too deep")
        act = act.get("act")
    if (
        not isinstance(parents, list)
        or len(parents) != len(actors)
        or not all(isinstance(p, str) and p for p in parents)
    ):
        raise jws.Rejected("tb_parents must name one parent credential per actor")
    return tuple(actors), tuple(parents)


def _confirmation(claims: Mapping[str, Any]) -> str:
    """RFC 9449 §6.1: ``cnf`` with the SHA-256 thumbprint of the DPoP key."""
    cnf = claims.get("cnf")
    if cnf is None:
        raise jws.Rejected("missing cnf")
    if not isinstance(cnf, dict):
        raise jws.Rejected("cnf is not an object")
    jkt = cnf.get("jkt")
    if jkt is None:
        raise jws.Rejected("missing cnf.jkt")
    if not isinstance(jkt, str) or _JKT.fullmatch(jkt) is None:
        raise jws.Rejected("cnf.jkt is not a SHA-256 JWK thumbprint")
    return jkt


def _authorization(
    claims: Mapping[str, Any],
) -> tuple[str, Tier, tuple[str, ...], dict[str, Any]]:
    """RFC 9396 §2 ``authorization_details`` (exactly one ``taskbound_tool`` entry) agreeing
    with the one RFC 9068 §2.2.3 ``scope`` token."""
    scope = jws.require_str(claims, "scope")
    details = claims.get("authorization_details")
    if details is None:
        raise jws.Rejected("missing authorization_details")
    if not isinstance(details, list) or len(details) != 1:
        raise jws.Rejected("authorization_details must hold exactly one entry")
    entry = details[0]
    if not isinstance(entry, dict):
        raise jws.Rejected("authorization_details entry is not an object")
    unknown = sorted(set(entry) - _DETAIL_MEMBERS)
    if unknown:
        raise jws.Rejected(f"authorization_details has unknown members: {', '.join(unknown)}")
    if entry.get("type") != AUTHORIZATION_DETAILS_TYPE:
        raise jws.Rejected("authorization_details type is not taskbound_tool")
    tool = jws.require_str(entry, "tool")
    if _TOOL.fullmatch(tool) is None:
        raise jws.Rejected("authorization_details tool is not a scope token")
    tier_value = jws.require_str(entry, "tier")
    try:
        tier = Tier(tier_value)
    except ValueError:
        raise jws.Rejected(f"unknown tier: {tier_value!r}") from None
    actions = entry.get("actions")
    if not isinstance(actions, list) or not all(isinstance(a, str) and a for a in actions):
        raise jws.Rejected("authorization_details actions is not an array of names")
    if len(set(actions)) != len(actions):
        raise jws.Rejected("authorization_details actions has duplicates")
    constraints = entry.get("constraints")
    if not isinstance(constraints, dict):
        raise jws.Rejected("authorization_details constraints is not an object")
    if scope != f"{tool}:{tier.value}":
        raise jws.Rejected("scope does not match authorization_details")
    return tool, tier, tuple(actions), constraints

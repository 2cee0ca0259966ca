"""Shared Signals: CAEP and RISC events carried as Security Event Tokens.

A Security Event Token (SET, RFC 8417) is a JWT whose ``events`` claim states facts about a
subject. The OpenID Shared Signals Framework 1.0 (SSF) profiles SETs (§4.1: explicit
``typ``, no ``sub``, no ``exp``, the subject in a top-level ``sub_id`` claim, §3.1), and two
event vocabularies build on it: the Continuous Access Evaluation Profile 1.0 (CAEP, e.g.
``session-revoked`` §3.1 and ``credential-change`` §3.3) and RISC 1.0 (e.g.
``account-disabled`` §2.3, ``account-purged`` §2.2, ``credential-compromise`` §2.7).
Subjects are RFC 9493 Subject Identifiers (``opaque``, ``uri``, ``iss_sub``, ``email`` …) or
SSF complex subjects (SSF §3.3).

taskbound is on both sides of a stream:

* as a Transmitter, :func:`revocation_set` turns a revocation-log entry into a signed SET
  (a revoked task is a revoked session, a revoked credential is a revoked credential);
* as a Receiver, :func:`verify_set` validates a SET pushed to us (RFC 8935) completely in one
  call, and :func:`agent_signals` picks out the events that name one of our agents by SPIFFE
  ID.

Every refusal is a :class:`SignalRejected` whose ``err`` is the RFC 8935 §2.4 error code the
push endpoint returns in its failure response (RFC 8935 §2.3) and whose ``reason`` is the
precise internal reason for the audit. Pure: no I/O; time and keys are parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from taskbound.core import jws
from taskbound.core.clock import to_epoch
from taskbound.core.identity import parse_spiffe_id
from taskbound.core.keys import KeyRing, PrivateKey
from taskbound.core.model import Revocation, RevocationKind

__all__ = [
    "CAEP_CREDENTIAL_CHANGE",
    "CAEP_SESSION_REVOKED",
    "MAX_SET_LENGTH",
    "RISC_ACCOUNT_DISABLED",
    "RISC_ACCOUNT_PURGED",
    "RISC_CREDENTIAL_COMPROMISE",
    "SET_TYP",
    "AgentSignal",
    "SecurityEvent",
    "SignalRejected",
    "agent_signals",
    "revocation_set",
    "verify_set",
]

_CAEP: Final = "https://schemas.openid.net/secevent/caep/event-type/"
_RISC: Final = "https://schemas.openid.net/secevent/risc/event-type/"

#: CAEP 1.0 §3.1: the session identified by the subject has been revoked.
CAEP_SESSION_REVOKED: Final = _CAEP + "session-revoked"
#: CAEP 1.0 §3.3: a credential was created, changed, revoked or deleted.
CAEP_CREDENTIAL_CHANGE: Final = _CAEP + "credential-change"
#: RISC 1.0 §2.3: the account identified by the subject has been disabled.
RISC_ACCOUNT_DISABLED: Final = _RISC + "account-disabled"
#: RISC 1.0 §2.2: the account identified by the subject has been permanently deleted.
RISC_ACCOUNT_PURGED: Final = _RISC + "account-purged"
#: RISC 1.0 §2.7: a credential of the subject was found to be compromised.
RISC_CREDENTIAL_COMPROMISE: Final = _RISC + "credential-compromise"

#: RFC 8417 §2.3 / SSF §4.1.1: the explicit ``typ`` of a SET ("application/" omitted).
SET_TYP: Final = "secevent+jwt"

#: The longest SET, in characters, that :func:`verify_set` will parse. A SET states one
#: event about one subject; 16 KiB is ample and bounds the work an unauthenticated push
#: can cause.
MAX_SET_LENGTH: Final = 16384

# RFC 8935 §2.4, the initial "Security Event Token Error Codes" registry. The two codes about
# the transmitter's HTTP authentication (authentication_failed, access_denied) are decided by
# the push endpoint, never by the token, so nothing here raises them.
_INVALID_REQUEST: Final = "invalid_request"
_INVALID_KEY: Final = "invalid_key"
_INVALID_ISSUER: Final = "invalid_issuer"
_INVALID_AUDIENCE: Final = "invalid_audience"

# RFC 7515 §4.1.9: the comparison is on the media type, so "application/secevent+jwt" and
# any letter case are the same value (jws.TypRule normalises both).
_TYP: Final = jws.TypRule(allowed=frozenset({SET_TYP}), required=True)

# CAEP 1.0 §3.3 lists the credential_type values: password, pin, x509, fido2-platform,
# fido2-roaming, fido-u2f, verifiable-credential, phone-voice, phone-sms and app ("or any
# other credential type supported mutually by the Transmitter and the Receiver"). A
# taskbound credential is an OAuth access token held by a software agent and bound (DPoP)
# to a key pair that agent holds. "app" is the only listed type for a credential that lives
# in and is presented by an application, with a key the application holds; every other one
# is a human secret (password, pin), a certificate (x509), an authenticator device (fido*),
# a phone or a wallet credential. A private value such as "oauth-access-token" would be
# more exact, but only receivers that agreed to it beforehand would accept it.
_CREDENTIAL_TYPE: Final = "app"

# CAEP 1.0 §3.3 change_type values that end a credential's use.
_ENDING_CHANGES: Final = frozenset({"revoke", "delete"})

# SSF §3.3: the complex-subject members that can name a principal such as an agent.
_AGENT_MEMBERS: Final = ("user", "device", "application")

# reason_admin is for logs (CAEP §2); a longer text is cut so that a SET always stays far
# below MAX_SET_LENGTH and a revocation is never left unsignalled because of its wording.
_MAX_REASON: Final = 1000


class SignalRejected(Exception):
    """A SET failed verification.

    ``err`` is the RFC 8935 §2.4 error code for the push failure response (RFC 8935 §2.3);
    ``reason`` is the exact internal reason, for the audit only.
    """

    def __init__(self, err: str, reason: str) -> None:
        super().__init__(f"{err}: {reason}")
        self.err = err
        self.reason = reason


@contextmanager
def _failing_as(err: str) -> Iterator[None]:
    """Turn a :class:`jws.Rejected` raised inside the block into ``SignalRejected(err)``."""
    try:
        yield
    except jws.Rejected as exc:
        raise SignalRejected(err, exc.reason) from None


# --- transmitting ---------------------------------------------------------------------------


def _initiating_entity(cause: str) -> str:
    """CAEP 1.0 §2 ``initiating_entity``: admin, user, policy or system."""
    if cause.startswith("admin:"):
        return "admin"
    if cause.startswith("signal:") or cause == "expiry":
        # A revocation triggered by a received signal or by a TTL is a policy decision.
        return "policy"
    return "system"


def _spiffe_uri_subject(spiffe_id: str) -> dict[str, str]:
    """RFC 9493 §3.2 ``uri`` Subject Identifier for an agent's SPIFFE ID."""
    return {"format": "uri", "uri": str(parse_spiffe_id(spiffe_id))}


def _complex_subject(members: Mapping[str, Any], agent_id: str | None) -> dict[str, Any]:
    """SSF §3.3 complex subject. The agent is the ``user``: SSF §2 counts "human or robotic
    principals" as subject principals, and CAEP's abstract names "robotic users"."""
    subject: dict[str, Any] = {"format": "complex", **members}
    if agent_id is not None:
        subject["user"] = _spiffe_uri_subject(agent_id)
    return subject


def revocation_set(
    rev: Revocation,
    *,
    issuer: str,
    audience: str,
    jti: str,
    now: datetime,
    key: PrivateKey,
) -> str | None:
    """A signed SET describing ``rev``, or ``None`` for kinds that send no signal.

    * ``TASK`` → CAEP ``session-revoked`` (CAEP 1.0 §3.1): a task is the agent's working
      session. ``sub_id`` is the complex subject ``{"session": opaque task id, "user": uri
      SPIFFE ID}`` (``user`` only when ``rev.agent_id`` is set).
    * ``CREDENTIAL`` → CAEP ``credential-change`` (CAEP 1.0 §3.3) with ``change_type``
      ``revoke`` and ``credential_type`` ``app`` (see ``_CREDENTIAL_TYPE``). ``sub_id`` is the
      complex subject ``{"credential": jwt_id, "user": uri SPIFFE ID}``: the credential is a
      JWT, and SSF §3.5.1 defines the ``jwt_id`` format (``iss`` + ``jti``) for exactly that;
      ``credential`` is an additional member name as SSF §3.3 permits, because none of the
      named members (user, device, session, application, tenant, org_unit, group) is a
      credential.
    * ``AGENT``, ``OWNER``, ``KEY`` → ``None``.

    Each event carries ``event_timestamp`` (``rev.time``), ``initiating_entity`` (``admin``
    for a cause ``admin:…``, ``policy`` for ``signal:…`` and ``expiry``, else ``system``) and
    ``reason_admin: {"en": rev.reason}`` when there is a reason (CAEP 1.0 §2).

    Header: ``alg`` of ``key``, ``kid``, ``typ: secevent+jwt`` (RFC 8417 §2.3, SSF §4.1.1).
    Claims: ``iss``, ``aud``, ``iat``, ``jti`` (RFC 8417 §2.2), ``sub_id`` (SSF §3.1) and
    ``events`` with exactly one event (SSF §4.2.1). Neither ``sub`` (SSF §4.1.2) nor ``exp``
    (SSF §4.1.7; RFC 8417 §4.5, §4.6): a SET must not be mistaken for an ID or access token.
    Raises ``ValueError`` for a naive time, an empty ``issuer``, ``audience``, ``jti`` or
    subject, or an ``agent_id`` that is not a SPIFFE ID.
    """
    jws.require_aware(now)
    jws.require_aware(rev.time)
    for name, value in (("issuer", issuer), ("audience", audience), ("jti", jti)):
        if not value:
            raise ValueError(f"a SET needs a non-empty {name}")
    if not rev.subject:
        raise ValueError("the revocation has no subject")
    kind = RevocationKind(rev.kind)
    payload: dict[str, Any]
    if kind is RevocationKind.TASK:
        event_type = CAEP_SESSION_REVOKED
        subject = _complex_subject(
            {"session": {"format": "opaque", "id": rev.subject}}, rev.agent_id
        )
        payload = {}
    elif kind is RevocationKind.CREDENTIAL:
        event_type = CAEP_CREDENTIAL_CHANGE
        subject = _complex_subject(
            {"credential": {"format": "jwt_id", "iss": issuer, "jti": rev.subject}},
            rev.agent_id,
        )
        payload = {"credential_type": _CREDENTIAL_TYPE, "change_type": "revoke"}
    else:
        return None
    payload["event_timestamp"] = to_epoch(rev.time)
    payload["initiating_entity"] = _initiating_entity(rev.cause)
    if rev.reason:
        payload["reason_admin"] = {"en": rev.reason[:_MAX_REASON]}
    header = {"alg": key.alg, "typ": SET_TYP, "kid": key.kid}
    claims = {
        "iss": issuer,
        "aud": audience,
        "iat": to_epoch(now),
        "jti": jti,
        "sub_id": subject,
        "events": {event_type: payload},
    }
    token = jws.sign_compact(header, claims, key)
    if len(token) > MAX_SET_LENGTH:
        # Only reachable with identifiers kilobytes long; a receiver would refuse the SET.
        raise ValueError(f"SET too long: {len(token)} > {MAX_SET_LENGTH} characters")
    return token


# --- receiving ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """A verified SET (RFC 8417 §2.2): who issued it, when, about whom, and its events.

    ``subject`` is the top-level ``sub_id`` (SSF §3.1), ``None`` when the transmitter sent
    none; ``events`` maps each event type URI to its event payload (a JSON object).
    """

    jti: str
    issuer: str
    issued_at: datetime
    subject: Mapping[str, Any] | None
    events: Mapping[str, Mapping[str, Any]]


def verify_set(
    token: object,
    *,
    keys: KeyRing,
    issuer: str,
    audience: str,
    algorithms: Collection[str],
    now: datetime,
    max_age: timedelta,
    leeway: timedelta,
) -> SecurityEvent:
    """Verify a SET completely (RFC 8417 §2, §4; SSF §4.1; RFC 8935 §2) and return it.

    In order, with the RFC 8935 §2.4 ``err`` of each failure:

    * a string of at most :data:`MAX_SET_LENGTH` characters holding a compact JWS with
      strict JSON (no duplicate members) — ``invalid_request``;
    * ``alg`` on ``algorithms`` and never ``none`` or HMAC (RFC 8725 §3.1) — ``invalid_key``;
    * ``typ`` ``secevent+jwt`` (RFC 8417 §2.3, required by SSF §4.1.1; the ``application/``
      prefix and letter case are ignored, RFC 7515 §4.1.9), no ``crit``, ``b64`` or
      key-carrying header — ``invalid_request``;
    * the key chosen by ``kid`` from ``keys`` only, registered for that same ``alg``, and
      the signature — ``invalid_key``;
    * ``iss`` exactly ``issuer`` (SSF §4.1.6) — ``invalid_issuer``;
    * ``aud`` a string or array naming ``audience`` (RFC 7519 §4.1.3, SSF §4.1.8) —
      ``invalid_audience``;
    * no ``exp`` (SSF §4.1.7) and no ``sub`` (SSF §4.1.2): SSF §4.1.3 requires both
      absences so that a SET cannot pass for an ID token or an access token (RFC 8417 §4.5,
      §4.6) — ``invalid_request``;
    * ``iat`` present (RFC 8417 §2.2), not later than ``now + leeway`` and not older than
      ``max_age + leeway`` — ``invalid_request``;
    * ``jti`` a non-empty string (RFC 8417 §2.2) — ``invalid_request``;
    * ``events`` a non-empty JSON object whose members are JSON objects (RFC 8417 §2.2) —
      ``invalid_request``;
    * ``sub_id``, when present, a Subject Identifier: a JSON object with a ``format``
      string (RFC 9493 §3, SSF §3.1) — ``invalid_request``. It may be absent: transmitters
      that predate SSF 1.0 name the subject inside the event (see :func:`agent_signals`).

    Raises :class:`SignalRejected`. ``ValueError`` for a naive ``now`` or a negative window.
    """
    jws.require_aware(now)
    if max_age < timedelta(0) or leeway < timedelta(0):
        raise ValueError("max_age and leeway must not be negative")
    with _failing_as(_INVALID_REQUEST):
        compact = jws.parse_compact(token, max_length=MAX_SET_LENGTH)
    with _failing_as(_INVALID_KEY):
        jws.check_alg(compact.header, algorithms)
    with _failing_as(_INVALID_REQUEST):
        jws.check_header(compact.header, _TYP)
    with _failing_as(_INVALID_KEY):
        jws.verify_with_keyring(compact, keys=keys, algorithms=algorithms, typ=_TYP)
    with _failing_as(_INVALID_REQUEST):
        claims = jws.decode_claims(compact)
    with _failing_as(_INVALID_ISSUER):
        if jws.require_str(claims, "iss") != issuer:
            raise jws.Rejected("issuer mismatch")
    with _failing_as(_INVALID_AUDIENCE):
        jws.audience_contains(claims, audience)
    with _failing_as(_INVALID_REQUEST):
        return _security_event(claims, issuer=issuer, now=now, max_age=max_age, leeway=leeway)


def _security_event(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    now: datetime,
    max_age: timedelta,
    leeway: timedelta,
) -> SecurityEvent:
    # Presence, not value: "exp": null and "sub": "" are still the claims SSF forbids.
    if "exp" in claims:
        raise jws.Rejected("exp present: SSF §4.1.7 forbids it in a SET")
    if "sub" in claims:
        raise jws.Rejected("sub present: SSF §4.1.2 forbids it in a SET")
    issued_at = jws.numeric_date(claims, "iat", required=True, integer=False)
    assert issued_at is not None
    # Differences of two datetimes cannot overflow, unlike now +/- a large window.
    if issued_at - now > leeway:
        raise jws.Rejected("issued in the future")
    if now - issued_at > max_age + leeway:
        raise jws.Rejected("too old")
    jti = jws.require_str(claims, "jti")
    events = claims.get("events")
    if events is None:
        raise jws.Rejected("missing events")
    if not isinstance(events, dict):
        raise jws.Rejected("events is not a JSON object")
    if not events:
        raise jws.Rejected("events is empty")
    for event_type, payload in events.items():
        if not event_type:
            raise jws.Rejected("events has an empty event type")
        if not isinstance(payload, dict):
            raise jws.Rejected(f"event {event_type!r} is not a JSON object")
    subject = claims.get("sub_id")
    if "sub_id" in claims:
        if not isinstance(subject, dict):
            raise jws.Rejected("sub_id is not a JSON object")
        fmt = subject.get("format")
        if not isinstance(fmt, str) or not fmt:
            raise jws.Rejected("sub_id has no format")
    return SecurityEvent(
        jti=jti, issuer=issuer, issued_at=issued_at, subject=subject, events=events
    )


@dataclass(frozen=True, slots=True)
class AgentSignal:
    """One event of a verified SET that names one of our agents.

    ``reason`` is the event's ``reason_admin.en`` (CAEP 1.0 §2) or, without one, the event
    type's short name (``session-revoked``).
    """

    spiffe_id: str
    event_type: str
    reason: str


def _spiffe_id_of(subject: object) -> str | None:
    """The SPIFFE ID a ``uri`` Subject Identifier (RFC 9493 §3.2) names, if it is one."""
    if not isinstance(subject, Mapping) or subject.get("format") != "uri":
        return None
    uri = subject.get("uri")
    if not isinstance(uri, str):
        return None
    try:
        return str(parse_spiffe_id(uri))
    except ValueError:
        return None


def _agents_named(subject: object) -> list[str]:
    """The SPIFFE IDs a subject names: a ``uri`` subject, or a ``complex`` subject (SSF
    §3.3) whose ``user``, ``device`` or ``application`` member is one. Anything else names
    no agent."""
    if not isinstance(subject, Mapping):
        return []
    fmt = subject.get("format")
    if fmt == "uri":
        single = _spiffe_id_of(subject)
        return [] if single is None else [single]
    if fmt != "complex":
        return []
    found: list[str] = []
    for member in _AGENT_MEMBERS:
        spiffe_id = _spiffe_id_of(subject.get(member))
        if spiffe_id is not None and spiffe_id not in found:
            found.append(spiffe_id)
    return found


def _reason(event_type: str, payload: Mapping[str, Any]) -> str:
    reason_admin = payload.get("reason_admin")
    if isinstance(reason_admin, Mapping):
        english = reason_admin.get("en")
        if isinstance(english, str) and english:
            return english
    return event_type.rstrip("/").rsplit("/", 1)[-1]


def agent_signals(event: SecurityEvent, accepted: Collection[str]) -> list[AgentSignal]:
    """The events of ``event`` whose type is in ``accepted`` and whose subject names an
    agent by SPIFFE ID, in the order of the ``events`` claim.

    The subject is the top-level ``sub_id`` (SSF §3.1) or, when there is none, the event's
    own ``subject`` member, which CAEP and RISC events defined before SSF 1.0 use (SSF
    §3.1.1). It names an agent when it is a ``uri`` subject with a ``spiffe://`` URI that
    is a valid SPIFFE ID, or a ``complex`` subject whose ``user``, ``device`` or
    ``application`` member is one. Any other subject names no agent and the event is
    skipped; that is not an error, a stream carries events about other principals too.
    A ``credential-change`` counts only when its ``change_type`` is ``revoke`` or
    ``delete`` (CAEP 1.0 §3.3); ``create`` and ``update`` take nothing away.
    """
    wanted = frozenset((accepted,) if isinstance(accepted, str) else accepted)
    signals: list[AgentSignal] = []
    for event_type, payload in event.events.items():
        if event_type not in wanted or not isinstance(payload, Mapping):
            continue
        if (
            event_type == CAEP_CREDENTIAL_CHANGE
            and payload.get("change_type") not in _ENDING_CHANGES
        ):
            continue
        subject = event.subject if event.subject is not None else payload.get("subject")
        reason = _reason(event_type, payload)
        signals.extend(
            AgentSignal(spiffe_id=spiffe_id, event_type=event_type, reason=reason)
            for spiffe_id in _agents_named(subject)
        )
    return signals

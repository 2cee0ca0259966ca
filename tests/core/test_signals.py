"""Shared Signals: SETs minted from revocations, verified in one call, read for our agents."""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskbound.core.keys import KeyRing, PrivateKey, public_jwk
from taskbound.core.model import Revocation, RevocationKind
from taskbound.core.signals import (
    CAEP_CREDENTIAL_CHANGE,
    CAEP_SESSION_REVOKED,
    MAX_SET_LENGTH,
    RISC_ACCOUNT_DISABLED,
    RISC_ACCOUNT_PURGED,
    RISC_CREDENTIAL_COMPROMISE,
    SET_TYP,
    AgentSignal,
    SecurityEvent,
    SignalRejected,
    agent_signals,
    revocation_set,
    verify_set,
)

from ._crypto import AGENT, LEEWAY, NOW, b64, b64json, forge, key, sign_segments

ISSUER = "https://broker.example"
RECEIVER = "https://receiver.example/ssf"
KEY = key("EdDSA")
ES = key("ES256")
OTHER = key("EdDSA", 1)
RING = KeyRing.from_private([KEY, ES])
HEADER = {"alg": "EdDSA", "typ": SET_TYP, "kid": KEY.kid}
EPOCH = int(NOW.timestamp())
MAX_AGE = timedelta(hours=1)
ALL_TYPES = (
    CAEP_SESSION_REVOKED,
    CAEP_CREDENTIAL_CHANGE,
    RISC_ACCOUNT_DISABLED,
    RISC_ACCOUNT_PURGED,
    RISC_CREDENTIAL_COMPROMISE,
)
DROP: Any = object()


def test_event_type_uris_are_the_registered_ones() -> None:
    assert CAEP_SESSION_REVOKED == (
        "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
    )
    assert CAEP_CREDENTIAL_CHANGE == (
        "https://schemas.openid.net/secevent/caep/event-type/credential-change"
    )
    assert RISC_ACCOUNT_DISABLED == (
        "https://schemas.openid.net/secevent/risc/event-type/account-disabled"
    )
    assert RISC_ACCOUNT_PURGED == (
        "https://schemas.openid.net/secevent/risc/event-type/account-purged"
    )
    assert RISC_CREDENTIAL_COMPROMISE == (
        "https://schemas.openid.net/secevent/risc/event-type/credential-compromise"
    )
    assert SET_TYP == "secevent+jwt"
    assert MAX_SET_LENGTH == 16384


def verify(raw: Any, **overrides: Any) -> SecurityEvent:
    kwargs: dict[str, Any] = {
        "keys": RING,
        "issuer": ISSUER,
        "audience": RECEIVER,
        "algorithms": ["EdDSA", "ES256"],
        "now": NOW,
        "max_age": MAX_AGE,
        "leeway": LEEWAY,
    }
    kwargs.update(overrides)
    return verify_set(raw, **kwargs)


def revocation(kind: RevocationKind = RevocationKind.TASK, **overrides: Any) -> Revocation:
    values: dict[str, Any] = {
        "kind": kind,
        "subject": "task-1" if kind is RevocationKind.TASK else "cred-1",
        "time": NOW - timedelta(seconds=5),
        "cause": "admin:tok-1",
        "reason": "owner revoked the task",
        "agent_id": AGENT,
    }
    values.update(overrides)
    return Revocation(**values)


def mint(rev: Revocation | None = None, signer: PrivateKey = KEY, **overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": RECEIVER,
        "jti": "set-1",
        "now": NOW,
        "key": signer,
    }
    kwargs.update(overrides)
    token = revocation_set(rev or revocation(), **kwargs)
    assert token is not None
    return token


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, decoded without verifying."""
    head, body, _ = token.split(".")
    return _decode(head), _decode(body)


def _decode(segment: str) -> dict[str, Any]:
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def set_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": RECEIVER,
        "iat": EPOCH,
        "jti": "set-1",
        "sub_id": {"format": "uri", "uri": AGENT},
        "events": {RISC_ACCOUNT_DISABLED: {"reason": "hijacking"}},
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not DROP}


def forged(header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A SET signed with the real key, so that only the edited part is wrong."""
    return forge(header or HEADER, set_claims(**claims), KEY, "EdDSA")


# --- transmitting: revocation_set -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
@pytest.mark.parametrize("ring_from", ["private", "jwks"])
def test_task_revocation_round_trip(alg: str, ring_from: str) -> None:
    signer = key(alg, 7)
    ring = KeyRing.from_private([signer])
    if ring_from == "jwks":
        ring = KeyRing.from_jwks({"keys": [public_jwk(signer)]})
    token = mint(signer=signer)

    event = verify(token, keys=ring, algorithms=[alg])

    assert event == SecurityEvent(
        jti="set-1",
        issuer=ISSUER,
        issued_at=NOW,
        subject={
            "format": "complex",
            "session": {"format": "opaque", "id": "task-1"},
            "user": {"format": "uri", "uri": AGENT},
        },
        events={
            CAEP_SESSION_REVOKED: {
                "event_timestamp": EPOCH - 5,
                "initiating_entity": "admin",
                "reason_admin": {"en": "owner revoked the task"},
            }
        },
    )
    assert agent_signals(event, [CAEP_SESSION_REVOKED]) == [
        AgentSignal(AGENT, CAEP_SESSION_REVOKED, "owner revoked the task")
    ]


def test_task_set_header_and_claims_on_the_wire() -> None:
    header, claims = segments(mint())
    assert header == {"alg": "EdDSA", "typ": "secevent+jwt", "kid": KEY.kid}
    # RFC 8417 §2.2 + SSF §3.1: exactly these claims; no exp (SSF §4.1.7), no sub (§4.1.2).
    assert set(claims) == {"iss", "aud", "iat", "jti", "sub_id", "events"}
    assert claims["iss"] == ISSUER
    assert claims["aud"] == RECEIVER
    assert claims["iat"] == EPOCH
    assert claims["jti"] == "set-1"
    assert list(claims["events"]) == [CAEP_SESSION_REVOKED]


def test_es256_set_header_names_its_key() -> None:
    header, _ = segments(mint(signer=ES))
    assert header == {"alg": "ES256", "typ": "secevent+jwt", "kid": ES.kid}
    assert verify(mint(signer=ES)).jti == "set-1"


def test_credential_revocation_round_trip() -> None:
    rev = revocation(RevocationKind.CREDENTIAL, cause="signal:risc", reason="key leaked")
    event = verify(mint(rev))

    assert event.subject == {
        "format": "complex",
        "credential": {"format": "jwt_id", "iss": ISSUER, "jti": "cred-1"},
        "user": {"format": "uri", "uri": AGENT},
    }
    assert event.events == {
        CAEP_CREDENTIAL_CHANGE: {
            "credential_type": "app",
            "change_type": "revoke",
            "event_timestamp": EPOCH - 5,
            "initiating_entity": "policy",
            "reason_admin": {"en": "key leaked"},
        }
    }
    assert agent_signals(event, [CAEP_CREDENTIAL_CHANGE]) == [
        AgentSignal(AGENT, CAEP_CREDENTIAL_CHANGE, "key leaked")
    ]


@pytest.mark.parametrize("kind", [RevocationKind.TASK, RevocationKind.CREDENTIAL])
def test_without_an_agent_the_subject_has_no_user(kind: RevocationKind) -> None:
    event = verify(mint(revocation(kind, agent_id=None)))
    assert event.subject is not None
    assert "user" not in event.subject
    assert agent_signals(event, ALL_TYPES) == []


@pytest.mark.parametrize(
    ("cause", "entity"),
    [
        ("admin:tok-1", "admin"),
        ("signal:risc-stream", "policy"),
        ("expiry", "policy"),
        ("agent", "system"),
        ("sweeper", "system"),
        ("administrator", "system"),
        ("expiry:later", "system"),
    ],
)
def test_initiating_entity_follows_the_cause(cause: str, entity: str) -> None:
    _, claims = segments(mint(revocation(cause=cause)))
    assert claims["events"][CAEP_SESSION_REVOKED]["initiating_entity"] == entity


def test_no_reason_means_no_reason_admin() -> None:
    event = verify(mint(revocation(reason="")))
    assert "reason_admin" not in event.events[CAEP_SESSION_REVOKED]
    assert agent_signals(event, [CAEP_SESSION_REVOKED])[0].reason == "session-revoked"


def test_a_long_reason_is_cut_and_the_set_stays_verifiable() -> None:
    event = verify(mint(revocation(reason="é" * 50_000)))
    assert event.events[CAEP_SESSION_REVOKED]["reason_admin"] == {"en": "é" * 1000}


def test_event_timestamp_is_the_revocation_time_not_the_issue_time() -> None:
    rev = revocation(time=datetime(2025, 12, 31, 23, 0, tzinfo=UTC))
    _, claims = segments(mint(rev))
    assert claims["events"][CAEP_SESSION_REVOKED]["event_timestamp"] == 1767222000
    assert claims["iat"] == EPOCH


@pytest.mark.parametrize("kind", [RevocationKind.AGENT, RevocationKind.OWNER, RevocationKind.KEY])
def test_other_kinds_send_no_signal(kind: RevocationKind) -> None:
    rev = revocation(kind, subject="x", state="suspended")
    assert revocation_set(rev, issuer=ISSUER, audience=RECEIVER, jti="j", now=NOW, key=KEY) is None


@pytest.mark.parametrize(
    ("rev", "overrides"),
    [
        (revocation(), {"now": datetime(2026, 1, 1)}),
        (revocation(time=datetime(2026, 1, 1)), {}),
        (revocation(), {"issuer": ""}),
        (revocation(), {"audience": ""}),
        (revocation(), {"jti": ""}),
        (revocation(subject=""), {}),
        (revocation(agent_id="https://example.org/agent"), {}),
        (revocation(agent_id="spiffe://Example.org/agent"), {}),
    ],
)
def test_revocation_set_refuses_bad_input(rev: Revocation, overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        mint(rev, **overrides)


# --- receiving: every accepted shape --------------------------------------------------------


def test_a_forged_good_set_is_accepted() -> None:
    event = verify(forged())
    assert event.subject == {"format": "uri", "uri": AGENT}
    assert event.events == {RISC_ACCOUNT_DISABLED: {"reason": "hijacking"}}


@pytest.mark.parametrize(
    "typ", ["secevent+jwt", "application/secevent+jwt", "SecEvent+JWT", "Application/secevent+jwt"]
)
def test_typ_spellings_of_the_same_media_type(typ: str) -> None:
    assert verify(forged({**HEADER, "typ": typ})).jti == "set-1"


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [
        (RECEIVER, True),
        ([RECEIVER], True),
        (["https://web.receiver.example", RECEIVER], True),
        (["https://web.receiver.example"], False),
        (RECEIVER + "/", False),
    ],
)
def test_aud_string_or_array(aud: Any, accepted: bool) -> None:
    if accepted:
        assert verify(forged(aud=aud)).jti == "set-1"
    else:
        with pytest.raises(SignalRejected) as info:
            verify(forged(aud=aud))
        assert info.value.err == "invalid_audience"


def test_sub_id_may_be_absent_for_pre_ssf_transmitters() -> None:
    assert verify(forged(sub_id=DROP)).subject is None


def test_extra_claims_and_fractional_iat_are_accepted() -> None:
    event = verify(forged(iat=EPOCH - 0.5, txn="8675309", toe=EPOCH - 60))
    assert event.issued_at == datetime.fromtimestamp(EPOCH - 0.5, UTC)


def test_iat_windows_edges() -> None:
    assert verify(forged(iat=EPOCH + 30)).jti == "set-1"  # future, within leeway
    assert verify(forged(iat=EPOCH - 3600 - 30)).jti == "set-1"  # max_age + leeway
    assert verify(forged(iat=EPOCH - 3600), leeway=timedelta(0)).jti == "set-1"


def test_verify_set_refuses_a_naive_now_or_negative_windows() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(forged(), now=datetime(2026, 1, 1, 12))
    with pytest.raises(ValueError, match="negative"):
        verify(forged(), max_age=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="negative"):
        verify(forged(), leeway=timedelta(seconds=-1))


# --- receiving: every rejection path --------------------------------------------------------


def _hmac_with_public_key() -> str:
    """RFC 8725 §2.1: HS256 keyed with the public key (algorithm confusion)."""
    from joserfc.jwk import OctKey

    secret = json.dumps(public_jwk(KEY)).encode()
    header = {"alg": "HS256", "typ": SET_TYP, "kid": KEY.kid}
    return forge(header, set_claims(), OctKey.import_key(secret), "HS256")


def _duplicate(segment: str) -> str:
    if segment == "header":
        head = b'{"alg":"EdDSA","typ":"secevent+jwt","kid":"%s","kid":"x"}' % KEY.kid.encode()
        return sign_segments(b64(head), b64json(set_claims()), KEY, "EdDSA")
    body = json.dumps(set_claims())[:-1] + ', "iss": "https://evil.example"}'
    return sign_segments(b64json(HEADER), b64(body.encode()), KEY, "EdDSA")


def _swap_payload() -> str:
    good = forged()
    evil = forged(sub_id={"format": "uri", "uri": "spiffe://example.org/agents/victim"})
    return ".".join([good.split(".")[0], evil.split(".")[1], good.split(".")[2]])


def _oversize() -> str:
    padding = "x" * MAX_SET_LENGTH
    return forged(events={RISC_ACCOUNT_DISABLED: {"note": padding}})


CASES: list[tuple[str, Callable[[], Any], str, str]] = [
    # structure -> invalid_request
    ("not a string", lambda: None, "invalid_request", "not a string"),
    ("bytes", lambda: forged().encode(), "invalid_request", "not a string"),
    ("empty", lambda: "", "invalid_request", "empty"),
    ("oversize", _oversize, "invalid_request", "too long"),
    ("two segments", lambda: ".".join(forged().split(".")[:2]), "invalid_request", "2 segments"),
    ("JWE shape", lambda: "a.b.c.d.e", "invalid_request", "5 segments"),
    ("empty signature", lambda: forged().rsplit(".", 1)[0] + ".", "invalid_request", "missing"),
    ("padded signature", lambda: forged() + "=", "invalid_request", "malformed signature"),
    ("header not JSON", lambda: b64(b"alg") + "." + forged().split(".", 1)[1], "invalid_request",
     "malformed header"),
    ("header dup member", lambda: _duplicate("header"), "invalid_request",
     "duplicate member 'kid'"),
    ("payload dup member", lambda: _duplicate("payload"), "invalid_request",
     "duplicate member 'iss'"),
    ("payload not JSON", lambda: forge(HEADER, b"\xff", KEY, "EdDSA"), "invalid_request",
     "malformed claims"),
    ("payload array", lambda: forge(HEADER, b"[]", KEY, "EdDSA"), "invalid_request",
     "not a JSON object"),
    # algorithm and key -> invalid_key
    ("alg missing", lambda: forged({"typ": SET_TYP, "kid": KEY.kid}), "invalid_key", "missing alg"),
    ("alg none", lambda: forged({**HEADER, "alg": "none"}), "invalid_key", "alg none"),
    ("alg None", lambda: forged({**HEADER, "alg": "None"}), "invalid_key", "alg none"),
    ("alg HS256", _hmac_with_public_key, "invalid_key", "alg not allowed: HS256"),
    ("alg vs key", lambda: forge({**HEADER, "alg": "ES256"}, set_claims(), ES, "ES256"),
     "invalid_key", "alg does not match key: token ES256, key EdDSA"),
    ("kid missing", lambda: forged({"alg": "EdDSA", "typ": SET_TYP}), "invalid_key", "missing kid"),
    ("kid unknown", lambda: forge({**HEADER, "kid": OTHER.kid}, set_claims(), OTHER, "EdDSA"),
     "invalid_key", "unknown kid"),
    ("signed by other key", lambda: forge(HEADER, set_claims(), OTHER, "EdDSA"), "invalid_key",
     "bad signature"),
    ("payload swapped", _swap_payload, "invalid_key", "bad signature"),
    # header profile -> invalid_request
    ("typ missing", lambda: forged({"alg": "EdDSA", "kid": KEY.kid}), "invalid_request",
     "missing typ"),
    ("typ JWT", lambda: forged({**HEADER, "typ": "JWT"}), "invalid_request", "wrong typ: 'JWT'"),
    ("typ at+jwt", lambda: forged({**HEADER, "typ": "at+jwt"}), "invalid_request", "wrong typ"),
    ("typ logout", lambda: forged({**HEADER, "typ": "logout+jwt"}), "invalid_request", "wrong typ"),
    ("typ number", lambda: forged({**HEADER, "typ": 1}), "invalid_request", "wrong typ"),
    ("embedded jwk", lambda: forged({**HEADER, "jwk": public_jwk(OTHER)}), "invalid_request",
     "header not allowed: jwk"),
    ("jku", lambda: forged({**HEADER, "jku": "https://evil.example/jwks"}), "invalid_request",
     "header not allowed: jku"),
    ("crit", lambda: forged({**HEADER, "crit": ["exp"]}), "invalid_request", "crit header"),
    # issuer -> invalid_issuer
    ("iss other", lambda: forged(iss="https://evil.example"), "invalid_issuer", "issuer mismatch"),
    ("iss slash", lambda: forged(iss=ISSUER + "/"), "invalid_issuer", "issuer mismatch"),
    ("iss case", lambda: forged(iss=ISSUER.upper()), "invalid_issuer", "issuer mismatch"),
    ("iss missing", lambda: forged(iss=DROP), "invalid_issuer", "missing iss"),
    ("iss number", lambda: forged(iss=1), "invalid_issuer", "iss is not a string"),
    # audience -> invalid_audience
    ("aud other", lambda: forged(aud="https://other.example"), "invalid_audience",
     "audience mismatch"),
    ("aud missing", lambda: forged(aud=DROP), "invalid_audience", "missing aud"),
    ("aud empty list", lambda: forged(aud=[]), "invalid_audience", "non-empty array"),
    ("aud number", lambda: forged(aud=[RECEIVER, 1]), "invalid_audience", "non-string member"),
    # distinguishing SETs from ID and access tokens (SSF §4.1.3) -> invalid_request
    ("exp future", lambda: forged(exp=EPOCH + 300), "invalid_request", "exp present"),
    ("exp null", lambda: forged(exp=None), "invalid_request", "exp present"),
    ("sub", lambda: forged(sub=AGENT), "invalid_request", "sub present"),
    ("sub empty", lambda: forged(sub=""), "invalid_request", "sub present"),
    # iat -> invalid_request
    ("iat missing", lambda: forged(iat=DROP), "invalid_request", "missing iat"),
    ("iat future", lambda: forged(iat=EPOCH + 31), "invalid_request", "issued in the future"),
    ("iat too old", lambda: forged(iat=EPOCH - 3600 - 31), "invalid_request", "too old"),
    ("iat string", lambda: forged(iat=str(EPOCH)), "invalid_request", "iat is not a number"),
    ("iat bool", lambda: forged(iat=True), "invalid_request", "iat is not a number"),
    ("iat negative", lambda: forged(iat=-1), "invalid_request", "iat out of range"),
    ("iat huge", lambda: forged(iat=10**20), "invalid_request", "iat out of range"),
    # jti -> invalid_request
    ("jti missing", lambda: forged(jti=DROP), "invalid_request", "missing jti"),
    ("jti empty", lambda: forged(jti=""), "invalid_request", "jti is empty"),
    ("jti number", lambda: forged(jti=7), "invalid_request", "jti is not a string"),
    # events -> invalid_request
    ("events missing", lambda: forged(events=DROP), "invalid_request", "missing events"),
    ("events empty", lambda: forged(events={}), "invalid_request", "events is empty"),
    ("events list", lambda: forged(events=[RISC_ACCOUNT_DISABLED]), "invalid_request",
     "events is not a JSON object"),
    ("events string", lambda: forged(events=RISC_ACCOUNT_DISABLED), "invalid_request",
     "events is not a JSON object"),
    ("event payload string", lambda: forged(events={RISC_ACCOUNT_DISABLED: "hijacking"}),
     "invalid_request", "is not a JSON object"),
    ("event payload null", lambda: forged(events={RISC_ACCOUNT_DISABLED: None}),
     "invalid_request", "is not a JSON object"),
    ("event type empty", lambda: forged(events={"": {}}), "invalid_request", "empty event type"),
    # sub_id -> invalid_request
    ("sub_id string", lambda: forged(sub_id=AGENT), "invalid_request", "sub_id is not a JSON"),
    ("sub_id null", lambda: forged(sub_id=None), "invalid_request", "sub_id is not a JSON"),
    ("sub_id no format", lambda: forged(sub_id={"uri": AGENT}), "invalid_request",
     "sub_id has no format"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "err", "reason"),
    [pytest.param(make, err, reason, id=name) for name, make, err, reason in CASES],
)
def test_rejections_carry_the_rfc8935_error_code(
    make: Callable[[], Any], err: str, reason: str
) -> None:
    with pytest.raises(SignalRejected) as info:
        verify(make())
    assert info.value.err == err
    assert reason in info.value.reason
    assert str(info.value) == f"{err}: {info.value.reason}"


def test_every_rejection_case_is_valid_apart_from_its_defect() -> None:
    # The forger itself must produce acceptable SETs, or the cases above prove nothing.
    assert verify(forged()).jti == "set-1"
    assert verify(forge(HEADER, set_claims(), KEY, "EdDSA")).jti == "set-1"
    assert len(forged()) < MAX_SET_LENGTH


def test_alg_allowed_by_ring_but_not_by_config_is_refused() -> None:
    with pytest.raises(SignalRejected) as info:
        verify(mint(signer=ES), algorithms=["EdDSA"])
    assert (info.value.err, info.value.reason) == ("invalid_key", "alg not allowed: ES256")


def test_hmac_is_refused_even_when_configured() -> None:
    with pytest.raises(SignalRejected) as info:
        verify(_hmac_with_public_key(), algorithms=["HS256", "EdDSA"])
    assert (info.value.err, info.value.reason) == ("invalid_key", "alg not supported: HS256")


def test_none_is_refused_even_when_configured() -> None:
    with pytest.raises(SignalRejected) as info:
        verify(forged({**HEADER, "alg": "none"}), algorithms=["none"])
    assert (info.value.err, info.value.reason) == ("invalid_key", "alg none")


def test_a_set_for_another_receiver_is_refused() -> None:
    token = mint(audience="https://other-receiver.example")
    with pytest.raises(SignalRejected) as info:
        verify(token)
    assert info.value.err == "invalid_audience"


def test_a_set_from_another_transmitter_is_refused_even_with_our_key() -> None:
    token = mint(issuer="https://other-broker.example")
    with pytest.raises(SignalRejected) as info:
        verify(token)
    assert info.value.err == "invalid_issuer"


# --- agent_signals --------------------------------------------------------------------------

VICTIM = "spiffe://example.org/agents/victim"


def security_event(subject: Any = None, events: dict[str, Any] | None = None) -> SecurityEvent:
    return SecurityEvent(
        jti="set-1",
        issuer=ISSUER,
        issued_at=NOW,
        subject=subject,
        events=events if events is not None else {RISC_ACCOUNT_DISABLED: {}},
    )


def uri(value: str) -> dict[str, str]:
    return {"format": "uri", "uri": value}


@pytest.mark.parametrize(
    ("subject", "agents"),
    [
        (uri(AGENT), [AGENT]),
        (uri("spiffe://example.org"), ["spiffe://example.org"]),
        (uri("https://example.org/agents/coder"), []),
        (uri("urn:uuid:4e851e98-83c4-4743-a5da-150ecb53042f"), []),
        (uri("spiffe://Example.org/agents/coder"), []),  # upper case trust domain
        (uri("spiffe://example.org/agents/../admin"), []),  # dot segment
        (uri("spiffe://example.org/agents/coder/"), []),  # trailing slash
        (uri("spiffe://"), []),
        ({"format": "uri", "uri": 7}, []),
        ({"format": "uri"}, []),
        ({"uri": AGENT}, []),  # no format
        ({"format": "URI", "uri": AGENT}, []),  # formats are case-sensitive names
        ({"format": "opaque", "id": AGENT}, []),
        ({"format": "email", "email": "coder@example.org"}, []),
        ({"format": "iss_sub", "iss": "spiffe://example.org", "sub": AGENT}, []),
        ({"format": "account", "uri": "acct:coder@example.org"}, []),
        ({"format": "complex", "user": uri(AGENT)}, [AGENT]),
        ({"format": "complex", "device": uri(AGENT)}, [AGENT]),
        ({"format": "complex", "application": uri(AGENT)}, [AGENT]),
        ({"format": "complex", "session": uri(AGENT)}, []),
        ({"format": "complex", "tenant": uri(AGENT)}, []),
        ({"format": "complex", "user": {"format": "email", "email": "a@example.org"}}, []),
        ({"format": "complex", "user": uri("https://example.org/a")}, []),
        ({"format": "complex", "user": AGENT}, []),
        ({"format": "complex", "user": uri(AGENT), "application": uri(AGENT)}, [AGENT]),
        ({"format": "complex", "user": uri(AGENT), "device": uri(VICTIM)}, [AGENT, VICTIM]),
        ({"format": "complex", "user": {"format": "complex", "user": uri(AGENT)}}, []),
        ({"format": "aliases", "identifiers": [uri(AGENT)]}, []),
        ("spiffe://example.org/agents/coder", []),
        ([uri(AGENT)], []),
        (None, []),
    ],
)
def test_which_subjects_name_an_agent(subject: Any, agents: list[str]) -> None:
    signals = agent_signals(security_event(subject), [RISC_ACCOUNT_DISABLED])
    assert [s.spiffe_id for s in signals] == agents
    assert all(s.event_type == RISC_ACCOUNT_DISABLED for s in signals)


def test_event_types_not_accepted_are_ignored() -> None:
    event = security_event(uri(AGENT), {RISC_ACCOUNT_DISABLED: {}, RISC_ACCOUNT_PURGED: {}})
    assert agent_signals(event, [RISC_ACCOUNT_PURGED]) == [
        AgentSignal(AGENT, RISC_ACCOUNT_PURGED, "account-purged")
    ]
    assert agent_signals(event, []) == []
    assert agent_signals(event, ["https://schemas.openid.net/secevent/risc/event-type/"]) == []


def test_a_single_string_is_one_accepted_type_not_a_set_of_letters() -> None:
    event = security_event(uri(AGENT))
    assert agent_signals(event, RISC_ACCOUNT_DISABLED) == [
        AgentSignal(AGENT, RISC_ACCOUNT_DISABLED, "account-disabled")
    ]


@pytest.mark.parametrize(
    ("change_type", "counts"),
    [("revoke", True), ("delete", True), ("create", False), ("update", False),
     (None, False), ("REVOKE", False)],
)  # fmt: skip
def test_credential_change_counts_only_when_it_takes_a_credential_away(
    change_type: str | None, counts: bool
) -> None:
    payload = {"credential_type": "app"}
    if change_type is not None:
        payload["change_type"] = change_type
    event = security_event(uri(AGENT), {CAEP_CREDENTIAL_CHANGE: payload})
    signals = agent_signals(event, [CAEP_CREDENTIAL_CHANGE])
    assert signals == ([AgentSignal(AGENT, CAEP_CREDENTIAL_CHANGE, "credential-change")]
                       if counts else [])  # fmt: skip


def test_change_type_only_matters_for_credential_change() -> None:
    event = security_event(
        uri(AGENT), {RISC_CREDENTIAL_COMPROMISE: {"credential_type": "app", "change_type": "x"}}
    )
    assert agent_signals(event, [RISC_CREDENTIAL_COMPROMISE]) == [
        AgentSignal(AGENT, RISC_CREDENTIAL_COMPROMISE, "credential-compromise")
    ]


def test_pre_ssf_events_name_the_subject_inside_the_event() -> None:
    event = security_event(None, {RISC_ACCOUNT_DISABLED: {"subject": uri(AGENT)}})
    assert agent_signals(event, [RISC_ACCOUNT_DISABLED]) == [
        AgentSignal(AGENT, RISC_ACCOUNT_DISABLED, "account-disabled")
    ]


def test_the_top_level_sub_id_wins_over_the_event_subject() -> None:
    event = security_event(uri(AGENT), {RISC_ACCOUNT_DISABLED: {"subject": uri(VICTIM)}})
    assert [s.spiffe_id for s in agent_signals(event, [RISC_ACCOUNT_DISABLED])] == [AGENT]
    event = security_event(
        {"format": "email", "email": "a@example.org"},
        {RISC_ACCOUNT_DISABLED: {"subject": uri(VICTIM)}},
    )
    assert agent_signals(event, [RISC_ACCOUNT_DISABLED]) == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"reason_admin": {"en": "Landspeed Policy Violation"}}, "Landspeed Policy Violation"),
        ({"reason_admin": {"de": "Verstoß", "en": "violation"}}, "violation"),
        ({"reason_admin": {"de": "Verstoß"}}, "account-disabled"),
        ({"reason_admin": {"en": ""}}, "account-disabled"),
        ({"reason_admin": {"en": 5}}, "account-disabled"),
        ({"reason_admin": "violation"}, "account-disabled"),
        ({"reason_user": {"en": "for users only"}}, "account-disabled"),
        ({"reason": "hijacking"}, "account-disabled"),
        ({}, "account-disabled"),
    ],
)
def test_reason_is_reason_admin_en_or_the_short_name(payload: dict[str, Any], reason: str) -> None:
    event = security_event(uri(AGENT), {RISC_ACCOUNT_DISABLED: payload})
    assert agent_signals(event, [RISC_ACCOUNT_DISABLED])[0].reason == reason


def test_alternative_event_uris_each_yield_a_signal_in_order() -> None:
    event = security_event(uri(AGENT), {RISC_ACCOUNT_PURGED: {}, RISC_ACCOUNT_DISABLED: {}})
    assert [s.event_type for s in agent_signals(event, ALL_TYPES)] == [
        RISC_ACCOUNT_PURGED,
        RISC_ACCOUNT_DISABLED,
    ]


def test_non_object_payloads_in_a_hand_built_event_are_skipped() -> None:
    event = security_event(uri(AGENT), {RISC_ACCOUNT_DISABLED: "hijacking"})
    assert agent_signals(event, ALL_TYPES) == []


# --- examples from the specifications -------------------------------------------------------

# CAEP 1.0 §3.1 (openid/sharedsignals, 1.0/openid-caep-1_0.md), "Example: Session Revoked -
# subject as `sub` claim (includes optional claims)", verbatim.
CAEP_SESSION_REVOKED_EXAMPLE = json.loads("""
{
    "iss": "https://idp.example.com/123456789/",
    "jti": "24c63fb56e5a2d77a6b512616ca9fa24",
    "iat": 1615305159,
    "aud": "https://sp.example.com/caep",
    "txn": "8675309",
    "sub_id": {
        "format": "complex",
        "session": {
          "format": "opaque",
          "id": "dMTlD|1600802906337.16|16008.16"
        },
        "user": {
          "format": "iss_sub",
          "iss": "https://idp.example.com/123456789/",
          "sub": "99beb27c-c1c2-4955-882a-e0dc4996fcbc"
        },
        "tenant": {
          "format": "opaque",
          "id": "123456789"
        }
    },
    "events": {
        "https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
            "initiating_entity": "policy",
            "reason_admin": {
                "en": "Landspeed Policy Violation: C076E82F"
            },
            "reason_user": {
                "en": "Access attempt from multiple regions.",
                "es-410": "Intento de acceso desde varias regiones."
            },
            "event_timestamp": 1615304991
        }
    }
}
""")

# RISC 1.0 §2.3 (openid/sharedsignals, openid-risc-1_0.xml), "Example: Account Disabled",
# with the wrapped event type URI joined and the stray comma after "sub" removed.
RISC_ACCOUNT_DISABLED_EXAMPLE = json.loads("""
{
  "iss": "https://idp.example.com/",
  "jti": "756E69717565206964656E746966696572",
  "iat": 1508184845,
  "aud": "636C69656E745F6964",
  "sub_id": {
    "format": "iss_sub",
    "iss": "https://idp.example.com/",
    "sub": "7375626A656374"
  },
  "events": {
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled": {
      "reason": "hijacking"
    }
  }
}
""")


def verify_example(claims: dict[str, Any]) -> SecurityEvent:
    """Sign a spec example with our key and verify it as of one minute after its ``iat``."""
    return verify(
        forge(HEADER, claims, KEY, "EdDSA"),
        issuer=claims["iss"],
        audience=claims["aud"],
        now=datetime.fromtimestamp(claims["iat"] + 60, UTC),
    )


def test_caep_session_revoked_example_verifies_and_names_no_agent() -> None:
    event = verify_example(CAEP_SESSION_REVOKED_EXAMPLE)
    assert event.jti == "24c63fb56e5a2d77a6b512616ca9fa24"
    assert event.subject is not None
    assert event.subject["format"] == "complex"
    # The user is an iss_sub subject, not a SPIFFE ID: a stream's other principals are
    # skipped, not errors.
    assert agent_signals(event, ALL_TYPES) == []


def test_caep_session_revoked_example_with_an_agent_as_the_user() -> None:
    claims = json.loads(json.dumps(CAEP_SESSION_REVOKED_EXAMPLE))
    claims["sub_id"]["user"] = uri(AGENT)
    event = verify_example(claims)
    assert agent_signals(event, [CAEP_SESSION_REVOKED]) == [
        AgentSignal(AGENT, CAEP_SESSION_REVOKED, "Landspeed Policy Violation: C076E82F")
    ]


def test_risc_account_disabled_example_verifies_and_names_no_agent() -> None:
    event = verify_example(RISC_ACCOUNT_DISABLED_EXAMPLE)
    assert event.events == {RISC_ACCOUNT_DISABLED: {"reason": "hijacking"}}
    assert agent_signals(event, ALL_TYPES) == []


def test_risc_account_disabled_example_with_an_agent_as_the_subject() -> None:
    claims = {**RISC_ACCOUNT_DISABLED_EXAMPLE, "sub_id": uri(AGENT)}
    assert agent_signals(verify_example(claims), [RISC_ACCOUNT_DISABLED]) == [
        AgentSignal(AGENT, RISC_ACCOUNT_DISABLED, "account-disabled")
    ]


def test_spec_examples_are_too_old_for_a_receiver_today() -> None:
    with pytest.raises(SignalRejected) as info:
        verify(
            forge(HEADER, CAEP_SESSION_REVOKED_EXAMPLE, KEY, "EdDSA"),
            issuer=CAEP_SESSION_REVOKED_EXAMPLE["iss"],
            audience=CAEP_SESSION_REVOKED_EXAMPLE["aud"],
        )
    assert (info.value.err, info.value.reason) == ("invalid_request", "too old")


# --- properties ------------------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = mint(revocation(RevocationKind.CREDENTIAL))


@st.composite
def tampered(draw: st.DrawFn, original: str) -> str:
    """One character replaced, deleted or inserted anywhere."""
    index = draw(st.integers(0, len(original) - 1))
    kind = draw(st.sampled_from(["replace", "delete", "insert"]))
    if kind == "delete":
        return original[:index] + original[index + 1 :]
    char = draw(st.one_of(st.sampled_from(string.printable), st.characters()))
    if kind == "insert":
        return original[:index] + char + original[index:]
    assume(char != original[index])
    return original[:index] + char + original[index + 1 :]


def test_the_untampered_set_verifies() -> None:
    assert verify(GOOD).jti == "set-1"


@FAST
@given(tampered(GOOD))
def test_any_tamper_of_a_set_is_rejected(raw: str) -> None:
    with pytest.raises(SignalRejected):
        verify(raw)


@FAST
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=50),
        st.none(),
        st.integers(),
        st.builds(
            lambda h, p: f"{b64json(h)}.{b64json(p)}.{GOOD.split('.')[2]}",
            st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit"]), st.text(max_size=8)),
            st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6)),
        ),
    )
)
def test_any_input_fails_only_with_signal_rejected(raw: Any) -> None:
    with pytest.raises(SignalRejected) as info:
        verify(raw)
    assert info.value.err in {"invalid_request", "invalid_key"}

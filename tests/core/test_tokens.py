"""Credentials: RFC 9068 access tokens minted and verified in one call."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskbound.core.keys import KeyRing, public_jwk
from taskbound.core.model import Tier
from taskbound.core.tokens import CredentialClaims, mint_credential, verify_credential
from taskbound.errors import InvalidToken

from ._crypto import (
    ISSUER,
    LEEWAY,
    NOW,
    TOOL_AUDIENCE,
    b64,
    b64json,
    credential_claims,
    credential_payload,
    forge,
    key,
    sign_segments,
)

KEY = key("EdDSA")
RING = KeyRing.from_private([KEY, key("ES256")])
HEADER = {"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid}


def verify(raw: Any, **overrides: Any) -> CredentialClaims:
    kwargs: dict[str, Any] = {
        "keys": RING,
        "issuer": ISSUER,
        "audiences": [TOOL_AUDIENCE],
        "algorithms": ["EdDSA", "ES256"],
        "now": NOW,
        "leeway": LEEWAY,
    }
    kwargs.update(overrides)
    return verify_credential(raw, **kwargs)


def token(header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A credential forged with the real key, so that only the edited part is wrong."""
    payload = credential_payload(**claims)
    for name, value in claims.items():
        if value is DROP:
            del payload[name]
    return forge(header or HEADER, payload, KEY, "EdDSA")


DROP: Any = object()


def details(**edits: Any) -> list[dict[str, Any]]:
    entry = dict(credential_payload()["authorization_details"][0])
    for name, value in edits.items():
        if value is DROP:
            del entry[name]
        else:
            entry[name] = value
    return [entry]


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_round_trip(alg: str) -> None:
    claims = credential_claims()
    raw = mint_credential(claims, key(alg))
    assert verify(raw) == claims


def test_wire_format() -> None:
    raw = mint_credential(credential_claims(), KEY)
    head, body, _ = raw.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid}
    assert payload == credential_payload()
    assert isinstance(payload["exp"], int)


def test_mint_truncates_to_whole_seconds() -> None:
    claims = credential_claims(issued_at=NOW + timedelta(microseconds=900_000))
    assert verify(mint_credential(claims, KEY)).issued_at == NOW


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issued_at": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"tier": "root"}, "'root' is not a valid Tier"),
        ({"audience": ""}, "needs an audience"),
        ({"tool": "git hub"}, "tool name not usable"),
        ({"tool": "github:admin"}, "tool name not usable"),
        ({"jkt": "short"}, "jkt must be"),
        ({"actions": ("push", "push")}, "distinct"),
        ({"actions": ("",)}, "distinct"),
    ],
)
def test_mint_refuses_bad_claims(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mint_credential(credential_claims(**overrides), KEY)


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_typ_compared_as_media_type(typ: str) -> None:
    assert verify(token({**HEADER, "typ": typ})).jti == "cred-1"


@pytest.mark.parametrize("shift", [timedelta(0), LEEWAY - timedelta(seconds=1)])
def test_expiry_honours_leeway(shift: timedelta) -> None:
    exp = int(NOW.timestamp())
    assert verify(token(exp=exp), now=NOW + shift).expires_at == NOW


def test_not_before_honours_leeway() -> None:
    nbf = int((NOW + LEEWAY).timestamp())
    assert verify(token(nbf=nbf, iat=nbf)).not_before == NOW + LEEWAY


def test_lone_string_audiences_is_one_audience_not_substrings() -> None:
    raw = token(aud="https://gateway.example")
    with pytest.raises(InvalidToken):
        verify(raw, audiences=TOOL_AUDIENCE)
    assert verify(token(), audiences=TOOL_AUDIENCE).audience == TOOL_AUDIENCE


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(token(), now=datetime(2026, 1, 1))


def test_failure_is_opaque_but_reason_is_precise() -> None:
    with pytest.raises(InvalidToken) as info:
        verify(token(exp=int(NOW.timestamp()) - 3600))
    assert info.value.detail == InvalidToken.default_detail
    assert info.value.code == "invalid_token"
    assert info.value.internal == "expired"
    assert "expired" not in str(info.value)


# --- every rejection path -------------------------------------------------------------

OTHER = key("EdDSA", 1)
ES = key("ES256")
EPOCH = int(NOW.timestamp())


def _hmac_with_public_key() -> str:
    """RFC 8725 §2.1: HS256 keyed with the public key bytes (algorithm confusion)."""
    from joserfc.jwk import OctKey

    secret = json.dumps(public_jwk(KEY)).encode()
    header = {"alg": "HS256", "typ": "at+jwt", "kid": KEY.kid}
    return forge(header, credential_payload(), OctKey.import_key(secret), "HS256")


def _embedded_jwk() -> str:
    header = {**HEADER, "kid": OTHER.kid, "jwk": {k: v for k, v in public_jwk(OTHER).items()}}
    return forge(header, credential_payload(), OTHER, "EdDSA")


def _duplicate(segment: str) -> str:
    if segment == "header":
        head = b64(b'{"alg":"EdDSA","typ":"at+jwt","kid":"%s","kid":"x"}' % KEY.kid.encode())
        return sign_segments(head, b64json(credential_payload()), KEY, "EdDSA")
    body = json.dumps(credential_payload())[:-1] + ', "iss": "https://evil.example"}'
    return sign_segments(b64json(HEADER), b64(body.encode()), KEY, "EdDSA")


def _swap_payload() -> str:
    good = token()
    evil = token(tsk="task-2")
    return ".".join([good.split(".")[0], evil.split(".")[1], good.split(".")[2]])


CASES: list[tuple[str, Callable[[], Any], str]] = [
    # structure
    ("not a string", lambda: None, "not a string"),
    ("bytes", lambda: token().encode(), "not a string"),
    ("empty", lambda: "", "empty"),
    ("too long", lambda: token() + "A" * 9000, "too long"),
    ("two segments", lambda: ".".join(token().split(".")[:2]), "not a compact JWS: 2"),
    ("four segments", lambda: token() + ".", "not a compact JWS: 4"),
    ("JWE shape", lambda: "a.b.c.d.e", "not a compact JWS: 5"),
    ("JSON serialization", lambda: json.dumps({"payload": "e30", "signature": "x"}), "1 segm"),
    ("empty signature", lambda: token().rsplit(".", 1)[0] + ".", "missing signature"),
    ("padded signature", lambda: token() + "=", "malformed signature"),
    ("header not base64", lambda: "!!." + token().split(".", 1)[1], "malformed header"),
    ("header not JSON", lambda: b64(b"alg") + "." + token().split(".", 1)[1], "malformed header"),
    ("header an array", lambda: sign_segments(b64json([]), "e30", KEY, "EdDSA"), "not a JSON obj"),
    ("header dup member", lambda: _duplicate("header"), "duplicate member 'kid'"),
    ("payload dup member", lambda: _duplicate("payload"), "duplicate member 'iss'"),
    ("payload not JSON", lambda: forge(HEADER, b"\xff", KEY, "EdDSA"), "malformed claims"),
    ("payload NaN", lambda: forge(HEADER, b'{"exp": NaN}', KEY, "EdDSA"), "malformed claims"),
    ("payload array", lambda: forge(HEADER, b"[]", KEY, "EdDSA"), "not a JSON object"),
    ("lone surrogate", lambda: token(intent="\ud800"), "malformed claims"),
    # algorithm and key selection (RFC 8725 §3.1)
    ("alg missing", lambda: token({"typ": "at+jwt", "kid": KEY.kid}), "missing alg"),
    ("alg none", lambda: token({**HEADER, "alg": "none"}), "alg none"),
    ("alg NONE", lambda: token({**HEADER, "alg": "NONE"}), "alg none"),
    ("alg HS256 confusion", _hmac_with_public_key, "alg not allowed: HS256"),
    ("alg vs key", lambda: forge({**HEADER, "alg": "ES256"}, credential_payload(), ES, "ES256"),
     "alg does not match key: token ES256, key EdDSA"),
    ("kid missing", lambda: token({"alg": "EdDSA", "typ": "at+jwt"}), "missing kid"),
    ("kid number", lambda: token({**HEADER, "kid": 1}), "missing kid"),
    ("kid unknown", lambda: forge({**HEADER, "kid": OTHER.kid}, credential_payload(), OTHER,
                                  "EdDSA"), "unknown kid"),
    ("kid huge", lambda: token({**HEADER, "kid": "k" * 300}), "kid too long"),
    ("embedded jwk", _embedded_jwk, "header not allowed: jwk"),
    ("jku", lambda: token({**HEADER, "jku": "https://evil.example/jwks"}), "not allowed: jku"),
    ("x5u", lambda: token({**HEADER, "x5u": "https://evil.example/c"}), "not allowed: x5u"),
    ("x5c", lambda: token({**HEADER, "x5c": ["MIIB"]}), "not allowed: x5c"),
    ("crit", lambda: token({**HEADER, "crit": ["exp"], "exp": 1}), "crit header"),
    ("b64", lambda: token({**HEADER, "b64": False}), "b64 header"),
    ("typ missing", lambda: token({"alg": "EdDSA", "kid": KEY.kid}), "missing typ"),
    ("typ JWT", lambda: token({**HEADER, "typ": "JWT"}), "wrong typ: 'JWT'"),
    ("typ dpop", lambda: token({**HEADER, "typ": "dpop+jwt"}), "wrong typ"),
    ("typ number", lambda: token({**HEADER, "typ": 1}), "wrong typ"),
    ("signed by other key", lambda: forge(HEADER, credential_payload(), OTHER, "EdDSA"),
     "bad signature"),
    ("payload swapped", _swap_payload, "bad signature"),
    # registered claims
    ("iss missing", lambda: token(iss=DROP), "missing iss"),
    ("iss other", lambda: token(iss="https://evil.example"), "issuer mismatch"),
    ("iss case", lambda: token(iss=ISSUER.upper()), "issuer mismatch"),
    ("iss number", lambda: token(iss=1), "iss is not a string"),
    ("aud missing", lambda: token(aud=DROP), "missing aud"),
    ("aud list", lambda: token(aud=[TOOL_AUDIENCE]), "aud is not a single string"),
    ("aud other tool", lambda: token(aud="https://gateway.example/jira"), "audience mismatch"),
    ("exp missing", lambda: token(exp=DROP), "missing exp"),
    ("expired", lambda: token(exp=EPOCH - 31), "expired"),
    ("exp at leeway edge", lambda: token(exp=EPOCH - 30), "expired"),
    ("exp float", lambda: token(exp=EPOCH + 60.5), "exp is not an integer"),
    ("exp bool", lambda: token(exp=True), "exp is not a number"),
    ("exp string", lambda: token(exp=str(EPOCH + 60)), "exp is not a number"),
    ("exp negative", lambda: token(exp=-1), "exp out of range"),
    ("exp huge", lambda: token(exp=10**20), "exp out of range"),
    ("exp year 9999", lambda: token(exp=253402300799, nbf=253402300799), "not yet valid"),
    ("iat year 9999", lambda: token(iat=253402300799), "issued in the future"),
    ("nbf missing", lambda: token(nbf=DROP), "missing nbf"),
    ("nbf future", lambda: token(nbf=EPOCH + 31), "not yet valid"),
    ("iat missing", lambda: token(iat=DROP), "missing iat"),
    ("iat future", lambda: token(iat=EPOCH + 31), "issued in the future"),
    ("sub missing", lambda: token(sub=DROP), "missing sub"),
    ("sub empty", lambda: token(sub=""), "sub is empty"),
    ("client_id missing", lambda: token(client_id=DROP), "missing client_id"),
    ("jti missing", lambda: token(jti=DROP), "missing jti"),
    ("jti number", lambda: token(jti=7), "jti is not a string"),
    ("tsk missing", lambda: token(tsk=DROP), "missing tsk"),
    ("owner missing", lambda: token(owner=DROP), "missing owner"),
    ("intent missing", lambda: token(intent=DROP), "missing intent"),
    ("intent object", lambda: token(intent={}), "intent is not a string"),
    # sender constraint (RFC 9449 §6.1)
    ("cnf missing", lambda: token(cnf=DROP), "missing cnf"),
    ("cnf string", lambda: token(cnf="x"), "cnf is not an object"),
    ("cnf.jkt missing", lambda: token(cnf={"x5t#S256": "abc"}), "missing cnf.jkt"),
    ("cnf.jkt short", lambda: token(cnf={"jkt": "abc"}), "not a SHA-256 JWK thumbprint"),
    # scope and authorization details (RFC 9396)
    ("scope missing", lambda: token(scope=DROP), "missing scope"),
    ("scope two tiers", lambda: token(scope="github:write github:admin"), "scope does not match"),
    ("scope other tier", lambda: token(scope="github:admin"), "scope does not match"),
    ("details missing", lambda: token(authorization_details=DROP), "missing authorization_det"),
    ("details empty", lambda: token(authorization_details=[]), "exactly one entry"),
    ("details object", lambda: token(authorization_details={}), "exactly one entry"),
    ("details two", lambda: token(authorization_details=details() * 2), "exactly one entry"),
    ("details entry string", lambda: token(authorization_details=["x"]), "not an object"),
    ("details type", lambda: token(authorization_details=details(type="openid")), "type is not"),
    ("details tool", lambda: token(authorization_details=details(tool=DROP)), "missing tool"),
    ("details tool spaces", lambda: token(authorization_details=details(tool="a b")),
     "tool is not a scope token"),
    ("details tier", lambda: token(authorization_details=details(tier="root")),
     "unknown tier: 'root'"),
    ("details tier wider", lambda: token(authorization_details=details(tier="admin")),
     "scope does not match"),
    ("details actions", lambda: token(authorization_details=details(actions="push")),
     "actions is not an array"),
    ("details action type", lambda: token(authorization_details=details(actions=[1])),
     "actions is not an array"),
    ("details actions dup", lambda: token(authorization_details=details(actions=["a", "a"])),
     "duplicates"),
    ("details constraints", lambda: token(authorization_details=details(constraints=[])),
     "constraints is not an object"),
    ("details extra member", lambda: token(authorization_details=details(locations=["x"])),
     "unknown members: locations"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejects(build: Callable[[], Any], reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        verify(build())
    assert reason in info.value.internal


def test_hs256_on_the_allow_list_is_still_refused() -> None:
    """A misconfigured pin cannot enable HMAC: the verifier has no symmetric algorithms."""
    with pytest.raises(InvalidToken) as info:
        verify(_hmac_with_public_key(), algorithms=["HS256", "EdDSA"])
    assert info.value.internal == "alg not supported: HS256"


def test_algorithm_pin_is_enforced_even_for_a_known_key() -> None:
    raw = mint_credential(credential_claims(), ES)
    assert verify(raw).jti == "cred-1"
    with pytest.raises(InvalidToken) as info:
        verify(raw, algorithms=["EdDSA"])
    assert info.value.internal == "alg not allowed: ES256"


def test_empty_algorithm_pin_rejects_everything() -> None:
    with pytest.raises(InvalidToken) as info:
        verify(token(), algorithms=[])
    assert info.value.internal == "alg not allowed: EdDSA"


def test_max_length_applies_before_parsing() -> None:
    raw = token()
    with pytest.raises(InvalidToken) as info:
        verify(raw, max_length=len(raw) - 1)
    assert info.value.internal.startswith("too long")


def test_tier_is_a_tier() -> None:
    claims = verify(token())
    assert claims.tier is Tier.WRITE
    assert claims.actions == ("push", "open_pr")
    assert claims.scope == "github:write"
    assert claims.issued_at.tzinfo is UTC

"""Transaction tokens (draft-ietf-oauth-transaction-tokens-10): minted and verified in one
call, and every way a forged, foreign or malformed one is refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from taskbound.core.keys import KeyRing, public_jwk
from taskbound.core.txn import (
    MAX_LENGTH,
    TXN_TOKEN_TYPE,
    InvalidTxnToken,
    TxnToken,
    mint_txn_token,
    verify_txn_token,
)
from taskbound.errors import InvalidToken

from ._crypto import AGENT, ISSUER, LEEWAY, NOW, b64, b64json, forge, key, sign_segments

AUDIENCE = "https://gateway.example/issues"
KEY = key("EdDSA")
ES = key("ES256")
OTHER = key("EdDSA", 1)
RING = KeyRing.from_private([KEY, ES])
HEADER = {"alg": "EdDSA", "typ": "txntoken+jwt", "kid": KEY.kid}
EPOCH = int(NOW.timestamp())
TCTX = {"task": "task-1", "owner": "alice", "tool": "issues", "actors": []}
RCTX = {"req_ip": "127.0.0.1", "authn": "dpop", "req_wl": ISSUER}
DROP: Any = object()


def mint(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "txn": "task-1",
        "subject": AGENT,
        "scope": "issues:read",
        "tctx": TCTX,
        "rctx": RCTX,
        "now": NOW,
        "ttl": timedelta(seconds=60),
        "key": KEY,
        "jti": "txn-jti-1",
    }
    kwargs.update(overrides)
    return mint_txn_token(**kwargs)


def verify(raw: Any, **overrides: Any) -> TxnToken:
    kwargs: dict[str, Any] = {
        "keys": RING,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["EdDSA", "ES256"],
        "now": NOW,
        "leeway": LEEWAY,
    }
    kwargs.update(overrides)
    return verify_txn_token(raw, **kwargs)


def payload(**edits: Any) -> dict[str, Any]:
    """The wire payload of a valid Txn-Token, edited."""
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": EPOCH,
        "exp": EPOCH + 60,
        "txn": "task-1",
        "sub": AGENT,
        "scope": "issues:read",
        "req_wl": ISSUER,
        "tctx": TCTX,
        "rctx": RCTX,
        "jti": "txn-jti-1",
    }
    for name, value in edits.items():
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def token(header: dict[str, Any] | None = None, **edits: Any) -> str:
    """A Txn-Token forged with the real key, so that only the edited part is wrong."""
    return forge(header or HEADER, payload(**edits), KEY, "EdDSA")


def segments(raw: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = raw.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(head + "==")),
        json.loads(base64.urlsafe_b64decode(body + "==")),
    )


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("signer", [KEY, ES], ids=["EdDSA", "ES256"])
def test_round_trip(signer: Any) -> None:
    got = verify(mint(key=signer))
    assert got == TxnToken(
        issuer=ISSUER,
        audience=AUDIENCE,
        txn="task-1",
        subject=AGENT,
        scope="issues:read",
        requesting_workload=ISSUER,
        issued_at=NOW,
        expires_at=NOW + timedelta(seconds=60),
        kid=signer.kid,
        tctx=TCTX,
        rctx=RCTX,
        jti="txn-jti-1",
    )


def test_wire_format() -> None:
    header, body = segments(mint())
    assert header == HEADER
    assert body == payload()
    assert isinstance(body["exp"], int)
    assert TXN_TOKEN_TYPE == "urn:ietf:params:oauth:token-type:txn_token"


def test_requesting_workload_and_jti_are_optional_inputs() -> None:
    _, body = segments(mint(jti=None, requesting_workload="spiffe://td/gateway"))
    assert "jti" not in body
    assert body["req_wl"] == "spiffe://td/gateway"
    got = verify(mint(jti=None))
    assert (got.jti, got.requesting_workload) == (None, ISSUER)


def test_mint_detaches_contexts_and_truncates_to_seconds() -> None:
    tctx = {"actors": ["a"]}
    raw = mint(tctx=tctx, now=NOW + timedelta(microseconds=900_000))
    tctx["actors"].append("b")
    got = verify(raw)
    assert got.tctx == {"actors": ["a"]}
    assert got.issued_at == NOW


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"now": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"audience": ""}, "non-empty audience"),
        ({"txn": ""}, "non-empty txn"),
        ({"subject": ""}, "non-empty subject"),
        ({"scope": ""}, "non-empty scope"),
        ({"issuer": ""}, "non-empty issuer"),
        ({"ttl": timedelta(0)}, "lives more than 0"),
        ({"ttl": timedelta(minutes=11)}, "at most"),
        ({"tctx": ["not", "an", "object"]}, "JSON objects"),
        ({"rctx": {"x": float("nan")}}, "Out of range float"),
        ({"tctx": {"big": "x" * MAX_LENGTH}}, "above"),
    ],
)
def test_mint_refuses_bad_input(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mint(**overrides)


@pytest.mark.parametrize("typ", ["txntoken+jwt", "TxnToken+JWT", "application/txntoken+jwt"])
def test_typ_compared_as_media_type(typ: str) -> None:
    assert verify(token({**HEADER, "typ": typ})).txn == "task-1"


@pytest.mark.parametrize("shift", [timedelta(0), LEEWAY - timedelta(seconds=1)])
def test_expiry_honours_leeway(shift: timedelta) -> None:
    raw = token(iat=EPOCH - 60, exp=EPOCH)
    assert verify(raw, now=NOW + shift).expires_at == NOW


def test_failure_is_opaque_but_reason_is_precise() -> None:
    with pytest.raises(InvalidTxnToken) as info:
        verify(token(iat=EPOCH - 120, exp=EPOCH - 60))
    assert isinstance(info.value, InvalidToken)
    assert info.value.code == "invalid_txn_token"
    assert info.value.detail == InvalidTxnToken.default_detail
    assert info.value.internal == "expired"
    assert "expired" not in str(info.value)


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(mint(), now=datetime(2026, 1, 1))


def test_a_credential_is_not_a_txn_token() -> None:
    """Same key ring, same claims, but the `typ` of an access token: refused."""
    with pytest.raises(InvalidTxnToken) as info:
        verify(token({**HEADER, "typ": "at+jwt"}))
    assert info.value.internal == "wrong typ: 'at+jwt'"


# --- every rejection path -------------------------------------------------------------


def _hmac_with_public_key() -> str:
    from joserfc.jwk import OctKey

    secret = json.dumps(public_jwk(KEY)).encode()
    header = {**HEADER, "alg": "HS256"}
    return forge(header, payload(), OctKey.import_key(secret), "HS256")


def _swap_payload() -> str:
    good = token()
    evil = token(sub="spiffe://example.org/agents/evil")
    return ".".join([good.split(".")[0], evil.split(".")[1], good.split(".")[2]])


def _alg_none() -> str:
    return b64json({**HEADER, "alg": "none"}) + "." + b64json(payload()) + "." + b64(b"sig")


def _by(header: dict[str, Any], signer: Any) -> str:
    return forge(header, payload(), signer, signer.alg)


def _duplicate_member() -> str:
    body = json.dumps(payload())[:-1] + ', "sub": "spiffe://example.org/agents/evil"}'
    return sign_segments(b64json(HEADER), b64(body.encode()), KEY, "EdDSA")


CASES: list[tuple[str, Callable[[], Any], str]] = [
    # structure and size
    ("not a string", lambda: None, "not a string"),
    ("empty", lambda: "", "empty"),
    ("too long", lambda: token() + "A" * MAX_LENGTH, "too long"),
    ("two segments", lambda: ".".join(token().split(".")[:2]), "not a compact JWS: 2"),
    ("JWE shape", lambda: "a.b.c.d.e", "not a compact JWS: 5"),
    ("payload not JSON", lambda: sign_segments(b64json(HEADER), b64(b"x"), KEY, "EdDSA"), "claims"),
    ("duplicate member", _duplicate_member, "duplicate member 'sub'"),
    # algorithm: pinned by configuration, and the key's own
    ("alg none", _alg_none, "alg none"),
    ("HMAC with the public key", _hmac_with_public_key, "alg not allowed: HS256"),
    ("alg of another key", lambda: _by({**HEADER, "alg": "ES256"}, ES), "does not match"),
    # key: by kid, from the key ring only
    ("no kid", lambda: token({"alg": "EdDSA", "typ": "txntoken+jwt"}), "missing kid"),
    ("unknown kid", lambda: _by({**HEADER, "kid": OTHER.kid}, OTHER), "unknown kid"),
    ("embedded jwk", lambda: _by({**HEADER, "jwk": public_jwk(OTHER)}, OTHER), "not allowed: jwk"),
    ("jku", lambda: token({**HEADER, "jku": "https://evil.example/jwks"}), "not allowed: jku"),
    ("crit", lambda: token({**HEADER, "crit": ["exp"]}), "crit"),
    ("signed by another key", lambda: forge(HEADER, payload(), OTHER, "EdDSA"), "bad signature"),
    ("payload swapped", _swap_payload, "bad signature"),
    # typ
    ("no typ", lambda: token({"alg": "EdDSA", "kid": KEY.kid}), "missing typ"),
    ("JWT typ", lambda: token({**HEADER, "typ": "JWT"}), "wrong typ"),
    ("DPoP typ", lambda: token({**HEADER, "typ": "dpop+jwt"}), "wrong typ"),
    # issuer and audience, exactly
    ("no iss", lambda: token(iss=DROP), "missing iss"),
    ("other iss", lambda: token(iss="https://evil.example"), "issuer mismatch"),
    ("iss prefix", lambda: token(iss=ISSUER + "/x"), "issuer mismatch"),
    ("no aud", lambda: token(aud=DROP), "missing aud"),
    ("other aud", lambda: token(aud="https://gateway.example/deploy"), "audience mismatch"),
    ("aud list", lambda: token(aud=[AUDIENCE]), "not a single string"),
    # time
    ("no exp", lambda: token(exp=DROP), "missing exp"),
    ("no iat", lambda: token(iat=DROP), "missing iat"),
    ("expired", lambda: token(iat=EPOCH - 120, exp=EPOCH - 31), "expired"),
    ("issued in the future", lambda: token(iat=EPOCH + 31, exp=EPOCH + 90), "in the future"),
    ("fractional exp", lambda: token(exp=EPOCH + 60.5), "exp is not an integer"),
    ("exp not after iat", lambda: token(iat=EPOCH, exp=EPOCH), "not after iat"),
    ("lives too long", lambda: token(exp=EPOCH + 601), "lifetime above 600 s"),
    # claims
    ("no txn", lambda: token(txn=DROP), "missing txn"),
    ("empty txn", lambda: token(txn=""), "txn is empty"),
    ("no sub", lambda: token(sub=DROP), "missing sub"),
    ("sub not a string", lambda: token(sub=7), "sub is not a string"),
    ("no scope", lambda: token(scope=DROP), "missing scope"),
    ("no req_wl", lambda: token(req_wl=DROP), "missing req_wl"),
    ("tctx not an object", lambda: token(tctx=["task-1"]), "tctx is not an object"),
    ("rctx not an object", lambda: token(rctx="127.0.0.1"), "rctx is not an object"),
    ("jti not a string", lambda: token(jti=1), "jti is not"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected(build: Callable[[], Any], reason: str) -> None:
    raw = build()
    with pytest.raises(InvalidTxnToken) as info:
        verify(raw)
    assert reason in info.value.internal


def test_algorithm_is_pinned_by_configuration() -> None:
    raw = forge({**HEADER, "alg": "ES256", "kid": ES.kid}, payload(), ES, "ES256")
    assert verify(raw).kid == ES.kid
    with pytest.raises(InvalidTxnToken) as info:
        verify(raw, algorithms=["EdDSA"])
    assert info.value.internal == "alg not allowed: ES256"


def test_max_lifetime_is_a_parameter() -> None:
    raw = token(exp=EPOCH + 120)
    assert verify(raw).expires_at == NOW + timedelta(seconds=120)
    with pytest.raises(InvalidTxnToken) as info:
        verify(raw, max_lifetime=timedelta(seconds=60))
    assert info.value.internal == "lifetime above 60 s"


def test_contexts_are_optional_on_the_wire() -> None:
    got = verify(token(tctx=DROP, rctx=DROP, jti=DROP))
    assert (dict(got.tctx), dict(got.rctx), got.jti) == ({}, {}, None)

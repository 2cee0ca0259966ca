"""DPoP proofs: every check of RFC 9449 §4.3, RFC examples, and URI normalisation."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import OctKey

from taskbound.core.clock import to_epoch
from taskbound.core.dpop import (
    DPoPProof,
    access_token_hash,
    make_dpop_proof,
    normalize_htu,
    verify_dpop_proof,
)
from taskbound.core.keys import jwk_thumbprint, public_jwk
from taskbound.errors import InvalidDPoPProof, UseDPoPNonce

from ._crypto import NOW, b64, b64json, forge, key, public_members, rsa_key, sign_segments

RFC = json.loads((Path(__file__).parent.parent / "vectors" / "rfc_examples.json").read_text())

URL = "https://gateway.example/github/repos/acme/web"
TOKEN = "eyJhbGciOiJFZERTQSJ9.e30.c2ln"
WINDOW = timedelta(seconds=60)
KEY = key("ES256", 5)
JWK = public_members(KEY)
JKT = jwk_thumbprint(JWK)
DROP: Any = object()


def verify(raw: Any, **overrides: Any) -> DPoPProof:
    kwargs: dict[str, Any] = {
        "method": "POST",
        "url": URL,
        "now": NOW,
        "algorithms": ["EdDSA", "ES256"],
        "iat_window": WINDOW,
    }
    kwargs.update(overrides)
    return verify_dpop_proof(raw, **kwargs)


def proof(header: dict[str, Any] | None = None, signer: Any = KEY, alg: str = "ES256",
          **claims: Any) -> str:  # fmt: skip
    head: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": JWK}
    head.update(header or {})
    body: dict[str, Any] = {"jti": "proof-1", "htm": "POST", "htu": URL, "iat": to_epoch(NOW)}
    for name, value in claims.items():
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    for name in [n for n, v in head.items() if v is DROP]:
        del head[name]
    return forge(head, body, signer, alg)


# --- round trips and RFC examples -----------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_round_trip(alg: str) -> None:
    k = key(alg, 5)
    raw = make_dpop_proof(
        k, method="GET", url=URL + "?page=2#x", now=NOW, jti="j-1", access_token=TOKEN, nonce="n"
    )
    result = verify(
        raw,
        method="GET",
        access_token=TOKEN,
        expected_jkt=jwk_thumbprint(public_jwk(k)),
        expected_nonce="n",
    )
    assert result == DPoPProof(
        jti="j-1",
        htm="GET",
        htu=URL,
        issued_at=NOW,
        jkt=jwk_thumbprint(public_jwk(k)),
        public_jwk=public_members(k),
        nonce="n",
        ath=access_token_hash(TOKEN),
    )


def test_make_dpop_proof_header_carries_public_key_only() -> None:
    raw = make_dpop_proof(KEY, method="POST", url=URL, now=NOW, jti="j")
    header = json.loads(base64.urlsafe_b64decode(raw.split(".")[0] + "=="))
    assert header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": JWK}


@pytest.mark.parametrize("jti", ["", "x" * 257])
def test_make_dpop_proof_refuses_bad_jti(jti: str) -> None:
    with pytest.raises(ValueError, match="jti"):
        make_dpop_proof(KEY, method="POST", url=URL, now=NOW, jti=jti)


@pytest.mark.parametrize("case", RFC["dpop_proofs"], ids=lambda c: c["rfc"])
def test_rfc9449_example_proof(case: dict[str, Any]) -> None:
    result = verify(
        case["proof"],
        method=case["method"],
        url=case["url"],
        now=datetime.fromtimestamp(case["now"], UTC),
        algorithms=["ES256"],
        expected_jkt=case["jkt"],
    )
    assert result.jti == case["jti"]
    assert result.jkt == case["jkt"]


@pytest.mark.parametrize("case", RFC["access_token_hashes"], ids=lambda c: c["rfc"])
def test_rfc9449_access_token_hash(case: dict[str, str]) -> None:
    assert access_token_hash(case["access_token"]) == case["ath"]


def test_access_token_hash_requires_ascii() -> None:
    with pytest.raises(UnicodeEncodeError):
        access_token_hash("tökén")


def test_rfc9864_ed25519_name_is_accepted_where_eddsa_is() -> None:
    ed = key("EdDSA", 5)
    raw = proof({"jwk": public_members(ed)}, signer=ed, alg="Ed25519")
    assert verify(raw, algorithms=["EdDSA"]).jkt == jwk_thumbprint(public_jwk(ed))
    with pytest.raises(InvalidDPoPProof) as info:
        verify(raw, algorithms=["ES256"])
    assert info.value.internal == "alg not allowed: Ed25519"


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_proofs_when_configured(alg: str) -> None:
    rsa = rsa_key()
    jwk = {k: v for k, v in rsa.as_dict(private=False).items() if k in ("kty", "n", "e")}
    raw = proof({"jwk": jwk}, signer=rsa, alg=alg)
    assert verify(raw, algorithms=[alg]).jkt == jwk_thumbprint(jwk)


@pytest.mark.parametrize("shift", [-WINDOW, WINDOW, timedelta(0)])
def test_iat_window_is_inclusive(shift: timedelta) -> None:
    assert verify(proof(iat=to_epoch(NOW + shift))).issued_at == NOW + shift


def test_float_iat_is_a_numeric_date() -> None:
    assert verify(proof(iat=to_epoch(NOW) + 0.5)).issued_at == NOW + timedelta(seconds=0.5)


def test_htu_compared_after_normalisation_on_both_sides() -> None:
    raw = proof(htu="HTTPS://Gateway.Example:443/github/repos/./acme/web?q=1")
    assert verify(raw, url="https://gateway.example/github/repos/acme/web#f").htu.startswith(
        "HTTPS"
    )


# --- nonces (RFC 9449 §8, §9) ----------------------------------------------------------


def test_missing_nonce_asks_for_one() -> None:
    with pytest.raises(UseDPoPNonce) as info:
        verify(proof(), expected_nonce="n-1")
    assert info.value.code == "use_dpop_nonce"
    assert info.value.internal == "missing nonce"


def test_wrong_nonce_asks_for_the_current_one() -> None:
    with pytest.raises(UseDPoPNonce) as info:
        verify(proof(nonce="n-0"), expected_nonce="n-1")
    assert info.value.internal == "wrong or stale nonce"


def test_nonce_is_checked_last() -> None:
    """A proof that is bad anyway is refused as such, not answered with a nonce."""
    with pytest.raises(InvalidDPoPProof) as info:
        verify(proof(htm="GET"), expected_nonce="n-1")
    assert type(info.value) is InvalidDPoPProof
    assert info.value.internal == "htm mismatch"


def test_unrequested_nonce_is_returned() -> None:
    assert verify(proof(nonce="n-9")).nonce == "n-9"


# --- every rejection path -------------------------------------------------------------

OTHER = key("ES256", 6)
EPOCH = to_epoch(NOW)


def _hmac_with_jwk() -> str:
    secret = OctKey.import_key(json.dumps(JWK).encode())
    return proof({"alg": "HS256"}, signer=secret, alg="HS256")


def _with_private_jwk() -> str:
    from taskbound.core.keys import private_key_to_bytes

    return proof({"jwk": json.loads(private_key_to_bytes(KEY))})


CASES: list[tuple[str, Callable[[], Any], dict[str, Any], str]] = [
    ("not a string", lambda: None, {}, "not a string"),
    ("too long", lambda: proof() + "A" * 5000, {}, "too long"),
    ("two segments", lambda: ".".join(proof().split(".")[:2]), {}, "not a compact JWS"),
    ("header not JSON", lambda: b64(b"{") + "." + proof().split(".", 1)[1], {}, "malformed head"),
    ("typ missing", lambda: proof({"typ": DROP}), {}, "missing typ"),
    ("typ JWT", lambda: proof({"typ": "JWT"}), {}, "wrong typ: 'JWT'"),
    ("typ at+jwt", lambda: proof({"typ": "at+jwt"}), {}, "wrong typ"),
    ("alg none", lambda: proof({"alg": "none"}), {}, "alg none"),
    ("alg HS256 keyed by jwk", _hmac_with_jwk, {}, "alg not allowed: HS256"),
    ("HS256 even if configured", _hmac_with_jwk, {"algorithms": ["HS256", "ES256"]},
     "alg not supported: HS256"),
    ("alg not allowed", lambda: proof(), {"algorithms": ["EdDSA"]}, "alg not allowed: ES256"),
    ("jwk missing", lambda: proof({"jwk": DROP}), {}, "missing jwk header"),
    ("jwk string", lambda: proof({"jwk": "x"}), {}, "jwk header is not an object"),
    ("jwk private", _with_private_jwk, {}, "jwk header: JWK has private members: d"),
    ("jwk symmetric", lambda: proof({"jwk": {"kty": "oct", "k": "AAAA"}}), {},
     "private members: k"),
    ("jwk X25519", lambda: proof({"jwk": {"kty": "OKP", "crv": "X25519", "x": b64(b"1" * 32)}}),
     {}, "unsupported OKP curve"),
    ("jwk off curve", lambda: proof({"jwk": {**JWK, "y": JWK["x"]}}), {}, "invalid EC key"),
    ("jwk vs alg", lambda: proof({"jwk": public_members(key("EdDSA"))}), {},
     "jwk does not fit alg ES256"),
    ("jwk P-384 for ES256", lambda: proof({"jwk": {"kty": "EC", "crv": "P-384", "x": b64(b"1" * 48),
                                                   "y": b64(b"1" * 48)}}), {}, "jwk header"),
    ("jku", lambda: proof({"jku": "https://evil.example/k"}), {}, "header not allowed: jku"),
    ("x5u", lambda: proof({"x5u": "https://evil.example/c"}), {}, "header not allowed: x5u"),
    ("x5c", lambda: proof({"x5c": ["MIIB"]}), {}, "header not allowed: x5c"),
    ("crit", lambda: proof({"crit": ["htm"]}), {}, "crit header"),
    ("signed by other key", lambda: proof(signer=OTHER), {}, "bad signature"),
    ("payload not object", lambda: sign_segments(
        b64json({"typ": "dpop+jwt", "alg": "ES256", "jwk": JWK}), b64(b"[]"), KEY, "ES256"), {},
     "not a JSON object"),
    ("jti missing", lambda: proof(jti=DROP), {}, "missing jti"),
    ("jti number", lambda: proof(jti=1), {}, "jti is not a string"),
    ("jti empty", lambda: proof(jti=""), {}, "jti is empty"),
    ("jti too long", lambda: proof(jti="j" * 257), {}, "jti too long"),
    ("htm missing", lambda: proof(htm=DROP), {}, "missing htm"),
    ("htu missing", lambda: proof(htu=DROP), {}, "missing htu"),
    ("iat missing", lambda: proof(iat=DROP), {}, "missing iat"),
    ("iat string", lambda: proof(iat="now"), {}, "iat is not a number"),
    ("nonce number", lambda: proof(nonce=1), {}, "nonce is not an acceptable string"),
    ("ath number", lambda: proof(ath=1), {}, "ath is not a string"),
    ("htm other", lambda: proof(htm="GET"), {}, "htm mismatch"),
    ("htm case", lambda: proof(htm="post"), {}, "htm mismatch"),
    ("htu other path", lambda: proof(htu=URL + "/x"), {}, "htu mismatch"),
    ("htu other host", lambda: proof(htu="https://evil.example/github/repos/acme/web"), {},
     "htu mismatch"),
    ("htu http", lambda: proof(htu=URL.replace("https", "http")), {}, "htu mismatch"),
    ("htu port", lambda: proof(htu="https://gateway.example:8443/github/repos/acme/web"), {},
     "htu mismatch"),
    ("htu path case", lambda: proof(htu=URL.upper()), {}, "htu mismatch"),
    ("htu relative", lambda: proof(htu="/github/repos/acme/web"), {}, "htu malformed"),
    ("htu userinfo", lambda: proof(htu="https://a@gateway.example/github/repos/acme/web"), {},
     "htu malformed"),
    ("request URL bad", lambda: proof(), {"url": "not a url"}, "request URL not usable"),
    ("iat old", lambda: proof(iat=EPOCH - 61), {}, "iat too old"),
    ("iat future", lambda: proof(iat=EPOCH + 61), {}, "iat too far in the future"),
    ("ath missing", lambda: proof(), {"access_token": TOKEN}, "missing ath"),
    ("ath other token", lambda: proof(ath=access_token_hash("other")), {"access_token": TOKEN},
     "ath mismatch"),
    ("ath non-ascii token", lambda: proof(ath="x"), {"access_token": "tökén"},
     "access token is not ASCII"),
    ("jkt mismatch", lambda: proof(), {"expected_jkt": jwk_thumbprint(public_jwk(OTHER))},
     "jkt mismatch"),
    ("max_length", lambda: proof(), {"max_length": 100}, "too long"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "overrides", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rejects(build: Callable[[], Any], overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidDPoPProof) as info:
        verify(build(), **overrides)
    assert type(info.value) is InvalidDPoPProof
    assert reason in info.value.internal
    assert info.value.detail == InvalidDPoPProof.default_detail


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(proof(), now=datetime(2026, 1, 1))


# --- htu normalisation (RFC 9449 §4.3 item 9, RFC 3986 §6) ------------------------------


@pytest.mark.parametrize("case", RFC["htu_normalization"], ids=lambda c: c["url"])
def test_normalize_htu(case: dict[str, str]) -> None:
    assert normalize_htu(case["url"]) == case["normalized"]
    assert normalize_htu(case["normalized"]) == case["normalized"]


@pytest.mark.parametrize("case", RFC["htu_invalid"], ids=lambda c: c["why"])
def test_normalize_htu_rejects(case: dict[str, str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the reasons differ per case
        normalize_htu(case["url"])


# --- taskbound's consent binding (tb_narrowing) -------------------------------------------


def test_a_bound_narrowing_round_trips() -> None:
    raw = make_dpop_proof(KEY, method="POST", url=URL, now=NOW, jti="j-n", narrowing="abc_-1")
    assert verify(raw).narrowing == "abc_-1"
    assert verify(proof()).narrowing is None


@pytest.mark.parametrize("value", [7, ["x"], {"a": 1}, "x" * 129])
def test_a_malformed_narrowing_refuses_the_proof(value: Any) -> None:
    with pytest.raises(InvalidDPoPProof):
        verify(proof(tb_narrowing=value))


def test_the_narrowing_digest_is_exactly_what_was_sent() -> None:
    from taskbound.core.exchange import Narrowing, narrowing_digest

    sent = Narrowing(audiences=("issues",), scope="list", authorization_details='[{"a":1}]')
    same = Narrowing(audiences=("issues",), scope="list", authorization_details='[{"a":1}]')
    assert narrowing_digest(sent) == narrowing_digest(same)
    for other in (
        Narrowing(audiences=("issues",), scope="list get", authorization_details='[{"a":1}]'),
        Narrowing(audiences=("issues",), scope="list", authorization_details='[{"a": 1}]'),
        Narrowing(audiences=("issues",), scope="list", authorization_details=None),
        Narrowing(audiences=("tracker",), scope="list", authorization_details='[{"a":1}]'),
    ):
        assert narrowing_digest(other) != narrowing_digest(sent)

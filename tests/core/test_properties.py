"""Property tests: any tamper is detected; any input fails only in the documented way."""

from __future__ import annotations

import contextlib
import string
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskbound.core.dpop import make_dpop_proof, normalize_htu, verify_dpop_proof
from taskbound.core.identity import (
    OIDCRule,
    mint_jwt_svid,
    parse_spiffe_id,
    unverified_issuer,
    verify_jwt_svid,
    verify_oidc_token,
)
from taskbound.core.keys import KeyRing, jwk_thumbprint, public_jwk
from taskbound.core.model import Tier
from taskbound.core.secretbox import SecretBox, parse_kek
from taskbound.core.tokens import mint_credential, verify_credential
from taskbound.errors import DecryptionFailed, InvalidDPoPProof, InvalidIdentity, InvalidToken

from ._crypto import ISSUER, LEEWAY, NOW, TOOL_AUDIENCE, b64, b64json, credential_claims, key

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CRED_KEY = key("ES256", 40)
RING = KeyRing.from_private([CRED_KEY, key("EdDSA", 40)])
URL = "https://gateway.example/github/x"
DPOP_KEY = key("EdDSA", 41)
TOKEN = mint_credential(credential_claims(), CRED_KEY)
PROOF = make_dpop_proof(DPOP_KEY, method="GET", url=URL, now=NOW, jti="p", access_token=TOKEN)
SVID = mint_jwt_svid(
    CRED_KEY,
    spiffe_id="spiffe://example.org/a",
    audience=ISSUER,
    now=NOW,
    ttl=timedelta(minutes=5),
    jti="s",
)
RULE = OIDCRule(ISSUER, TOOL_AUDIENCE, ("ES256", "RS256"), "spiffe://example.org/{sub}")


def check_credential(raw: Any) -> Any:
    return verify_credential(
        raw,
        keys=RING,
        issuer=ISSUER,
        audiences=[TOOL_AUDIENCE],
        algorithms=["ES256", "EdDSA"],
        now=NOW,
        leeway=LEEWAY,
    )


def check_proof(raw: Any) -> Any:
    return verify_dpop_proof(
        raw,
        method="GET",
        url=URL,
        now=NOW,
        algorithms=["EdDSA", "ES256"],
        iat_window=timedelta(seconds=60),
        access_token=TOKEN,
        expected_jkt=jwk_thumbprint(public_jwk(DPOP_KEY)),
    )


def check_svid(raw: Any) -> Any:
    return verify_jwt_svid(
        raw,
        bundles={"example.org": RING},
        audience=ISSUER,
        algorithms=["ES256", "EdDSA"],
        now=NOW,
        leeway=LEEWAY,
    )


def check_oidc(raw: Any) -> Any:
    return verify_oidc_token(raw, rule=RULE, keys=RING, now=NOW, leeway=LEEWAY)


def test_originals_verify() -> None:
    assert check_credential(TOKEN) == credential_claims()
    assert check_proof(PROOF).jti == "p"
    assert check_svid(SVID).spiffe_id == "spiffe://example.org/a"


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


@FAST
@given(tampered(TOKEN))
def test_any_tamper_of_a_credential_is_rejected(raw: str) -> None:
    try:
        check_credential(raw)
    except InvalidToken:
        return
    raise AssertionError(f"tampered credential accepted: {raw!r}")


@FAST
@given(tampered(PROOF))
def test_any_tamper_of_a_proof_is_rejected(raw: str) -> None:
    try:
        check_proof(raw)
    except InvalidDPoPProof:
        return
    raise AssertionError(f"tampered proof accepted: {raw!r}")


@FAST
@given(tampered(SVID))
def test_any_tamper_of_a_jwt_svid_is_rejected(raw: str) -> None:
    try:
        check_svid(raw)
    except InvalidIdentity:
        return
    raise AssertionError(f"tampered SVID accepted: {raw!r}")


finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
header_like = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["ES256", "EdDSA", "Ed25519", "none", "HS256", "RS256"]) | st.text(),
        "typ": st.sampled_from(["at+jwt", "dpop+jwt", "JWT"]) | json_values,
        "kid": st.sampled_from(sorted(RING.kids())) | json_values,
        "jwk": st.just(public_jwk(DPOP_KEY)) | json_values,
        "crit": json_values,
    },
)
segment = st.from_regex(r"[A-Za-z0-9_-]{0,40}", fullmatch=True)
arbitrary_tokens = st.one_of(
    st.text(max_size=200),
    st.builds("{}.{}.{}".format, segment, segment, segment),
    st.builds(
        lambda h, p, s: f"{b64json(h)}.{b64json(p)}.{s}",
        header_like,
        st.dictionaries(st.sampled_from(["iss", "sub", "aud", "exp", "jti", "htm"]), json_values),
        segment,
    ),
    st.builds(lambda h, p: f"{b64json(h)}.{b64(p)}.AAAA", header_like, st.binary(max_size=60)),
    st.none(),
    st.integers(),
    st.binary(max_size=50),
)


@FAST
@given(arbitrary_tokens)
def test_verifiers_fail_only_with_their_error(raw: Any) -> None:
    for check, error in (
        (check_credential, InvalidToken),
        (check_proof, InvalidDPoPProof),
        (check_svid, InvalidIdentity),
        (check_oidc, InvalidIdentity),
    ):
        try:
            check(raw)
        except error:
            continue
        raise AssertionError(f"{check.__name__} accepted {raw!r}")
    result = unverified_issuer(raw)
    assert result is None or isinstance(result, str)


@FAST
@given(json_values)
def test_key_parsers_fail_only_with_value_error(value: Any) -> None:
    for parse in (KeyRing.from_jwks, jwk_thumbprint, lambda v: KeyRing.from_jwks({"keys": [v]})):
        with contextlib.suppress(ValueError):
            parse(value)


@FAST
@given(st.text(max_size=120))
def test_text_parsers_fail_only_with_value_error(text: str) -> None:
    for parse in (normalize_htu, parse_spiffe_id, parse_kek):
        with contextlib.suppress(ValueError):
            parse(text)


@FAST
@given(st.binary(max_size=80), st.binary(max_size=20))
def test_decrypt_fails_only_with_decryption_failed(blob: bytes, aad: bytes) -> None:
    try:
        SecretBox(bytes(32)).decrypt(blob, aad=aad)
    except DecryptionFailed:
        return
    raise AssertionError("a random blob decrypted")


@FAST
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_secretbox_round_trip(plaintext: bytes, aad: bytes) -> None:
    box = SecretBox(bytes(range(32)))
    assert box.decrypt(box.encrypt(plaintext, aad=aad), aad=aad) == plaintext


names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


@FAST
@given(
    purpose=st.text(max_size=200),
    tool=names,
    tier=st.sampled_from(list(Tier)),
    actions=st.lists(names, unique=True, max_size=5).map(tuple),
    constraints=st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    ttl=st.integers(1, 86_400),
)
def test_credential_round_trip(
    purpose: str, tool: str, tier: Tier, actions: tuple[str, ...], constraints: Any, ttl: int
) -> None:
    claims = credential_claims(
        purpose=purpose,
        tool=tool,
        tier=tier,
        actions=actions,
        constraints=constraints,
        expires_at=NOW + timedelta(seconds=ttl),
    )
    assert check_credential(mint_credential(claims, CRED_KEY)) == claims


urls = st.builds(
    "{}://{}{}{}{}".format,
    st.sampled_from(["http", "https", "HTTPS", "HtTp"]),
    st.from_regex(r"[A-Za-z0-9-]{1,10}(\.[A-Za-z]{1,5}){0,2}", fullmatch=True),
    st.sampled_from(["", ":80", ":443", ":8080", ":"]),
    st.from_regex(r"(/([A-Za-z0-9._~-]|%[0-9a-fA-F]{2}){0,6}){0,4}", fullmatch=True),
    st.sampled_from(["", "?q=1", "#f", "?a#b"]),
)


@FAST
@given(urls)
def test_normalize_htu_is_idempotent(url: str) -> None:
    once = normalize_htu(url)
    assert normalize_htu(once) == once
    assert "?" not in once
    assert "#" not in once

"""Interoperability with an independent JOSE implementation (PyJWT).

What taskbound mints must verify elsewhere with nothing but the published JWK, and what a
standard library produces must verify here. PyJWT has no injectable clock, so its time checks
are switched off: the instants here are the fake clock's, and taskbound's own time checks
are covered in test_tokens.py.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import jwt
import pytest
from jwt import PyJWK

from taskbound.core.dpop import access_token_hash, make_dpop_proof, verify_dpop_proof
from taskbound.core.identity import mint_jwt_svid
from taskbound.core.keys import KeyRing, PrivateKey, jwk_thumbprint, public_jwk
from taskbound.core.tokens import mint_credential, verify_credential

from ._crypto import (
    ISSUER,
    LEEWAY,
    NOW,
    TOOL_AUDIENCE,
    credential_claims,
    credential_payload,
    key,
    public_members,
)

NO_CLOCK = {"verify_exp": False, "verify_nbf": False, "verify_iat": False}
ALGS = ["EdDSA", "ES256"]


def pyjwt_key(k: PrivateKey) -> Any:
    """The public key as PyJWT builds it from the published JWK."""
    return PyJWK.from_dict(public_jwk(k)).key


def native_private(k: PrivateKey) -> Any:
    return k.key.private_key


@pytest.mark.parametrize("alg", ALGS)
def test_credential_verifies_with_pyjwt(alg: str) -> None:
    k = key(alg, 30)
    raw = mint_credential(credential_claims(), k)
    header = jwt.get_unverified_header(raw)
    assert header == {"alg": alg, "typ": "at+jwt", "kid": k.kid}
    decoded = jwt.decode(
        raw,
        key=pyjwt_key(k),
        algorithms=[alg],
        audience=TOOL_AUDIENCE,
        issuer=ISSUER,
        options={**NO_CLOCK, "require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    assert decoded == credential_payload()


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_rejects_a_tampered_credential(alg: str) -> None:
    k = key(alg, 30)
    head, _, sig = mint_credential(credential_claims(), k).split(".")
    forged_body = jwt.utils.base64url_encode(
        json.dumps(credential_payload(scope="github:admin")).encode()
    ).decode()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            f"{head}.{forged_body}.{sig}",
            key=pyjwt_key(k),
            algorithms=[alg],
            audience=TOOL_AUDIENCE,
            options=NO_CLOCK,
        )


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_minted_credential_verifies_here(alg: str) -> None:
    k = key(alg, 31)
    raw = jwt.encode(
        credential_payload(),
        native_private(k),
        algorithm=alg,
        headers={"typ": "at+jwt", "kid": k.kid},
    )
    claims = verify_credential(
        raw,
        keys=KeyRing.from_jwks({"keys": [public_jwk(k)]}),
        issuer=ISSUER,
        audiences=[TOOL_AUDIENCE],
        algorithms=[alg],
        now=NOW,
        leeway=LEEWAY,
    )
    assert claims == credential_claims()


@pytest.mark.parametrize("alg", ALGS)
def test_jwt_svid_verifies_with_pyjwt(alg: str) -> None:
    k = key(alg, 32)
    raw = mint_jwt_svid(
        k,
        spiffe_id="spiffe://example.org/a",
        audience=ISSUER,
        now=NOW,
        ttl=timedelta(minutes=5),
        jti="s",
    )
    decoded = jwt.decode(raw, key=pyjwt_key(k), algorithms=[alg], audience=ISSUER, options=NO_CLOCK)
    assert decoded["sub"] == "spiffe://example.org/a"


@pytest.mark.parametrize("alg", ALGS)
def test_dpop_proofs_interoperate(alg: str) -> None:
    k = key(alg, 33)
    url = "https://gateway.example/github/x"
    ours = make_dpop_proof(k, method="GET", url=url, now=NOW, jti="a", access_token="tok")
    header = jwt.get_unverified_header(ours)
    assert header["typ"] == "dpop+jwt"
    decoded = jwt.decode(ours, key=PyJWK.from_dict(header["jwk"]).key, algorithms=[alg])
    assert decoded["ath"] == access_token_hash("tok")

    theirs = jwt.encode(
        {"jti": "b", "htm": "GET", "htu": url, "iat": int(NOW.timestamp())},
        native_private(k),
        algorithm=alg,
        headers={"typ": "dpop+jwt", "jwk": public_members(k)},
    )
    proof = verify_dpop_proof(
        theirs,
        method="GET",
        url=url,
        now=NOW,
        algorithms=[alg],
        iat_window=timedelta(seconds=60),
        expected_jkt=jwk_thumbprint(public_jwk(k)),
    )
    assert proof.jti == "b"

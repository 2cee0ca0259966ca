"""Project Wycheproof vectors through taskbound's own verification path.

Vectors: tests/vectors/wycheproof/ (Apache-2.0, see LICENSE and SOURCE.md there).

* ``ed25519_test.json`` and ``ecdsa_secp256r1_sha256_p1363_test.json`` are raw signature
  vectors (the message is not a JWS signing input). They go through
  :func:`taskbound.core.jws.verify_signature`, the primitive every taskbound verifier calls,
  with the key imported by :meth:`KeyRing.from_jwks` exactly as a trust bundle would be.
* ``json_web_signature_test.json``, ``json_web_key_test.json`` and
  ``json_web_crypto_test.json`` are JOSE vectors. Their payloads are not JWTs (``foo``), so
  they go through the JWS layer that :func:`verify_credential`, :func:`verify_jwt_svid` and
  :func:`verify_oidc_token` all share (:func:`parse_compact` + :func:`verify_with_keyring`),
  with the group's key loaded by :meth:`KeyRing.from_jwks` and every asymmetric algorithm
  taskbound implements on the allow-list. Claims checks come after this layer and can only
  reject more.

Every vector is classified. An "invalid" vector must be rejected. A "valid" vector must be
accepted unless its rejection is one of the deliberate policy decisions in
:data:`DOCUMENTED_REJECTIONS`, in which case the rejection reason must be exactly the one
documented there, so that an unexpected rejection still fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from taskbound.core import jws
from taskbound.core.keys import VERIFICATION_ALGORITHMS, KeyRing

VECTORS = Path(__file__).parent.parent / "vectors" / "wycheproof"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth"}
ANY_TYP = jws.TypRule(allowed=frozenset(), required=False)  # vectors carry no typ
ALL_ALGORITHMS = sorted(VERIFICATION_ALGORITHMS)


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


@dataclass(frozen=True)
class Vector:
    file: str
    group: dict[str, Any]
    test: dict[str, Any]

    @property
    def id(self) -> str:
        comment = self.group.get("comment") or self.group.get("type")
        return f"{self.file.removesuffix('_test.json')}-{self.test['tcId']}-{comment}"


def vectors(name: str) -> Iterator[Vector]:
    for group in load(name)["testGroups"]:
        for test in group["tests"]:
            yield Vector(name, group, test)


# --- raw signature primitives ----------------------------------------------------------


def _ec_jwk(group: dict[str, Any]) -> dict[str, Any]:
    """publicKeyJwk, or (for the few groups without one) the JWK of publicKey wx/wy."""
    if "publicKeyJwk" in group:
        return dict(group["publicKeyJwk"])
    from joserfc.util import urlsafe_b64encode

    def coordinate(hex_value: str) -> str:
        raw = int(hex_value, 16).to_bytes(32, "big")
        return urlsafe_b64encode(raw).decode()

    public = group["publicKey"]
    return {"kty": "EC", "crv": "P-256", "x": coordinate(public["wx"]),
            "y": coordinate(public["wy"])}  # fmt: skip


def check_raw(vector: Vector, alg: str, jwk: dict[str, Any]) -> tuple[bool, str]:
    try:
        ring = KeyRing.from_jwks({"keys": [{**jwk, "kid": "k", "alg": alg}]})
    except ValueError as exc:
        return False, f"key refused: {exc}"
    registered = ring.get("k")
    assert registered is not None
    accepted = jws.verify_signature(
        alg, registered[1], bytes.fromhex(vector.test["msg"]), bytes.fromhex(vector.test["sig"])
    )
    return accepted, "accepted" if accepted else "bad signature"


ED25519 = list(vectors("ed25519_test.json"))
ECDSA = list(vectors("ecdsa_secp256r1_sha256_p1363_test.json"))


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
@pytest.mark.parametrize("vector", ED25519, ids=lambda v: v.id)
def test_ed25519(vector: Vector, alg: str) -> None:
    accepted, reason = check_raw(vector, alg, vector.group["publicKeyJwk"])
    assert accepted == (vector.test["result"] == "valid"), (vector.test, reason)


@pytest.mark.parametrize("vector", ECDSA, ids=lambda v: v.id)
def test_ecdsa_p256_p1363(vector: Vector) -> None:
    accepted, reason = check_raw(vector, "ES256", _ec_jwk(vector.group))
    assert accepted == (vector.test["result"] == "valid"), (vector.test, reason)


# --- JOSE ----------------------------------------------------------------------------------


def _public_part(jwk: dict[str, Any]) -> dict[str, Any]:
    """The harness contract of SOURCE.txt: the public part of an asymmetric key; a symmetric
    key is handed over as it is (and refused by KeyRing, which is the point)."""
    if jwk.get("kty") == "oct":
        return jwk
    return {k: v for k, v in jwk.items() if k not in PRIVATE_MEMBERS}


def group_keyset(group: dict[str, Any]) -> dict[str, Any]:
    source = group.get("public") or group["private"]
    if "keys" in source:
        return {"keys": [_public_part(k) for k in source["keys"]]}
    return {"keys": [_public_part(source)]}


def check_jose(vector: Vector, keyset: dict[str, Any] | None = None) -> tuple[bool, str]:
    try:
        ring = KeyRing.from_jwks(keyset or group_keyset(vector.group))
    except ValueError as exc:
        return False, f"keyring: {exc}"
    raw = vector.test.get("jws", vector.test.get("jwe"))
    try:
        token = jws.parse_compact(raw, max_length=8192)
        jws.verify_with_keyring(token, keys=ring, algorithms=ALL_ALGORITHMS, typ=ANY_TYP)
    except jws.Rejected as exc:
        return False, exc.reason
    return True, "accepted"


@dataclass(frozen=True)
class Documented:
    applies: Callable[[Vector], bool]
    reason: str  # the rejection reason must contain this
    why: str


DOCUMENTED_REJECTIONS = [
    Documented(
        lambda v: any(
            k.get("kty") == "oct" for k in group_keyset(v.group)["keys"] if isinstance(k, dict)
        ),
        "private or secret members: k",
        "HMAC (HS256/384/512) and AES keys: taskbound verifies asymmetric signatures only and "
        "refuses any key set that carries a secret (RFC 8725 §2.1, §3.1). These valid MACs "
        "can never be accepted by design.",
    ),
    Documented(
        lambda v: v.file == "json_web_signature_test.json" and v.test["tcId"] in (346, 350),
        "alg does not match key: token PS384, key PS256",
        "RFC 7520 Figure 20 is signed with PS384 but the vector's key declares alg PS256. "
        "taskbound pins one algorithm per key (RFC 8725 §3.1), so the mismatch is refused; "
        "test_rfc7520_figures_verify_with_consistent_keys shows the signature itself verifies.",
    ),
    Documented(
        lambda v: v.file == "json_web_signature_test.json" and v.test["tcId"] in (347, 351),
        "unknown kid",
        "RFC 7520 Figure 27 (ES512/P-521): the vector's key declares the unregistered alg "
        "'ES521', so KeyRing leaves the key out (RFC 7517 §5) and the kid is unknown. With the "
        "registered name ES512 the signature verifies (see the test below).",
    ),
    Documented(
        lambda v: "jwe" in v.test,
        "not a compact JWS: 5 segments",
        "JWE: taskbound verifies compact JWS only; an encrypted token is never accepted.",
    ),
]


def documented(vector: Vector) -> Documented | None:
    matches = [d for d in DOCUMENTED_REJECTIONS if d.applies(vector)]
    return matches[0] if matches else None


JOSE_FILES = ["json_web_signature_test.json", "json_web_key_test.json", "json_web_crypto_test.json"]
JOSE = [v for name in JOSE_FILES for v in vectors(name)]


@pytest.mark.parametrize("vector", JOSE, ids=lambda v: v.id)
def test_jose(vector: Vector) -> None:
    accepted, reason = check_jose(vector)
    if vector.test["result"] == "invalid":
        assert not accepted, vector.test
        assert reason
        return
    if accepted:
        return
    rule = documented(vector)
    assert rule is not None, f"valid vector rejected without a documented reason: {reason}"
    assert rule.reason in reason, (rule.why, reason)


def test_every_vector_is_classified() -> None:
    """Nothing is skipped: the parametrised lists hold every test of every file."""
    counted = {
        "ed25519_test.json": len(ED25519),
        "ecdsa_secp256r1_sha256_p1363_test.json": len(ECDSA),
        **{name: sum(v.file == name for v in JOSE) for name in JOSE_FILES},
    }
    for name, count in counted.items():
        assert count == load(name)["numberOfTests"], name
    assert sum(counted.values()) == 151 + 262 + 401 + 26 + 83


def test_valid_vectors_are_accepted_where_policy_allows() -> None:
    """The classification is not vacuous: valid asymmetric JWS vectors are accepted."""
    accepted = [v.test["tcId"] for v in JOSE if check_jose(v)[0]]
    assert len(accepted) >= 30
    assert 18 in accepted  # es256 acceptsValid
    assert 378 in accepted  # SpecialCaseEs256 valid


def _figure(tc_id: int) -> Vector:
    return next(v for v in vectors("json_web_signature_test.json") if v.test["tcId"] == tc_id)


@pytest.mark.parametrize(("tc_id", "alg"), [(346, "PS384"), (347, "ES512")])
def test_rfc7520_figures_verify_with_consistent_keys(tc_id: int, alg: str) -> None:
    vector = _figure(tc_id)
    keyset = group_keyset(vector.group)
    keyset["keys"][0]["alg"] = alg
    assert check_jose(vector, keyset) == (True, "accepted")


def test_base64_group_is_refused_by_the_parser_itself() -> None:
    """The ``base64`` group uses an HMAC key (refused up front), so run its JWS through the
    parser too: every malformed encoding fails there, before any key is involved. tcIds 372
    and 373 are "valid" upstream only for lenient decoders (SOURCE.txt allows rejecting them);
    367 and 370 are byte-identical to the valid 357 in this snapshot, so only the key policy
    can classify them, and it rejects all three."""
    group = next(
        g for g in load("json_web_signature_test.json")["testGroups"] if g["comment"] == "base64"
    )
    by_id = {t["tcId"]: t for t in group["tests"]}
    assert by_id[367]["jws"] == by_id[357]["jws"] == by_id[370]["jws"]
    malformed = {360, 361, 362, 363, 364, 365, 366, 368, 369, 371, 372, 373, 374, 375}
    for tc_id in malformed:
        with pytest.raises(jws.Rejected, match="malformed"):
            jws.parse_compact(by_id[tc_id]["jws"], max_length=8192)
    for tc_id in set(by_id) - malformed:
        jws.parse_compact(by_id[tc_id]["jws"], max_length=8192)

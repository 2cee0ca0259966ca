"""Workload identity: SPIFFE IDs, JWT-SVIDs, OIDC tokens mapped to SPIFFE IDs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import OctKey

from taskbound.core.clock import to_epoch
from taskbound.core.identity import (
    OIDCRule,
    SpiffeId,
    WorkloadIdentity,
    mint_jwt_svid,
    parse_spiffe_id,
    unverified_issuer,
    verify_jwt_svid,
    verify_oidc_token,
)
from taskbound.core.keys import KeyRing, public_jwk
from taskbound.errors import InvalidIdentity

from ._crypto import LEEWAY, NOW, b64, b64json, forge, key, rsa_key, sign_segments

SPIFFE = json.loads((Path(__file__).parent.parent / "vectors" / "spiffe_ids.json").read_text())

BROKER = "https://broker.example"
AGENT = "spiffe://example.org/agents/coder"
DROP: Any = object()
EPOCH = to_epoch(NOW)

# --- SPIFFE IDs -----------------------------------------------------------------------


@pytest.mark.parametrize("case", SPIFFE["valid"], ids=lambda c: c["id"])
def test_parse_spiffe_id(case: dict[str, str]) -> None:
    parsed = parse_spiffe_id(case["id"])
    assert parsed == SpiffeId(trust_domain=case["trust_domain"], path=case["path"])
    assert str(parsed) == case["id"]


@pytest.mark.parametrize("case", SPIFFE["invalid"], ids=lambda c: f"{c['why']}:{c['id']}")
def test_parse_spiffe_id_rejects(case: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=case["match"]):
        parse_spiffe_id(case["id"])


def test_spiffe_id_length_limit() -> None:
    base = "spiffe://example.org/"
    assert parse_spiffe_id(base + "a" * (2048 - len(base)))
    with pytest.raises(ValueError, match="2048 bytes"):
        parse_spiffe_id(base + "a" * (2049 - len(base)))


def test_spiffe_id_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_spiffe_id(b"spiffe://example.org/a")  # type: ignore[arg-type]


# --- JWT-SVIDs ------------------------------------------------------------------------

SVID_KEY = key("ES256", 10)
BUNDLES = {
    "example.org": KeyRing.from_private([SVID_KEY, key("EdDSA", 10)]),
    "other.org": KeyRing.from_private([key("ES256", 11)]),
}
SVID_HEADER = {"alg": "ES256", "kid": SVID_KEY.kid, "typ": "JWT"}


def verify_svid(raw: Any, **overrides: Any) -> WorkloadIdentity:
    kwargs: dict[str, Any] = {
        "bundles": BUNDLES,
        "audience": BROKER,
        "algorithms": ["ES256", "EdDSA"],
        "now": NOW,
        "leeway": LEEWAY,
    }
    kwargs.update(overrides)
    return verify_jwt_svid(raw, **kwargs)


def svid(header: dict[str, Any] | None = None, signer: Any = SVID_KEY, alg: str = "ES256",
         **claims: Any) -> str:  # fmt: skip
    head = {**SVID_HEADER, **(header or {})}
    head = {k: v for k, v in head.items() if v is not DROP}
    body: dict[str, Any] = {"sub": AGENT, "aud": [BROKER], "exp": EPOCH + 300, "iat": EPOCH}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not DROP}
    return forge(head, body, signer, alg)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_svid_round_trip(alg: str) -> None:
    raw = mint_jwt_svid(
        key(alg, 10), spiffe_id=AGENT, audience=BROKER, now=NOW, ttl=timedelta(minutes=5), jti="s"
    )
    assert verify_svid(raw) == WorkloadIdentity(
        spiffe_id=AGENT,
        method="jwt-svid",
        issuer="spiffe://example.org",
        subject=AGENT,
        expires_at=NOW + timedelta(minutes=5),
    )


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ({"typ": DROP}, {}),
        ({"typ": "JOSE"}, {}),
        ({"typ": "application/jwt"}, {}),
        ({}, {"aud": BROKER}),
        ({}, {"aud": ["https://other.example", BROKER]}),
        ({}, {"iat": DROP}),
        ({}, {"iss": "https://spire.example.org", "nbf": EPOCH}),
    ],
)
def test_svid_accepts(header: dict[str, Any], claims: dict[str, Any]) -> None:
    assert verify_svid(svid(header, **claims)).spiffe_id == AGENT


def test_svid_issuer_is_reported() -> None:
    assert verify_svid(svid(iss="https://spire.example.org")).issuer == "https://spire.example.org"


def _cross_domain() -> str:
    """Signed by other.org's key but claiming an example.org identity."""
    other = key("ES256", 11)
    return svid({"kid": other.kid}, signer=other)


def _svid_hmac() -> str:
    secret = OctKey.import_key(json.dumps(public_jwk(SVID_KEY)).encode())
    return svid({"alg": "HS256"}, signer=secret, alg="HS256")


SVID_CASES: list[tuple[str, Callable[[], Any], dict[str, Any], str]] = [
    ("not a string", lambda: 1, {}, "not a string"),
    ("too long", lambda: svid() + "A" * 9000, {}, "too long"),
    ("garbage", lambda: "a.b.c", {}, "malformed"),
    ("alg none", lambda: svid({"alg": "none"}), {}, "alg none"),
    ("alg HS256", _svid_hmac, {}, "alg not allowed: HS256"),
    ("alg not allowed", lambda: svid(), {"algorithms": ["EdDSA"]}, "alg not allowed: ES256"),
    ("alg vs key", lambda: svid({"alg": "EdDSA"}, signer=key("EdDSA", 10), alg="EdDSA"), {},
     "alg does not match key"),
    ("jwk header", lambda: svid({"jwk": public_jwk(SVID_KEY)}), {}, "header not allowed: jwk"),
    ("jku header", lambda: svid({"jku": "https://evil.example"}), {}, "header not allowed: jku"),
    ("x5u header", lambda: svid({"x5u": "https://evil.example"}), {}, "header not allowed: x5u"),
    ("x5c header", lambda: svid({"x5c": ["MIIB"]}), {}, "header not allowed: x5c"),
    ("crit", lambda: svid({"crit": ["x"]}), {}, "crit header"),
    ("typ at+jwt", lambda: svid({"typ": "at+jwt"}), {}, "wrong typ"),
    ("typ dpop+jwt", lambda: svid({"typ": "dpop+jwt"}), {}, "wrong typ"),
    ("sub missing", lambda: svid(sub=DROP), {}, "missing sub"),
    ("sub not SPIFFE", lambda: svid(sub="system:serviceaccount:default:x"), {},
     "sub is not a SPIFFE ID"),
    ("sub bad path", lambda: svid(sub="spiffe://example.org/a/../b"), {}, "sub is not a SPIFFE"),
    ("unknown trust domain", lambda: svid(sub="spiffe://evil.org/a"), {},
     "no bundle for trust domain evil.org"),
    ("key of other domain", _cross_domain, {}, "unknown kid"),
    ("kid missing", lambda: svid({"kid": DROP}), {}, "missing kid"),
    ("kid unknown", lambda: svid({"kid": "nope"}), {}, "unknown kid"),
    ("bad signature", lambda: svid(signer=key("ES256", 12)), {}, "bad signature"),
    ("aud missing", lambda: svid(aud=DROP), {}, "missing aud"),
    ("aud other", lambda: svid(aud=["https://other.example"]), {}, "audience mismatch"),
    ("aud empty list", lambda: svid(aud=[]), {}, "non-empty array"),
    ("aud non-string", lambda: svid(aud=[BROKER, 1]), {}, "non-string member"),
    ("aud object", lambda: svid(aud={"a": BROKER}), {}, "non-empty array"),
    ("exp missing", lambda: svid(exp=DROP), {}, "missing exp"),
    ("expired", lambda: svid(exp=EPOCH - 31), {}, "expired"),
    ("nbf future", lambda: svid(nbf=EPOCH + 31), {}, "not yet valid"),
    ("iat future", lambda: svid(iat=EPOCH + 31), {}, "issued in the future"),
    ("iss number", lambda: svid(iss=1), {}, "iss is not a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "overrides", "reason"), [c[1:] for c in SVID_CASES], ids=[c[0] for c in SVID_CASES]
)
def test_svid_rejects(build: Callable[[], Any], overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        verify_svid(build(), **overrides)
    assert reason in info.value.internal
    assert info.value.detail == InvalidIdentity.default_detail


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"spiffe_id": "spiffe://example.org/"}, "trailing"),
        ({"audience": ""}, "audience"),
        ({"ttl": timedelta(0)}, "ttl"),
        ({"jti": ""}, "jti"),
        ({"now": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_mint_jwt_svid_refuses(kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "spiffe_id": AGENT,
        "audience": BROKER,
        "now": NOW,
        "ttl": timedelta(minutes=5),
        "jti": "j",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=reason):
        mint_jwt_svid(SVID_KEY, **args)


# --- OIDC -----------------------------------------------------------------------------

K8S = "https://kubernetes.default.svc.cluster.local"
RULE = OIDCRule(
    issuer=K8S,
    audience=BROKER,
    algorithms=("RS256", "ES256"),
    spiffe_id_template="spiffe://example.org/ns/{kubernetes.io/namespace}/sa/"
    "{kubernetes.io/serviceaccount/name}",
    required_claims={"kubernetes.io/namespace": "agents"},
)
RSA = rsa_key()
RSA_JWK = {
    **{k: v for k, v in RSA.as_dict(private=False).items() if k in ("kty", "n", "e")},
    "kid": "k8s-1",
}
OIDC_KEYS = KeyRing.from_jwks({"keys": [RSA_JWK, {**public_jwk(key("ES256", 20)), "kid": "k8s-2"}]})


def k8s_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": K8S,
        "sub": "system:serviceaccount:agents:coder",
        "aud": [BROKER],
        "exp": EPOCH + 600,
        "iat": EPOCH - 10,
        "nbf": EPOCH - 10,
        "kubernetes.io": {
            "namespace": "agents",
            "serviceaccount": {"name": "coder", "uid": "0d4c"},
        },
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not DROP}


def oidc(header: dict[str, Any] | None = None, signer: Any = RSA, alg: str = "RS256",
         **claims: Any) -> str:  # fmt: skip
    head = {"alg": alg, "kid": "k8s-1" if alg == "RS256" else "k8s-2", **(header or {})}
    head = {k: v for k, v in head.items() if v is not DROP}
    return forge(head, k8s_claims(**claims), signer, alg)


def verify_oidc(raw: Any, rule: OIDCRule = RULE, **overrides: Any) -> WorkloadIdentity:
    kwargs: dict[str, Any] = {"rule": rule, "keys": OIDC_KEYS, "now": NOW, "leeway": LEEWAY}
    kwargs.update(overrides)
    return verify_oidc_token(raw, **kwargs)


def _with_namespace(value: Any) -> str:
    return oidc(**{"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": value}}})


@pytest.mark.parametrize(("alg", "signer"), [("RS256", RSA), ("ES256", key("ES256", 20))])
def test_oidc_maps_claims_to_spiffe_id(alg: str, signer: Any) -> None:
    assert verify_oidc(oidc(signer=signer, alg=alg)) == WorkloadIdentity(
        spiffe_id="spiffe://example.org/ns/agents/sa/coder",
        method="oidc",
        issuer=K8S,
        subject="system:serviceaccount:agents:coder",
        expires_at=NOW + timedelta(minutes=10),
    )


def test_oidc_accepts_string_audience_and_float_times() -> None:
    raw = oidc(aud=BROKER, exp=EPOCH + 60.5)
    assert verify_oidc(raw).expires_at == NOW + timedelta(seconds=60.5)


def test_oidc_template_may_use_top_level_claims() -> None:
    rule = OIDCRule(
        issuer="https://token.actions.githubusercontent.com",
        audience=BROKER,
        algorithms=("RS256",),
        spiffe_id_template="spiffe://ci.example.org/gh/{repository_owner}/{workflow}",
        required_claims={"repository_owner": "acme"},
    )
    raw = forge(
        {"alg": "RS256", "kid": "k8s-1", "typ": "JWT"},
        {
            "iss": rule.issuer,
            "sub": "repo:acme/web:ref:refs/heads/main",
            "aud": BROKER,
            "exp": EPOCH + 60,
            "repository_owner": "acme",
            "workflow": "release",
        },
        RSA,
        "RS256",
    )
    assert verify_oidc(raw, rule).spiffe_id == "spiffe://ci.example.org/gh/acme/release"


OIDC_CASES: list[tuple[str, Callable[[], Any], dict[str, Any], str]] = [
    ("not a string", lambda: None, {}, "not a string"),
    ("alg none", lambda: oidc({"alg": "none"}), {}, "alg none"),
    ("alg not in rule", lambda: oidc(signer=key("EdDSA"), alg="EdDSA"), {},
     "alg not allowed: EdDSA"),
    ("alg vs key", lambda: oidc({"kid": "k8s-1"}, signer=key("ES256", 20), alg="ES256"), {},
     "alg does not match key: token ES256, key RS256"),
    ("PS256 with RS256 key", lambda: oidc({"alg": "PS256"}, alg="PS256"),
     {"rule": OIDCRule(K8S, BROKER, ("PS256", "RS256"), RULE.spiffe_id_template)},
     "alg does not match key"),
    ("kid unknown", lambda: oidc({"kid": "k8s-9"}), {}, "unknown kid"),
    ("kid missing", lambda: oidc({"kid": DROP}), {}, "missing kid"),
    ("jwk header", lambda: oidc({"jwk": RSA_JWK}), {}, "header not allowed: jwk"),
    ("typ at+jwt", lambda: oidc({"typ": "at+jwt"}), {}, "wrong typ"),
    ("bad signature", lambda: oidc(signer=key("ES256", 21), alg="ES256"), {}, "bad signature"),
    ("iss missing", lambda: oidc(iss=DROP), {}, "missing iss"),
    ("iss trailing slash", lambda: oidc(iss=K8S + "/"), {}, "issuer mismatch"),
    ("iss other", lambda: oidc(iss="https://evil.example"), {}, "issuer mismatch"),
    ("aud other", lambda: oidc(aud=["https://other.example"]), {}, "audience mismatch"),
    ("aud missing", lambda: oidc(aud=DROP), {}, "missing aud"),
    ("exp missing", lambda: oidc(exp=DROP), {}, "missing exp"),
    ("expired", lambda: oidc(exp=EPOCH - 31), {}, "expired"),
    ("nbf future", lambda: oidc(nbf=EPOCH + 31), {}, "not yet valid"),
    ("sub missing", lambda: oidc(sub=DROP), {}, "missing sub"),
    ("required claim other", lambda: oidc(**{"kubernetes.io": {
        "namespace": "default", "serviceaccount": {"name": "coder"}}}), {},
     "claim kubernetes.io/namespace does not have the required value"),
    ("required claim missing", lambda: oidc(**{"kubernetes.io": DROP}), {},
     "missing claim kubernetes.io/namespace"),
    ("required claim not string", lambda: oidc(**{"kubernetes.io": {
        "namespace": ["agents"], "serviceaccount": {"name": "coder"}}}), {},
     "does not have the required value"),
    ("template claim missing", lambda: oidc(**{"kubernetes.io": {"namespace": "agents"}}), {},
     "missing claim kubernetes.io/serviceaccount/name"),
    ("template through non-object", lambda: oidc(**{"kubernetes.io": {
        "namespace": "agents", "serviceaccount": "coder"}}), {}, "missing claim"),
    ("injection slash", lambda: _with_namespace("coder/../../admin"), {},
     "not a usable SPIFFE ID segment"),
    ("injection dotdot", lambda: _with_namespace(".."), {}, "dot segment"),
    ("injection dot", lambda: _with_namespace("."), {}, "dot segment"),
    ("empty value", lambda: _with_namespace(""), {}, "not a usable SPIFFE ID segment"),
    ("percent value", lambda: _with_namespace("%2e%2e"), {}, "not a usable SPIFFE ID segment"),
    ("query value", lambda: _with_namespace("a?b"), {}, "not a usable SPIFFE ID segment"),
    ("number value", lambda: _with_namespace(7), {}, "not a usable SPIFFE ID segment"),
    ("null value", lambda: _with_namespace(None), {}, "not a usable SPIFFE ID segment"),
    ("upper case in trust domain", lambda: oidc(tenant="ACME"),
     {"rule": OIDCRule(K8S, BROKER, ("RS256",), "spiffe://{tenant}.example.org/w")},
     "mapped SPIFFE ID is invalid"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "overrides", "reason"), [c[1:] for c in OIDC_CASES], ids=[c[0] for c in OIDC_CASES]
)
def test_oidc_rejects(build: Callable[[], Any], overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        verify_oidc(build(), **overrides)
    assert reason in info.value.internal


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"issuer": ""}, "needs an issuer"),
        ({"audience": ""}, "needs an audience"),
        ({"algorithms": ()}, "tuple of algorithms"),
        ({"algorithms": "RS256"}, "tuple of algorithms"),
        ({"algorithms": ("HS256",)}, "unsupported algorithms: \\['HS256'\\]"),
        ({"algorithms": ("none", "RS256")}, "unsupported algorithms"),
        ({"spiffe_id_template": "https://example.org/{sub}"}, "must start with 'spiffe://'"),
        ({"spiffe_id_template": "spiffe://example.org/{sub"}, "unbalanced"),
        ({"spiffe_id_template": "spiffe://example.org/sub}"}, "unbalanced"),
        ({"spiffe_id_template": "spiffe://example.org/{{sub}}"}, "unbalanced"),
        ({"spiffe_id_template": "spiffe://example.org/{a//b}"}, "empty segment"),
        ({"spiffe_id_template": "spiffe://example.org/{}"}, "empty segment"),
        ({"required_claims": {"a/": "x"}}, "empty segment"),
        ({"required_claims": {"a": 1}}, "must map to a string"),
    ],
)
def test_oidc_rule_is_validated_when_built(kwargs: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "issuer": K8S,
        "audience": BROKER,
        "algorithms": ("RS256",),
        "spiffe_id_template": "spiffe://example.org/{sub}",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=reason):
        OIDCRule(**args)


# --- routing ----------------------------------------------------------------------------


def test_unverified_issuer_reads_iss() -> None:
    assert unverified_issuer(oidc()) == K8S
    assert unverified_issuer(svid()) is None


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "a.b",
        "a.b.c.d",
        "a.!!.c",
        "a." + b64(b"\xff") + ".c",
        "a." + b64json([1]) + ".c",
        "a." + b64json({"iss": 1}) + ".c",
        "a." + b64(b"[" * 5000) + ".c",
        "a." + b64json({"iss": "x"}) + ".c" + "A" * 9000,
    ],
)
def test_unverified_issuer_never_raises(raw: Any) -> None:
    assert unverified_issuer(raw) is None


def test_unverified_issuer_is_not_verification() -> None:
    forged = sign_segments(b64json({"alg": "EdDSA"}), b64json({"iss": K8S}), key("EdDSA"), "EdDSA")
    assert unverified_issuer(forged) == K8S
    with pytest.raises(InvalidIdentity):
        verify_oidc(forged)

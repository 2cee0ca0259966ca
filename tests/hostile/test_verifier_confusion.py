"""Confusing the verifiers: algorithm confusion, kid injection, typ confusion between
identity tokens, credentials and DPoP proofs, SPIFFE ID tricks."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

from joserfc.jws import JWSRegistry

from taskbound.core.clock import to_epoch
from taskbound.core.dpop import access_token_hash, make_dpop_proof
from taskbound.core.jws import sign_compact
from taskbound.core.keys import generate_key, public_jwk
from taskbound.core.model import KeyPurpose, TaskFilter
from tests.api.conftest import AGENT, Agent, Live

from .helpers import READ, assert_clean_refusal, b64, b64json, claims_of, header_of, introspect

BODY: dict[str, Any] = {
    "intent": {"purpose": "p"},
    "on_behalf_of": "alice",
    "scopes": [READ],
    "ttl_seconds": 300,
}


async def a_credential(live: Live) -> tuple[Agent, dict[str, Any], str]:
    agent = await live.agent()
    r = await agent.call("POST", "/v1/tasks", json=BODY)
    assert r.status_code == 201, r.text
    task = r.json()
    return agent, task, task["credentials"][0]["access_token"]


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def svid(live: Live, sub: str, **header: Any) -> str:
    """A JWT-SVID for any ``sub`` signed by the real dev-issuer key (as a compromised or
    sloppy issuer of a trusted domain could produce), bypassing the minting checks."""
    key = live.services.keys.signer(KeyPurpose.DEV_IDENTITY)
    now = to_epoch(live.clock.now())
    claims = {"sub": sub, "aud": [live.base], "iat": now, "exp": now + 300, "jti": "j"}
    return sign_compact({"alg": key.alg, "kid": key.kid, "typ": "JWT", **header}, claims, key)


# --- credentials at introspection and revocation -------------------------------------------


async def test_forged_credentials_are_never_active(live: Live) -> None:
    _, _, token = await a_credential(live)
    head, claims = header_of(token), claims_of(token)
    jwk = live.services.keys.jwks()["keys"][0]
    sig = token.split(".")[2]
    widened = {**claims, "scope": "issues:admin", "exp": claims["exp"] + 86400}
    widened["authorization_details"] = [
        {**claims["authorization_details"][0], "tier": "admin", "actions": ["wipe"]}
    ]
    attacker = generate_key("EdDSA")
    forged = {
        # RFC 8725 §2.1 algorithm confusion: the public key as an HMAC secret.
        "hs256_public_x": hs256({**head, "alg": "HS256"}, widened, jwk["x"].encode()),
        "hs256_public_json": hs256({**head, "alg": "HS256"}, widened, json.dumps(jwk).encode()),
        "alg_none": f"{b64json({**head, 'alg': 'none'})}.{b64json(widened)}.",
        "alg_none_sig_kept": f"{b64json({**head, 'alg': 'none'})}.{b64json(claims)}.{sig}",
        "payload_tampered": f"{token.split('.')[0]}.{b64json(widened)}.{sig}",
        "header_tampered_alg": f"{b64json({**head, 'alg': 'Ed25519'})}.{token.split('.')[1]}.{sig}",
        "own_jwk": sign_compact(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": head["kid"], "jwk": public_jwk(attacker)},
            widened,
            attacker,
        ),
        "attacker_key_same_kid": sign_compact(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": head["kid"]}, widened, attacker
        ),
        "kid_traversal": sign_compact(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": "../../../../dev/null"}, widened, attacker
        ),
        "kid_sql": sign_compact(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": "' OR '1'='1"}, widened, attacker
        ),
        "kid_huge": sign_compact(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": "k" * 5000}, widened, attacker
        ),
        "json_serialization": json.dumps(
            {"protected": token.split(".")[0], "payload": token.split(".")[1], "signature": sig}
        ),
        "five_parts": token + ".x.y",
        "padded": token + "=",
        "whitespace": " " + token,
    }
    for name, bad in forged.items():
        r = await live.http.post("/oauth/introspect", data={"token": bad}, headers=live.admin)
        assert r.status_code == 200, (name, r.text)
        assert r.json() == {"active": False}, name
        r = await live.http.post("/oauth/revoke", data={"token": bad})
        assert r.status_code == 200, (name, r.text)
    # None of the forgeries revoked the real credential (they all carry its jti).
    assert (await introspect(live, token))["active"] is True


async def check_identity_tokens_and_proofs_are_not_credentials(live: Live) -> None:
    agent, _, _ = await a_credential(live)
    proof = agent.proof("POST", "/oauth/introspect")
    for name, tok in (("identity", agent.identity), ("dpop", proof)):
        assert (await introspect(live, tok)) == {"active": False}, name


async def check_credentials_and_proofs_are_not_identity_tokens(live: Live) -> None:
    agent, task, token = await a_credential(live)
    for name, tok in (
        ("credential", token),
        ("dpop_proof", agent.proof("POST", "/v1/tasks")),
        (
            "credential_retyped_jwt",
            f"{b64json({**header_of(token), 'typ': 'JWT'})}.{token.split('.', 1)[1]}",
        ),
    ):
        impostor = Agent(live, tok, key=agent.key)
        r = await impostor.call("POST", "/v1/tasks", json=BODY)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["code"] == "invalid_identity_token", name
        r = await impostor.call("GET", f"/v1/tasks/{task['id']}")
        assert r.status_code == 401, name


async def check_identity_tokens_and_credentials_are_not_dpop_proofs(live: Live) -> None:
    agent, _, token = await a_credential(live)
    for name, tok in (("identity", agent.identity), ("credential", token)):
        r = await agent.call("POST", "/v1/tasks", proof=tok, json=BODY)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["code"] == "invalid_dpop_proof", name


async def check_identity_token_of_another_purpose_key_is_refused(live: Live) -> None:
    """A token signed by the broker's credential key (same server, other purpose) is not
    an identity, even with a JWT typ and an SVID-shaped body."""
    key = live.services.keys.signer(KeyPurpose.CREDENTIALS)
    now = to_epoch(live.clock.now())
    claims = {"sub": AGENT, "aud": [live.base], "iat": now, "exp": now + 300}
    tok = sign_compact({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims, key)
    r = await Agent(live, tok).call("POST", "/v1/tasks", json=BODY)
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_identity_token"


# --- DPoP proof forgeries ---------------------------------------------------------------


def raw_proof(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    """Signed without joserfc's header validation, so malformed headers get through."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    alg = "EdDSA" if key.alg == "EdDSA" else key.alg
    signature = JWSRegistry.algorithms[alg].sign(signing_input.encode(), key.key)
    return f"{signing_input}.{b64(signature)}"


async def check_malicious_dpop_proofs_are_refused_cleanly(live: Live) -> None:
    agent = await live.agent()
    key = agent.key
    url = live.base + "/v1/tasks"
    now = to_epoch(live.clock.now())
    jwk = {k: v for k, v in public_jwk(key).items() if k in ("kty", "crv", "x")}
    good_claims = {"htm": "POST", "htu": url, "iat": now}

    def mk(header: dict[str, Any] | None = None, **claims: Any) -> str:
        h = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk, **(header or {})}
        c = {"jti": secrets.token_urlsafe(8), **good_claims, **claims}
        return raw_proof({k: v for k, v in h.items() if v is not None}, c, key)

    ec = generate_key("ES256")
    ec_jwk = dict(public_jwk(ec))
    ec_off_curve = {**ec_jwk, "y": b64(b"\x01" * 32)}
    cases = {
        "private_member_d": mk({"jwk": {**jwk, "d": b64(b"\x00" * 32)}}),
        "typ_jwt": mk({"typ": "JWT"}),
        "typ_missing": mk({"typ": None}),
        "typ_at_jwt": mk({"typ": "at+jwt"}),
        "jku": mk({"jku": "https://evil.example/jwks"}),
        "x5u": mk({"x5u": "https://evil.example/cert"}),
        "kid_only_no_jwk": mk({"jwk": None, "kid": "anything"}),
        "jwk_not_object": mk({"jwk": "nope"}),
        "jwk_other_alg": mk({"alg": "ES256"}),
        "crit": mk({"crit": ["exp"]}),
        "htu_https": mk(htu=url.replace("http://", "https://")),
        "htu_other_host": mk(htu=url.replace("127.0.0.1", "localhost")),
        "htu_other_port": mk(htu=url.replace(f":{live.services.settings.server.port}", ":1")),
        "htu_userinfo": mk(htu=url.replace("http://", "http://a:b@")),
        "htu_prefix": mk(htu=live.base + "/v1/task"),
        "htu_not_string": mk(htu=["x"]),
        "htm_lower": mk(htm="post"),
        "iat_future": mk(iat=now + 3600),
        "iat_past": mk(iat=now - 3600),
        "iat_string": mk(iat=str(now)),
        "iat_huge": mk(iat=10**30),
        "iat_nan_like": mk(iat=1e308),
        "jti_too_long": mk(jti="j" * 300),
        "jti_not_string": mk(jti=123),
        "nonce_not_string": mk(nonce={"a": 1}),
        "ath_not_string": mk(ath=5),
    }
    cases["ec_point_off_curve"] = raw_proof(
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": ec_off_curve},
        {"jti": "x", **good_claims},
        ec,
    )
    hs_header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"k" * 32)}}
    cases["hs256_oct_jwk"] = hs256(hs_header, {"jti": "y", **good_claims}, b"k" * 32)
    cases["alg_none"] = (
        f"{b64json({'typ': 'dpop+jwt', 'alg': 'none', 'jwk': jwk})}."
        f"{b64json({'jti': 'z', **good_claims})}."
    )
    for name, proof in cases.items():
        r = await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)
        assert_clean_refusal(r, 401)
        assert r.json()["code"] == "invalid_dpop_proof", name
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def check_proof_with_ath_of_another_token_still_binds_only_its_key(live: Live) -> None:
    agent = await live.agent()
    proof = make_dpop_proof(
        agent.key,
        method="POST",
        url=live.base + "/v1/tasks",
        now=live.clock.now(),
        jti="with-ath",
        access_token="some-other-token",
    )
    r = await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)
    assert r.status_code == 201
    assert access_token_hash("some-other-token")  # ath is irrelevant at the broker


# --- identity tokens ------------------------------------------------------------------------


SPIFFE_TRICKS = [
    "spiffe://taskbound.local/agents/bot/",
    "spiffe://TASKBOUND.local/agents/bot",
    "SPIFFE://taskbound.local/agents/bot",
    "spiffe://taskbound.local/agents/%62ot",
    "spiffe://taskbound.local/agents//bot",
    "spiffe://taskbound.local/agents/./bot",
    "spiffe://taskbound.local/agents/x/../bot",
    "spiffe://taskbound.local/agents/bot?x=1",
    "spiffe://taskbound.local/agents/bot#x",
    "spiffe://u@taskbound.local/agents/bot",
    "spiffe://taskbound.local:443/agents/bot",
    "spiffe://taskbound.local/agents/b\u043et",  # Cyrillic o
    "spiffe://taskbound.local/agents/\uff42ot",  # fullwidth b
    "spiffe://taskbound.local/agents/bot\u0000",
    "spiffe://taskbound.local/agents/bot\n",
    " spiffe://taskbound.local/agents/bot",
    "spiffe://taskbound.local/agents/bot ",
    "spiffe://evil.example/agents/bot",
    "spiffe://taskbound.local.evil.example/agents/bot",
]


async def check_spiffe_id_tricks_never_reach_the_registered_agent(live: Live) -> None:
    for sub in SPIFFE_TRICKS:
        r = await Agent(live, svid(live, sub)).call("POST", "/v1/tasks", json=BODY)
        assert_clean_refusal(r, 401)
        assert r.json()["code"] == "invalid_identity_token", sub
        # The dev issuer refuses to mint them too.
        r = await live.http.post(
            "/v1/admin/dev/identity", json={"spiffe_id": sub}, headers=live.admin
        )
        assert_clean_refusal(r)
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def check_spiffe_ids_are_case_sensitive_in_the_path(live: Live) -> None:
    r = await Agent(live, svid(live, "spiffe://taskbound.local/agents/BOT")).call(
        "POST", "/v1/tasks", json=BODY
    )
    assert r.status_code == 403
    assert r.json()["code"] == "unknown_agent"


async def check_identity_token_with_future_nbf_or_wrong_aud_is_refused(live: Live) -> None:
    key = live.services.keys.signer(KeyPurpose.DEV_IDENTITY)
    now = to_epoch(live.clock.now())
    base = {"sub": AGENT, "aud": [live.base], "iat": now, "exp": now + 300}
    for claims in (
        {**base, "nbf": now + 3600},
        {**base, "iat": now + 3600},
        {**base, "aud": [live.base + "/"]},
        {**base, "aud": live.base.upper()},
        {**base, "aud": []},
        {**base, "aud": [["x"]]},
        {**base, "exp": "soon"},
        {**base, "exp": 10**30},
        {k: v for k, v in base.items() if k != "exp"},
        {**base, "sub": ["spiffe://taskbound.local/agents/bot"]},
    ):
        tok = sign_compact({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims, key)
        r = await Agent(live, tok).call("POST", "/v1/tasks", json=BODY)
        assert_clean_refusal(r, 401)


async def check_deeply_nested_identity_header_is_a_401_not_a_500(live: Live) -> None:
    """Unauthenticated: a header that is ~1500 nested arrays."""
    agent = await live.agent()
    head = b64(b"[" * 1500)
    payload = b64json({"sub": AGENT})
    for tok in (f"{head}.{payload}.c2ln", f"{b64json({'kid': 'k'})}.{b64(b'[' * 3000)}.c2ln"):
        r = await Agent(live, tok, key=agent.key).call("POST", "/v1/tasks", json=BODY)
        assert_clean_refusal(r, 401)


async def check_identity_token_is_not_replay_limited_but_proofs_are(live: Live) -> None:
    """Regression guard for the documented model: the identity token may be reused, the
    DPoP proof never."""
    agent = await live.agent()
    for _ in range(2):
        assert (await agent.call("POST", "/v1/tasks", json=BODY)).status_code == 201
    proof = agent.proof("POST", "/v1/tasks")
    assert (await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)).status_code == 201
    live.clock.advance(1)
    assert (await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)).status_code == 401
    live.clock.advance(-1)


# --- the checks above, grouped so that each server start is used for several -------------


async def test_no_token_kind_passes_for_another(live: Live) -> None:
    await check_identity_tokens_and_proofs_are_not_credentials(live)
    await check_credentials_and_proofs_are_not_identity_tokens(live)
    await check_identity_tokens_and_credentials_are_not_dpop_proofs(live)
    await check_identity_token_of_another_purpose_key_is_refused(live)


async def check_htu_comes_from_the_public_url_not_the_host_header(live: Live) -> None:
    agent = await live.agent()
    spoofed = make_dpop_proof(
        agent.key, method="POST", url="http://evil.example/v1/tasks", now=live.clock.now(), jti="h"
    )
    r = await agent.call(
        "POST", "/v1/tasks", proof=spoofed, json=BODY, headers={"Host": "evil.example"}
    )
    assert r.status_code == 401
    r = await agent.call("POST", "/v1/tasks", json=BODY, headers={"Host": "evil.example"})
    assert r.status_code == 201


async def test_dpop_proof_forgeries(live: Live) -> None:
    await check_malicious_dpop_proofs_are_refused_cleanly(live)
    await check_htu_comes_from_the_public_url_not_the_host_header(live)
    await check_proof_with_ath_of_another_token_still_binds_only_its_key(live)


async def test_spiffe_id_tricks(live: Live) -> None:
    await check_spiffe_id_tricks_never_reach_the_registered_agent(live)
    await check_spiffe_ids_are_case_sensitive_in_the_path(live)


async def test_identity_token_claims_and_structure(live: Live) -> None:
    await check_identity_token_with_future_nbf_or_wrong_aud_is_refused(live)
    await check_deeply_nested_identity_header_is_a_401_not_a_500(live)
    key = live.services.keys.signer(KeyPurpose.DEV_IDENTITY)
    now = to_epoch(live.clock.now())
    claims = {"sub": AGENT, "aud": [live.base], "exp": now + 60, "pad": "x" * 9000}
    too_long = sign_compact({"alg": key.alg, "kid": key.kid}, claims, key)
    r = await Agent(live, too_long).call("POST", "/v1/tasks", json=BODY)
    assert_clean_refusal(r, 401)
    await check_identity_token_is_not_replay_limited_but_proofs_are(live)

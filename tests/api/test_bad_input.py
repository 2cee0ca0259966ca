"""Every bad input of issue 2 gets a clear 4xx with a stable code, persists nothing, and is
logged."""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, OKPKey

from taskbound.core.clock import to_epoch
from taskbound.core.identity import mint_jwt_svid
from taskbound.core.keys import generate_key
from taskbound.core.model import KeyPurpose, TaskFilter

from .conftest import AGENT, Agent, Live


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def svid_claims(live: Live, sub: str = AGENT, **extra: Any) -> dict[str, Any]:
    now = to_epoch(live.clock.now())
    claims = {"sub": sub, "aud": [live.base], "exp": now + 300, "iat": now}
    claims.update(extra)
    return claims


def forged_identity(live: Live, case: str) -> str:
    dev = live.services.keys.signer(KeyPurpose.DEV_IDENTITY)
    if case == "expired":
        return mint_jwt_svid(
            dev,
            spiffe_id=AGENT,
            audience=live.base,
            now=live.clock.now() - timedelta(hours=1),
            ttl=timedelta(minutes=5),
            jti="x1",
        )
    if case == "alg_none":
        return f"{b64({'alg': 'none', 'kid': dev.kid})}.{b64(svid_claims(live))}."
    if case == "alg_hs256":
        key = OctKey.import_key(b"k" * 32)
        return jwt.encode(
            {"alg": "HS256", "kid": dev.kid}, svid_claims(live), key, algorithms=["HS256"]
        )
    if case == "alg_eddsa_outside_allow_list":
        key = OKPKey.generate_key("Ed25519")
        return jwt.encode(
            {"alg": "EdDSA", "kid": dev.kid}, svid_claims(live), key, algorithms=["EdDSA"]
        )
    if case == "untrusted_domain":
        return mint_jwt_svid(
            dev,
            spiffe_id="spiffe://evil.example/agents/bot",
            audience=live.base,
            now=live.clock.now(),
            ttl=timedelta(minutes=5),
            jti="x2",
        )
    if case == "unknown_kid":
        other = generate_key("ES256")
        return mint_jwt_svid(
            other,
            spiffe_id=AGENT,
            audience=live.base,
            now=live.clock.now(),
            ttl=timedelta(minutes=5),
            jti="x3",
        )
    if case in ("own_jwk", "own_jku"):
        key = ECKey.generate_key("P-256")
        header: dict[str, Any] = {"alg": "ES256", "kid": key.thumbprint()}
        if case == "own_jwk":
            header["jwk"] = key.as_dict(private=False)
        else:
            header["jku"] = "https://evil.example/jwks.json"
        return jwt.encode(header, svid_claims(live), key, algorithms=["ES256"])
    if case == "wrong_audience":
        return mint_jwt_svid(
            dev,
            spiffe_id=AGENT,
            audience="https://someone-else.example",
            now=live.clock.now(),
            ttl=timedelta(minutes=5),
            jti="x4",
        )
    if case == "garbage":
        return "not.a.jwt"
    raise AssertionError(case)


IDENTITY_CASES = [
    "expired",
    "alg_none",
    "alg_hs256",
    "alg_eddsa_outside_allow_list",
    "untrusted_domain",
    "unknown_kid",
    "own_jwk",
    "own_jku",
    "wrong_audience",
    "garbage",
]


@pytest.mark.parametrize("case", IDENTITY_CASES)
async def test_bad_identity_tokens_are_refused(
    live: Live, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskbound")
    agent = Agent(live, forged_identity(live, case))
    r = await agent.start()
    assert r.status_code == 401, r.text
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["code"] == "invalid_identity_token"
    assert "WWW-Authenticate" in r.headers
    assert await live.services.storage.list_tasks(TaskFilter()) == []
    refused = [rec for rec in caplog.records if rec.getMessage() == "request refused"]
    assert refused
    assert refused[-1].__dict__["code"] == "invalid_identity_token"


async def test_missing_identity_token(live: Live) -> None:
    agent = await live.agent()
    r = await live.http.post(
        "/v1/tasks", json={}, headers={"DPoP": agent.proof("POST", "/v1/tasks")}
    )
    assert r.status_code == 400
    assert "Bearer" in r.json()["detail"]


async def dpop_case(agent: Agent, case: str) -> dict[str, str] | None:
    """DPoP headers for a bad-proof case (None: no DPoP header at all)."""
    if case == "missing":
        return None
    if case == "wrong_url":
        return {"DPoP": agent.proof("POST", "/v1/other")}
    if case == "wrong_method":
        return {"DPoP": agent.proof("PUT", "/v1/tasks")}
    if case == "stale":
        agent.live.clock.advance(-3600)
        proof = agent.proof("POST", "/v1/tasks")
        agent.live.clock.advance(3600)
        return {"DPoP": proof}
    if case == "garbage":
        return {"DPoP": "x.y.z"}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "wrong_url", "wrong_method", "stale", "garbage"])
async def test_bad_dpop_proofs_are_refused(live: Live, case: str) -> None:
    agent = await live.agent()
    headers = {"Authorization": f"Bearer {agent.identity}"}
    extra = await dpop_case(agent, case)
    headers.update(extra or {})
    r = await live.http.post("/v1/tasks", json={}, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_dpop_proof"
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def test_two_dpop_headers_are_refused(live: Live) -> None:
    agent = await live.agent()
    p1, p2 = agent.proof("POST", "/v1/tasks"), agent.proof("POST", "/v1/tasks")
    headers = [("Authorization", f"Bearer {agent.identity}"), ("DPoP", p1), ("DPoP", p2)]
    r = await live.http.post("/v1/tasks", json={}, headers=headers)
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_dpop_proof"


async def test_replayed_dpop_proof_is_refused(live: Live) -> None:
    agent = await live.agent()
    proof = agent.proof("POST", "/v1/tasks")
    first = await agent.call(
        "POST",
        "/v1/tasks",
        proof=proof,
        json={
            "intent": {"purpose": "p"},
            "on_behalf_of": "alice",
            "scopes": [{"tool": "issues", "tier": "read"}],
            "ttl_seconds": 60,
        },
    )
    assert first.status_code == 201
    again = await agent.call("POST", "/v1/tasks", proof=proof, json={})
    assert again.status_code == 401
    assert again.json()["code"] == "invalid_dpop_proof"


GOOD: dict[str, Any] = {
    "intent": {"purpose": "p"},
    "on_behalf_of": "alice",
    "scopes": [{"tool": "issues", "tier": "read"}],
    "ttl_seconds": 60,
}
READ = {"tool": "issues", "tier": "read"}


def body_with(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[]", 400, "invalid_request"),
        (body_with(admin=True), 400, "unknown_field"),
        (body_with(intent={"purpose": "p", "extra": 1}), 400, "unknown_field"),
        (body_with(scopes=[]), 400, "invalid_request"),
        (body_with(scopes=[{"tool": "issues", "tier": "root"}]), 400, "invalid_request"),
        (body_with(scopes=[READ, READ]), 400, "invalid_request"),
        (body_with(ttl_seconds=999999), 400, "ttl_exceeds_cap"),
        (body_with(intent={"purpose": ""}), 400, "invalid_request"),
        (
            body_with(intent={"purpose": "p", "constraints": {"bad key": "x"}}),
            400,
            "invalid_request",
        ),
    ],
)
async def test_malformed_bodies(live: Live, body: bytes, status: int, code: str) -> None:
    agent = await live.agent()
    r = await agent.call(
        "POST", "/v1/tasks", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def test_wrong_content_type(live: Live) -> None:
    agent = await live.agent()
    r = await agent.call(
        "POST", "/v1/tasks", content=b"a=b", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415
    assert r.json()["code"] == "unsupported_media_type"


async def test_oversized_body_and_headers(live: Live) -> None:
    agent = await live.agent()
    big = b'{"intent": {"purpose": "' + b"x" * 70_000 + b'"}}'
    r = await agent.call(
        "POST", "/v1/tasks", content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"
    r = await agent.call("POST", "/v1/tasks", json={}, headers={"X-Padding": "p" * 17_000})
    assert r.status_code == 431
    assert r.json()["code"] == "headers_too_large"
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def test_unknown_agent(live: Live) -> None:
    agent = await live.agent("spiffe://taskbound.local/agents/ghost")
    r = await agent.start()
    assert r.status_code == 403
    assert r.json()["code"] == "unknown_agent"


@pytest.mark.parametrize("state", ["suspended", "quarantined", "retired"])
async def test_inactive_agent_cannot_start_tasks(live: Live, state: str) -> None:
    spec = {
        "spiffe_id": AGENT,
        "owner": "alice",
        "state": state,
        "ceiling": [{"tool": "issues", "tier": "read"}],
    }
    r = await live.http.put(f"/v1/admin/agents/{AGENT}", json=spec, headers=live.admin)
    assert r.status_code == 200, r.text
    agent = await live.agent()
    r = await agent.start()
    assert r.status_code == 403
    assert r.json()["code"] == "agent_not_active"
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def test_scope_beyond_ceiling_only(live: Live) -> None:
    agent = await live.agent()
    r = await agent.start(scopes=[{"tool": "issues", "tier": "admin"}])
    assert r.status_code == 403
    assert r.json()["code"] == "no_scope_granted"


async def test_acting_for_another_owner_is_refused(live: Live) -> None:
    agent = await live.agent()
    for owner in ("bob", "nobody"):
        r = await agent.start(on_behalf_of=owner)
        assert r.status_code == 403
        assert r.json()["code"] == "owner_not_allowed"


async def test_unknown_paths_and_methods_are_problems(live: Live) -> None:
    r = await live.http.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    r = await live.http.delete("/v1/tasks")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"

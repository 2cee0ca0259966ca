"""Tasks and credentials end to end over HTTP (DESIGN.md §9)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest

from taskbound.core.keys import jwk_thumbprint, public_jwk
from taskbound.core.model import TaskFilter

from .conftest import AGENT, Agent, Live


def claims_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def header_of(token: str) -> dict[str, Any]:
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


async def test_start_task_issues_one_credential_per_tool_and_tier(live: Live) -> None:
    agent = await live.agent()
    r = await agent.start()
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    task = r.json()
    assert task["state"] == "active"
    assert task["agent"] == AGENT
    assert task["on_behalf_of"] == "alice"
    assert {(g["tool"], g["tier"]) for g in task["granted"]} == {
        ("issues", "read"),
        ("issues", "write"),
    }
    assert task["denied"] == []
    creds = {c["tier"]: c for c in task["credentials"]}
    assert set(creds) == {"read", "write"}
    jkt = jwk_thumbprint(public_jwk(agent.key))
    for tier, cred in creds.items():
        assert cred["token_type"] == "DPoP"
        assert cred["scope"] == f"issues:{tier}"
        assert 0 < cred["expires_in"] <= 600
        head, body = header_of(cred["access_token"]), claims_of(cred["access_token"])
        assert head["typ"] == "at+jwt"
        assert head["alg"] == "EdDSA"
        assert body["iss"] == live.base
        assert body["aud"] == "https://gw.example/issues"  # one destination only
        assert body["sub"] == body["client_id"] == AGENT
        assert body["cnf"] == {"jkt": jkt}
        assert body["tsk"] == task["id"]
        assert body["exp"] - body["iat"] == 600  # the credential cap, below the task's 900 s
        details = body["authorization_details"]
        assert len(details) == 1
        assert details[0]["tier"] == tier  # one tier only
        assert "upstream-secret" not in cred["access_token"]
    assert claims_of(creds["read"]["access_token"])["authorization_details"][0]["actions"] == [
        "list",
        "get",
    ]
    assert claims_of(creds["write"]["access_token"])["authorization_details"][0]["actions"] == [
        "comment"
    ]
    # Every issued credential is recorded under its task.
    recorded = await live.services.storage.list_credentials(task["id"])
    assert {c.jti for c in recorded} == {c["jti"] for c in task["credentials"]}


async def test_credential_verifies_with_an_independent_jose_library(live: Live) -> None:
    agent = await live.agent()
    token = (await agent.start()).json()["credentials"][0]["access_token"]
    jwks = (await live.http.get("/.well-known/jwks.json")).json()
    kid = header_of(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    assert "d" not in jwk
    key = pyjwt.PyJWK(jwk).key
    decoded = pyjwt.decode(
        token,
        key=key,
        algorithms=["EdDSA"],
        audience="https://gw.example/issues",
        issuer=live.base,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded["sub"] == AGENT


async def test_task_is_capped_to_the_task_ttl(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start(ttl_seconds=60)).json()
    for c in task["credentials"]:
        assert c["expires_in"] == 60


async def test_partial_grant_lists_what_was_denied_and_why(live: Live) -> None:
    agent = await live.agent()
    r = await agent.start(
        scopes=[
            {"tool": "issues", "tier": "read"},
            {"tool": "issues", "tier": "admin"},
            {"tool": "deploy", "tier": "admin"},
            {"tool": "nope", "tier": "read"},
        ]
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert [(g["tool"], g["tier"]) for g in task["granted"]] == [("issues", "read")]
    assert {(d["tool"], d["tier"], d["code"]) for d in task["denied"]} == {
        ("issues", "admin", "beyond_ceiling"),
        ("deploy", "admin", "beyond_ceiling"),
        ("nope", "read", "unknown_tool"),
    }
    assert len(task["credentials"]) == 1


async def test_fresh_credential_same_key_and_task_lifecycle(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start()).json()
    path = f"/v1/tasks/{task['id']}"
    r = await agent.call("POST", f"{path}/credentials", json={"tool": "issues", "tier": "read"})
    assert r.status_code == 201, r.text
    fresh = r.json()
    assert fresh["scope"] == "issues:read"
    assert (
        claims_of(fresh["access_token"])["cnf"]
        == claims_of(task["credentials"][0]["access_token"])["cnf"]
    )

    r = await agent.call("GET", path)
    assert r.status_code == 200
    assert r.json()["state"] == "active"

    r = await agent.call("POST", f"{path}/complete")
    assert r.status_code == 200
    assert r.json()["state"] == "completed"
    assert r.json()["changed"] is True
    creds = await live.services.storage.list_credentials(task["id"])
    assert creds
    assert all(c.revoked_at is not None for c in creds)

    r = await agent.call("POST", f"{path}/complete")
    assert r.json()["changed"] is False  # idempotent, and says so
    r = await agent.call("POST", f"{path}/credentials", json={"tool": "issues", "tier": "read"})
    assert r.status_code == 409
    assert r.json()["code"] == "task_not_active"


async def test_cancel_revokes_and_introspection_follows(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start()).json()
    token = task["credentials"][0]["access_token"]
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.status_code == 200
    info = r.json()
    assert info["active"] is True
    assert info["scope"] in ("issues:read", "issues:write")
    assert info["cnf"]["jkt"] == jwk_thumbprint(public_jwk(agent.key))
    assert info["token_type"] == "DPoP"
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/cancel", json={"reason": "user gave up"})
    assert r.json()["state"] == "cancelled"
    assert r.json()["end_reason"] == "user gave up"
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.json() == {"active": False}


async def test_task_expires_on_its_ttl(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start(ttl_seconds=30)).json()
    token = task["credentials"][0]["access_token"]
    live.clock.advance(31)
    r = await live.http.get(f"/v1/tasks/{task['id']}", headers=live.admin)
    assert r.json()["state"] == "expired"
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.json() == {"active": False}
    assert await live.services.broker.sweep() == [task["id"]]
    stored = await live.services.storage.get_task(task["id"])
    assert stored is not None
    assert stored.state.value == "expired"
    assert all(c.revoked_at for c in await live.services.storage.list_credentials(task["id"]))


async def test_other_agents_and_other_keys_cannot_touch_a_task(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start()).json()
    thief = Agent(live, agent.identity)  # same identity token, different DPoP key
    for method, suffix in (("GET", ""), ("POST", "/complete"), ("POST", "/credentials")):
        kw = {"json": {"tool": "issues", "tier": "read"}} if suffix == "/credentials" else {}
        r = await thief.call(method, f"/v1/tasks/{task['id']}{suffix}", **kw)
        assert r.status_code == 404, (method, suffix, r.text)
    assert (await live.services.storage.get_task(task["id"])).state.value == "active"  # type: ignore[union-attr]


async def test_refresh_of_ungranted_scope_is_refused(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start(scopes=[{"tool": "issues", "tier": "read"}])).json()
    r = await agent.call(
        "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": "issues", "tier": "write"}
    )
    assert r.status_code == 403


async def test_revocation_endpoint_rfc7009(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start()).json()
    token = task["credentials"][0]["access_token"]
    r = await live.http.post("/oauth/revoke", data={"token": token})
    assert r.status_code == 200
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.json() == {"active": False}
    # The other credential of the task is untouched.
    other = task["credentials"][1]["access_token"]
    r = await live.http.post("/oauth/introspect", data={"token": other}, headers=live.admin)
    assert r.json()["active"] is True
    # Unknown and garbage tokens are not an error (RFC 7009 §2.2).
    assert (await live.http.post("/oauth/revoke", data={"token": "garbage"})).status_code == 200


async def test_introspection_requires_an_authenticated_caller(live: Live) -> None:
    agent = await live.agent()
    token = (await agent.start()).json()["credentials"][0]["access_token"]
    r = await live.http.post("/oauth/introspect", data={"token": token})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"
    r = await live.http.post(
        "/oauth/introspect", data={"token": token}, headers={"Authorization": "Bearer tbat_wrong"}
    )
    assert r.status_code == 401
    r = await live.http.post("/oauth/introspect", json={"token": token}, headers=live.admin)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"


async def test_metadata_and_jwks(live: Live) -> None:
    meta = (await live.http.get("/.well-known/oauth-authorization-server")).json()
    assert meta["issuer"] == live.base
    assert meta["jwks_uri"] == f"{live.base}/.well-known/jwks.json"
    assert meta["introspection_endpoint"] == f"{live.base}/oauth/introspect"
    assert meta["revocation_endpoint"] == f"{live.base}/oauth/revoke"
    assert "EdDSA" in meta["dpop_signing_alg_values_supported"]
    jwks = (await live.http.get("/.well-known/jwks.json")).json()
    assert len(jwks["keys"]) == 1
    key = jwks["keys"][0]
    assert key["kid"] == jwk_thumbprint(key)  # RFC 7638 thumbprint as kid
    assert not {"d", "p", "q"} & set(key)


async def test_key_rotation_keeps_old_credentials_valid_until_overlap_ends(live: Live) -> None:
    agent = await live.agent()
    old = (await agent.start()).json()["credentials"][0]["access_token"]
    r = await live.http.post("/v1/admin/keys/rotate", headers=live.admin)
    assert r.status_code == 201
    new_kid = r.json()["kid"]
    jwks = (await live.http.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {header_of(old)["kid"], new_kid}
    new = (await agent.start()).json()["credentials"][0]["access_token"]
    assert header_of(new)["kid"] == new_kid
    r = await live.http.post("/oauth/introspect", data={"token": old}, headers=live.admin)
    assert r.json()["active"] is True
    # After the overlap (credential cap + leeway) the old key is pruned from the JWKS.
    live.clock.advance(600 + 30 + 1)
    await live.services.broker.sweep()
    jwks = (await live.http.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {new_kid}


async def test_metrics_and_health(live: Live) -> None:
    agent = await live.agent()
    await agent.start()
    text = (await live.http.get("/metrics")).text
    assert "taskbound_tasks_started_total 1.0" in text
    assert (await live.http.get("/healthz")).json() == {"status": "ok"}
    assert (await live.http.get("/readyz")).json() == {"status": "ready"}


async def test_nothing_is_persisted_on_refusal(live: Live) -> None:
    agent = await live.agent()
    r = await agent.start(scopes=[{"tool": "deploy", "tier": "admin"}])
    assert r.status_code == 403
    assert r.json()["code"] == "no_scope_granted"
    assert await live.services.storage.list_tasks(TaskFilter()) == []


@pytest.mark.parametrize("tier", ["read", "write"])
async def test_requested_actions_narrow_the_credential(live: Live, tier: str) -> None:
    agent = await live.agent()
    actions = ["get"] if tier == "read" else ["comment"]
    task = (await agent.start(scopes=[{"tool": "issues", "tier": tier, "actions": actions}])).json()
    assert (
        claims_of(task["credentials"][0]["access_token"])["authorization_details"][0]["actions"]
        == actions
    )

"""Attacks on tasks and their credentials: widening, stealing, replaying, outliving."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import generate_key, jwk_thumbprint, public_jwk
from taskbound.core.model import TaskFilter
from tests.api.conftest import AGENT, Agent, Live

from .helpers import READ, WRITE, assert_clean_refusal, claims_of, introspect, put_agent

OTHER = "spiffe://taskbound.local/agents/other"


async def register_other_agent(live: Live) -> None:
    r = await live.http.post(
        "/v1/admin/agents",
        json={"spiffe_id": OTHER, "owner": "alice", "ceiling": [READ, WRITE]},
        headers=live.admin,
    )
    assert r.status_code == 201, r.text


def body(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        # The default policy pack grants writes only when the intent names them.
        "intent": {"purpose": "p", "constraints": {"tiers": ["read", "write"]}},
        "on_behalf_of": "alice",
        "scopes": [READ],
        "ttl_seconds": 300,
    }
    out.update(changes)
    return out


# --- widening ---------------------------------------------------------------------------


async def check_each_credential_has_one_audience_one_tier_and_only_that_tiers_actions(
    live: Live,
) -> None:
    agent = await live.agent()
    r = await agent.start(
        scopes=[
            READ,
            WRITE,
            {"tool": "issues", "tier": "admin"},
            {"tool": "deploy", "tier": "admin"},
        ]
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert {(d["tool"], d["tier"], d["code"]) for d in task["denied"]} == {
        ("issues", "admin", "beyond_ceiling"),
        ("deploy", "admin", "beyond_ceiling"),
    }
    tiers = {"read": {"list", "get"}, "write": {"comment"}}
    for cred in task["credentials"]:
        c = claims_of(cred["access_token"])
        assert c["aud"] == "https://gw.example/issues"
        (detail,) = c["authorization_details"]
        assert c["scope"] == f"issues:{detail['tier']}"
        assert set(detail["actions"]) == tiers[detail["tier"]]
        assert c["exp"] - c["iat"] <= live.services.settings.credentials.max_ttl_seconds


async def check_actions_of_another_tier_cannot_be_smuggled_into_a_scope(live: Live) -> None:
    agent = await live.agent()
    for actions in (["comment"], ["list", "wipe"], ["list", "comment"]):
        r = await agent.call("POST", "/v1/tasks", json=body(scopes=[{**READ, "actions": actions}]))
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "no_scope_granted"


async def check_tool_and_tier_names_are_exact(live: Live) -> None:
    agent = await live.agent()
    for scope in (
        {"tool": "Issues", "tier": "read"},
        {"tool": "issues ", "tier": "read"},
        {"tool": "issues\u200b", "tier": "read"},
        {"tool": "ISSUES", "tier": "read"},
    ):
        r = await agent.call("POST", "/v1/tasks", json=body(scopes=[scope]))
        assert r.status_code == 403, (scope, r.text)
    for tier in ("READ", "Read", "read ", "*", "admin,read"):
        r = await agent.call(
            "POST", "/v1/tasks", json=body(scopes=[{"tool": "issues", "tier": tier}])
        )
        assert_clean_refusal(r, 400)


async def check_refresh_cannot_widen_tier_or_tool(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    for req in (WRITE, {"tool": "issues", "tier": "admin"}, {"tool": "deploy", "tier": "admin"}):
        r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=req)
        assert r.status_code == 403, (req, r.text)
    r = await agent.call(
        "POST", f"/v1/tasks/{task['id']}/credentials", json={**READ, "actions": ["wipe"]}
    )
    assert_clean_refusal(r, 400)
    assert r.json()["code"] == "unknown_field"


async def check_ttl_cannot_exceed_the_cap_nor_outlive_the_task(live: Live) -> None:
    agent = await live.agent()
    cap = live.services.settings.credentials.task_max_ttl_seconds
    for ttl in (cap + 1, 2**63, 10**30):
        r = await agent.call("POST", "/v1/tasks", json=body(ttl_seconds=ttl))
        assert_clean_refusal(r, 400)
    for ttl in (-1, 0, 9, 10.5, None, [60]):
        r = await agent.call("POST", "/v1/tasks", json=body(ttl_seconds=ttl))
        assert_clean_refusal(r, 400)
    task = (await agent.call("POST", "/v1/tasks", json=body(ttl_seconds=20))).json()
    live.clock.advance(15)
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 201
    assert (
        claims_of(r.json()["access_token"])["exp"]
        <= claims_of(task["credentials"][0]["access_token"])["exp"]
    )
    live.clock.advance(6)
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 409


# --- another agent's task ------------------------------------------------------------------


async def check_another_registered_agent_cannot_touch_my_task(live: Live) -> None:
    await register_other_agent(live)
    mine = await live.agent()
    task = (await mine.call("POST", "/v1/tasks", json=body())).json()
    # The other agent, even holding my DPoP key (the strongest case), is still not me.
    other = Agent(live, await live.identity(OTHER), key=mine.key)
    for method, suffix, kw in (
        ("GET", "", {}),
        ("POST", "/credentials", {"json": READ}),
        ("POST", "/complete", {}),
        ("POST", "/cancel", {}),
    ):
        r = await other.call(method, f"/v1/tasks/{task['id']}{suffix}", **kw)
        assert r.status_code == 404, (suffix, r.text)
        assert r.json()["code"] == "not_found"
    # Unknown task ids answer exactly the same.
    r = await other.call("GET", "/v1/tasks/tsk_doesnotexist")
    assert r.status_code == 404
    stored = await live.services.storage.get_task(task["id"])
    assert stored is not None
    assert stored.state.value == "active"


async def check_stolen_credential_does_not_authenticate_anything(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    token = task["credentials"][0]["access_token"]
    thief = Agent(live, token)  # a credential presented as if it were an identity token
    r = await thief.call("GET", f"/v1/tasks/{task['id']}")
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_identity_token"
    r = await thief.call("POST", "/v1/tasks", json=body())
    assert r.status_code == 401
    for scheme in ("Bearer", "DPoP"):
        r = await live.http.get(
            f"/v1/tasks/{task['id']}", headers={"Authorization": f"{scheme} {token}"}
        )
        assert_clean_refusal(r)
        r = await live.http.get("/v1/admin/agents", headers={"Authorization": f"{scheme} {token}"})
        assert_clean_refusal(r, 401)


# --- DPoP binding --------------------------------------------------------------------------


async def check_credentials_are_bound_to_the_proven_key_only(live: Live) -> None:
    agent = await live.agent()
    victim_key = generate_key("EdDSA")
    # The attacker signs with its own key; the task must be bound to the signing key, and
    # nothing in the request (a jwk header of another key) may redirect the binding.
    r = await agent.call("POST", "/v1/tasks", json=body())
    task = r.json()
    jkt = jwk_thumbprint(public_jwk(agent.key))
    assert jkt != jwk_thumbprint(public_jwk(victim_key))
    for cred in task["credentials"]:
        assert claims_of(cred["access_token"])["cnf"] == {"jkt": jkt}


async def test_one_proof_starts_at_most_one_task_even_concurrently(live: Live) -> None:
    agent = await live.agent()
    proof = agent.proof("POST", "/v1/tasks")
    results = await asyncio.gather(
        *(agent.call("POST", "/v1/tasks", proof=proof, json=body()) for _ in range(8))
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [401] * 7, codes
    tasks = await live.services.storage.list_tasks(TaskFilter())
    assert len(tasks) == 1


async def check_proof_for_one_request_is_not_accepted_for_another(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    path = f"/v1/tasks/{task['id']}"
    wrong = [
        agent.proof("GET", path),  # another method
        agent.proof("POST", f"{path}/complete"),  # another path
        agent.proof("POST", f"/v1/tasks/{task['id']}x/credentials"),
        agent.proof("post", f"{path}/credentials"),  # method case
    ]
    for proof in wrong:
        r = await agent.call("POST", f"{path}/credentials", proof=proof, json=READ)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "invalid_dpop_proof"
    good = agent.proof("POST", f"{path}/credentials")
    assert (
        await agent.call("POST", f"{path}/credentials", proof=good, json=READ)
    ).status_code == 201
    again = await agent.call("POST", f"{path}/credentials", proof=good, json=READ)
    assert again.status_code == 401


async def check_proof_refused_for_bad_body_is_still_spent(live: Live) -> None:
    """A proof is consumed when checked: a request that failed later cannot be retried
    with the same proof by someone who captured it."""
    agent = await live.agent()
    proof = agent.proof("POST", "/v1/tasks")
    r = await agent.call("POST", "/v1/tasks", proof=proof, json={"bad": 1})
    assert r.status_code == 400
    r = await agent.call("POST", "/v1/tasks", proof=proof, json=body())
    assert r.status_code == 401


async def check_other_key_cannot_reuse_a_seen_jti_but_is_isolated(live: Live) -> None:
    """The replay key is (jkt, jti): one agent cannot burn another's jti."""
    a = await live.agent()
    b = Agent(live, a.identity, key=generate_key("EdDSA"))

    def proof(agent: Agent) -> str:
        return make_dpop_proof(
            agent.key,
            method="POST",
            url=live.base + "/v1/tasks",
            now=live.clock.now(),
            jti="shared-jti",
        )

    assert (await b.call("POST", "/v1/tasks", proof=proof(b), json=body())).status_code == 201
    assert (await a.call("POST", "/v1/tasks", proof=proof(a), json=body())).status_code == 201


# --- outliving revocation -----------------------------------------------------------------


async def test_suspension_revokes_for_good(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    token = task["credentials"][0]["access_token"]
    assert (await introspect(live, token))["active"] is True
    assert (await put_agent(live, state="suspended")).status_code == 200
    assert (await introspect(live, token))["active"] is False
    assert (await put_agent(live, state="active")).status_code == 200
    # DESIGN §3.7: suspension or quarantine revokes every credential of the affected tasks.
    assert (await introspect(live, token))["active"] is False
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 409, r.text


async def check_suspended_agent_cannot_refresh(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    assert (await put_agent(live, state="quarantined")).status_code == 200
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 403
    assert r.json()["code"] == "agent_not_active"


async def test_disabling_the_owner_kills_its_tasks(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    token = task["credentials"][0]["access_token"]
    r = await live.http.put(
        "/v1/admin/owners/alice",
        json={"id": "alice", "contact": "alice@example.com", "disabled": True},
        headers=live.admin,
    )
    assert r.status_code == 200, r.text
    assert (await introspect(live, token))["active"] is False
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert 400 <= r.status_code < 500, r.text


async def test_refresh_respects_a_narrowed_ceiling(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body(scopes=[READ, WRITE]))).json()
    assert (await put_agent(live, ceiling=[READ])).status_code == 200
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=WRITE)
    assert r.status_code == 403, r.text


async def test_refresh_never_puts_an_action_of_another_tier_in_a_credential(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body(scopes=[WRITE]))).json()
    tool = (await live.http.get("/v1/admin/tools/issues", headers=live.admin)).json()
    spec = {k: tool[k] for k in ("id", "audience", "upstream_url", "kind", "upstream_auth_header")}
    actions = [dict(a) for a in tool["actions"]]
    for a in actions:
        if a["name"] == "comment":
            a["tier"] = "admin"  # commenting is now an admin operation
        if a["name"] == "list":
            a["tier"] = "write"  # and write keeps at least one action
    spec["actions"] = actions
    r = await live.http.put("/v1/admin/tools/issues", json=spec, headers=live.admin)
    assert r.status_code == 200, r.text
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=WRITE)
    if r.status_code == 201:
        (detail,) = claims_of(r.json()["access_token"])["authorization_details"]
        assert detail["tier"] == "write"
        assert "comment" not in detail["actions"], detail


async def check_revoked_credential_and_ended_task_stay_dead(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body(scopes=[READ, WRITE]))).json()
    t0, t1 = (c["access_token"] for c in task["credentials"])
    assert (await live.http.post("/oauth/revoke", data={"token": t0})).status_code == 200
    assert (await introspect(live, t0)) == {"active": False}
    assert (await introspect(live, t1))["active"] is True
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/cancel")
    assert r.status_code == 200
    assert (await introspect(live, t1)) == {"active": False}
    # Nothing brings it back: re-ending, admin revoke, refresh.
    r = await live.http.post(f"/v1/admin/tasks/{task['id']}/revoke", headers=live.admin)
    assert r.json()["changed"] is False
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 409
    assert (await introspect(live, t1)) == {"active": False}


async def check_expired_credential_is_inactive_even_while_its_task_lives(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body(ttl_seconds=3000))).json()
    token = task["credentials"][0]["access_token"]
    cap = live.services.settings.credentials.max_ttl_seconds
    live.clock.advance(cap)
    assert (await introspect(live, token)) == {"active": False}
    r = await live.http.get(f"/v1/tasks/{task['id']}", headers=live.admin)
    assert r.json()["state"] == "active"


async def check_identity_token_expiry_ends_agent_access(live: Live) -> None:
    agent = Agent(live, await live.identity(AGENT, ttl=10))
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    leeway = live.services.settings.credentials.clock_leeway_seconds
    live.clock.advance(10 + leeway + 1)
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/credentials", json=READ)
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_identity_token"


# --- the checks above, grouped so that each server start is used for several -------------


async def test_a_task_never_grants_wider_than_asked_and_allowed(live: Live) -> None:
    await check_each_credential_has_one_audience_one_tier_and_only_that_tiers_actions(live)
    await check_actions_of_another_tier_cannot_be_smuggled_into_a_scope(live)
    await check_tool_and_tier_names_are_exact(live)
    await check_refresh_cannot_widen_tier_or_tool(live)
    await check_ttl_cannot_exceed_the_cap_nor_outlive_the_task(live)  # moves the clock


async def test_other_agents_and_stolen_tokens_get_nothing(live: Live) -> None:
    await check_another_registered_agent_cannot_touch_my_task(live)
    await check_stolen_credential_does_not_authenticate_anything(live)


async def test_dpop_binding_and_one_time_proofs(live: Live) -> None:
    await check_credentials_are_bound_to_the_proven_key_only(live)
    await check_proof_for_one_request_is_not_accepted_for_another(live)
    await check_proof_refused_for_bad_body_is_still_spent(live)
    await check_other_key_cannot_reuse_a_seen_jti_but_is_isolated(live)


async def test_ended_revoked_and_suspended_stay_dead(live: Live) -> None:
    await check_revoked_credential_and_ended_task_stay_dead(live)
    await check_suspended_agent_cannot_refresh(live)  # leaves the agent quarantined


async def test_expiry_of_credentials_and_identities(live: Live) -> None:
    await check_identity_token_expiry_ends_agent_access(live)
    await check_expired_credential_is_inactive_even_while_its_task_lives(live)


async def test_credential_cannot_move_to_another_tool_by_audience_reuse(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=body())).json()
    token = task["credentials"][0]["access_token"]
    old_aud = claims_of(token)["aud"]
    tools = {
        t["id"]: t
        for t in (await live.http.get("/v1/admin/tools", headers=live.admin)).json()["tools"]
    }

    def spec(tool: dict[str, Any], audience: str) -> dict[str, Any]:
        keep = ("id", "upstream_url", "kind", "upstream_auth_header", "actions", "description")
        return {**{k: tool[k] for k in keep}, "audience": audience}

    # Defence 1: an audience never moves, so it can never be handed to another tool.
    r = await live.http.put(
        "/v1/admin/tools/issues", json=spec(tools["issues"], old_aud + "-v2"), headers=live.admin
    )
    assert_clean_refusal(r, 400)
    r = await live.http.put(
        "/v1/admin/tools/deploy", json=spec(tools["deploy"], old_aud), headers=live.admin
    )
    assert_clean_refusal(r, 400)
    assert (await introspect(live, token))["active"] is True
    # Defence 2: even if the registry were changed underneath (here, directly in storage),
    # introspection requires the token's audience to be its own tool's current audience.
    issues = await live.services.storage.get_tool("issues")
    deploy = await live.services.storage.get_tool("deploy")
    assert issues is not None
    assert deploy is not None
    await live.services.storage.update_tool(replace(issues, audience=old_aud + "-v2"), None)
    await live.services.storage.update_tool(replace(deploy, audience=old_aud), None)
    info = await introspect(live, token)
    assert info["active"] is False, info

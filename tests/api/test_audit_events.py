"""Every security-relevant change is an audit record, durable before the answer (issue 8):
tasks started and ended, credentials issued and revoked, refused starts and refreshes,
registry, key and admin-token changes, policy reloads. No record carries a secret, and
when the audit store refuses the record the request fails.

Run against a live server on SQLite and on PostgreSQL. The failing audit store is the real
database refusing inserts into ``audit_events`` (a trigger), not a mock.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.model import AgentState, AuditEvent, TaskFilter
from taskbound.errors import StorageError
from taskbound.service.admin import create_admin_token
from taskbound.service.policy import default_policy_dir
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema, refuse_audit_inserts

from .conftest import AGENT, REGISTRY, Live, make_settings, start_live

SECRET = "upstream-secret-never-returned"  # the REGISTRY's tool secret


@dataclass
class World:
    live: Live
    backend: str
    url: str
    policy_dir: Path

    @property
    def storage(self) -> Any:
        return self.live.services.storage

    async def records(self, event: str | None = None) -> list[AuditEvent]:
        found = [e for _, e in await self.storage.list_audit(limit=1000)]
        return [e for e in found if event is None or e.event == event]

    async def admin_cause(self) -> str:
        (token,) = await self.storage.list_admin_tokens()
        return f"admin:{token.id}"

    def refuse_audit_inserts(self) -> None:
        """From now on the database refuses every insert into ``audit_events``."""
        refuse_audit_inserts(self.url)


@pytest.fixture(params=["sqlite", "postgres"])
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[World]:
    """A live server with the registry applied and its own (writable) policy directory."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), policy_dir)
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(postgres_schema(postgres_url()))
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
        settings = make_settings(
            tmp_path, storage={"url": url}, policy={"dir": str(policy_dir), "watch": False}
        )
        async for live in start_live(settings, clock):
            yield World(live, request.param, url, policy_dir)


def assert_storage_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "storage_unavailable"


def no_secret_in(events: list[AuditEvent], *secrets: str) -> None:
    for event in events:
        for secret in secrets:
            assert secret not in repr(event), event


# --- tasks and credentials -------------------------------------------------------------


async def test_a_task_start_records_the_task_and_each_credential(world: World) -> None:
    agent = await world.live.agent()
    r = await agent.start()
    assert r.status_code == 201, r.text
    task = r.json()
    (started,) = await world.records("task.started")
    assert started.decision == "info"
    assert (started.agent, started.owner, started.task, started.txn) == (
        AGENT,
        "alice",
        task["id"],
        task["id"],
    )
    assert started.intent == "triage acme/web"
    assert started.policies[0] == "registry-ceiling"
    assert started.policies[1] == world.live.services.policy.state.compiled.version
    assert "granted issues:read (list, get), issues:write (comment)" in (started.detail or "")
    assert "denied none" in (started.detail or "")
    issued = await world.records("credential.issued")
    by_jti = {e.jti: e for e in issued}
    assert set(by_jti) == {c["jti"] for c in task["credentials"]}
    for cred in task["credentials"]:
        e = by_jti[cred["jti"]]
        assert (e.decision, e.agent, e.owner, e.task, e.txn) == (
            "info",
            AGENT,
            "alice",
            task["id"],
            task["id"],
        )
        assert (e.tool, e.tier) == (cred["tool"], cred["tier"])
        assert e.exception_id is None
        assert e.policies == started.policies
    no_secret_in(await world.records(), *(c["access_token"] for c in task["credentials"]), SECRET)


async def test_a_refresh_records_the_new_credential(world: World) -> None:
    agent = await world.live.agent()
    task = (await agent.start()).json()
    r = await agent.call(
        "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": "issues", "tier": "read"}
    )
    assert r.status_code == 201, r.text
    fresh = r.json()
    (e,) = [e for e in await world.records("credential.issued") if e.jti == fresh["jti"]]
    assert (e.task, e.tool, e.tier, e.agent, e.owner) == (
        task["id"],
        "issues",
        "read",
        AGENT,
        "alice",
    )
    assert e.policies
    assert e.policies[0] == "registry-ceiling"
    no_secret_in(await world.records(), fresh["access_token"])


async def test_refused_starts_and_refreshes_are_recorded(world: World) -> None:
    agent = await world.live.agent()
    r = await agent.start(scopes=[{"tool": "deploy", "tier": "admin"}])
    assert r.status_code == 403, r.text
    (refused,) = await world.records("task.refused")
    assert (refused.decision, refused.code) == ("deny", r.json()["code"])
    assert (refused.agent, refused.owner, refused.task) == (AGENT, "alice", None)
    assert "scopes requested: deploy:admin" in (refused.detail or "")

    task = (await agent.start()).json()
    r = await agent.call(
        "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": "issues", "tier": "admin"}
    )
    assert r.status_code == 403, r.text
    r = await agent.call(
        "POST", "/v1/tasks/tsk_nobody/credentials", json={"tool": "issues", "tier": "read"}
    )
    assert r.status_code == 404, r.text
    ungranted, unknown = await world.records("credential.refused")
    assert (ungranted.decision, ungranted.code, ungranted.task, ungranted.owner) == (
        "deny",
        "forbidden",
        task["id"],
        "alice",
    )
    assert (ungranted.tool, ungranted.tier) == ("issues", "admin")
    # Another agent's (or no) task is never named: the record says what was asked.
    assert (unknown.code, unknown.task, unknown.agent) == ("not_found", None, AGENT)
    assert "tsk_nobody" in (unknown.detail or "")


async def test_ending_a_task_is_recorded_once(world: World) -> None:
    agent = await world.live.agent()
    completed = (await agent.start()).json()
    cancelled = (await agent.start()).json()
    revoked = (await agent.start()).json()
    r = await agent.call("POST", f"/v1/tasks/{completed['id']}/complete")
    assert r.status_code == 200, r.text
    r = await agent.call("POST", f"/v1/tasks/{completed['id']}/complete")  # no change
    assert r.json()["changed"] is False
    r = await agent.call(
        "POST", f"/v1/tasks/{cancelled['id']}/cancel", json={"reason": "not needed"}
    )
    assert r.status_code == 200, r.text
    r = await world.live.http.post(
        f"/v1/admin/tasks/{revoked['id']}/revoke",
        json={"reason": "looks wrong"},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text
    ended = {e.task: e for e in await world.records("task.ended")}
    assert len(await world.records("task.ended")) == 3
    admin = await world.admin_cause()
    for task, start, detail in (
        (completed, "completed: ended by the agent", "(by agent)"),
        (cancelled, "cancelled: not needed", "(by agent)"),
        (revoked, "revoked: looks wrong", f"(by {admin})"),
    ):
        e = ended[task["id"]]
        assert (e.decision, e.agent, e.owner, e.txn) == ("info", AGENT, "alice", task["id"])
        assert (e.detail or "").startswith(start)
        assert (e.detail or "").endswith(detail)


async def test_expiry_by_the_sweep_is_recorded(world: World, clock: FakeClock) -> None:
    agent = await world.live.agent()
    task = (await agent.start(ttl_seconds=60)).json()
    clock.advance(61)
    assert await world.live.services.broker.sweep() == [task["id"]]
    assert await world.live.services.broker.sweep() == []
    (e,) = await world.records("task.ended")
    assert (e.task, e.agent, e.owner, e.decision) == (task["id"], AGENT, "alice", "info")
    assert (e.detail or "").startswith("expired")


async def test_revoking_a_credential_is_recorded(world: World) -> None:
    agent = await world.live.agent()
    task = (await agent.start()).json()
    by_admin, by_holder = task["credentials"]
    r = await world.live.http.post(
        f"/v1/admin/credentials/{by_admin['jti']}/revoke", headers=world.live.admin
    )
    assert r.json()["changed"] is True
    r = await world.live.http.post(
        f"/v1/admin/credentials/{by_admin['jti']}/revoke", headers=world.live.admin
    )
    assert r.json()["changed"] is False  # nothing more to record
    r = await world.live.http.post("/oauth/revoke", data={"token": by_holder["access_token"]})
    assert r.status_code == 200, r.text
    first, second = await world.records("credential.revoked")
    admin = await world.admin_cause()
    for e, cred, cause in ((first, by_admin, admin), (second, by_holder, "token holder")):
        assert (e.jti, e.task, e.agent, e.owner, e.tool, e.tier) == (
            cred["jti"],
            task["id"],
            AGENT,
            "alice",
            cred["tool"],
            cred["tier"],
        )
        assert (e.detail or "").endswith(f"(by {cause})")
    no_secret_in(await world.records(), by_holder["access_token"])


# --- the registry, keys, tokens and policy --------------------------------------------


async def test_the_registry_apply_is_recorded_without_secrets(world: World) -> None:
    owners = {e.owner: e for e in await world.records("admin.owner.created")}
    assert set(owners) == {"alice", "bob"}
    assert "roles approver; enabled" in (owners["alice"].detail or "")
    tools = {e.tool: e for e in await world.records("admin.tool.created")}
    assert set(tools) == {"issues", "deploy"}
    assert "upstream secret set" in (tools["issues"].detail or "")
    assert "upstream https://issues.example;" in (tools["issues"].detail or "")
    assert "no upstream secret" in (tools["deploy"].detail or "")
    (agent,) = await world.records("admin.agent.created")
    assert (agent.agent, agent.owner) == (AGENT, "alice")
    assert "ceiling issues:read, issues:write" in (agent.detail or "")
    (applied,) = await world.records("admin.registry.applied")
    assert "created owner/alice, owner/bob, tool/issues, tool/deploy, agent/" in (
        applied.detail or ""
    )
    assert applied.decision == "info"
    for e in [*owners.values(), *tools.values(), agent]:
        assert e.decision == "info"
        assert "registry apply" in (e.detail or "")
    no_secret_in(await world.records(), SECRET, world.live.admin_token)


async def test_admin_changes_are_recorded_with_their_cause(world: World) -> None:
    live = world.live
    admin = await world.admin_cause()
    new_secret = "s3cret-rotated-upstream-value"
    client_secret = "client-secret-of-the-exchange"
    r = await live.http.post(
        "/v1/admin/owners", json={"id": "carol", "contact": "c@example.com"}, headers=live.admin
    )
    assert r.status_code == 201, r.text
    r = await live.http.put(
        "/v1/admin/owners/bob",
        json={"id": "bob", "contact": "bob@example.com", "disabled": True},
        headers=live.admin,
    )
    assert r.status_code == 200, r.text
    tool = dict(REGISTRY["tools"][0])
    tool.update(
        upstream_url="https://issues.example/api?api_key=not-for-the-log",
        upstream_secret=new_secret,
    )
    r = await live.http.put("/v1/admin/tools/issues", json=tool, headers=live.admin)
    assert r.status_code == 200, r.text
    exchanged = {
        "id": "wiki",
        "audience": "https://gw.example/wiki",
        "upstream_url": "https://wiki.example/api",
        "upstream_exchange": {
            "token_endpoint": "https://as.wiki.example/token",
            "audience": "wiki.example",
            "client_id": "taskbound",
            "client_secret": client_secret,
        },
        "actions": [{"name": "read", "tier": "read", "method": "GET", "path": "/pages"}],
    }
    r = await live.http.post("/v1/admin/tools", json=exchanged, headers=live.admin)
    assert r.status_code == 201, r.text
    r = await live.http.put(
        f"/v1/admin/agents/{AGENT}",
        json={
            "spiffe_id": AGENT,
            "owner": "alice",
            "ceiling": [{"tool": "issues", "tier": "read"}],
        },
        headers=live.admin,
    )
    assert r.status_code == 200, r.text

    (carol,) = [e for e in await world.records("admin.owner.created") if e.owner == "carol"]
    assert "owner carol created" in (carol.detail or "")
    (bob,) = await world.records("admin.owner.updated")
    assert bob.owner == "bob"
    assert "disabled: every live task on its behalf revoked" in (bob.detail or "")
    assert (bob.detail or "").endswith(f"(by {admin})")
    (issues,) = await world.records("admin.tool.updated")
    assert issues.tool == "issues"
    assert "upstream secret set" in (issues.detail or "")
    (wiki,) = [e for e in await world.records("admin.tool.created") if e.tool == "wiki"]
    assert "upstream exchange at https://as.wiki.example as client taskbound" in (wiki.detail or "")
    (agent,) = await world.records("admin.agent.updated")
    assert (agent.agent, agent.owner) == (AGENT, "alice")
    assert "ceiling issues:read" in (agent.detail or "")
    assert (agent.detail or "").endswith(f"(by {admin})")
    no_secret_in(
        await world.records(),
        SECRET,
        new_secret,
        client_secret,
        "not-for-the-log",
        live.admin_token,
    )


async def test_agent_state_changes_are_recorded(world: World) -> None:
    live = world.live
    admin = await world.admin_cause()
    agent = await live.agent()
    assert (await agent.start()).status_code == 201
    for verb, body in (("suspend", {"reason": "odd traffic"}), ("suspend", {}), ("resume", {})):
        r = await live.http.post(
            f"/v1/admin/agents/{AGENT}/{verb}", json=body or None, headers=live.admin
        )
        assert r.status_code == 200, r.text
    suspended, resumed = await world.records("admin.agent.state_changed")  # one per change
    assert (suspended.agent, suspended.owner, suspended.decision) == (AGENT, "alice", "info")
    assert suspended.detail == (
        f"active -> suspended: odd traffic; every live task of the agent revoked (by {admin})"
    )
    assert resumed.detail == f"suspended -> active (by {admin})"


async def test_key_rotation_and_withdrawal_are_recorded(world: World) -> None:
    live = world.live
    admin = await world.admin_cause()
    agent = await live.agent()
    assert (await agent.start()).status_code == 201
    r = await live.http.post("/v1/admin/keys/rotate", headers=live.admin)
    assert r.status_code == 201, r.text
    rotated_kid = r.json()["kid"]
    old = [
        k
        for k in (await live.http.get("/v1/admin/keys", headers=live.admin)).json()["keys"]
        if k["purpose"] == "credentials" and k["kid"] != rotated_kid
    ]
    r = await live.http.post(
        f"/v1/admin/keys/{old[0]['kid']}/withdraw", json={"reason": "leaked"}, headers=live.admin
    )
    assert r.status_code == 200, r.text
    revoked = r.json()["credentials_revoked"]
    assert revoked == 2
    (rotated,) = await world.records("admin.key.rotated")
    assert rotated.detail is not None
    assert rotated.detail.startswith(f"credentials key rotated: {rotated_kid}")
    (withdrawn,) = await world.records("admin.key.withdrawn")
    assert withdrawn.detail == (
        f"credentials key {old[0]['kid']} withdrawn: leaked; 2 credential(s) it signed "
        f"revoked, with every credential derived from them (by {admin})"
    )


async def test_admin_token_creation_is_recorded(world: World) -> None:
    (token,) = await world.storage.list_admin_tokens()
    (e,) = await world.records("admin.token.created")
    assert e.detail == f"admin token {token.id} created: tests (by system)"
    no_secret_in(await world.records(), world.live.admin_token, token.token_hash)


async def test_policy_reloads_are_recorded(world: World) -> None:
    live = world.live
    version = live.services.policy.state.compiled.version
    start_up, *by_registry = await world.records("policy.reloaded")
    assert start_up.decision == "info"
    assert (start_up.detail or "").endswith("first load (by start-up)")
    # The tools the registry apply created changed the schema, so the version in force.
    assert by_registry
    assert by_registry[-1].policy_version == version
    for e in by_registry:
        assert (e.detail or "").endswith("(by registry change)")
    r = await live.http.post("/v1/admin/policy/reload", headers=live.admin)
    assert r.status_code == 200, r.text
    again = (await world.records("policy.reloaded"))[-1]
    assert again.policy_version == version
    assert "unchanged (by admin API (admin:" in (again.detail or "")

    (world.policy_dir / "broken.cedar").write_text("permit (principal, action, resource")
    r = await live.http.post("/v1/admin/policy/reload", headers=live.admin)
    assert r.status_code == 422, r.text
    (refused,) = await world.records("policy.reload_refused")
    assert (refused.decision, refused.code, refused.policy_version) == (
        "error",
        "policy_invalid",
        version,
    )
    assert "broken.cedar" in (refused.detail or "")
    assert "(by admin API (admin:" in (refused.detail or "")


async def test_a_registry_change_policy_cannot_follow_is_recorded_once(world: World) -> None:
    live = world.live
    (world.policy_dir / "wipe.cedar").write_text(
        '@id("never-wipe")\nforbid (principal, action == Action::"issues:wipe", resource);\n'
    )
    r = await live.http.post("/v1/admin/policy/reload", headers=live.admin)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    tool = dict(REGISTRY["tools"][0])
    tool.pop("upstream_secret")
    tool["actions"] = [a for a in tool["actions"] if a["name"] != "wipe"]
    r = await live.http.put("/v1/admin/tools/issues", json=tool, headers=live.admin)
    assert r.status_code == 200, r.text
    await live.services.policy.refresh_registry()  # as every sweep does
    (refused,) = await world.records("policy.reload_refused")
    assert (refused.decision, refused.policy_version) == ("error", version)
    assert (refused.detail or "").endswith("(by registry change)")
    assert live.services.policy.state.compiled.version == version


# --- no answer without its record ----------------------------------------------------


async def test_an_admin_change_without_its_record_does_not_happen(world: World) -> None:
    live = world.live
    before = await world.records()
    keys = await world.storage.list_keys()
    tools = await world.storage.list_tools()
    world.refuse_audit_inserts()
    r = await live.http.post(
        "/v1/admin/owners", json={"id": "dave", "contact": "d@example.com"}, headers=live.admin
    )
    assert_storage_unavailable(r)
    assert await world.storage.get_owner("dave") is None
    r = await live.http.post("/v1/admin/keys/rotate", headers=live.admin)
    assert_storage_unavailable(r)
    assert await world.storage.list_keys() == keys
    tool = dict(REGISTRY["tools"][0])
    tool.pop("upstream_secret")
    tool["description"] = "changed without a record"
    r = await live.http.put("/v1/admin/tools/issues", json=tool, headers=live.admin)
    assert_storage_unavailable(r)
    assert await world.storage.list_tools() == tools
    with pytest.raises(StorageError):
        await create_admin_token(world.storage, live.services.clock, "unrecorded")
    assert len(await world.storage.list_admin_tokens()) == 1
    assert await world.records() == before


async def test_a_suspension_without_its_record_still_takes_effect(world: World) -> None:
    # Taking authority away is committed first and recorded right after: the caller
    # hears of the failed record, and the agent stays suspended (fail safe).
    live = world.live
    world.refuse_audit_inserts()
    r = await live.http.post(f"/v1/admin/agents/{AGENT}/suspend", headers=live.admin)
    assert_storage_unavailable(r)
    agent = await world.storage.get_agent(AGENT)
    assert agent is not None
    assert agent.state is AgentState.SUSPENDED


async def test_a_policy_reload_without_its_record_changes_nothing(world: World) -> None:
    live = world.live
    version = live.services.policy.state.compiled.version
    (world.policy_dir / "extra.cedar").write_text(
        '@id("extra-forbid")\nforbid (principal, action, resource) when { false };\n'
    )
    world.refuse_audit_inserts()
    r = await live.http.post("/v1/admin/policy/reload", headers=live.admin)
    assert_storage_unavailable(r)
    # The new set is swapped in only once its record is durable.
    assert live.services.policy.state.compiled.version == version


async def test_a_task_start_without_its_record_hands_out_nothing(world: World) -> None:
    agent = await world.live.agent()
    world.refuse_audit_inserts()
    r = await agent.start()
    assert_storage_unavailable(r)
    assert "access_token" not in r.text
    # The task, its credentials and their records are one transaction: none of it exists.
    assert await world.storage.list_tasks(TaskFilter(agent_id=AGENT)) == []


async def test_a_refresh_without_its_record_hands_out_nothing(world: World) -> None:
    agent = await world.live.agent()
    task = (await agent.start()).json()
    world.refuse_audit_inserts()
    r = await agent.call(
        "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": "issues", "tier": "read"}
    )
    assert_storage_unavailable(r)
    assert "access_token" not in r.text
    creds = await world.storage.list_credentials(task["id"])
    assert {c.jti for c in creds} == {x["jti"] for x in task["credentials"]}

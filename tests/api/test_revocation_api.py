"""Revocation through the admin API, end to end on SQLite and PostgreSQL: suspending,
quarantining, resuming and retiring agents, revoking one credential, withdrawing a signing
key, disabling an owner; each seen at the gateway (a real upstream behind it), in the
revocation log and in /metrics; and a gateway whose revocation feed is stale refusing
calls with 503 until it has caught up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

import taskbound.service.runtime as runtime
from taskbound.core.clock import FakeClock
from taskbound.core.model import Revocation
from taskbound.errors import StorageError
from taskbound.service.revocations import FeedSource, RevocationFeed, source_for
from tests.api.conftest import AGENT, Agent, Live, free_port, make_settings, start_live
from tests.gateway.conftest import Echo, call_headers, echo_app, registry, serve
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

LIST = "/issues/repos/acme/web/issues"
AGENT_PATH = f"/v1/admin/agents/{quote(AGENT, safe='')}"  # as the CLI sends it
WAIT_S = 10.0


@dataclass
class World:
    live: Live
    echo: Echo

    async def task(self, *scopes: tuple[str, str]) -> tuple[Agent, dict[str, Any]]:
        """A new task of AGENT; its credentials by "tool:tier"."""
        agent = await self.live.agent()
        r = await start(agent, *(scopes or (("issues", "read"),)))
        assert r.status_code == 201, r.text
        task = r.json()
        creds = {f"{c['tool']}:{c['tier']}": c["access_token"] for c in task["credentials"]}
        return agent, {"task": task, "creds": creds}

    async def call(self, agent: Agent, token: str, path: str = LIST) -> httpx.Response:
        return await self.live.http.get(path, headers=call_headers(agent, token, "GET", path))

    async def admin_post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.live.http.post(path, headers=self.live.admin, **kw)

    async def task_state(self, task_id: str) -> str:
        r = await self.live.http.get(f"/v1/tasks/{task_id}", headers=self.live.admin)
        assert r.status_code == 200, r.text
        return str(r.json()["state"])

    async def log(self, after: int = 0) -> list[dict[str, Any]]:
        r = await self.live.http.get(
            "/v1/admin/revocations", params={"after": after, "limit": 1000}, headers=self.live.admin
        )
        assert r.status_code == 200, r.text
        return list(r.json()["revocations"])

    async def cause(self) -> str:
        """The cause an admin change by this test's token is recorded with."""
        (token,) = await self.live.services.storage.list_admin_tokens()
        return f"admin:{token.id}"


async def start(agent: Agent, *scopes: tuple[str, str]) -> httpx.Response:
    return await agent.start(
        intent={
            "purpose": "revocation test",
            "constraints": {"org": "acme", "repo": "web", "tiers": ["read", "write"]},
        },
        scopes=[{"tool": t, "tier": tier} for t, tier in scopes],
    )


@contextlib.asynccontextmanager
async def open_world(
    backend: str, tmp_path: Path, clock: FakeClock, **sections: dict[str, Any]
) -> AsyncIterator[World]:
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    server, task = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))
    try:
        with contextlib.ExitStack() as stack:
            if backend == "postgres":
                url = stack.enter_context(postgres_schema(postgres_url()))
            else:
                url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
            settings = make_settings(tmp_path, storage={"url": url}, **sections)
            async for live in start_live(settings, clock, registry=False):
                doc = registry(echo.base, "http://127.0.0.1:9/mcp", live.base)
                doc["agents"][0]["ceiling"] = [
                    {"tool": "issues", "tier": "read"},
                    {"tool": "issues", "tier": "write"},
                ]
                doc["owners"].append({"id": "bob", "contact": "bob@example.com"})
                r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
                assert r.status_code == 200, r.text
                yield World(live, echo)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def world(backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async with open_world(backend, tmp_path, clock) as w:
        yield w


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.02)


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert (body["code"], body["status"]) == (code, status)
    assert body["type"].endswith("/" + code)


def kid_of(token: str) -> str:
    header = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


# --- agents --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "state"), [("suspend", "suspended"), ("quarantine", "quarantined")]
)
async def test_leaving_active_revokes_live_tasks_until_resumed(
    world: World, clock: FakeClock, verb: str, state: str
) -> None:
    agent, first = await world.task(("issues", "read"))
    other_agent, second = await world.task(("issues", "read"))
    read = first["creds"]["issues:read"]
    assert (await world.call(agent, read)).status_code == 200
    cause = await world.cause()
    before = await world.log()

    clock.advance(1)
    r = await world.admin_post(f"{AGENT_PATH}/{verb}", json={"reason": "incident 42"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["spiffe_id"], body["state"], body["changed"]) == (AGENT, state, True)

    # Every live task is revoked, and its credentials are refused at the gateway.
    for t in (first, second):
        assert await world.task_state(t["task"]["id"]) == "revoked"
    seen = len(world.echo.seen)
    r = await world.call(agent, read)
    assert_refused(r, 401, "invalid_token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert_refused(
        await world.call(other_agent, second["creds"]["issues:read"]), 401, "invalid_token"
    )
    assert len(world.echo.seen) == seen
    # It cannot start a task.
    assert_refused(
        await start(await world.live.agent(), ("issues", "read")), 403, "agent_not_active"
    )

    # The log says who and why: the agent entry and each task's.
    new = [e for e in await world.log() if e not in before]
    (agent_entry,) = [e for e in new if e["kind"] == "agent"]
    assert (agent_entry["subject"], agent_entry["state"]) == (AGENT, state)
    assert (agent_entry["cause"], agent_entry["reason"]) == (cause, "incident 42")
    tasks = {e["subject"]: e for e in new if e["kind"] == "task"}
    assert set(tasks) == {first["task"]["id"], second["task"]["id"]}
    assert all((e["cause"], e["reason"]) == (cause, "incident 42") for e in tasks.values())
    assert all(e["agent"] == AGENT for e in tasks.values())

    # Again: nothing changes and nothing is logged.
    r = await world.admin_post(f"{AGENT_PATH}/{verb}")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["changed"]) == (state, False)
    logged = await world.log()
    assert len(logged) == len(before) + len(new)

    # Resumed: new tasks work, the old ones stay revoked.
    clock.advance(1)
    r = await world.admin_post(f"{AGENT_PATH}/resume", json={"reason": "all clear"})
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["changed"]) == ("active", True)
    resumed = [e for e in await world.log() if e not in logged]
    assert [(e["kind"], e["state"], e["cause"], e["reason"]) for e in resumed] == [
        ("agent", "active", cause, "all clear")
    ]
    fresh_agent, fresh = await world.task(("issues", "read"))
    assert (await world.call(fresh_agent, fresh["creds"]["issues:read"])).status_code == 200
    assert_refused(await world.call(agent, read), 401, "invalid_token")
    assert await world.task_state(first["task"]["id"]) == "revoked"
    r = await world.admin_post(f"{AGENT_PATH}/resume")
    assert (r.status_code, r.json()["changed"]) == (200, False)


async def test_the_verb_path_takes_the_spiffe_id_quoted_or_not(world: World) -> None:
    # Quoted (one path segment, %2F for its slashes), as the CLI sends it: the server
    # decodes it before routing. And plain, slashes and all.
    r = await world.admin_post(f"{AGENT_PATH}/suspend")
    assert (r.status_code, r.json()["spiffe_id"], r.json()["changed"]) == (200, AGENT, True)
    r = await world.admin_post(f"/v1/admin/agents/{AGENT}/suspend")
    assert (r.status_code, r.json()["spiffe_id"], r.json()["changed"]) == (200, AGENT, False)
    # The agent's own GET and PUT routes still answer beside the verbs.
    r = await world.live.http.get(AGENT_PATH, headers=world.live.admin)
    assert (r.status_code, r.json()["state"]) == (200, "suspended")


async def test_a_reason_is_optional(world: World) -> None:
    _, t = await world.task()
    r = await world.admin_post(f"{AGENT_PATH}/suspend")
    assert r.status_code == 200, r.text
    entries = await world.log()
    (entry,) = [e for e in entries if e["kind"] == "agent"]
    assert entry["reason"] == "agent suspended"
    (task,) = [e for e in entries if e["kind"] == "task"]
    assert task["subject"] == t["task"]["id"]
    assert task["reason"]


async def test_retire_is_final(world: World, clock: FakeClock) -> None:
    agent, t = await world.task()
    clock.advance(1)
    r = await world.admin_post(f"{AGENT_PATH}/retire", json={"reason": "decommissioned"})
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["changed"]) == ("retired", True)
    assert await world.task_state(t["task"]["id"]) == "revoked"
    assert_refused(await world.call(agent, t["creds"]["issues:read"]), 401, "invalid_token")
    logged = await world.log()
    for verb in ("resume", "suspend", "quarantine"):
        r = await world.admin_post(f"{AGENT_PATH}/{verb}")
        assert r.status_code == 409, (verb, r.text)
        assert r.json()["code"] == "conflict"
    r = await world.admin_post(f"{AGENT_PATH}/retire")
    assert (r.status_code, r.json()["changed"]) == (200, False)
    assert await world.log() == logged
    assert_refused(
        await start(await world.live.agent(), ("issues", "read")), 403, "agent_not_active"
    )
    r = await world.live.http.get(AGENT_PATH, headers=world.live.admin)
    assert r.json()["state"] == "retired"


async def test_unknown_agents_and_verbs_are_not_found(world: World) -> None:
    ghost = quote("spiffe://taskbound.local/agents/ghost", safe="")
    r = await world.admin_post(f"/v1/admin/agents/{ghost}/suspend")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    for verb in ("explode", "activate", "delete", "SUSPEND"):
        r = await world.admin_post(f"{AGENT_PATH}/{verb}")
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), verb
    r = await world.live.http.get(AGENT_PATH, headers=world.live.admin)
    assert r.json()["state"] == "active"
    assert await world.log() == []


async def test_revocation_routes_need_an_admin(world: World) -> None:
    agent, t = await world.task()
    jti = t["task"]["credentials"][0]["jti"]
    kid = kid_of(t["creds"]["issues:read"])
    identity = {"Authorization": f"Bearer {agent.identity}"}
    for headers in ({}, {"Authorization": "Bearer tbat_forged"}, identity):
        for method, path in (
            ("POST", f"{AGENT_PATH}/suspend"),
            ("POST", f"/v1/admin/credentials/{jti}/revoke"),
            ("POST", f"/v1/admin/keys/{kid}/withdraw"),
            ("GET", "/v1/admin/revocations"),
        ):
            r = await world.live.http.request(method, path, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["code"] == "invalid_admin_token"
    assert await world.log() == []
    assert (await world.call(agent, t["creds"]["issues:read"])).status_code == 200


# --- one credential ------------------------------------------------------------------------


async def test_revoking_one_credential(world: World, clock: FakeClock) -> None:
    agent, t = await world.task(("issues", "read"), ("issues", "write"))
    read, write = t["creds"]["issues:read"], t["creds"]["issues:write"]
    (jti,) = [c["jti"] for c in t["task"]["credentials"] if c["tier"] == "read"]
    assert (await world.call(agent, read)).status_code == 200
    clock.advance(1)

    r = await world.admin_post(f"/v1/admin/credentials/{jti}/revoke", json={"reason": "leaked"})
    assert r.status_code == 200, r.text
    assert r.json() == {"jti": jti, "changed": True}
    assert_refused(await world.call(agent, read), 401, "invalid_token")
    # The task and its other credential live on.
    assert await world.task_state(t["task"]["id"]) == "active"
    path = LIST
    r = await world.live.http.post(
        path, json={"title": "x"}, headers=call_headers(agent, write, "POST", path)
    )
    assert r.status_code == 200, r.text

    (entry,) = await world.log()
    assert (entry["kind"], entry["subject"], entry["task"], entry["agent"]) == (
        "credential",
        jti,
        t["task"]["id"],
        AGENT,
    )
    assert (entry["cause"], entry["reason"]) == (await world.cause(), "leaked")
    assert entry["expires_at"] is not None

    r = await world.admin_post(f"/v1/admin/credentials/{jti}/revoke")
    assert (r.status_code, r.json()) == (200, {"jti": jti, "changed": False})
    r = await world.admin_post("/v1/admin/credentials/cred_nope/revoke")
    assert (r.status_code, r.json()) == (200, {"jti": "cred_nope", "changed": False})
    assert len(await world.log()) == 1


# --- a signing key -------------------------------------------------------------------------


async def test_withdrawing_the_active_key(world: World, clock: FakeClock) -> None:
    agent, t = await world.task(("issues", "read"), ("issues", "write"))
    read = t["creds"]["issues:read"]
    old = kid_of(read)
    assert (await world.call(agent, read)).status_code == 200
    jwks = (await world.live.http.get("/.well-known/jwks.json")).json()
    assert old in {k["kid"] for k in jwks["keys"]}
    clock.advance(1)

    r = await world.admin_post(f"/v1/admin/keys/{old}/withdraw", json={"reason": "key leaked"})
    assert r.status_code == 200, r.text
    assert r.json() == {"kid": old, "credentials_revoked": 2}

    # What it signed is refused; it is no longer published; a new key replaces it.
    assert_refused(await world.call(agent, read), 401, "invalid_token")
    jwks = (await world.live.http.get("/.well-known/jwks.json")).json()
    kids = {k["kid"] for k in jwks["keys"]}
    assert old not in kids
    (new,) = kids
    keys = (await world.live.http.get("/v1/admin/keys", headers=world.live.admin)).json()["keys"]
    assert [(k["kid"], k["state"]) for k in keys if k["purpose"] == "credentials"] == [
        (new, "active")
    ]
    fresh_agent, fresh = await world.task(("issues", "read"))
    token = fresh["creds"]["issues:read"]
    assert kid_of(token) == new
    assert (await world.call(fresh_agent, token)).status_code == 200

    entries = await world.log()
    (key_entry,) = [e for e in entries if e["kind"] == "key"]
    assert (key_entry["subject"], key_entry["cause"], key_entry["reason"]) == (
        old,
        await world.cause(),
        "key leaked",
    )
    assert {e["subject"] for e in entries if e["kind"] == "credential"} == {
        c["jti"] for c in t["task"]["credentials"]
    }

    r = await world.admin_post(f"/v1/admin/keys/{old}/withdraw")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await world.admin_post("/v1/admin/keys/no-such-kid/withdraw")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert len(await world.log()) == len(entries)


async def test_withdrawing_a_retiring_key(world: World, clock: FakeClock) -> None:
    agent, t = await world.task()
    read = t["creds"]["issues:read"]
    old = kid_of(read)
    r = await world.admin_post("/v1/admin/keys/rotate")
    assert r.status_code == 201, r.text
    active = r.json()["kid"]
    jwks = (await world.live.http.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {old, active}
    assert (await world.call(agent, read)).status_code == 200  # still trusted while retiring
    clock.advance(1)

    r = await world.admin_post(f"/v1/admin/keys/{old}/withdraw")
    assert r.status_code == 200, r.text
    assert r.json() == {"kid": old, "credentials_revoked": 1}
    assert_refused(await world.call(agent, read), 401, "invalid_token")
    jwks = (await world.live.http.get("/.well-known/jwks.json")).json()
    assert [k["kid"] for k in jwks["keys"]] == [active]  # the active key is not replaced
    fresh_agent, fresh = await world.task()
    assert kid_of(fresh["creds"]["issues:read"]) == active
    assert (await world.call(fresh_agent, fresh["creds"]["issues:read"])).status_code == 200
    (key_entry,) = [e for e in await world.log() if e["kind"] == "key"]
    assert (key_entry["subject"], key_entry["reason"]) == (old, "signing key withdrawn")


async def test_withdrawing_the_dev_identity_key(world: World) -> None:
    keys = (await world.live.http.get("/v1/admin/keys", headers=world.live.admin)).json()["keys"]
    (old,) = [k["kid"] for k in keys if k["purpose"] == "dev_identity"]
    stale_agent = await world.live.agent()
    assert kid_of(stale_agent.identity) == old

    r = await world.admin_post(f"/v1/admin/keys/{old}/withdraw")
    assert r.status_code == 200, r.text
    # Identities it signed no longer start tasks; new ones (from the new key) do.
    r = await start(stale_agent, ("issues", "read"))
    assert r.status_code == 401, r.text
    fresh = await world.live.agent()
    assert kid_of(fresh.identity) != old
    assert (await start(fresh, ("issues", "read"))).status_code == 201


# --- an owner ------------------------------------------------------------------------------


async def test_disabling_an_owner_revokes_its_tasks(world: World, clock: FakeClock) -> None:
    agent, t = await world.task()
    read = t["creds"]["issues:read"]
    assert (await world.call(agent, read)).status_code == 200
    spec = {"id": "alice", "contact": "alice@example.com", "roles": ["approver"]}
    clock.advance(1)

    r = await world.live.http.put(
        "/v1/admin/owners/alice", json={**spec, "disabled": True}, headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    assert await world.task_state(t["task"]["id"]) == "revoked"
    assert_refused(await world.call(agent, read), 401, "invalid_token")
    cause = await world.cause()
    entries = await world.log()
    (owner,) = [e for e in entries if e["kind"] == "owner"]
    assert (owner["subject"], owner["state"], owner["cause"]) == ("alice", "disabled", cause)
    (task,) = [e for e in entries if e["kind"] == "task"]
    assert (task["subject"], task["cause"]) == (t["task"]["id"], cause)
    assert_refused(
        await start(await world.live.agent(), ("issues", "read")), 403, "owner_not_allowed"
    )

    clock.advance(1)
    r = await world.live.http.put(
        "/v1/admin/owners/alice", json={**spec, "disabled": False}, headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    latest = (await world.log())[-1]
    assert (latest["kind"], latest["state"], latest["cause"]) == ("owner", "enabled", cause)
    fresh_agent, fresh = await world.task()
    assert (await world.call(fresh_agent, fresh["creds"]["issues:read"])).status_code == 200
    assert_refused(await world.call(agent, read), 401, "invalid_token")


async def test_an_owner_update_that_keeps_it_enabled_logs_nothing(world: World) -> None:
    spec = {"id": "alice", "contact": "alice@example.org", "roles": ["approver"]}
    r = await world.live.http.put("/v1/admin/owners/alice", json=spec, headers=world.live.admin)
    assert r.status_code == 200, r.text
    r = await world.live.http.put(
        "/v1/admin/owners/bob",
        json={"id": "bob", "contact": "b@x", "disabled": True},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text
    assert [(e["kind"], e["subject"]) for e in await world.log()] == [("owner", "bob")]
    r = await world.live.http.put(
        "/v1/admin/owners/bob",
        json={"id": "bob", "contact": "b@y", "disabled": True},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text
    assert len(await world.log()) == 1


async def test_re_applying_the_registry_does_not_resume_a_quarantined_agent(
    world: World,
) -> None:
    """The registry document kept in git does not name the agent's state. Applying it again
    (a routine CI run) after an incident must not undo the quarantine."""
    doc = {
        "agents": [
            {
                "spiffe_id": AGENT,
                "owner": "alice",
                "ceiling": [
                    {"tool": "issues", "tier": "read"},
                    {"tool": "issues", "tier": "write"},
                ],
            }
        ]
    }
    r = await world.admin_post("/v1/admin/apply", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["unchanged"] == [f"agent/{AGENT}"]
    r = await world.admin_post(f"{AGENT_PATH}/quarantine", json={"reason": "incident 7"})
    assert r.status_code == 200, r.text

    r = await world.admin_post("/v1/admin/apply", json=doc)
    assert r.status_code == 200, r.text
    r = await world.live.http.get(AGENT_PATH, headers=world.live.admin)
    assert r.json()["state"] == "quarantined"
    assert_refused(
        await start(await world.live.agent(), ("issues", "read")), 403, "agent_not_active"
    )


async def test_re_applying_the_registry_does_not_re_enable_a_disabled_owner(
    world: World,
) -> None:
    """The same for an owner disabled through the admin API: a document that does not say
    ``disabled`` must not re-enable it."""
    doc = {"owners": [{"id": "alice", "contact": "alice@example.com", "roles": ["approver"]}]}
    r = await world.admin_post("/v1/admin/apply", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["unchanged"] == ["owner/alice"]
    r = await world.live.http.put(
        "/v1/admin/owners/alice",
        json={**doc["owners"][0], "disabled": True},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text

    r = await world.admin_post("/v1/admin/apply", json=doc)
    assert r.status_code == 200, r.text
    r = await world.live.http.get("/v1/admin/owners/alice", headers=world.live.admin)
    assert r.json()["disabled"] is True


async def test_concurrent_suspensions_change_once(world: World) -> None:
    await world.task()
    responses = await asyncio.gather(*(world.admin_post(f"{AGENT_PATH}/suspend") for _ in range(4)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # One change, logged once (the store serializes them) ...
    assert [e["kind"] for e in await world.log() if e["kind"] == "agent"] == ["agent"]
    # ... and reported once: the others found the agent suspended already.
    assert sorted(r.json()["changed"] for r in responses) == [False, False, False, True]


# --- the feed ------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_metrics_show_the_feed(world: World) -> None:
    agent, t = await world.task()
    text = (await world.live.http.get("/metrics")).text
    assert metric(text, "taskbound_revocation_feed_stale") == 0
    assert metric(text, "taskbound_revocation_seq") == 0
    assert metric(text, "taskbound_revocation_feed_age_seconds") < 5

    r = await world.admin_post(f"/v1/admin/tasks/{t['task']['id']}/revoke")
    assert r.status_code == 200, r.text
    assert_refused(await world.call(agent, t["creds"]["issues:read"]), 401, "invalid_token")
    last = await world.live.services.storage.last_revocation_seq()
    assert last >= 1
    text = (await world.live.http.get("/metrics")).text
    assert metric(text, "taskbound_revocation_feed_stale") == 0
    assert metric(text, "taskbound_revocation_seq") == last
    assert metric(text, "taskbound_revocation_entries") >= 1
    assert metric(text, "taskbound_revocations_applied_total") >= 1
    feed = (await world.live.http.get("/v1/admin/revocations", headers=world.live.admin)).json()
    assert feed["feed"]["seq"] == last
    assert feed["feed"]["stale"] is False


class Skewed:
    """A monotonic clock that runs with the real one, plus a jump the test makes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class Breakable:
    """The real feed source (PostgreSQL's listener, or polling), which the test can break
    as a lost database would: every open and fetch then fails."""

    def __init__(self, real: FeedSource) -> None:
        self.real = real
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StorageError(internal="database unreachable (test)")

    async def open(self) -> None:
        self._check()
        await self.real.open()

    async def fetch(
        self, *, after: int, limit: int, live_at: datetime | None = None
    ) -> list[Revocation]:
        self._check()
        return await self.real.fetch(after=after, limit=limit, live_at=live_at)

    async def wait(self, seconds: float) -> bool:
        self._check()
        return await self.real.wait(seconds)

    async def close(self) -> None:
        await self.real.close()


async def test_a_stale_feed_refuses_calls_with_503(
    backend: str, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    skewed = Skewed()
    sources: list[Breakable] = []

    def feed(settings: Any, storage: Any, clock: Any, **kw: Any) -> RevocationFeed:
        source = Breakable(source_for(settings, storage))
        sources.append(source)
        return RevocationFeed(settings, storage, clock, source=source, monotonic=skewed, **kw)

    # The services the server opens follow the log through this feed; the gateway's
    # checks are the real ones.
    monkeypatch.setattr(runtime, "RevocationFeed", feed)
    async with open_world(backend, tmp_path, clock) as world:
        (source,) = sources
        services = world.live.services
        bound = services.settings.revocation.staleness_bound_seconds
        agent, t = await world.task()
        read = t["creds"]["issues:read"]
        assert (await world.call(agent, read)).status_code == 200  # the feed loop runs

        # The database is lost to the feed, and time passes beyond the bound.
        source.broken = True
        skewed.offset += bound + 1
        seen = len(world.echo.seen)
        r = await world.call(agent, read)
        assert_refused(r, 503, "revocation_feed_stale")
        assert r.headers["cache-control"] == "no-store"
        assert r.json()["title"] == "revocation feed stale"
        assert len(world.echo.seen) == seen  # the upstream never saw it
        events = [e for _, e in await services.storage.list_audit(task=t["task"]["id"])]
        assert (events[-1].decision, events[-1].code) == ("deny", "revocation_feed_stale")
        assert (events[-1].agent, events[-1].task) == (AGENT, t["task"]["id"])
        text = (await world.live.http.get("/metrics")).text
        assert metric(text, "taskbound_revocation_feed_stale") == 1
        status = await world.live.http.get("/v1/admin/revocations", headers=world.live.admin)
        assert status.json()["feed"]["stale"] is True
        # Tasks still start (the broker does not need the feed); their calls wait too.
        fresh_agent, fresh = await world.task()
        assert_refused(
            await world.call(fresh_agent, fresh["creds"]["issues:read"]),
            503,
            "revocation_feed_stale",
        )

        # The feed's loop finds the database lost, and keeps retrying.
        feed = services.revocations
        await eventually(lambda: feed.failures >= 1, "the loop finds the source broken")
        assert_refused(await world.call(agent, read), 503, "revocation_feed_stale")

        # The database is back: the feed catches up by itself (backoff) and calls pass.
        source.broken = False
        await eventually(lambda: feed.stale() is None, "the feed recovers")
        assert (await world.call(agent, read)).status_code == 200
        text = (await world.live.http.get("/metrics")).text
        assert metric(text, "taskbound_revocation_feed_stale") == 0
        assert metric(text, "taskbound_revocation_feed_failures_total") >= 1

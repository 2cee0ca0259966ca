"""Break-glass exceptions end to end, on a live server (memory, SQLite and PostgreSQL) with a
real upstream behind its gateway: a scope beyond the agent's ceiling is refused, then
granted while an exception adds it (the credential names it and dies with it, and so do
credentials delegated from it); calls made with it are flagged in the audit and listed
under the exception; Cedar policy sees it at task start, delegation and call; an
early end revokes what relies on it; it expires by itself, waits for a review by someone
other than its granter, and is overdue on /metrics when that takes too long. Every refused
grant, end or review answers with a stable code, stores nothing and is audited."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from taskbound.core.clock import FakeClock, to_epoch
from taskbound.core.model import AuditEvent, Tier
from taskbound.service.policy import default_policy_dir
from tests.api.conftest import AGENT, Agent, Live, free_port, make_settings, start_live
from tests.gateway.conftest import Echo, call_headers, echo_app, registry, serve
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

WRITER = "spiffe://taskbound.local/agents/writer"
HELPER = "spiffe://taskbound.local/agents/helper"
PEER = "spiffe://taskbound.local/agents/peer"
LIST = "/issues/repos/acme/web/issues"
WHY = "INC-4711: the nightly sync is down and issues must be filed by hand"
TTL = 300  # the exceptions' lifetime in these tests, shorter than a credential's cap (600)
REVIEW_WITHIN = 600

# Policy that looks at context.exception.active at both decision points.
BREAKGLASS_POLICY = """
@id("no-admin-grants-under-breakglass")
forbid (principal, action in Action::"admin", resource)
when { context.point == "grant" && context.exception.active };

@id("no-writes-under-breakglass")
forbid (principal, action in Action::"write", resource)
when { context.point == "call" && context.exception.active };

@id("no-delegation-under-breakglass")
forbid (principal, action, resource)
when { context.point == "grant" && context.exception.active && context.delegation_depth > 0 };
"""


@dataclass
class World:
    live: Live
    echo: Echo

    @property
    def clock(self) -> FakeClock:
        return self.live.clock

    # --- the admin API -----------------------------------------------------------------

    async def grant(self, **body: Any) -> httpx.Response:
        """POST /v1/admin/breakglass: by default issues:write for AGENT, granted by root."""
        payload: dict[str, Any] = {
            "agent": AGENT,
            "scopes": [{"tool": "issues", "tier": "write"}],
            "justification": WHY,
            "as_owner": "root",
            "expires_in_seconds": TTL,
        }
        payload.update(body)
        return await self.live.http.post(
            "/v1/admin/breakglass", json=payload, headers=self.live.admin
        )

    async def granted(self, **body: Any) -> dict[str, Any]:
        r = await self.grant(**body)
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def get(self, bg_id: str) -> dict[str, Any]:
        r = await self.live.http.get(f"/v1/admin/breakglass/{bg_id}", headers=self.live.admin)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def ids(self, query: str = "") -> list[str]:
        r = await self.live.http.get(f"/v1/admin/breakglass{query}", headers=self.live.admin)
        assert r.status_code == 200, r.text
        return [bg["id"] for bg in r.json()["exceptions"]]

    async def verb(self, bg_id: str, verb: str, **body: Any) -> httpx.Response:
        return await self.live.http.post(
            f"/v1/admin/breakglass/{bg_id}/{verb}", json=body, headers=self.live.admin
        )

    async def refusals(self) -> list[AuditEvent]:
        return [e for e in await self.audit() if e.event == "breakglass.refused"]

    async def audit(self) -> list[AuditEvent]:
        return [e for _, e in await self.live.services.storage.list_audit(limit=1000)]

    async def overdue(self) -> float:
        text = (await self.live.http.get("/metrics")).text
        match = re.search(r"^taskbound_breakglass_reviews_overdue (\S+)$", text, re.MULTILINE)
        assert match, "taskbound_breakglass_reviews_overdue not in /metrics"
        return float(match.group(1))

    # --- the agents ----------------------------------------------------------------------

    async def start(self, *tiers: str, spiffe_id: str = AGENT) -> tuple[Agent, httpx.Response]:
        """A new task asking for issues at ``tiers``, by a fresh agent session."""
        agent = await self.live.agent(spiffe_id)
        r = await agent.start(
            intent={
                "purpose": "file issues by hand",
                "constraints": {"org": "acme", "repo": "web", "tiers": ["read", "write", "admin"]},
            },
            scopes=[{"tool": "issues", "tier": tier} for tier in tiers],
        )
        return agent, r

    async def task(self, *tiers: str, spiffe_id: str = AGENT) -> tuple[Agent, dict[str, Any]]:
        agent, r = await self.start(*tiers, spiffe_id=spiffe_id)
        assert r.status_code == 201, r.text
        return agent, dict(r.json())

    async def call(self, agent: Agent, token: str, method: str = "GET") -> httpx.Response:
        """List issues (read) or, with POST, create one (write) through the gateway."""
        kw: dict[str, Any] = {"json": {"title": "filed by hand"}} if method == "POST" else {}
        return await self.live.http.request(
            method, LIST, headers=call_headers(agent, token, method, LIST), **kw
        )

    async def exchange(self, holder: Agent, token: str, delegate: Agent) -> httpx.Response:
        """RFC 8693 token exchange of ``holder``'s credential ``token`` to ``delegate``."""
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_dpop": holder.proof("POST", "/oauth/token", access_token=token),
            "actor_token": delegate.identity,
            "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
        }
        return await self.live.http.post(
            "/oauth/token", data=form, headers={"DPoP": delegate.proof("POST", "/oauth/token")}
        )

    async def refresh(self, agent: Agent, task_id: str, tier: str) -> httpx.Response:
        return await agent.call(
            "POST", f"/v1/tasks/{task_id}/credentials", json={"tool": "issues", "tier": tier}
        )


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def creds(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["tier"]: c for c in task["credentials"]}


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert (r.json()["code"], r.json()["status"]) == (code, status)


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
            elif backend == "sqlite":
                url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
            else:
                url = "memory://"
            sections.setdefault("breakglass", {"review_within_seconds": REVIEW_WITHIN})
            settings = make_settings(tmp_path, storage={"url": url}, **sections)
            async for live in start_live(settings, clock, registry=False):
                doc = registry(echo.base, "http://127.0.0.1:9/mcp", live.base)
                # AGENT and HELPER may only read; WRITER and PEER may also write.
                doc["agents"] = [
                    {
                        "spiffe_id": AGENT,
                        "owner": "alice",
                        "ceiling": [{"tool": "issues", "tier": "read"}],
                    },
                    {
                        "spiffe_id": HELPER,
                        "owner": "alice",
                        "ceiling": [{"tool": "issues", "tier": "read"}],
                    },
                    *(
                        {
                            "spiffe_id": spiffe_id,
                            "owner": "alice",
                            "ceiling": [
                                {"tool": "issues", "tier": "read"},
                                {"tool": "issues", "tier": "write"},
                            ],
                        }
                        for spiffe_id in (WRITER, PEER)
                    ),
                ]
                # A tool that only reads.
                doc["tools"].append(
                    {
                        "id": "wiki",
                        "audience": f"{live.base}/wiki",
                        "upstream_url": f"{echo.base}/wiki",
                        "kind": "http",
                        "actions": [
                            {"name": "page", "tier": "read", "method": "GET", "path": "/pages"}
                        ],
                    }
                )
                doc["owners"] += [
                    {"id": "root", "contact": "root@example.com", "roles": ["admin"]},
                    # An admin who may also review: but never an exception of her own.
                    {"id": "ada", "contact": "ada@example.com", "roles": ["admin", "reviewer"]},
                    {"id": "rita", "contact": "rita@example.com", "roles": ["reviewer"]},
                    {"id": "bob", "contact": "bob@example.com"},
                ]
                r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
                assert r.status_code == 200, r.text
                yield World(live, echo)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def world(backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async with open_world(backend, tmp_path, clock) as w:
        yield w


@pytest.fixture
async def policed(backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    """A world whose policy pack also forbids things under a break-glass exception."""
    pack = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), pack)
    (pack / "breakglass.cedar").write_text(BREAKGLASS_POLICY)
    async with open_world(backend, tmp_path, clock, policy={"dir": str(pack)}) as w:
        yield w


# --- granting, relying, flagging ---------------------------------------------------------


async def test_an_exception_widens_the_grant_and_flags_every_call(world: World) -> None:
    # Without an exception the write tier is beyond AGENT's ceiling.
    _, before = await world.task("read", "write")
    assert [g["tier"] for g in before["granted"]] == ["read"]
    assert [(d["tier"], d["code"]) for d in before["denied"]] == [("write", "beyond_ceiling")]

    granted_at = world.clock.now()
    bg = await world.granted()
    assert bg["id"].startswith("bg")
    assert (bg["state"], bg["agent"], bg["granted_by"]) == ("active", AGENT, "root")
    assert bg["scopes"] == [{"tool": "issues", "tier": "write"}]
    assert bg["justification"] == WHY
    assert at(bg["created_at"]) == granted_at
    assert to_epoch(at(bg["expires_at"])) == to_epoch(granted_at) + TTL
    assert bg["ended_at"] is bg["reviewed_at"] is None
    assert await world.ids("?state=active") == [bg["id"]]
    assert await world.ids(f"?agent={quote(AGENT, safe='')}") == [bg["id"]]
    assert await world.ids(f"?agent={quote(WRITER, safe='')}") == []
    assert await world.ids("?state=review") == []

    world.clock.advance(10)
    agent, task = await world.task("read", "write")
    assert [g["tier"] for g in task["granted"]] == ["read", "write"]
    assert task["denied"] == []
    # The task's write grant names the exception it relies on; its read grant does not.
    stored = await world.live.services.storage.get_task(task["id"])
    assert stored is not None
    assert {g.tier: g.exception for g in stored.granted} == {
        Tier.READ: None,
        Tier.WRITE: bg["id"],
    }
    # The write credential says so (tb_exc) and dies with the exception, before its cap.
    read, write = creds(task)["read"], creds(task)["write"]
    assert claims(write["access_token"])["tb_exc"] == bg["id"]
    assert claims(write["access_token"])["exp"] == to_epoch(at(bg["expires_at"]))
    assert write["expires_in"] == TTL - 10
    assert "tb_exc" not in claims(read["access_token"])
    assert read["expires_in"] == 600
    records = await world.live.services.storage.list_credentials(task["id"])
    assert {c.tier: c.exception_id for c in records} == {Tier.READ: None, Tier.WRITE: bg["id"]}

    # Calls with it go through, and the audit flags the one that relies on the exception.
    seen = len(world.echo.seen)
    r = await world.call(agent, write["access_token"], "POST")
    assert r.status_code == 200, r.text
    assert (await world.call(agent, read["access_token"])).status_code == 200
    assert len(world.echo.seen) == seen + 2
    calls = [e for e in await world.audit() if e.event == "gateway.call"]
    assert [(e.action, e.decision, e.exception_id) for e in calls] == [
        ("create_issue", "allow", bg["id"]),
        ("list_issues", "allow", None),
    ]

    # Its page lists every record made under it: its grant, the credential issued under it
    # and the write call, not the read.
    page = await world.get(bg["id"])
    assert page["state"] == "active"
    assert [(c["event"], c["action"]) for c in page["calls"]] == [
        ("breakglass.granted", None),
        ("credential.issued", None),
        ("gateway.call", "create_issue"),
    ]
    assert {c["exception"] for c in page["calls"]} == {bg["id"]}
    call = page["calls"][2]
    assert (call["decision"], call["task"], call["agent"]) == ("allow", task["id"], AGENT)
    assert call["jti"] == claims(write["access_token"])["jti"]

    # A refresh relies on it again, and is capped again.
    world.clock.advance(100)
    r = await world.refresh(agent, task["id"], "write")
    assert r.status_code == 201, r.text
    assert claims(r.json()["access_token"])["tb_exc"] == bg["id"]
    assert claims(r.json()["access_token"])["exp"] == to_epoch(at(bg["expires_at"]))
    assert r.json()["expires_in"] == TTL - 110
    r = await world.refresh(agent, task["id"], "read")
    assert "tb_exc" not in claims(r.json()["access_token"])


async def test_a_grant_without_an_expiry_lasts_the_default(world: World) -> None:
    bg = await world.granted(expires_in_seconds=None)
    default = world.live.services.settings.breakglass.default_duration_seconds
    assert to_epoch(at(bg["expires_at"])) == to_epoch(world.clock.now()) + default
    # ... and a credential relying on it still lives no longer than its own cap.
    _, task = await world.task("write")
    assert creds(task)["write"]["expires_in"] == 600


async def test_an_exception_adds_only_its_scopes_and_only_for_its_agent(world: World) -> None:
    bg = await world.granted()
    _, task = await world.task("read", "write", "admin")
    assert [g["tier"] for g in task["granted"]] == ["read", "write"]
    assert [(d["tier"], d["code"]) for d in task["denied"]] == [("admin", "beyond_ceiling")]
    # Another agent with write in its own ceiling gets a credential relying on nothing.
    _, other = await world.task("write", spiffe_id=WRITER)
    assert "tb_exc" not in claims(creds(other)["write"]["access_token"])
    assert [c["event"] for c in (await world.get(bg["id"]))["calls"]] == [
        "breakglass.granted",
        "credential.issued",  # the first agent's write credential, not the other's
    ]


async def test_policy_sees_that_a_scope_relies_on_an_exception(policed: World) -> None:
    world = policed
    bg = await world.granted(
        scopes=[{"tool": "issues", "tier": "write"}, {"tool": "issues", "tier": "admin"}]
    )
    # At task start: context.exception.active is true for the excepted scopes only.
    agent, task = await world.task("read", "write", "admin")
    assert [g["tier"] for g in task["granted"]] == ["read", "write"]
    (denial,) = task["denied"]
    assert (denial["tier"], denial["code"]) == ("admin", "policy_denied")
    assert "no-admin-grants-under-breakglass" in denial["reason"]

    # At the gateway: the write credential relies on the exception, so policy refuses it ...
    seen = len(world.echo.seen)
    r = await world.call(agent, creds(task)["write"]["access_token"], "POST")
    assert_refused(r, 403, "policy_denied")
    assert len(world.echo.seen) == seen
    (refused,) = [e for e in await world.audit() if e.event == "gateway.call"]
    assert (refused.decision, refused.exception_id) == ("deny", bg["id"])
    assert "no-writes-under-breakglass" in refused.policies
    # ... while the same write by an agent whose own ceiling holds it is allowed.
    writer, other = await world.task("write", spiffe_id=WRITER)
    r = await world.call(writer, creds(other)["write"]["access_token"], "POST")
    assert r.status_code == 200, r.text
    # The refused call is listed under the exception like any other.
    page = await world.get(bg["id"])
    assert [(c["event"], c["decision"]) for c in page["calls"]] == [
        ("breakglass.granted", "allow"),
        ("credential.issued", "info"),
        ("gateway.call", "deny"),
    ]


async def test_policy_sees_the_exception_a_delegation_relies_on(policed: World) -> None:
    world = policed
    await world.granted()
    agent, task = await world.task("write")
    relying = creds(task)["write"]["access_token"]
    owner, own = await world.task("write", spiffe_id=WRITER)
    writers = creds(own)["write"]["access_token"]
    cases = [
        # AGENT's credential relies on the exception: so would WRITER's child of it.
        (agent, relying, WRITER),
        # WRITER's own credential to AGENT: the child would rely on AGENT's exception.
        (owner, writers, AGENT),
    ]
    for holder, token, to in cases:
        r = await world.exchange(holder, token, await world.live.agent(to))
        assert (r.status_code, r.json()["error"]) == (400, "invalid_scope"), (to, r.text)
    refused = [e for e in await world.audit() if e.event == "token.exchange"]
    assert [(e.decision, e.agent) for e in refused] == [("deny", WRITER), ("deny", AGENT)]
    assert all("no-delegation-under-breakglass" in (e.detail or "") for e in refused)
    # Where no exception is relied on, the policy does not apply: WRITER's own credential
    # to PEER, whose ceiling holds write too.
    r = await world.exchange(owner, writers, await world.live.agent(PEER))
    assert r.status_code == 200, r.text
    assert "tb_exc" not in claims(r.json()["access_token"])


async def test_a_delegated_credential_is_flagged_and_dies_with_the_exception(
    world: World,
) -> None:
    bg = await world.granted()
    expiry = to_epoch(at(bg["expires_at"]))
    # AGENT's write credential, relying on the exception, delegated to WRITER (whose own
    # ceiling holds write): the child inherits the flag and the expiry.
    agent, task = await world.task("write")
    writer = await world.live.agent(WRITER)
    r = await world.exchange(agent, creds(task)["write"]["access_token"], writer)
    assert r.status_code == 200, r.text
    inherited = r.json()["access_token"]
    assert (claims(inherited)["tb_exc"], claims(inherited)["exp"]) == (bg["id"], expiry)
    # WRITER's own write credential delegated to AGENT: the child relies on AGENT's exception.
    owner, own = await world.task("write", spiffe_id=WRITER)
    writers = creds(own)["write"]["access_token"]
    assert "tb_exc" not in claims(writers)
    delegate = await world.live.agent(AGENT)
    r = await world.exchange(owner, writers, delegate)
    assert r.status_code == 200, r.text
    relying = r.json()["access_token"]
    assert (claims(relying)["tb_exc"], claims(relying)["exp"]) == (bg["id"], expiry)

    for who, token in ((writer, inherited), (delegate, relying)):
        assert (await world.call(who, token, "POST")).status_code == 200
    events = [
        (e.event, e.agent, e.exception_id)
        for e in await world.audit()
        if e.event in ("token.exchange", "gateway.call")
    ]
    assert events == [
        ("token.exchange", WRITER, bg["id"]),
        ("token.exchange", AGENT, bg["id"]),
        ("gateway.call", WRITER, bg["id"]),
        ("gateway.call", AGENT, bg["id"]),
    ]

    # Ending it revokes the parent and both children, not WRITER's own credential.
    r = await world.verb(bg["id"], "end", as_owner="root")
    assert r.status_code == 200, r.text
    assert r.json()["credentials_revoked"] == 3
    parent = creds(task)["write"]["access_token"]
    for who, token in ((agent, parent), (writer, inherited), (delegate, relying)):
        assert_refused(await world.call(who, token, "POST"), 401, "invalid_token")
    assert (await world.call(owner, writers, "POST")).status_code == 200
    # ... and WRITER's credential can no longer be delegated to AGENT.
    r = await world.exchange(owner, writers, await world.live.agent(AGENT))
    assert (r.status_code, r.json()["error"]) == (400, "invalid_scope"), r.text


async def test_ending_the_parents_exception_revokes_a_child_relying_on_another(
    world: World,
) -> None:
    mine = await world.granted()
    theirs = await world.granted(agent=HELPER)
    agent, task = await world.task("write")
    parent = creds(task)["write"]["access_token"]
    helper = await world.live.agent(HELPER)
    r = await world.exchange(agent, parent, helper)
    assert r.status_code == 200, r.text
    child = r.json()["access_token"]
    # The child relies on its own holder's exception, and is derived from the parent.
    assert claims(child)["tb_exc"] == theirs["id"]
    assert (await world.call(helper, child, "POST")).status_code == 200

    r = await world.verb(mine["id"], "end", as_owner="root")
    assert r.status_code == 200, r.text
    assert r.json()["credentials_revoked"] == 2
    for who, token in ((agent, parent), (helper, child)):
        assert_refused(await world.call(who, token, "POST"), 401, "invalid_token")
    assert (await world.get(theirs["id"]))["state"] == "active"


# --- ending early ------------------------------------------------------------------------


async def test_ending_early_revokes_what_relies_on_it(world: World) -> None:
    bg = await world.granted()
    agent, task = await world.task("read", "write")
    read, write = creds(task)["read"]["access_token"], creds(task)["write"]["access_token"]
    assert (await world.call(agent, write, "POST")).status_code == 200
    # A refreshed write credential relies on it too.
    r = await world.refresh(agent, task["id"], "write")
    assert r.status_code == 201, r.text
    refreshed = r.json()["access_token"]

    # Someone who is neither its granter nor an admin cannot end it; nothing changes.
    for who in ("bob", "rita", "nobody", ""):
        assert_refused(await world.verb(bg["id"], "end", as_owner=who), 403, "role_required")
    assert (await world.call(agent, write, "POST")).status_code == 200
    assert_refused(await world.verb("bg_unknown", "end", as_owner="root"), 404, "not_found")

    world.clock.advance(30)
    ended_at = world.clock.now()
    r = await world.verb(bg["id"], "end", as_owner="ada", reason="sync is back")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["state"], out["ended_by"], out["credentials_revoked"]) == ("review", "ada", 2)
    assert at(out["ended_at"]) == ended_at
    assert await world.ids("?state=active") == []
    assert await world.ids("?state=review") == [bg["id"]]

    # The gateway refuses what relied on it at once; the rest of the task lives on.
    seen = len(world.echo.seen)
    for token in (write, refreshed):
        r = await world.call(agent, token, "POST")
        assert_refused(r, 401, "invalid_token")
    assert len(world.echo.seen) == seen
    assert (await world.call(agent, read)).status_code == 200
    r = await world.live.http.get(f"/v1/tasks/{task['id']}", headers=world.live.admin)
    assert r.json()["state"] == "active"

    # The revocation log says why, for each credential.
    r = await world.live.http.get("/v1/admin/revocations", headers=world.live.admin)
    entries = [e for e in r.json()["revocations"] if e["cause"] == "breakglass"]
    assert sorted(e["subject"] for e in entries) == sorted(
        claims(t)["jti"] for t in (write, refreshed)
    )
    assert {(e["kind"], e["reason"], e["task"]) for e in entries} == {
        ("credential", "sync is back", task["id"])
    }

    # No more write credentials: not by refresh, not for a new task.
    assert_refused(await world.refresh(agent, task["id"], "write"), 403, "forbidden")
    _, again = await world.task("read", "write")
    assert [(d["tier"], d["code"]) for d in again["denied"]] == [("write", "beyond_ceiling")]

    # Ending it again is refused; every refusal is audited against it.
    assert_refused(await world.verb(bg["id"], "end", as_owner="root"), 409, "already_ended")
    refusals = await world.refusals()
    assert [e.code for e in refusals] == ["role_required"] * 4 + ["not_found", "already_ended"]
    assert [e.exception_id for e in refusals] == [bg["id"]] * 4 + [None, bg["id"]]
    page = await world.get(bg["id"])
    assert page["state"] == "review"
    # Its page has it all, the refused calls made with revoked credentials included.
    assert [(c["event"], c["code"]) for c in page["calls"]] == [
        ("breakglass.granted", None),
        ("credential.issued", None),
        ("gateway.call", None),
        ("credential.issued", None),
        *[("breakglass.refused", "role_required")] * 4,
        ("gateway.call", None),
        ("breakglass.ended", None),
        ("gateway.call", "invalid_token"),
        ("gateway.call", "invalid_token"),
        ("breakglass.refused", "already_ended"),
    ]


async def test_its_granter_may_end_it_without_being_an_admin_any_more(world: World) -> None:
    bg = await world.granted(as_owner="ada")
    r = await world.live.http.put(
        "/v1/admin/owners/ada",
        json={"id": "ada", "contact": "ada@example.com", "roles": ["reviewer"]},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text
    r = await world.verb(bg["id"], "end", as_owner="ada")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["credentials_revoked"]) == ("review", 0)


# --- expiry and review -------------------------------------------------------------------


async def test_it_expires_by_itself_then_waits_for_a_review(world: World) -> None:
    bg = await world.granted(as_owner="ada")
    agent, task = await world.task("write")
    write = creds(task)["write"]["access_token"]
    assert (await world.call(agent, write, "POST")).status_code == 200
    r = await world.verb(bg["id"], "review", as_owner="rita", note="fine")
    assert_refused(r, 409, "not_ended")

    # At its expiry it stops counting, with nobody doing anything.
    world.clock.advance(TTL)
    assert (await world.get(bg["id"]))["state"] == "review"
    assert await world.ids("?state=active") == []
    assert await world.ids("?state=review") == [bg["id"]]
    _, again = await world.task("read", "write")
    assert [(d["tier"], d["code"]) for d in again["denied"]] == [("write", "beyond_ceiling")]
    assert_refused(await world.refresh(agent, task["id"], "write"), 403, "forbidden")
    # Its credentials expired with it, at the same instant.
    assert_refused(await world.call(agent, write, "POST"), 401, "invalid_token")
    # It cannot be ended any more.
    assert_refused(await world.verb(bg["id"], "end", as_owner="root"), 409, "already_ended")

    # The review: by a reviewer who did not grant it, with a note.
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"as_owner": "ada", "note": "mine, looks fine"}, 403, "self_review_not_allowed"),
        ({"as_owner": "root", "note": "admins are not reviewers"}, 403, "role_required"),
        ({"as_owner": "bob", "note": "n/a"}, 403, "role_required"),
        ({"as_owner": "rita", "note": "  "}, 400, "review_note_required"),
    ]
    for body, status, code in cases:
        assert_refused(await world.verb(bg["id"], "review", **body), status, code)
    assert (await world.get(bg["id"]))["reviewed_at"] is None

    world.clock.advance(5)
    reviewed_at = world.clock.now()
    r = await world.verb(bg["id"], "review", as_owner="rita", note="justified; sync fixed")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["state"], out["reviewed_by"]) == ("reviewed", "rita")
    assert (out["review_note"], at(out["reviewed_at"])) == ("justified; sync fixed", reviewed_at)
    assert await world.ids("?state=reviewed") == [bg["id"]]
    assert await world.ids("?state=review") == []
    r = await world.verb(bg["id"], "review", as_owner="rita", note="again")
    assert_refused(r, 409, "already_reviewed")

    refusals = await world.refusals()
    assert [e.code for e in refusals] == [
        "not_ended",
        "already_ended",
        *(code for *_, code in cases),
        "already_reviewed",
    ]
    assert {e.exception_id for e in refusals} == {bg["id"]}
    assert [c["event"] for c in (await world.get(bg["id"]))["calls"]][-2:] == [
        "breakglass.reviewed",
        "breakglass.refused",
    ]


async def test_overdue_reviews_on_metrics(world: World) -> None:
    assert await world.overdue() == 0
    bg = await world.granted()
    world.clock.advance(TTL)
    assert await world.overdue() == 0
    assert (await world.get(bg["id"]))["state"] == "review"
    world.clock.advance(REVIEW_WITHIN - 1)
    assert await world.overdue() == 0
    world.clock.advance(1)  # at the deadline it is overdue
    assert await world.overdue() == 1
    assert (await world.get(bg["id"]))["state"] == "overdue"
    assert await world.ids("?state=review") == [bg["id"]]
    r = await world.verb(bg["id"], "review", as_owner="rita", note="late, but justified")
    assert r.status_code == 200, r.text
    assert await world.overdue() == 0


# --- refused grants ----------------------------------------------------------------------


GRANT_REFUSALS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no justification", {"justification": ""}, 400, "justification_required"),
    ("blank justification", {"justification": "   "}, 400, "justification_required"),
    ("short justification", {"justification": "urgent fix"}, 400, "justification_too_short"),
    ("too long", {"expires_in_seconds": 4 * 3600 + 1}, 400, "expiry_too_long"),
    (
        "in the ceiling",
        {"scopes": [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}]},
        400,
        "already_in_ceiling",
    ),
    ("unknown tool", {"scopes": [{"tool": "nope", "tier": "write"}]}, 400, "invalid_request"),
    ("tier not offered", {"scopes": [{"tool": "wiki", "tier": "admin"}]}, 400, "invalid_request"),
    ("no role", {"as_owner": "bob"}, 403, "role_required"),
    ("reviewer only", {"as_owner": "rita"}, 403, "role_required"),
    ("unknown owner", {"as_owner": "nobody"}, 403, "role_required"),
    ("no owner", {"as_owner": ""}, 403, "role_required"),
    ("unknown agent", {"agent": "spiffe://taskbound.local/agents/ghost"}, 404, "not_found"),
    ("suspended agent", {"agent": WRITER}, 403, "agent_not_active"),
]


async def test_refused_grants_store_nothing_and_are_audited(world: World) -> None:
    r = await world.live.http.post(
        f"/v1/admin/agents/{quote(WRITER, safe='')}/suspend", headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    for what, body, status, code in GRANT_REFUSALS:
        r = await world.grant(**body)
        assert (r.status_code, r.json().get("code")) == (status, code), (what, r.text)
    assert await world.ids() == []
    assert await world.live.services.storage.list_breakglass(now=world.clock.now()) == []
    events = await world.audit()
    assert not [e for e in events if e.event == "breakglass.granted"]
    refusals = await world.refusals()
    assert [e.code for e in refusals] == [code for *_, code in GRANT_REFUSALS]
    assert {(e.decision, e.exception_id) for e in refusals} == {("deny", None)}
    assert refusals[-1].agent == WRITER
    # Still refused without an exception: the task cannot reach the write tier.
    _, task = await world.task("write", "read")
    assert [(d["tier"], d["code"]) for d in task["denied"]] == [("write", "beyond_ceiling")]


async def test_malformed_requests_are_refused_before_anyone_is_asked(world: World) -> None:
    r = await world.grant(extra=1)
    assert_refused(r, 400, "unknown_field")
    r = await world.grant(scopes=[])
    assert_refused(r, 400, "invalid_request")
    r = await world.live.http.post("/v1/admin/breakglass", json={"agent": AGENT})
    assert_refused(r, 401, "invalid_admin_token")
    for query in ("?state=bogus", "?limit=0", "?limit=x"):
        r = await world.live.http.get(f"/v1/admin/breakglass{query}", headers=world.live.admin)
        assert_refused(r, 400, "invalid_request")
    r = await world.live.http.get("/v1/admin/breakglass/bg_unknown", headers=world.live.admin)
    assert_refused(r, 404, "not_found")
    bg = await world.granted()
    assert_refused(await world.verb(bg["id"], "extend", as_owner="root"), 404, "not_found")
    assert (await world.get(bg["id"]))["state"] == "active"
    assert await world.refusals() == []

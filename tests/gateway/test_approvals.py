"""Human approval at the gateway, end to end over HTTP with a real echo upstream, a real MCP
server and the default policy pack (its `admin-needs-approval` and
`destructive-needs-approval` gates): a held call, its approval bound to exactly that call,
the same retry let through once, quorum, deny and expiry reaching the agent, and 50
concurrent retries consuming one approval exactly once on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskbound.core.approvals import SIGNATURE_HEADER, verify_webhook
from taskbound.core.clock import FakeClock, to_epoch
from tests.api.conftest import Agent, free_port, make_settings, start_live
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

from .conftest import DPoPAuth, Echo, World, call_headers, echo_app, mcp_server, registry, serve

MERGE = "/issues/repos/acme/web/pulls/7/merge"
DELETE = "/issues/repos/acme/web"
WEBHOOK_SECRET = "approvals-webhook-secret-for-tests"


def approval_registry(echo_base: str, mcp_base: str, gateway_base: str) -> dict[str, Any]:
    """The gateway tests' registry plus a destructive write (merge, risk high) and people:
    bob and carol approve, dave only reviews; alice owns the agent."""
    doc = registry(echo_base, mcp_base, gateway_base)
    doc["owners"] += [
        {"id": "bob", "contact": "bob@example.com", "roles": ["approver"]},
        {"id": "carol", "contact": "carol@example.com", "roles": ["approver", "reviewer"]},
        {"id": "dave", "contact": "dave@example.com", "roles": ["reviewer"]},
    ]
    issues = next(t for t in doc["tools"] if t["id"] == "issues")
    issues["actions"].append(
        {
            "name": "merge",
            "tier": "write",
            "method": "PUT",
            "path": "/repos/{org}/{repo}/pulls/{n}/merge",
            "risk": "high",
        }
    )
    return doc


@contextlib.asynccontextmanager
async def approval_world(
    tmp_path: Path, clock: FakeClock, *, url: str | None = None, **approvals: Any
) -> AsyncIterator[World]:
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    calls: list[dict[str, Any]] = []
    mcp_port = free_port()
    servers = [
        await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1])),
        await serve(mcp_server(calls).streamable_http_app(stateless_http=True), mcp_port),
    ]
    sections: dict[str, dict[str, Any]] = {"approvals": approvals}
    if url is not None:
        sections["storage"] = {"url": url}
    live_gen = start_live(make_settings(tmp_path, **sections), clock, registry=False)
    try:
        live = await live_gen.__anext__()
        doc = approval_registry(echo.base, f"http://127.0.0.1:{mcp_port}/mcp", live.base)
        r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
        assert r.status_code == 200, r.text
        yield World(live, echo, calls)
    finally:
        await live_gen.aclose()
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task


@pytest.fixture
async def hw(tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async with approval_world(tmp_path, clock) as world:
        yield world


async def put(
    world: World, agent: Agent, token: str, body: Any = None, path: str = MERGE
) -> httpx.Response:
    return await world.live.http.put(
        path,
        json={"method": "squash"} if body is None else body,
        headers=call_headers(agent, token, "PUT", path),
    )


async def delete(world: World, agent: Agent, token: str, path: str = DELETE) -> httpx.Response:
    return await world.live.http.delete(path, headers=call_headers(agent, token, "DELETE", path))


def held(r: httpx.Response) -> str:
    """The approval id of a held call's refusal (and that it is one)."""
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "approval_required"
    assert body["poll"] == f"/v1/approvals/{body['approval_id']}"
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    return str(body["approval_id"])


async def vote(
    world: World, approval_id: str, who: str, verb: str = "approve", reason: str = "checked"
) -> httpx.Response:
    return await world.live.http.post(
        f"/v1/admin/approvals/{approval_id}/{verb}",
        json={"as_owner": who, "reason": reason},
        headers=world.live.admin,
    )


async def poll(world: World, agent: Agent, approval_id: str, wait: float = 0) -> httpx.Response:
    path = f"/v1/approvals/{approval_id}"
    query = f"?wait={wait}" if wait else ""
    return await agent.call("GET", path + query, proof=agent.proof("GET", path))


async def admin_view(world: World, approval_id: str) -> dict[str, Any]:
    r = await world.live.http.get(f"/v1/approvals/{approval_id}", headers=world.live.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def events(world: World, task_id: str) -> list[Any]:
    return [e for _, e in await world.live.services.storage.list_audit(task=task_id, limit=1000)]


async def test_a_held_call_goes_through_once_when_approved(hw: World) -> None:
    agent, t = await hw.task(("issues", "write"))
    task_id, token = t["task"]["id"], t["creds"]["issues:write"]
    storage = hw.live.services.storage
    credentials = await storage.list_credentials(task_id)

    first = held(await put(hw, agent, token))
    assert hw.echo.seen == []
    assert held(await put(hw, agent, token)) == first  # still the same pending approval

    seen = (await poll(hw, agent, first)).json()
    assert (seen["state"], seen["tool"], seen["action"], seen["tier"]) == (
        "pending",
        "issues",
        "merge",
        "write",
    )
    assert (seen["required"], seen["approvals"], seen["target"]) == (
        1,
        0,
        "/repos/acme/web/pulls/7/merge",
    )
    assert "summary" not in seen  # the agent's view is lean
    assert "votes" not in seen
    full = await admin_view(hw, first)
    assert full["owner"] == "alice"
    assert full["intent"] == "gateway test"
    summary = full["summary"]
    assert (summary["method"], summary["path"]) == ("PUT", MERGE)
    assert summary["arguments"] == {"org": "acme", "repo": "web", "n": "7"}
    assert summary["body"] == {"method": "squash"}
    assert summary["policies"] == ["destructive-needs-approval"]
    assert summary["truncated"] is False

    r = await vote(hw, first, "bob", reason="reviewed the PR")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["decided_by"]) == ("approved", "bob")

    r = await put(hw, agent, token)  # the same call, once
    assert r.status_code == 200, r.text
    assert len(hw.echo.seen) == 1
    assert hw.echo.seen[0]["body"] == '{"method":"squash"}'
    assert (await admin_view(hw, first))["state"] == "consumed"

    second = held(await put(hw, agent, token))  # used up: a new approval is needed
    assert second != first
    third = held(await put(hw, agent, token, {"method": "rebase"}))  # other arguments
    assert third not in (first, second)
    assert held(await put(hw, agent, token, path=MERGE.replace("/7/", "/8/"))) not in (
        first,
        second,
        third,
    )
    assert len(hw.echo.seen) == 1

    calls = [e for e in await events(hw, task_id) if e.event == "gateway.call"]
    allowed = [e for e in calls if e.decision == "allow"]
    assert len(allowed) == 1
    assert f"approval {first} consumed" in (allowed[0].detail or "")
    assert allowed[0].policies == ("write-tier-when-intent-allows",)
    assert all(e.decision == "approval_required" for e in calls if e not in allowed)
    assert f"held for approval {first}" in (calls[0].detail or "")
    kinds = [e.event for e in await events(hw, task_id) if e.event.startswith("approval.")]
    assert kinds[:3] == ["approval.requested", "approval.approved", "approval.consumed"]
    # Approving changed no credential.
    assert await storage.list_credentials(task_id) == credentials


async def test_the_admin_tier_needs_two_distinct_approvers(hw: World) -> None:
    agent, t = await hw.task(("issues", "admin"))
    task_id, token = t["task"]["id"], t["creds"]["issues:admin"]
    approval = held(await delete(hw, agent, token))
    assert (await admin_view(hw, approval))["required"] == 2
    r = await vote(hw, approval, "bob")
    assert (r.status_code, r.json()["state"], r.json()["approvals"]) == (200, "pending", 1)
    assert held(await delete(hw, agent, token)) == approval  # one approval is not enough
    for who, status, code in (
        ("bob", 409, "already_voted"),
        ("alice", 403, "self_approval_not_allowed"),  # the agent's own owner
        ("dave", 403, "approver_not_allowed"),  # no approver role
        ("nobody", 403, "approver_not_allowed"),
    ):
        r = await vote(hw, approval, who)
        assert (r.status_code, r.json()["code"]) == (status, code), who
    assert (await admin_view(hw, approval))["approvals"] == 1
    r = await vote(hw, approval, "carol")
    assert (r.json()["state"], r.json()["approvals"]) == ("approved", 2)
    assert [v["approver"] for v in r.json()["votes"]] == ["bob", "carol"]
    r = await delete(hw, agent, token)
    assert r.status_code == 200, r.text
    assert [s["method"] for s in hw.echo.seen] == ["DELETE"]
    assert held(await delete(hw, agent, token)) != approval
    refused = [e for e in await events(hw, task_id) if e.event == "approval.refused"]
    assert [e.code for e in refused] == [
        "already_voted",
        "self_approval_not_allowed",
        "approver_not_allowed",
        "approver_not_allowed",
    ]
    assert all(approval in (e.detail or "") for e in refused)


async def test_a_deny_reaches_the_waiting_agent(hw: World) -> None:
    agent, t = await hw.task(("issues", "write"))
    token = t["creds"]["issues:write"]
    approval = held(await put(hw, agent, token))
    started = time.monotonic()
    waiting = asyncio.create_task(poll(hw, agent, approval, wait=20))
    await asyncio.sleep(0.4)
    assert not waiting.done()
    r = await vote(hw, approval, "bob", "deny", reason="")
    assert (r.status_code, r.json()["code"]) == (400, "reason_required")
    assert not waiting.done()
    r = await vote(hw, approval, "bob", "deny", reason="not during the freeze")
    assert (r.status_code, r.json()["state"]) == (200, "denied")
    answer = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 5
    assert answer.status_code == 200
    assert (answer.json()["state"], answer.json()["reason"]) == ("denied", "not during the freeze")
    r = await vote(hw, approval, "carol")
    assert (r.status_code, r.json()["code"]) == (409, "approval_not_pending")
    assert hw.echo.seen == []
    # Denied is final; the same call asks afresh, and is refused meanwhile.
    assert held(await put(hw, agent, token)) != approval
    assert hw.echo.seen == []


async def test_expiry_of_pending_and_of_approved_approvals(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with approval_world(tmp_path, clock, pending_ttl_seconds=60, use_ttl_seconds=30) as world:
        agent, t = await world.task(("issues", "write"))
        token = t["creds"]["issues:write"]
        first = held(await put(world, agent, token))
        clock.advance(61)
        assert (await poll(world, agent, first)).json()["state"] == "expired"
        r = await vote(world, first, "bob")
        assert (r.status_code, r.json()["code"]) == (409, "approval_expired")
        assert (await admin_view(world, first))["state"] == "expired"

        second = held(await put(world, agent, token))
        assert second != first
        assert (await vote(world, second, "bob")).json()["state"] == "approved"
        clock.advance(31)  # approved, but not used in time
        assert (await admin_view(world, second))["state"] == "expired"
        third = held(await put(world, agent, token))
        assert third not in (first, second)
        assert world.echo.seen == []


async def test_an_approval_is_for_its_own_task_only(hw: World) -> None:
    agent, one = await hw.task(("issues", "write"))
    other_agent, two = await hw.task(("issues", "write"))
    approval = held(await put(hw, agent, one["creds"]["issues:write"]))
    assert (await vote(hw, approval, "bob")).status_code == 200
    # The other task makes exactly the same call: its own approval, not this one.
    assert held(await put(hw, other_agent, two["creds"]["issues:write"])) != approval
    r = await poll(hw, other_agent, approval)
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert (await admin_view(hw, approval))["state"] == "approved"
    r = await put(hw, agent, one["creds"]["issues:write"])
    assert r.status_code == 200, r.text
    assert len(hw.echo.seen) == 1


async def test_an_agent_cannot_approve(hw: World) -> None:
    agent, t = await hw.task(("issues", "write"))
    approval = held(await put(hw, agent, t["creds"]["issues:write"]))
    path = f"/v1/admin/approvals/{approval}/approve"
    for auth in (f"Bearer {agent.identity}", f"DPoP {t['creds']['issues:write']}"):
        r = await hw.live.http.post(
            path,
            json={"as_owner": "bob", "reason": "me"},
            headers={"Authorization": auth, "DPoP": agent.proof("POST", path)},
        )
        assert (r.status_code, r.json()["code"]) == (401, "invalid_admin_token")
    assert (await admin_view(hw, approval))["state"] == "pending"


async def test_mcp_tools_call_is_held_too(hw: World) -> None:
    agent, t = await hw.task(("tracker", "admin"))
    token = t["creds"]["tracker:admin"]
    async with (
        create_mcp_http_client(auth=DPoPAuth(token, agent.key, hw.live.clock)) as http,
        streamable_http_client(f"{hw.live.base}/tracker", http_client=http) as streams,
        ClientSession(*streams[:2]) as session,
    ):
        await session.initialize()
        with pytest.raises(MCPError) as refused:
            await session.call_tool("wipe", {"project": "WEB"})
        data = refused.value.error.data
        assert data["code"] == "approval_required"
        approval = data["approval_id"]
        assert data["poll"] == f"/v1/approvals/{approval}"
        full = await admin_view(hw, approval)
        assert (full["required"], full["target"], full["summary"]["mcp_tool"]) == (
            2,
            "wipe",
            "wipe",
        )
        assert full["summary"]["arguments"] == {"project": "WEB"}
        assert set(full["summary"]["policies"]) == {
            "admin-needs-approval",
            "destructive-needs-approval",
        }
        assert (await vote(hw, approval, "bob")).status_code == 200
        assert (await vote(hw, approval, "carol")).json()["state"] == "approved"
        result = await session.call_tool("wipe", {"project": "WEB"})
        assert result.content[0].text == "wiped"
        with pytest.raises(MCPError) as refused:
            await session.call_tool("wipe", {"project": "WEB"})
        assert refused.value.error.data["code"] == "approval_required"
        assert refused.value.error.data["approval_id"] != approval
    assert hw.mcp_calls == [{"tool": "wipe", "project": "WEB"}]
    calls = [e for e in await events(hw, t["task"]["id"]) if e.event == "gateway.call"]
    assert [e.decision for e in calls if e.action == "wipe"] == [
        "approval_required",
        "allow",
        "approval_required",
    ]


async def test_a_new_approval_is_announced_by_webhook(tmp_path: Path, clock: FakeClock) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    statuses = [500]

    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=statuses.pop(0) if statuses else 204)

    port = free_port()
    server, task = await serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), port)
    try:
        async with approval_world(
            tmp_path,
            clock,
            webhook_url=f"http://127.0.0.1:{port}/hook",
            webhook_secret=WEBHOOK_SECRET,
        ) as world:
            agent, t = await world.task(("issues", "write"))
            approval = held(await put(world, agent, t["creds"]["issues:write"]))
            webhook = world.live.services.approvals.webhook
            assert webhook is not None
            await asyncio.wait_for(webhook.drain(), 10)
    finally:
        server.should_exit = True
        await task
    assert len(received) == 2  # a 500, then retried
    for headers, body in received:
        assert verify_webhook(
            WEBHOOK_SECRET.encode(),
            headers[SIGNATURE_HEADER.lower()],
            body,
            now=to_epoch(clock.now()),
        )
    message = json.loads(received[-1][1])
    assert approval in message["text"]
    assert "issues.merge (write)" in json.dumps(message["blocks"])


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_fifty_concurrent_retries_consume_one_approval(
    tmp_path: Path, clock: FakeClock, backend: str
) -> None:
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(postgres_schema(postgres_url()))
            if backend == "postgres"
            else f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
        )
        async with approval_world(tmp_path, clock, url=url) as world:
            agent, t = await world.task(("issues", "write"))
            task_id, token = t["task"]["id"], t["creds"]["issues:write"]
            approval = held(await put(world, agent, token))
            assert (await vote(world, approval, "bob")).json()["state"] == "approved"
            answers = await asyncio.gather(*(put(world, agent, token) for _ in range(50)))
            statuses = sorted(r.status_code for r in answers)
            assert statuses == [200] + [403] * 49
            again = {held(r) for r in answers if r.status_code == 403}
            assert len(again) == 1  # every loser waits on one new approval
            assert approval not in again
            assert len(world.echo.seen) == 1
            assert (await admin_view(world, approval))["state"] == "consumed"
            audit = await events(world, task_id)
            assert [e.event for e in audit].count("approval.consumed") == 1
            assert [e.decision for e in audit if e.event == "gateway.call"].count("allow") == 1

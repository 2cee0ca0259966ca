"""Held calls through the SDK: ``ApprovalRequired`` with the approval's id, a person
deciding through the admin API, and ``retry_when_approved`` sending the very same call
once — over MCP (the official client) and over HTTP; a deny and a timeout reach the agent
as typed errors. The default policy pack holds every admin-tier call, with a quorum of two
approvers (bob and carol; alice, the agent's owner, may not decide)."""

from __future__ import annotations

import asyncio
import time

import pytest

from taskbound.sdk import ApprovalDenied, ApprovalRequired, Client
from tests.gateway.conftest import World
from tests.sdk.conftest import INTENT, REPO, admin_get, calls_of, vote


async def approve(world: World, approval_id: str) -> None:
    """The admin tier's quorum: two approvers, neither the agent's owner."""
    assert (await vote(world, approval_id, "bob"))["state"] == "pending"
    assert (await vote(world, approval_id, "carol"))["state"] == "approved"


async def test_an_mcp_call_held_for_approval_goes_through_once(
    world: World, client: Client
) -> None:
    scopes = [("tracker", "read"), ("tracker", "admin")]
    async with client.task(
        "clean up WEB", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as task:
        async with task.mcp("tracker", "read") as session:
            tools = await session.list_tools()
            assert [t.name for t in tools.tools] == ["search"]  # only what this credential may
            found = await session.call_tool("search", {"project": "WEB", "query": "crash"})
            assert "3 issues in WEB" in found.content[0].text

        async with task.mcp("tracker", "admin") as session:
            with pytest.raises(ApprovalRequired) as refused:
                await session.call_tool("wipe", {"project": "WEB"})
            held = refused.value
            assert held.approval_id.startswith("apr_")
            assert held.poll == f"/v1/approvals/{held.approval_id}"
            assert (held.code, held.status) == ("approval_required", 403)
            assert world.mcp_calls == [{"tool": "search", "project": "WEB", "query": "crash"}]
            view = await admin_get(world, f"/v1/approvals/{held.approval_id}")
            assert (view["state"], view["target"], view["required"]) == ("pending", "wipe", 2)
            assert view["summary"]["arguments"] == {"project": "WEB"}

            await approve(world, held.approval_id)
            result = await task.retry_when_approved(held, within=5)
            assert result.content[0].text == "wiped"
            view = await admin_get(world, f"/v1/approvals/{held.approval_id}")
            assert view["state"] == "consumed"

            with pytest.raises(ApprovalRequired) as again:  # good for one call only
                await session.call_tool("wipe", {"project": "WEB"})
            assert again.value.approval_id != held.approval_id
    assert [c["tool"] for c in world.mcp_calls] == ["search", "wipe"]
    wipes = [c["decision"] for c in await calls_of(world, task.id) if c["action"] == "wipe"]
    assert wipes == ["approval_required", "allow", "approval_required"]


async def test_an_http_call_held_for_approval_goes_through_once(
    world: World, client: Client
) -> None:
    scopes = [("issues", "admin")]
    async with (
        client.task(
            "retire acme/web", on_behalf_of="alice", scopes=scopes, constraints=INTENT
        ) as task,
        task.http("issues") as issues,
    ):
        with pytest.raises(ApprovalRequired) as refused:
            await issues.delete(REPO, params={"confirm": "yes"}, headers={"X-Why": "retired"})
        held = refused.value
        assert world.echo.seen == []
        # The agent waits while the people decide.
        retried = asyncio.create_task(task.retry_when_approved(held, within=10))
        await asyncio.sleep(0.2)
        assert not retried.done()
        await approve(world, held.approval_id)
        r = await asyncio.wait_for(retried, 10)
        assert r.status_code == 200, r.text
        assert [(s["method"], s["path"], s["query"]) for s in world.echo.seen] == [
            ("DELETE", "/api/repos/acme/web", "confirm=yes")
        ]
        assert world.echo.seen[0]["headers"]["x-why"] == "retired"  # the same call, as sent

        with pytest.raises(ApprovalRequired) as again:
            await held.resend()  # type: ignore[misc]
        assert again.value.approval_id != held.approval_id
        with pytest.raises(ApprovalRequired) as other:  # another query is another call
            await issues.delete(REPO, params={"confirm": "no"})
        assert other.value.approval_id not in (held.approval_id, again.value.approval_id)
    assert len(world.echo.seen) == 1
    deletes = [c["decision"] for c in await calls_of(world, task.id)]
    assert deletes == ["approval_required", "allow", "approval_required", "approval_required"]


async def test_a_held_call_can_be_retried_after_its_client_is_closed(
    world: World, client: Client
) -> None:
    scopes = [("issues", "admin")]
    async with client.task(
        "retire", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as task:
        with pytest.raises(ApprovalRequired) as refused:
            async with task.http("issues") as issues:
                await issues.delete(REPO)
        assert issues.is_closed
        await approve(world, refused.value.approval_id)
        r = await task.retry_when_approved(refused.value, within=5)
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "path": "/api/repos/acme/web"}
    assert [s["method"] for s in world.echo.seen] == ["DELETE"]


async def test_a_denied_approval_reaches_the_agent(world: World, client: Client) -> None:
    scopes = [("issues", "admin")]
    async with (
        client.task("retire", on_behalf_of="alice", scopes=scopes, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        with pytest.raises(ApprovalRequired) as refused:
            await issues.delete(REPO)
        held = refused.value
        waiting = asyncio.create_task(task.wait_for_approval(held, within=10))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await vote(world, held.approval_id, "bob", "deny", reason="not during the freeze")
        with pytest.raises(ApprovalDenied) as denied:
            await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started < 3  # woken by the decision, not by a timeout
        assert (denied.value.state, denied.value.reason) == ("denied", "not during the freeze")
        assert denied.value.approval_id == held.approval_id
        assert denied.value.code == "approval_denied"
        with pytest.raises(ApprovalDenied):
            await task.retry_when_approved(held, within=5)
    assert world.echo.seen == []


async def test_waiting_for_a_pending_approval_times_out(world: World, client: Client) -> None:
    scopes = [("issues", "admin")]
    async with (
        client.task("retire", on_behalf_of="alice", scopes=scopes, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        with pytest.raises(ApprovalRequired) as refused:
            await issues.delete(REPO)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="still pending"):
            await task.wait_for_approval(refused.value, within=1)
        assert 0.9 < time.monotonic() - started < 1.8  # at the deadline, not a second later
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await task.retry_when_approved(refused.value, within=0.3)
        assert 0.25 < time.monotonic() - started < 1
        view = await admin_get(world, f"/v1/approvals/{refused.value.approval_id}")
        assert view["state"] == "pending"
    assert world.echo.seen == []

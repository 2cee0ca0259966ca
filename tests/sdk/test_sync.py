"""``SyncClient`` from plain synchronous code: the agent's code runs in a worker thread
(``asyncio.to_thread``), as it would in a program without an event loop, while the live
server runs on the test's loop."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import pytest

from taskbound.sdk import ApprovalRequired, Delegation, SyncClient, Unauthorized
from tests.gateway.conftest import World
from tests.sdk.conftest import (
    HELPER,
    INTENT,
    LIST,
    REPO,
    identity,
    raw_call,
    task_state,
    vote,
)

READ = [("issues", "read")]


class Boom(Exception):
    pass


async def test_a_task_from_synchronous_code(world: World) -> None:
    source = identity(world)

    def agent() -> tuple[str, int, dict[str, Any], str]:
        with (
            SyncClient(world.live.base, identity=source) as tb,
            tb.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        ):
            with task.http("issues") as issues:
                r = issues.get(LIST)
            assert task.granted[0]["tool"] == "issues"
            assert task.state()["state"] == "active"
            return task.id, r.status_code, r.json(), repr(task._holder)

    def started() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if not t.daemon}

    await asyncio.to_thread(lambda: None)  # the worker thread, started beforehand
    threads = started()
    task_id, status, body, shown = await asyncio.to_thread(agent)
    assert (status, body) == (200, {"ok": True, "path": "/api/repos/acme/web/issues"})
    assert await task_state(world, task_id) == "completed"
    assert task_id in shown
    assert started() <= threads  # the client's event loop thread is gone


async def test_leaving_by_an_exception_cancels_from_synchronous_code(world: World) -> None:
    source = identity(world)
    seen: dict[str, Any] = {}
    boom = Boom("sync agent failed")

    def agent() -> None:
        with SyncClient(world.live.base, identity=source) as tb:
            try:
                with tb.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task:
                    seen.update(id=task.id, token=task.credential("issues"), holder=task._holder)
                    issues = task.http("issues")
                    assert issues.get(LIST).status_code == 200
                    raise boom
            finally:
                with pytest.raises(Unauthorized):  # the client made inside, reused
                    issues.get(LIST)
                issues.close()

    with pytest.raises(Boom) as raised:
        await asyncio.to_thread(agent)
    assert raised.value is boom
    assert await task_state(world, seen["id"]) == "cancelled"
    r = await raw_call(world, "GET", f"/issues{LIST}", seen["token"], seen["holder"]._key.proof)
    assert (r.status_code, r.json()["code"]) == (401, "invalid_token")
    assert len(world.echo.seen) == 1


async def test_an_approval_from_synchronous_code(world: World) -> None:
    source = identity(world)
    held: queue.Queue[str] = queue.Queue()

    def agent() -> tuple[str, int, int]:
        with (
            SyncClient(world.live.base, identity=source) as tb,
            tb.task(
                "retire", on_behalf_of="alice", scopes=[("issues", "admin")], constraints=INTENT
            ) as task,
            task.http("issues") as issues,
        ):
            try:
                issues.delete(REPO)
            except ApprovalRequired as refused:
                held.put(refused.approval_id)
                r = task.retry_when_approved(refused, within=10)
            with pytest.raises(ApprovalRequired):
                issues.delete(REPO)  # good for one call only
            return task.id, r.status_code, len(world.echo.seen)

    running = asyncio.create_task(asyncio.to_thread(agent))
    approval_id = await asyncio.to_thread(held.get, timeout=10)
    assert world.echo.seen == []
    await vote(world, approval_id, "bob")
    await vote(world, approval_id, "carol")
    task_id, status, calls = await asyncio.wait_for(running, 15)
    assert (status, calls) == (200, 1)
    assert await task_state(world, task_id) == "completed"


async def test_a_delegation_between_synchronous_agents(world: World) -> None:
    parent, child = identity(world), identity(world, HELPER)

    def agent() -> tuple[int, str, str]:
        with (
            SyncClient(world.live.base, identity=parent) as tb,
            tb.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        ):
            handoff = task.delegate("issues", actions=["list_issues"]).to_json()
            with SyncClient(world.live.base, identity=child) as sub:
                delegated = sub.accept(Delegation.from_json(handoff))
                with delegated.http("issues") as issues:
                    status = issues.get(LIST).status_code
                return status, delegated.jkt, task.jkt

    status, child_jkt, parent_jkt = await asyncio.to_thread(agent)
    assert status == 200
    assert child_jkt != parent_jkt

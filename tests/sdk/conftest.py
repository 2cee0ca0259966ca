"""A real server on loopback for the SDK: the gateway's test world (an HTTP tool and an MCP
tracker tool behind a live taskbound) on the wall clock, since the SDK signs its proofs
with the real time, as agents do.

The HTTP tool here echoes what it received like the gateway tests' one, and also answers
with its own errors on request (``?status=NNN``), so tests can tell a tool's own answer
from a refusal by the gateway. Besides the gateway registry, two approvers (bob, carol)
and a sub-agent (``HELPER``) are registered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskbound.core.clock import FakeClock
from taskbound.sdk import Client, DevIssuer
from tests.api.conftest import AGENT, free_port, make_settings, start_live
from tests.gateway.conftest import Echo, World, mcp_server, registry, serve

#: A sub-agent of alice's, for delegation.
HELPER = "spiffe://taskbound.local/agents/helper"
#: Another sub-agent of alice's, with the same ceiling as ``HELPER``.
OTHER = "spiffe://taskbound.local/agents/other"
#: An agent of another owner (bob), with the same ceiling as ``HELPER``.
STRANGER = "spiffe://taskbound.local/agents/stranger"

INTENT = {"org": "acme", "repo": "web", "project": "WEB", "tiers": ["read", "write", "admin"]}
LIST = "/repos/acme/web/issues"
REPO = "/repos/acme/web"


class WallClock(FakeClock):
    """The real time, for a server that SDK clients talk to."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def advance(self, seconds: float) -> datetime:
        raise AssertionError("the wall clock cannot be moved")


def tool_app(echo: Echo) -> Starlette:
    """The HTTP tool: echoes the call, or answers ``?status=NNN`` with that status and a
    problem body of its own (``?forge=code`` imitates a gateway refusal)."""

    async def everything(request: Request) -> Response:
        body = await request.body()
        echo.seen.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": body.decode(errors="replace"),
            }
        )
        status = int(request.query_params.get("status", "200"))
        if status == 200:
            return JSONResponse(
                {"ok": True, "path": request.url.path}, headers={"X-Upstream": "echo"}
            )
        forged = request.query_params.get("forge")
        kind = f"https://taskbound.dev/problems/{forged}" if forged else "https://tool.example/oops"
        problem = {"type": kind, "title": "the tool's own", "status": status}
        headers = {"X-Upstream": "echo"}
        if forged:
            problem["code"] = forged
            headers["Taskbound-Refusal"] = forged  # the gateway's mark, imitated too
        return JSONResponse(problem, status, media_type="application/problem+json", headers=headers)

    return Starlette(
        routes=[Route("/{path:path}", everything, methods=["GET", "POST", "DELETE", "PUT"])]
    )


HELPER_CEILING = [
    {"tool": "issues", "tier": "read"},
    {"tool": "issues", "tier": "write"},
    {"tool": "tracker", "tier": "read"},
]
PEOPLE: dict[str, Any] = {
    "owners": [
        {"id": "bob", "contact": "bob@example.com", "roles": ["approver"]},
        {"id": "carol", "contact": "carol@example.com", "roles": ["approver"]},
    ],
    "agents": [
        {"spiffe_id": HELPER, "owner": "alice", "ceiling": HELPER_CEILING},
        {"spiffe_id": OTHER, "owner": "alice", "ceiling": HELPER_CEILING},
        {"spiffe_id": STRANGER, "owner": "bob", "ceiling": HELPER_CEILING},
    ],
}


async def open_sdk_world(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[World]:
    """The tools (HTTP, MCP) and a live server on the wall clock with their registry, the
    approvers and the sub-agents; ``sections`` override settings (``gateway={...}``…).
    Everything starts and stops concurrently: a world is set up for nearly every test."""
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    calls: list[dict[str, Any]] = []
    mcp_port = free_port()
    servers = await asyncio.gather(
        serve(tool_app(echo), int(echo.base.rsplit(":", 1)[1])),
        serve(mcp_server(calls).streamable_http_app(stateless_http=True), mcp_port),
    )
    live_gen = start_live(make_settings(tmp_path, **sections), WallClock(), registry=False)
    try:
        live = await live_gen.__anext__()
        tools = registry(echo.base, f"http://127.0.0.1:{mcp_port}/mcp", live.base)
        for doc in (tools, PEOPLE):
            r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert r.status_code == 200, r.text
        # On the wall clock the revocation feed must be followed, as a serving gateway
        # does: confirmed only once at start, it would be stale (503) after five seconds.
        live.services.revocations.start()
        yield World(live, echo, calls)
    finally:
        for server, _ in servers:
            server.should_exit = True
        await live_gen.aclose()
        for _, task in servers:
            with contextlib.suppress(Exception):
                await task


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async for w in open_sdk_world(tmp_path):
        yield w


def identity(world: World, spiffe_id: str = AGENT) -> DevIssuer:
    return DevIssuer(world.live.base, world.live.admin_token, spiffe_id)


@pytest.fixture
async def client(world: World) -> AsyncIterator[Client]:
    async with Client(world.live.base, identity=identity(world)) as c:
        yield c


# --- what a person (or an operator) does, through the admin API -------------------------


async def admin_get(world: World, path: str) -> Any:
    r = await world.live.http.get(path, headers=world.live.admin)
    assert r.status_code == 200, r.text
    return r.json()


async def task_state(world: World, task_id: str) -> str:
    """The task's state as an operator sees it."""
    return str((await admin_get(world, f"/v1/tasks/{task_id}"))["state"])


async def credentials_of(world: World, task_id: str) -> list[dict[str, Any]]:
    return list((await admin_get(world, f"/v1/admin/tasks/{task_id}/credentials"))["credentials"])


async def calls_of(world: World, task_id: str) -> list[dict[str, Any]]:
    """The task's ``gateway.call`` audit records, oldest first."""
    found = await admin_get(world, f"/v1/admin/audit?task={task_id}&limit=1000")
    return [r for r in found["records"] if r["event"] == "gateway.call"]


async def vote(
    world: World, approval_id: str, who: str, verb: str = "approve", reason: str = "checked"
) -> dict[str, Any]:
    r = await world.live.http.post(
        f"/v1/admin/approvals/{approval_id}/{verb}",
        json={"as_owner": who, "reason": reason},
        headers=world.live.admin,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait (bounded) until ``check`` holds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "still not so after the wait"
        await asyncio.sleep(0.02)


async def raw_call(
    world: World, method: str, path: str, token: str, proof: Callable[..., str]
) -> httpx.Response:
    """A call through the gateway with no SDK in the way: the credential and a proof made
    with ``proof`` (the holder's key: ``holder._key.proof``)."""
    url = f"{world.live.base}{path}"
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof(method, url, access_token=token)}
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.request(method, url, headers=headers)

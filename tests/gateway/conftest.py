"""Real upstreams behind the gateway: an HTTP service that echoes what it received, and an
MCP server built with the official `mcp` SDK; both on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from taskbound.core.clock import FakeClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import PrivateKey
from tests.api.conftest import AGENT, Agent, Live, free_port, make_settings, start_live

UPSTREAM_SECRET = "Bearer upstream-secret-only-the-gateway-holds"


@dataclass
class Echo:
    base: str
    seen: list[dict[str, Any]] = field(default_factory=list)


async def serve(app: Any, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "upstream failed to start"
        await asyncio.sleep(0.01)
    return server, task


def echo_app(echo: Echo) -> Starlette:
    async def everything(request: Request) -> JSONResponse:
        body = await request.body()
        seen = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
        }
        echo.seen.append(seen)
        return JSONResponse({"ok": True, "path": request.url.path}, headers={"X-Upstream": "echo"})

    return Starlette(
        routes=[Route("/{path:path}", everything, methods=["GET", "POST", "DELETE", "PUT"])]
    )


def mcp_server(calls: list[dict[str, Any]]) -> MCPServer:
    server = MCPServer("tracker")

    @server.tool()
    def search(project: str, query: str = "") -> str:
        """Search issues in a project."""
        calls.append({"tool": "search", "project": project, "query": query})
        return f"3 issues in {project} matching {query!r}"

    @server.tool()
    def create_issue(project: str, title: str) -> str:
        """Create an issue."""
        calls.append({"tool": "create_issue", "project": project, "title": title})
        return f"created {title!r} in {project}"

    @server.tool()
    def wipe(project: str) -> str:
        """Delete every issue of a project."""
        calls.append({"tool": "wipe", "project": project})
        return "wiped"

    return server


def registry(echo_base: str, mcp_base: str, gateway_base: str) -> dict[str, Any]:
    return {
        "owners": [{"id": "alice", "contact": "alice@example.com", "roles": ["approver"]}],
        "tools": [
            {
                "id": "issues",
                "audience": f"{gateway_base}/issues",
                "upstream_url": f"{echo_base}/api",
                "kind": "http",
                "upstream_secret": UPSTREAM_SECRET,
                "actions": [
                    {
                        "name": "list_issues",
                        "tier": "read",
                        "method": "GET",
                        "path": "/repos/{org}/{repo}/issues",
                    },
                    {
                        "name": "create_issue",
                        "tier": "write",
                        "method": "POST",
                        "path": "/repos/{org}/{repo}/issues",
                    },
                    {
                        "name": "delete_repo",
                        "tier": "admin",
                        "method": "DELETE",
                        "path": "/repos/{org}/{repo}",
                    },
                ],
            },
            {
                "id": "tracker",
                "audience": f"{gateway_base}/tracker",
                "upstream_url": mcp_base,
                "kind": "mcp",
                "upstream_auth_header": "X-Api-Key",
                "upstream_secret": "tracker-key-only-the-gateway-holds",
                "actions": [
                    {
                        "name": "search",
                        "tier": "read",
                        "mcp_tool": "search",
                        "input_schema": {
                            "type": "object",
                            "properties": {
                                "project": {"type": "string"},
                                "query": {"type": "string"},
                            },
                            "required": ["project"],
                        },
                    },
                    {
                        "name": "create_issue",
                        "tier": "write",
                        "mcp_tool": "create_issue",
                        "input_schema": {
                            "type": "object",
                            "properties": {
                                "project": {"type": "string"},
                                "title": {"type": "string"},
                            },
                            "required": ["project", "title"],
                        },
                    },
                    {
                        "name": "wipe",
                        "tier": "admin",
                        "mcp_tool": "wipe",
                        "risk": "high",
                        "input_schema": {
                            "type": "object",
                            "properties": {"project": {"type": "string"}},
                            "required": ["project"],
                        },
                    },
                ],
            },
        ],
        "agents": [
            {
                "spiffe_id": AGENT,
                "owner": "alice",
                "ceiling": [
                    {"tool": "issues", "tier": "read"},
                    {"tool": "issues", "tier": "write"},
                    {"tool": "issues", "tier": "admin"},
                    {"tool": "tracker", "tier": "read"},
                    {"tool": "tracker", "tier": "write"},
                    {"tool": "tracker", "tier": "admin"},
                ],
            }
        ],
    }


@dataclass
class World:
    live: Live
    echo: Echo
    mcp_calls: list[dict[str, Any]]

    async def task(self, *scopes: tuple[str, str], **intent: Any) -> tuple[Agent, dict[str, Any]]:
        agent = await self.live.agent()
        constraints = {
            "org": "acme",
            "repo": "web",
            "project": "WEB",
            "tiers": ["read", "write", "admin"],
        }
        constraints.update(intent)
        r = await agent.start(
            intent={"purpose": "gateway test", "constraints": constraints},
            scopes=[{"tool": t, "tier": tier} for t, tier in scopes],
        )
        assert r.status_code == 201, r.text
        task = r.json()
        creds = {f"{c['tool']}:{c['tier']}": c["access_token"] for c in task["credentials"]}
        return agent, {"task": task, "creds": creds}


@pytest.fixture
async def world(tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async for world in open_world(tmp_path, clock):
        yield world


async def open_world(
    tmp_path: Path,
    clock: FakeClock,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[World]:
    """The upstreams (HTTP echo, MCP tracker) and a live server with their registry
    (changed by ``edit`` before it is applied, when given)."""
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    calls: list[dict[str, Any]] = []
    mcp_port = free_port()
    servers = [
        await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1])),
        await serve(mcp_server(calls).streamable_http_app(stateless_http=True), mcp_port),
    ]
    settings = make_settings(tmp_path, **sections)
    try:
        async for live in start_live(settings, clock, registry=False):
            doc = registry(echo.base, f"http://127.0.0.1:{mcp_port}/mcp", live.base)
            if edit is not None:
                edit(doc)
            r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert r.status_code == 200, r.text
            yield World(live, echo, calls)
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task


class DPoPAuth(httpx2.Auth):
    """What the SDK will do: the credential as `DPoP` and a fresh proof per request."""

    def __init__(self, token: str, key: PrivateKey, clock: FakeClock) -> None:
        self.token, self.key, self.clock = token, key, clock

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        url = str(request.url).split("?", 1)[0]
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = make_dpop_proof(
            self.key,
            method=request.method,
            url=url,
            now=self.clock.now(),
            jti=secrets.token_urlsafe(16),
            access_token=self.token,
        )
        yield request


def call_headers(agent: Agent, token: str, method: str, path: str, **kw: Any) -> dict[str, str]:
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": agent.proof(method, path, access_token=token, **kw),
    }


__all__ = [
    "UPSTREAM_SECRET",
    "DPoPAuth",
    "World",
    "call_headers",
    "free_port",
    "open_world",
    "registry",
]

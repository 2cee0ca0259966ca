"""An MCP server built with the official SDK, driven through the gateway by the official
MCP client: tools/list is filtered to the credential, allowed calls work, out-of-tier and
out-of-constraint calls come back as JSON-RPC errors the client can read."""

from __future__ import annotations

import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from mcp.shared.exceptions import MCPError

from .conftest import DPoPAuth, World


async def test_official_client_through_the_gateway(world: World) -> None:
    agent, t = await world.task(("tracker", "read"), ("tracker", "write"))
    read = t["creds"]["tracker:read"]
    url = f"{world.live.base}/tracker"
    # Connect to this server's own port, while proofs name the public URL (they are equal here).
    async with (
        create_mcp_http_client(auth=DPoPAuth(read, agent.key, world.live.clock)) as http,
        streamable_http_client(url, http_client=http) as streams,
        ClientSession(*streams[:2]) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        assert [tool.name for tool in tools.tools] == [
            "search"
        ]  # only what this credential may call
        result = await session.call_tool("search", {"project": "WEB", "query": "crash"})
        assert "3 issues in WEB" in result.content[0].text
        with pytest.raises(MCPError) as refused:
            await session.call_tool("create_issue", {"project": "WEB", "title": "x"})
        assert refused.value.error.data["code"] == "insufficient_scope"
        with pytest.raises(MCPError) as refused:
            await session.call_tool("search", {"project": "PAYROLL"})
        assert refused.value.error.data["code"] == "policy_denied"
    assert [c["tool"] for c in world.mcp_calls] == ["search"]
    write = t["creds"]["tracker:write"]
    async with (
        create_mcp_http_client(auth=DPoPAuth(write, agent.key, world.live.clock)) as http,
        streamable_http_client(url, http_client=http) as streams,
        ClientSession(*streams[:2]) as session,
    ):
        await session.initialize()
        assert [tool.name for tool in (await session.list_tools()).tools] == ["create_issue"]
        result = await session.call_tool("create_issue", {"project": "WEB", "title": "bug"})
        assert "created 'bug'" in result.content[0].text
    events = [e for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])]
    assert {(e.action, e.decision) for e in events} >= {
        ("search", "allow"),
        ("create_issue", "deny"),
        ("create_issue", "allow"),
    }


async def test_admin_mcp_call_waits_for_approval(world: World) -> None:
    agent, t = await world.task(("tracker", "admin"))
    admin = t["creds"]["tracker:admin"]
    async with (
        create_mcp_http_client(auth=DPoPAuth(admin, agent.key, world.live.clock)) as http,
        streamable_http_client(f"{world.live.base}/tracker", http_client=http) as streams,
        ClientSession(*streams[:2]) as session,
    ):
        await session.initialize()
        with pytest.raises(MCPError) as refused:
            await session.call_tool("wipe", {"project": "WEB"})
        assert refused.value.error.data["code"] == "approval_required"
    assert world.mcp_calls == []

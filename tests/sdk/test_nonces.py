"""DPoP server nonces (RFC 9449 §8) with a gateway that requires them
(``gateway.require_dpop_nonce``): the SDK's first call is answered ``use_dpop_nonce``
with a nonce, the SDK sends it again once with the nonce, and uses that nonce from then
on — over HTTP and MCP — without the agent's code seeing any of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from taskbound.sdk import Client, Refused, SyncClient
from tests.gateway.conftest import World
from tests.sdk.conftest import INTENT, LIST, calls_of, identity, open_sdk_world


@pytest.fixture
async def nonce_world(tmp_path: Path) -> AsyncIterator[World]:
    async for world in open_sdk_world(tmp_path, gateway={"require_dpop_nonce": True}):
        yield world


def counting(sent: list[httpx.Request]) -> dict[str, list[object]]:
    async def count(request: httpx.Request) -> None:
        sent.append(request)

    return {"request": [count]}


async def test_http_calls_learn_and_reuse_the_gateways_nonce(nonce_world: World) -> None:
    world = nonce_world
    sent: list[httpx.Request] = []
    async with (
        Client(world.live.base, identity=identity(world)) as client,
        client.task(
            "t", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
        ) as task,
        task.http("issues", event_hooks=counting(sent)) as issues,
    ):
        r = await issues.get(LIST)
        assert r.status_code == 200, r.text
        assert len(sent) == 2  # refused for want of a nonce, then again with it
        r = await issues.get(LIST)
        assert r.status_code == 200, r.text
        assert len(sent) == 3  # the nonce is kept: no refusal this time

        # A nonce the gateway no longer takes: told the new one, the SDK sends once more.
        origin = next(iter(task._key._nonces))
        task._key._nonces[origin] = "stale-nonce"
        r = await issues.get(LIST)
        assert r.status_code == 200, r.text
        assert len(sent) == 5

        # A refusal that is not about the nonce still raises, after no extra attempt.
        with pytest.raises(Refused) as refused:
            await issues.post(LIST, json={"title": "x"})
        assert refused.value.code == "insufficient_scope"
        assert len(sent) == 6
    decisions = [(c["decision"], c["code"]) for c in await calls_of(world, task.id)]
    assert decisions == [
        ("deny", "use_dpop_nonce"),
        ("allow", None),
        ("allow", None),
        ("deny", "use_dpop_nonce"),
        ("allow", None),
        ("deny", "insufficient_scope"),
    ]
    assert len(world.echo.seen) == 3


async def test_mcp_sessions_work_with_nonces(nonce_world: World) -> None:
    world = nonce_world
    async with (
        Client(world.live.base, identity=identity(world)) as client,
        client.task(
            "t", on_behalf_of="alice", scopes=[("tracker", "read")], constraints=INTENT
        ) as task,
        task.mcp("tracker") as session,
    ):
        assert [t.name for t in (await session.list_tools()).tools] == ["search"]
        found = await session.call_tool("search", {"project": "WEB"})
        assert "3 issues in WEB" in found.content[0].text
    assert world.mcp_calls == [{"tool": "search", "project": "WEB", "query": ""}]
    refused = [c for c in await calls_of(world, task.id) if c["code"] == "use_dpop_nonce"]
    assert len(refused) == 1  # once per task key, not once per request


async def test_synchronous_calls_learn_the_nonce_too(nonce_world: World) -> None:
    world = nonce_world
    source = identity(world)
    sent: list[httpx.Request] = []

    def count(request: httpx.Request) -> None:
        sent.append(request)

    def agent() -> list[int]:
        with (
            SyncClient(world.live.base, identity=source) as tb,
            tb.task(
                "t", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
            ) as task,
            task.http("issues", event_hooks={"request": [count]}) as issues,
        ):
            return [issues.get(LIST).status_code for _ in range(2)]

    assert await asyncio.to_thread(agent) == [200, 200]
    assert len(sent) == 3

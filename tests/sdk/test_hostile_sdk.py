"""Hostile review of the agent SDK: each test shows a real problem and is marked
``xfail(strict=True)`` until it is fixed (then the mark goes).

The first tests need no server: a ``Task`` is made from a broker answer by hand and its
HTTP client talks to an ``httpx.MockTransport`` standing in for the gateway. The others
run against the live world of ``tests/sdk/conftest.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import tests.sdk.conftest as sdk_conftest
from taskbound.core.dpop import normalize_htu
from taskbound.sdk import Client, StaticToken, TaskboundClientError
from taskbound.sdk._dpop import DPoPKey, check_destination
from taskbound.sdk.client import Task
from taskbound.sdk.errors import ApprovalRequired
from taskbound.sdk.sync import SyncHolder
from tests.gateway.conftest import Echo, World
from tests.sdk.conftest import HELPER, INTENT, LIST, identity, open_sdk_world, task_state

GW = "http://gw.example"
SECRET = "the-issues-credential"


def offline_task() -> Task:
    """A task holding an issues:read credential, as the broker would have answered."""
    client = Client(GW, identity=StaticToken("identity"))
    body = {
        "id": "t-1",
        "credentials": [
            {"tool": "issues", "tier": "read", "access_token": SECRET, "expires_in": 600}
        ],
    }
    return Task(client, DPoPKey(), body)


def redirecting(location: str, seen: list[httpx.Request]) -> httpx.MockTransport:
    """A gateway that answers the first request with a redirect to ``location``."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(307, headers={"Location": location})
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handle)


REDIRECTS = [
    f"{GW}/tracker/mcp",  # another tool at the same gateway: Authorization is kept
    f"{GW}/v1/admin/tasks",  # the broker's admin API on the same origin
    "http://evil.example/collect",  # another host: httpx drops Authorization, not DPoP
]


def leaked(seen: list[httpx.Request]) -> list[tuple[str, list[str]]]:
    """Requests after the first that left the tool carrying the credential or a proof."""
    out = []
    for r in seen[1:]:
        try:
            check_destination(str(r.url), f"{GW}/issues")
            continue
        except TaskboundClientError:
            pass
        carried = [h for h in ("authorization", "dpop") if h in r.headers]
        if carried:
            out.append((str(r.url), carried))
    return out


# --- 1. redirects are followed without the destination check ----------------------------


@pytest.mark.parametrize("location", REDIRECTS)
async def test_hostile_a_redirect_cannot_carry_the_credential_out_of_the_tool(
    location: str,
) -> None:
    task = offline_task()
    seen: list[httpx.Request] = []
    # Following redirects is refused outright: httpx would not sign again.
    with pytest.raises(TypeError, match="never follows redirects"):
        task.http("issues", follow_redirects=True)
    async with task.http("issues", transport=redirecting(location, seen)) as issues:
        r = await issues.get(LIST)  # the redirect comes back as it is, unfollowed
    assert r.is_redirect
    assert len(seen) == 1
    assert leaked(seen) == []


@pytest.fixture
def portal() -> Iterator[Any]:
    with start_blocking_portal() as p:
        yield p


def test_hostile_a_redirect_cannot_carry_the_credential_out_of_the_tool_sync(
    portal: Any,
) -> None:
    holder = SyncHolder(portal, portal.call(_offline_task_async))
    seen: list[httpx.Request] = []
    with pytest.raises(TypeError, match="never follows redirects"):
        holder.http("issues", follow_redirects=True)
    with holder.http("issues", transport=redirecting(REDIRECTS[0], seen)) as issues:
        r = issues.get(LIST)
    assert r.is_redirect
    assert len(seen) == 1
    assert leaked(seen) == []


async def _offline_task_async() -> Task:
    return offline_task()


# --- 2. percent-encoded dot segments pass the destination check -------------------------


ENCODED = [
    f"{GW}/issues/%2e%2e/tracker/mcp",
    f"{GW}/issues/%2E%2E/v1/admin/tasks",
    f"{GW}/issues/.%2e/tracker/mcp",
]


@pytest.mark.parametrize("url", ENCODED)
async def test_hostile_encoded_dot_segments_are_outside_the_tool(url: str) -> None:
    # The SDK itself signs the proof for this URL as if it were another tool's:
    assert not normalize_htu(url).startswith(f"{GW}/issues/")
    task = offline_task()
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    async with task.http("issues", transport=httpx.MockTransport(handle)) as issues:
        with pytest.raises(TaskboundClientError) as refused:
            await issues.get(url)
        assert refused.value.code == "wrong_destination"
    assert seen == []


# --- 3. the re-sent held call is not the held call ---------------------------------------


async def test_hostile_resend_sends_exactly_the_held_call() -> None:
    task = offline_task()
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            problem = {
                "type": "https://taskbound.dev/problems/approval_required",
                "code": "approval_required",
                "approval_id": "ap-1",
            }
            return httpx.Response(
                403,
                json=problem,
                headers={
                    "Taskbound-Refusal": "approval_required",
                    "Content-Type": "application/problem+json",
                },
            )
        return httpx.Response(200)

    async with task.http(
        "issues", params={"repo": "web"}, transport=httpx.MockTransport(handle)
    ) as issues:
        with pytest.raises(ApprovalRequired) as held:
            await issues.get(LIST, params={"repo": "api"})
        assert held.value.resend is not None
        await held.value.resend()
    assert str(seen[0].url) == f"{GW}/issues{LIST}?repo=api"
    assert str(seen[1].url) == str(seen[0].url)


# --- 4. an upstream tool drives the SDK's DPoP nonce handling ----------------------------


def nonce_tool_app(echo: Echo) -> Starlette:
    """A tool that answers like a DPoP resource server asking for a nonce (``?ask=1``),
    or hands out a nonce of its own on a success (``?give=1``)."""

    async def everything(request: Request) -> Response:
        echo.seen.append(
            {"method": request.method, "path": request.url.path, "query": request.url.query}
        )
        if request.query_params.get("ask"):
            return JSONResponse(
                {"error": "use_dpop_nonce"},
                401,
                headers={
                    "WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
                    "DPoP-Nonce": f"tool-nonce-{len(echo.seen)}",
                },
            )
        headers = {"DPoP-Nonce": "tool-chosen-nonce"} if request.query_params.get("give") else {}
        return JSONResponse({"ok": True}, headers=headers)

    return Starlette(
        routes=[Route("/{path:path}", everything, methods=["GET", "POST", "DELETE", "PUT"])]
    )


@pytest.fixture
async def nonce_tool_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setattr(sdk_conftest, "tool_app", nonce_tool_app)
    async for w in open_sdk_world(tmp_path):
        yield w


async def test_hostile_a_tool_cannot_make_the_sdk_send_a_call_twice(
    nonce_tool_world: World,
) -> None:
    world = nonce_tool_world
    async with (
        Client(world.live.base, identity=identity(world)) as client,
        client.task(
            "t", on_behalf_of="alice", scopes=[("issues", "write")], constraints=INTENT
        ) as task,
        task.http("issues") as issues,
    ):
        r = await issues.post(LIST, params={"ask": 1}, json={"title": "once"})
        assert r.status_code == 401  # the tool's own answer, passed through
    assert [s["method"] for s in world.echo.seen] == ["POST"]


async def test_hostile_a_tool_cannot_choose_the_gateways_nonce(nonce_tool_world: World) -> None:
    world = nonce_tool_world
    async with (
        Client(world.live.base, identity=identity(world)) as client,
        client.task(
            "t", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
        ) as task,
        task.http("issues") as issues,
    ):
        r = await issues.get(LIST, params={"give": 1})
        assert r.status_code == 200
        assert "tool-chosen-nonce" not in task._key._nonces.values()


# --- 5. the narrowing of a delegation is not bound to the parent's consent ---------------


async def test_hostile_a_delegate_cannot_widen_what_it_was_handed(
    world: World, client: Client
) -> None:
    wide = {**INTENT, "repo": ["web", "api"]}
    async with (
        Client(world.live.base, identity=identity(world, HELPER)) as helper,
        client.task(
            "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=wide
        ) as task,
    ):
        handoff = await task.delegate("issues", "read", constraints={"repo": "web"})
        doc = json.loads(handoff.to_json())
        doc["constraints"] = None  # the sub-agent edits what it was handed
        try:
            delegated = await helper.accept(json.dumps(doc))
        except TaskboundClientError:
            return  # refused: the consent was for the narrower request only
        assert delegated.details["constraints"]["repo"] == "web"


# --- 6. an anyio cancel scope around the client leaves the task running ------------------


async def test_hostile_an_anyio_cancel_scope_still_ends_the_task(world: World) -> None:
    ids: list[str] = []
    base, ident = world.live.base, identity(world)

    def agent() -> None:
        async def main() -> None:
            with anyio.move_on_after(1.0):
                async with (
                    Client(base, identity=ident) as tb,
                    tb.task(
                        "t", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
                    ) as task,
                ):
                    ids.append(task.id)
                    await asyncio.sleep(30)

        asyncio.run(main())

    await asyncio.to_thread(agent)
    await asyncio.sleep(0.5)
    assert await task_state(world, ids[0]) == "cancelled"

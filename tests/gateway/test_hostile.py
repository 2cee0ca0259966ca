"""Everything the gateway must refuse — with the right status and code, nothing reaching
the upstream, and every refusal audited."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskbound.core.keys import generate_key

from .conftest import World, call_headers

LIST = "/issues/repos/acme/web/issues"


async def refused(world: World, r: Any, status: int, code: str, task_id: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert world.echo.seen == []
    if task_id is not None:
        events = [e for _, e in await world.live.services.storage.list_audit(task=task_id)]
        assert events
        assert events[-1].code == code
        assert events[-1].decision == "deny"


async def test_replayed_proof(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    headers = call_headers(agent, token, "GET", LIST)
    assert (await world.live.http.get(LIST, headers=headers)).status_code == 200
    world.echo.seen.clear()
    await refused(
        world,
        await world.live.http.get(LIST, headers=headers),
        401,
        "invalid_dpop_proof",
        t["task"]["id"],
    )


@pytest.mark.parametrize(
    "case", ["other_url", "other_method", "wrong_ath", "other_key", "no_proof", "two_proofs"]
)
async def test_bad_proofs(world: World, case: str) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    headers = call_headers(agent, token, "GET", LIST)
    if case == "other_url":
        headers["DPoP"] = agent.proof("GET", "/issues/repos/acme/web/other", access_token=token)
    elif case == "other_method":
        headers["DPoP"] = agent.proof("POST", LIST, access_token=token)
    elif case == "wrong_ath":
        headers["DPoP"] = agent.proof("GET", LIST, access_token=token + "x")
    elif case == "other_key":
        thief_key = generate_key("EdDSA")
        from .conftest import Agent

        headers["DPoP"] = Agent(world.live, agent.identity, thief_key).proof(
            "GET", LIST, access_token=token
        )
    elif case == "no_proof":
        del headers["DPoP"]
    if case == "two_proofs":
        r = await world.live.http.get(
            LIST,
            headers=[
                ("Authorization", headers["Authorization"]),
                ("DPoP", headers["DPoP"]),
                ("DPoP", agent.proof("GET", LIST, access_token=token)),
            ],
        )
    else:
        r = await world.live.http.get(LIST, headers=headers)
    await refused(world, r, 401, "invalid_dpop_proof", t["task"]["id"])
    assert 'error="invalid_dpop_proof"' in r.headers["www-authenticate"]


async def test_bearer_downgrade(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    headers = call_headers(agent, token, "GET", LIST)
    headers["Authorization"] = f"Bearer {token}"
    r = await world.live.http.get(LIST, headers=headers)
    await refused(world, r, 401, "invalid_token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "resource_metadata=" in r.headers["www-authenticate"]


async def test_credential_for_another_tool(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    token = t["creds"]["tracker:read"]
    await refused(
        world,
        await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST)),
        401,
        "invalid_token",
    )


async def test_expired_and_revoked_credentials(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    r = await agent.call("POST", f"/v1/tasks/{t['task']['id']}/complete")
    assert r.status_code == 200
    r = await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    await refused(world, r, 401, "invalid_token", t["task"]["id"])
    agent2, t2 = await world.task(("issues", "read"))
    token2 = t2["creds"]["issues:read"]
    world.live.clock.advance(601 + 30)
    r = await world.live.http.get(LIST, headers=call_headers(agent2, token2, "GET", LIST))
    await refused(world, r, 401, "invalid_token")


async def test_suspending_the_agent_stops_its_calls_at_once(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    assert (
        await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    ).status_code == 200
    world.echo.seen.clear()
    from tests.api.conftest import AGENT

    spec = {"spiffe_id": AGENT, "owner": "alice", "state": "suspended", "ceiling": []}
    assert (
        await world.live.http.put(f"/v1/admin/agents/{AGENT}", json=spec, headers=world.live.admin)
    ).status_code == 200
    r = await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    await refused(world, r, 401, "invalid_token")


MCP = "/tracker"


async def mcp_post(world: World, agent: Any, token: str, body: bytes, **headers: str) -> Any:
    h = call_headers(agent, token, "POST", MCP)
    h.update({"Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    h.update(headers)
    return await world.live.http.post(MCP, content=body, headers=h)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"jsonrpc": "1.0", "method": "ping", "id": 1}',
        b'{"jsonrpc": "2.0", "id": 1}',
        b'{"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": 5}}',
        b'{"jsonrpc": "2.0", "method": "ping", "id": 1, "id": 2}',
    ],
)
async def test_malformed_jsonrpc(world: World, body: bytes) -> None:
    agent, t = await world.task(("tracker", "read"))
    r = await mcp_post(world, agent, t["creds"]["tracker:read"], body)
    await refused(world, r, 400, "invalid_jsonrpc", t["task"]["id"])
    assert world.mcp_calls == []


async def test_header_body_mismatch(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"project": "WEB"}},
        }
    ).encode()
    r = await mcp_post(
        world,
        agent,
        t["creds"]["tracker:read"],
        body,
        **{"Mcp-Method": "tools/call", "Mcp-Name": "wipe"},
    )
    await refused(world, r, 400, "mcp_header_mismatch", t["task"]["id"])
    assert world.mcp_calls == []


async def test_a_batch_is_decided_per_call(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    body = json.dumps(
        [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "search", "arguments": {"project": "WEB"}},
            },
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "wipe", "arguments": {"project": "WEB"}},
            },
        ]
    ).encode()
    r = await mcp_post(world, agent, t["creds"]["tracker:read"], body)
    # Whatever the upstream answers to the allowed part, the refused call never reaches it.
    assert all(c["tool"] != "wipe" for c in world.mcp_calls)
    events = [e for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])]
    assert any(e.action == "wipe" and e.code == "insufficient_scope" for e in events)
    assert r.status_code < 500


async def test_oversized_body(world: World) -> None:
    agent, t = await world.task(("issues", "write"))
    token = t["creds"]["issues:write"]
    big = b'{"title": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    h = call_headers(agent, token, "POST", LIST)
    h["Content-Type"] = "application/json"
    r = await world.live.http.post(LIST, content=big, headers=h)
    assert r.status_code == 413
    assert world.echo.seen == []


async def test_unknown_tool_is_404_and_audited(world: World) -> None:
    r = await world.live.http.get("/nosuchtool/x")
    assert r.status_code == 404
    assert r.json()["code"] == "unknown_tool"
    events = [e for _, e in await world.live.services.storage.list_audit()]
    assert events[-1].tool == "nosuchtool"


async def test_audit_store_failure_fails_the_call(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]

    async def broken(events: Any) -> list[int]:
        raise OSError("audit disk full")

    monkeypatch.setattr(world.live.services.storage, "append_audits", broken)
    r = await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    assert r.status_code == 503
    assert r.json()["code"] == "audit_unavailable"
    assert "ok" not in r.json()  # the upstream's answer is never returned unrecorded
    r = await world.live.http.get(
        "/issues/repos/evil/web/issues",
        headers=call_headers(agent, token, "GET", "/issues/repos/evil/web/issues"),
    )
    assert r.status_code == 503  # refusals too must be recorded before they are answered

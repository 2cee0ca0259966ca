"""Transaction tokens through the gateway: every forwarded call, HTTP or MCP, carries a
fresh `Txn-Token` that verifies against /.well-known/txn-jwks.json and says which task,
agent and action it is; the agent's own `Txn-Token` never reaches the tool; every audit
record of the task carries its transaction id."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from taskbound.api.app import create_app
from taskbound.core.clock import FakeClock
from taskbound.core.keys import KeyRing
from taskbound.core.model import KeyPurpose
from taskbound.core.txn import InvalidTxnToken, TxnToken, verify_txn_token
from tests.api.conftest import AGENT, make_settings, start_live

from .conftest import UPSTREAM_SECRET, DPoPAuth, Echo, World, call_headers, free_port, mcp_server
from .conftest import registry as base_registry
from .conftest import serve as serve_app

LEEWAY = timedelta(seconds=5)


@dataclass
class Seen:
    """Every request an upstream received, with its headers exactly as sent."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def headers(self, i: int = -1) -> list[tuple[str, str]]:
        return list(self.requests[i]["headers"])

    def txn_tokens(self, i: int = -1) -> list[str]:
        return [v for k, v in self.headers(i) if k == "txn-token"]


def recorded(app: Any, seen: Seen) -> Any:
    """The ASGI app, recording the raw headers of every HTTP request it gets."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.requests.append(
                {
                    "method": scope["method"],
                    "path": scope["path"],
                    "headers": [(k.decode().lower(), v.decode()) for k, v in scope["headers"]],
                }
            )
        await app(scope, receive, send)

    return asgi


def echo() -> Starlette:
    async def answer(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": True}, headers={"X-Echo-Txn": "hidden"})

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


@dataclass
class TxnWorld(World):
    http_seen: Seen = field(default_factory=Seen)
    mcp_seen: Seen = field(default_factory=Seen)

    async def keys(self) -> KeyRing:
        r = await self.live.http.get("/.well-known/txn-jwks.json")
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "public, max-age=60"
        return KeyRing.from_jwks(r.json())

    async def verify(self, raw: str, tool: str) -> TxnToken:
        return verify_txn_token(
            raw,
            keys=await self.keys(),
            issuer=self.live.base,
            audience=f"{self.live.base}/{tool}",
            algorithms=("EdDSA",),
            now=self.live.clock.now(),
            leeway=LEEWAY,
        )


@pytest.fixture
async def txn_world(tmp_path: Path, clock: FakeClock) -> AsyncIterator[TxnWorld]:
    http_seen, mcp_seen = Seen(), Seen()
    echo_port, mcp_port = free_port(), free_port()
    calls: list[dict[str, Any]] = []
    servers = [
        await serve_app(recorded(echo(), http_seen), echo_port),
        await serve_app(
            recorded(mcp_server(calls).streamable_http_app(stateless_http=True), mcp_seen),
            mcp_port,
        ),
    ]
    echo_base = f"http://127.0.0.1:{echo_port}"
    try:
        async for live in start_live(make_settings(tmp_path), clock, registry=False):
            doc = base_registry(echo_base, f"http://127.0.0.1:{mcp_port}/mcp", live.base)
            # An MCP tool whose upstream is the echo: batches reach it as they are.
            batch_tool = json.loads(json.dumps(doc["tools"][1]))
            batch_tool.update(
                id="batcher", audience=f"{live.base}/batcher", upstream_url=f"{echo_base}/mcp"
            )
            doc["tools"].append(batch_tool)
            doc["agents"][0]["ceiling"].append({"tool": "batcher", "tier": "read"})
            r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert r.status_code == 200, r.text
            yield TxnWorld(live, Echo(echo_base), calls, http_seen, mcp_seen)
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task


async def get_issues(world: TxnWorld, agent: Any, token: str, **headers: str) -> Any:
    path = "/issues/repos/acme/web/issues"
    h = call_headers(agent, token, "GET", path)
    h.update(headers)
    return await world.live.http.get(path, headers=h)


async def test_every_forwarded_call_carries_a_fresh_txn_token(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("issues", "read"))
    task_id = t["task"]["id"]
    token = t["creds"]["issues:read"]
    for _ in range(2):
        r = await get_issues(world, agent, token)
        assert r.status_code == 200, r.text
    first, second = (world.http_seen.txn_tokens(i) for i in (0, 1))
    assert len(first) == len(second) == 1
    assert first != second  # a fresh token per call
    events = [
        e
        for _, e in await world.live.services.storage.list_audit(task=task_id)
        if e.event == "gateway.call"
    ]
    for raw, event in zip((first[0], second[0]), events, strict=True):
        got = await world.verify(raw, "issues")
        assert got.txn == task_id
        assert got.subject == AGENT
        assert got.scope == "issues:read"
        assert got.audience == f"{world.live.base}/issues"
        assert got.requesting_workload == world.live.base
        assert got.expires_at - got.issued_at == timedelta(seconds=60)
        assert got.tctx == {
            "task": task_id,
            "owner": "alice",
            "intent": "gateway test",
            "tool": "issues",
            "tier": "read",
            "actors": [],
            "action": "list_issues",
            "argument_digest": event.argument_digest,
        }
        assert got.rctx == {"req_ip": "127.0.0.1", "authn": "dpop", "req_wl": world.live.base}
        assert token not in raw
    headers = dict(world.http_seen.headers(0))
    assert headers["authorization"] == UPSTREAM_SECRET  # the tool's secret, still
    assert all(token not in v for _, v in world.http_seen.headers(0))
    # Signed with the transaction key, not the credential key: a credential verifier
    # (keys from /.well-known/jwks.json) does not accept it, nor is it a credential.
    credential_keys = KeyRing.from_jwks(
        (await world.live.http.get("/.well-known/jwks.json")).json()
    )
    with pytest.raises(InvalidTxnToken) as refused:
        verify_txn_token(
            first[0],
            keys=credential_keys,
            issuer=world.live.base,
            audience=f"{world.live.base}/issues",
            algorithms=("EdDSA",),
            now=world.live.clock.now(),
            leeway=LEEWAY,
        )
    assert refused.value.internal == "unknown kid"
    # A Txn-Token for one tool is not accepted as one for another.
    with pytest.raises(InvalidTxnToken) as refused:
        await world.verify(first[0], "tracker")
    assert refused.value.internal == "audience mismatch"


async def test_the_agents_own_txn_token_is_stripped(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."
    r = await get_issues(world, agent, token, **{"Txn-Token": forged})
    assert r.status_code == 200, r.text
    (raw,) = world.http_seen.txn_tokens()
    assert raw != forged
    assert (await world.verify(raw, "issues")).txn == t["task"]["id"]
    assert all(forged not in v for _, v in world.http_seen.headers())
    # (aiohttp would also replace a header of the same name given in another case: the
    # gateway drops the agent's explicitly all the same, whatever the client library does.)
    # Nor is the gateway's token handed back to the agent in the answer.
    assert all(raw not in v for v in r.headers.values())


async def test_audit_records_carry_the_transaction_id(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    assert (await get_issues(world, agent, token)).status_code == 200
    path = "/issues/repos/acme/web/issues"
    refused = await world.live.http.post(
        path, json={"title": "x"}, headers=call_headers(agent, token, "POST", path)
    )
    assert refused.status_code == 403
    events = [e for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])]
    calls = [e for e in events if e.event == "gateway.call"]
    assert [e.decision for e in calls] == ["allow", "deny"]
    assert {e.txn for e in calls} == {t["task"]["id"]}
    assert len(world.http_seen.requests) == 1  # the refused call never went upstream


async def test_mcp_calls_carry_txn_tokens(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("tracker", "read"))
    read = t["creds"]["tracker:read"]
    async with (
        create_mcp_http_client(auth=DPoPAuth(read, agent.key, world.live.clock)) as http,
        streamable_http_client(f"{world.live.base}/tracker", http_client=http) as streams,
        ClientSession(*streams[:2]) as session,
    ):
        await session.initialize()
        result = await session.call_tool("search", {"project": "WEB", "query": "crash"})
        assert "3 issues in WEB" in result.content[0].text
    assert world.mcp_calls == [{"tool": "search", "project": "WEB", "query": "crash"}]
    posts = [i for i, r in enumerate(world.mcp_seen.requests) if r["method"] == "POST"]
    assert posts
    actions = []
    for i in posts:
        (raw,) = world.mcp_seen.txn_tokens(i)
        got = await world.verify(raw, "tracker")
        assert (got.txn, got.subject, got.scope) == (t["task"]["id"], AGENT, "tracker:read")
        assert dict(world.mcp_seen.headers(i))["x-api-key"] == "tracker-key-only-the-gateway-holds"
        actions.append(got.tctx["action"])
        if got.tctx["action"] == "search":
            assert got.tctx["argument_digest"]
    assert actions[0] == "mcp:initialize"
    assert "search" in actions


async def test_an_mcp_batch_carries_one_token_naming_each_call(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("batcher", "read"))
    token = t["creds"]["batcher:read"]
    batch = [
        {
            "jsonrpc": "2.0",
            "id": n,
            "method": "tools/call",
            "params": {"name": "search", "arguments": {"project": "WEB", "query": q}},
        }
        for n, q in ((1, "crash"), (2, "leak"))
    ]
    r = await world.live.http.post(
        "/batcher", json=batch, headers=call_headers(agent, token, "POST", "/batcher")
    )
    assert r.status_code == 200, r.text
    (raw,) = world.http_seen.txn_tokens()
    got = await world.verify(raw, "batcher")
    events = [
        e
        for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])
        if e.event == "gateway.call"
    ]
    assert got.tctx["calls"] == [
        {"action": "search", "argument_digest": e.argument_digest} for e in events
    ]
    assert "action" not in got.tctx
    assert {e.txn for e in events} == {t["task"]["id"]}


async def test_txn_tokens_follow_a_key_rotation(txn_world: TxnWorld) -> None:
    world = txn_world
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    old = world.live.services.keys.signer(KeyPurpose.TRANSACTION).kid
    r = await world.live.http.post(
        "/v1/admin/keys/rotate", params={"purpose": "transaction"}, headers=world.live.admin
    )
    assert r.status_code == 201, r.text
    new = r.json()["kid"]
    assert new != old
    assert (await get_issues(world, agent, token)).status_code == 200
    (raw,) = world.http_seen.txn_tokens()
    assert (await world.verify(raw, "issues")).kid == new
    published = {
        k["kid"] for k in (await world.live.http.get("/.well-known/txn-jwks.json")).json()["keys"]
    }
    assert published == {old, new}  # the old key stays published while tokens may live


async def test_a_gateway_without_its_key_makes_one_on_first_use(
    tmp_path: Path, clock: FakeClock
) -> None:
    """`taskbound gateway` (the gateway alone, sharing the broker's database and keys) with
    `gateway.enabled` off in its configuration still signs the calls it forwards."""
    seen = Seen()
    echo_port, gateway_port = free_port(), free_port()
    servers = [await serve_app(recorded(echo(), seen), echo_port)]
    settings = make_settings(tmp_path, gateway={"enabled": False})
    try:
        async for live in start_live(settings, clock, registry=False):
            assert live.services.keys.jwks(KeyPurpose.TRANSACTION) == {"keys": []}
            doc = base_registry(
                f"http://127.0.0.1:{echo_port}", "http://127.0.0.1:1/mcp", live.base
            )
            r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert r.status_code == 200, r.text
            assert (await live.http.get("/issues/repos/acme/web/issues")).status_code == 404
            gateway_only = create_app(settings, services=live.services, sweep=False, broker=False)
            servers.append(await serve_app(gateway_only, gateway_port))
            world = TxnWorld(live, Echo(""), [], seen)
            agent, t = await world.task(("issues", "read"))
            token = t["creds"]["issues:read"]
            path = "/issues/repos/acme/web/issues"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as http:
                for _ in range(2):
                    r = await http.get(path, headers=call_headers(agent, token, "GET", path))
                    assert r.status_code == 200, r.text
            published = (await live.http.get("/.well-known/txn-jwks.json")).json()["keys"]
            assert len(published) == 1  # made once, on first use
            for i in (0, 1):
                (raw,) = seen.txn_tokens(i)
                assert (await world.verify(raw, "issues")).kid == published[0]["kid"]
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task

"""Hostile review of the gateway: each test asserts the secure behaviour. Tests marked
``xfail(strict=True)`` demonstrate a finding (they fail because of the bug they name)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskbound.core.clock import FakeClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.gateway.app import Gateway
from tests.api.conftest import AGENT, Agent, make_settings, start_live

from .conftest import UPSTREAM_SECRET, World, call_headers, free_port, serve

LIST = "/issues/repos/acme/web/issues"
ROGUE_SECRET = "rogue-key-only-the-gateway-holds"
RAW_SECRET = "Bearer raw-http-secret-only-the-gateway-holds"

# --- a hostile / misbehaving upstream that records raw requests -------------------------


@dataclass
class Rogue:
    base: str
    seen: list[dict[str, Any]] = field(default_factory=list)


ALL_TOOLS = [
    {"name": n, "inputSchema": {"type": "object", "properties": {}}}
    for n in ("search", "create_issue", "wipe")
]


def rogue_app(rogue: Rogue) -> Starlette:
    async def everything(request: Request) -> Response:
        body = await request.body()
        rogue.seen.append(
            {
                "method": request.method,
                "raw_path": request.scope["raw_path"].decode("latin-1"),
                "path": request.url.path,
                "query": request.url.query,
                "headers": [(k.decode(), v.decode()) for k, v in request.scope["headers"]],
                "body": body,
            }
        )
        path = request.url.path
        if path == "/cookies":
            r = JSONResponse({"ok": True})
            r.headers.append("Set-Cookie", "a=1; Path=/")
            r.headers.append("Set-Cookie", "b=2; Path=/")
            return r
        if path == "/reflect":
            seen = request.headers.get("authorization", "")
            return JSONResponse({"ok": True}, headers={"X-Debug-Auth": seen})
        if path == "/redirect":
            return Response(status_code=302, headers={"Location": "/http/items/2"})
        if path == "/slow":
            await asyncio.sleep(1.5)
            return JSONResponse({"slow": True})
        if path.startswith("/mcp") and request.method == "POST":
            message = json.loads(body)
            if isinstance(message, dict) and message.get("method") == "tools/list":
                ctype = request.query_params.get("ctype", "application/json")
                payload = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": ALL_TOOLS}}
                if "event-stream" in ctype.lower():
                    text = "event: message\ndata: " + json.dumps(payload) + "\n\n"
                    return Response(text, media_type=None, headers={"Content-Type": ctype})
                if request.query_params.get("broken"):
                    return Response(b"{not json", headers={"Content-Type": ctype})
                return Response(json.dumps(payload), headers={"Content-Type": ctype})
            return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
        return JSONResponse({"ok": True, "path": path})

    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", everything, methods=methods)])


SCHEMA = {"type": "object", "properties": {"project": {"type": "string"}}}


def extra_registry(rogue_base: str, dead_base: str, gw: str) -> dict[str, Any]:
    return {
        "tools": [
            {
                "id": "rogue",
                "audience": f"{gw}/rogue",
                "upstream_url": f"{rogue_base}/mcp",
                "kind": "mcp",
                "upstream_auth_header": "X-Api-Key",
                "upstream_secret": ROGUE_SECRET,
                "actions": [
                    {"name": n, "tier": tier, "mcp_tool": n, "input_schema": SCHEMA}
                    for n, tier in (
                        ("search", "read"),
                        ("create_issue", "write"),
                        ("wipe", "admin"),
                    )
                ],
            },
            {
                "id": "http",
                "audience": f"{gw}/http",
                "upstream_url": rogue_base,
                "kind": "http",
                "upstream_secret": RAW_SECRET,
                "actions": [
                    {"name": n, "tier": "read", "method": "GET", "path": f"/{n}"}
                    for n in ("cookies", "reflect", "redirect", "slow")
                ]
                + [{"name": "item", "tier": "read", "method": "GET", "path": "/items/{id}"}],
            },
            {
                "id": "dead",
                "audience": f"{gw}/dead",
                "upstream_url": dead_base,
                "kind": "http",
                "upstream_secret": "dead-secret",
                "actions": [{"name": "ping", "tier": "read", "method": "GET", "path": "/ping"}],
            },
        ],
        "agents": [
            {
                "spiffe_id": AGENT,
                "owner": "alice",
                "ceiling": [
                    {"tool": t, "tier": tier}
                    for t in ("issues", "tracker")
                    for tier in ("read", "write", "admin")
                ]
                + [
                    {"tool": "rogue", "tier": "read"},
                    {"tool": "rogue", "tier": "write"},
                    {"tool": "http", "tier": "read"},
                    {"tool": "dead", "tier": "read"},
                ],
            }
        ],
    }


@pytest.fixture
async def rogue(world: World) -> AsyncIterator[Rogue]:
    r = Rogue(f"http://127.0.0.1:{free_port()}")
    server, task = await serve(rogue_app(r), int(r.base.rsplit(":", 1)[1]))
    doc = extra_registry(r.base, f"http://127.0.0.1:{free_port()}", world.live.base)
    resp = await world.live.http.post("/v1/admin/apply", json=doc, headers=world.live.admin)
    assert resp.status_code == 200, resp.text
    try:
        yield r
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


async def audit(world: World, task: dict[str, Any]) -> list[Any]:
    return [e for _, e in await world.live.services.storage.list_audit(task=task["task"]["id"])]


def mcp_headers(agent: Agent, token: str, path: str, method: str = "POST") -> dict[str, str]:
    h = call_headers(agent, token, method, path)
    h.update({"Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
    return h


def rpc(method: str, mid: int | None = 1, **params: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if mid is not None:
        m["id"] = mid
    if params:
        m["params"] = params
    return m


# === FINDINGS =============================================================================


async def test_mcp_get_cannot_reach_other_upstream_paths(world: World, rogue: Rogue) -> None:
    """MCP GET/DELETE/POST below /{tool} are forwarded to upstream_url + <raw rest>, with no
    route check: `%2e%2e` is decoded and normalised by yarl, so any path of the upstream
    host is reached with the tool's secret injected — and no Cedar decision is made."""
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    for method in ("GET", "DELETE"):
        path = "/rogue/%2e%2e/admin/users"
        r = await world.live.http.request(
            method, path, headers=call_headers(agent, token, method, path)
        )
        assert r.status_code >= 400, (method, r.text)
    escaped = [s for s in rogue.seen if not s["path"].startswith("/mcp")]
    assert escaped == [], escaped


async def test_mcp_post_goes_only_to_the_registered_endpoint(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    path = "/rogue/%2e%2e/internal/exec"
    body = json.dumps(rpc("tools/call", name="search", arguments={"project": "WEB"}))
    r = await world.live.http.post(path, content=body, headers=mcp_headers(agent, token, path))
    assert r.status_code >= 400, r.text
    assert [s["path"] for s in rogue.seen if s["path"] != "/mcp"] == []


async def test_batch_audit_records_what_was_actually_allowed(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    token = t["creds"]["tracker:read"]
    body = json.dumps(
        [
            rpc("tools/call", 1, name="search", arguments={"project": "WEB"}),
            rpc("tools/call", 2, name="wipe", arguments={"project": "WEB"}),
        ]
    )
    await world.live.http.post(
        "/tracker", content=body, headers=mcp_headers(agent, token, "/tracker")
    )
    events = await audit(world, t)
    allowed = [(e.action, e.tier) for e in events if e.decision == "allow"]
    denied = [e for e in events if e.decision == "deny"]
    assert ("wipe", "admin") not in allowed, allowed  # the wipe was refused, never allowed
    assert all(("read-tier" not in e.policies) for e in denied if e.action == "wipe")


async def test_tools_list_is_filtered_whatever_the_content_type(world: World, rogue: Rogue) -> None:
    """The MCP client lower-cases Content-Type; the gateway's check is case-sensitive, so an
    upstream answering `Application/JSON` or `TEXT/EVENT-STREAM` gets its list through."""
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    leaked = []
    for ctype in ("Application/JSON", "TEXT/EVENT-STREAM"):
        r = await world.live.http.post(
            f"/rogue?ctype={ctype}",
            content=json.dumps(rpc("tools/list")),
            headers=mcp_headers(agent, token, "/rogue"),
        )
        if "wipe" in r.text or "create_issue" in r.text:
            leaked.append(ctype)
    assert leaked == []


async def test_tools_list_filtered_for_plain_json_and_sse(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    for ctype in ("application/json", "text/event-stream"):
        r = await world.live.http.post(
            f"/rogue?ctype={ctype}",
            content=json.dumps(rpc("tools/list")),
            headers=mcp_headers(agent, token, "/rogue"),
        )
        assert r.status_code == 200
        assert "search" in r.text
        assert "wipe" not in r.text
        assert "create_issue" not in r.text


async def test_override_headers_do_not_reach_the_upstream(world: World) -> None:
    """A read credential's GET carries `X-HTTP-Method-Override: DELETE` (or an
    `X-Original-URL`) to the upstream, which many frameworks honour."""
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    forwarded = []
    for header in (
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-URL",
    ):
        h = call_headers(agent, token, "GET", LIST)
        h[header] = "DELETE" if "Method" in header else "/api/repos/acme/web"
        world.echo.seen.clear()
        r = await world.live.http.get(LIST, headers=h)
        if r.status_code == 200 and any(header.lower() in x["headers"] for x in world.echo.seen):
            forwarded.append(header)
    assert forwarded == []


async def test_oversized_body_refusal_is_audited(world: World) -> None:
    agent, t = await world.task(("issues", "write"))
    token = t["creds"]["issues:write"]
    h = call_headers(agent, token, "POST", LIST)
    h["Content-Type"] = "application/json"
    r = await world.live.http.post(LIST, content=b"x" * (1024 * 1024 + 10), headers=h)
    assert r.status_code == 413
    assert world.echo.seen == []
    all_events = [e for _, e in await world.live.services.storage.list_audit()]
    assert any(e.code == "payload_too_large" for e in all_events)


async def test_unknown_tool_cache_is_bounded(world: World) -> None:
    await world.live.http.get("/nope")  # the gateway is built on its first request
    (gateway,) = [
        o for o in gc.get_objects() if isinstance(o, Gateway) and o.s is world.live.services
    ]
    before = len(gateway._tools)
    for i in range(300):  # unauthenticated
        r = await world.live.http.get(f"/nope-{i}-{secrets.token_hex(4)}")
        assert r.status_code == 404
    assert len(gateway._tools) - before < 100, len(gateway._tools)


async def test_repeated_response_headers_survive(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("http", "read"))
    token = t["creds"]["http:read"]
    r = await world.live.http.get(
        "/http/cookies", headers=call_headers(agent, token, "GET", "/http/cookies")
    )
    assert r.status_code == 200
    assert len(r.headers.get_list("set-cookie")) == 2, r.headers


async def test_relative_redirect_is_kept(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("http", "read"))
    token = t["creds"]["http:read"]
    r = await world.live.http.get(
        "/http/redirect", headers=call_headers(agent, token, "GET", "/http/redirect")
    )
    assert r.status_code == 302
    assert "location" in r.headers  # a 302 without Location is useless to the agent


async def test_injected_secret_never_reaches_the_agent(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("http", "read"))
    token = t["creds"]["http:read"]
    r = await world.live.http.get(
        "/http/reflect", headers=call_headers(agent, token, "GET", "/http/reflect")
    )
    assert r.status_code == 200
    assert RAW_SECRET not in str(r.headers)
    assert RAW_SECRET not in r.text


async def test_one_call_one_verdict_when_the_filter_fails(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    r = await world.live.http.post(
        "/rogue?broken=1",
        content=json.dumps(rpc("tools/list")),
        headers=mcp_headers(agent, token, "/rogue"),
    )
    assert r.status_code >= 500
    decisions = [e.decision for e in await audit(world, t) if e.event == "gateway.call"]
    assert decisions == ["deny"], decisions


# === ATTACKS CORRECTLY REFUSED ============================================================


async def test_agent_secret_header_never_overrides_the_injected_one(
    world: World, rogue: Rogue
) -> None:
    agent, t = await world.task(("rogue", "read"))
    token = t["creds"]["rogue:read"]
    h = list(mcp_headers(agent, token, "/rogue").items())
    h += [
        ("X-Api-Key", "attacker"),
        ("x-api-key", "attacker2"),
        ("Connection", "keep-alive, X-Api-Key, Authorization"),
        ("Proxy-Authorization", "Basic evil"),
        ("Authorization", "Bearer second"),
    ]
    body = json.dumps(rpc("tools/call", name="search", arguments={"project": "WEB"}))
    r = await world.live.http.post("/rogue", content=body, headers=h)
    assert r.status_code == 200, r.text
    (seen,) = rogue.seen
    keys = [v for k, v in seen["headers"] if k.lower() == "x-api-key"]
    assert keys == [ROGUE_SECRET]
    names = {k.lower() for k, _ in seen["headers"]}
    assert not names & {"authorization", "dpop", "proxy-authorization"}
    assert all(token not in v for _, v in seen["headers"])


PATH_TRICKS = [
    "/issues/repos/acme/web/%2e%2e/issues",
    "/issues/repos/acme/web%2F..%2F..%2Fadmin/issues",
    "/issues/repos/acme/..;/web/issues",
    "/issues/repos//acme/web/issues",
    "/issues/repos/acme/web/issues/",
    "/issues/repos/acme/web/issues;x=1",
    "/issues/repos/acme/web%5C..%5Cx/issues",
    "/issues/repos/acme/web/issues%3F/x",
    "/issues/repos/acme/web/%69ssues",
    "/issues/repos/acme/web%00/issues",
]


async def test_path_tricks_are_refused(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    for path in PATH_TRICKS:
        r = await world.live.http.get(path, headers=call_headers(agent, token, "GET", path))
        if path.endswith("%69ssues"):  # unreserved escape: the same route, and allowed
            assert r.status_code == 200
            assert world.echo.seen.pop()["path"] == "/api/repos/acme/web/issues"
            continue
        assert r.status_code == 403, (path, r.text)
        assert world.echo.seen == []
        assert (await audit(world, t))[-1].decision == "deny"


async def test_other_methods_on_a_read_route_are_refused(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    for method in ("HEAD", "OPTIONS", "PATCH", "PUT", "TRACE"):
        r = await world.live.http.request(
            method, LIST, headers=call_headers(agent, token, method, LIST)
        )
        assert r.status_code in (403, 405), method
        assert world.echo.seen == []
    codes = [e.code for e in await audit(world, t)]
    assert codes.count("no_matching_action") >= 4


async def test_one_proof_used_twenty_times_in_parallel_passes_once(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    headers = call_headers(agent, token, "GET", LIST)
    rs = await asyncio.gather(*(world.live.http.get(LIST, headers=headers) for _ in range(20)))
    assert sorted(r.status_code for r in rs) == [200] + [401] * 19
    assert len(world.echo.seen) == 1
    events = await audit(world, t)
    assert sum(e.code == "invalid_dpop_proof" for e in events) == 19


async def test_completed_task_is_refused_at_once_after_a_cached_call(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    r = await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    assert r.status_code == 200
    r = await agent.call("POST", f"/v1/tasks/{t['task']['id']}/complete")
    assert r.status_code == 200
    r = await world.live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"
    assert len(world.echo.seen) == 1
    assert (await audit(world, t))[-1].code == "invalid_token"


async def test_credential_of_tool_a_at_tool_b_even_after_caching(
    world: World, rogue: Rogue
) -> None:
    agent, t = await world.task(("issues", "read"), ("tracker", "read"))
    issues = t["creds"]["issues:read"]
    assert (
        await world.live.http.get(LIST, headers=call_headers(agent, issues, "GET", LIST))
    ).status_code == 200
    r = await world.live.http.post(
        "/tracker",
        content=json.dumps(rpc("tools/list")),
        headers=mcp_headers(agent, issues, "/tracker"),
    )
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"
    assert world.mcp_calls == []


async def test_garbled_authorization_is_refused_and_audited(world: World) -> None:
    agent, _ = await world.task(("issues", "read"))
    for auth in (
        "DPoP " + "A" * 6000,
        "DPoP a.b.c",
        "DPoP",
        "dpop  x.y.z",
        "Basic Zm9vOmJhcg==",
        "DPoP ...",
    ):
        h = {"Authorization": auth, "DPoP": agent.proof("GET", LIST)}
        r = await world.live.http.get(LIST, headers=h)
        assert r.status_code in (400, 401, 431), (auth[:20], r.text)
        assert world.echo.seen == []
        if r.status_code == 401:
            events = [e for _, e in await world.live.services.storage.list_audit()]
            assert events[-1].code in ("invalid_token", "invalid_request")


async def test_proof_htu_variants(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    base = world.live.base
    scheme, rest = base.split("://", 1)
    host, _, port = rest.partition(":")
    other = "https" if scheme == "http" else "http"
    variants = {
        "other_port": f"{scheme}://{host}:{int(port or 80) + 1}{LIST}",
        "other_host": f"{scheme}://evil.example{':' + port if port else ''}{LIST}",
        "other_scheme": f"{other}://{rest}{LIST}",
        "other_tool": f"{base}/tracker/repos/acme/web/issues",
        "with_query": f"{base}{LIST}?state=open",
    }
    for variant, url in variants.items():
        proof = make_dpop_proof(
            agent.key,
            method="GET",
            url=url,
            now=world.live.clock.now(),
            jti=secrets.token_urlsafe(16),
            access_token=token,
        )
        h = {"Authorization": f"DPoP {token}", "DPoP": proof}
        r = await world.live.http.get(LIST, headers=h)
        if variant == "with_query":  # RFC 9449 §4.3: htu is compared without its query
            assert r.status_code == 200
        else:
            assert r.status_code == 401, variant
            assert r.json()["code"] == "invalid_dpop_proof"
    assert len(world.echo.seen) == 1


SMUGGLED = [
    json.dumps(rpc("tools/call", None, name="wipe", arguments={"project": "WEB"})).encode(),
    b"\xef\xbb\xbf" + json.dumps(rpc("tools/call", name="wipe", arguments={})).encode(),
    json.dumps(rpc("tools/call", name="wipe", arguments={})).encode("utf-16"),
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"search","na\\u006de":"wipe","arguments":{"project":"WEB"}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"wipe","arguments":[]}}',
    json.dumps([rpc("tools/call", 1, name="search", arguments={}), rpc("ping", 1)]).encode(),
    b'{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"wipe"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}} {"x":1}',
    b'{"jsonrpc":"2.0","id":1.0,"method":"tools/call","params":{"name":"wipe"}}',
]


async def test_mcp_smuggling_is_refused(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    token = t["creds"]["tracker:read"]
    for body in SMUGGLED:
        r = await world.live.http.post(
            "/tracker", content=body, headers=mcp_headers(agent, token, "/tracker")
        )
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == "invalid_jsonrpc"
        assert (await audit(world, t))[-1].code == "invalid_jsonrpc"
    assert world.mcp_calls == []


async def test_mcp_name_tricks(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    token = t["creds"]["tracker:read"]
    body = json.dumps(rpc("tools/call", name="wipe", arguments={"project": "WEB"}))
    for name, method in (
        ("=?base64?c2VhcmNo?=", "tools/call"),
        ("search", "tools/call"),
        ("wipe", "Tools/Call"),
    ):
        h = mcp_headers(agent, token, "/tracker")
        h.update({"Mcp-Method": method, "Mcp-Name": name})
        r = await world.live.http.post("/tracker", content=body, headers=h)
        assert r.status_code == 400
        assert r.json()["code"] == "mcp_header_mismatch"
    assert world.mcp_calls == []


async def test_notification_methods_cannot_smuggle_a_call(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    token = t["creds"]["tracker:read"]
    body = json.dumps(rpc("resources/read", 5, uri="file:///etc/passwd"))
    r = await world.live.http.post(
        "/tracker", content=body, headers=mcp_headers(agent, token, "/tracker")
    )
    assert r.status_code == 200
    assert r.json()["error"]["data"]["code"] == "method_not_allowed"
    assert (await audit(world, t))[-1].decision == "deny"


async def test_upstream_down_is_502_audited_and_fast(world: World, rogue: Rogue) -> None:
    agent, t = await world.task(("dead", "read"))
    token = t["creds"]["dead:read"]
    start = time.monotonic()
    r = await world.live.http.get(
        "/dead/ping", headers=call_headers(agent, token, "GET", "/dead/ping")
    )
    assert time.monotonic() - start < 3
    assert r.status_code == 502
    assert r.json()["code"] == "gateway_error"
    assert "127.0.0.1" not in r.text
    assert "dead-secret" not in r.text
    assert (await audit(world, t))[-1].code == "gateway_error"


async def test_no_secret_or_credential_in_logs_or_refusals(
    world: World, rogue: Rogue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    agent, t = await world.task(("issues", "read"), ("dead", "read"))
    token = t["creds"]["issues:read"]
    bodies = []
    for path in (LIST, "/issues/repos/evil/web/issues", "/issues/x"):
        r = await world.live.http.get(path, headers=call_headers(agent, token, "GET", path))
        bodies.append(r.text + str(r.headers))
    dead = t["creds"]["dead:read"]
    r = await world.live.http.get(
        "/dead/ping", headers=call_headers(agent, dead, "GET", "/dead/ping")
    )
    bodies.append(r.text + str(r.headers))
    text = caplog.text + "".join(bodies)
    for s in (token, dead, UPSTREAM_SECRET, "dead-secret", "upstream-secret-only"):
        assert s not in text
    for e in await audit(world, t):
        assert token not in (e.detail or "")
        assert dead not in (e.detail or "")


async def test_smuggling_te_and_cl_is_not_passed_on(world: World) -> None:
    agent, t = await world.task(("issues", "write"))
    token = t["creds"]["issues:write"]
    h = call_headers(agent, token, "POST", LIST)
    port = int(world.live.http.base_url.port or 80)
    lines = [
        f"POST {LIST} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: {h['Authorization']}",
        f"DPoP: {h['DPoP']}",
        "Content-Type: application/json",
        "Content-Length: 4",
        "Transfer-Encoding: chunked",
        "",
        "",
    ]
    raw = "\r\n".join(lines).encode() + b"2\r\n{}\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.1 200", b"HTTP/1.1 403"))
    for seen in world.echo.seen:
        assert "transfer-encoding" not in seen["headers"]
        assert seen["body"] in ("", "{}")
        assert seen["path"] == "/api/repos/acme/web/issues"


# === slow upstream, with small timeouts set through settings ==============================


@pytest.fixture
async def short(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[World, Rogue]]:
    r = Rogue(f"http://127.0.0.1:{free_port()}")
    server, task = await serve(rogue_app(r), int(r.base.rsplit(":", 1)[1]))
    settings = make_settings(
        tmp_path, gateway={"upstream_timeout_seconds": 0.5, "connect_timeout_seconds": 0.5}
    )
    from .conftest import Echo, registry

    try:
        async for live in start_live(settings, clock, registry=False):
            doc = registry("http://127.0.0.1:9", "http://127.0.0.1:9/mcp", live.base)
            resp = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert resp.status_code == 200, resp.text
            doc = extra_registry(r.base, "http://127.0.0.1:9", live.base)
            resp = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert resp.status_code == 200, resp.text
            yield World(live, Echo("http://127.0.0.1:9"), []), r
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


async def test_slow_upstream_honours_the_timeout(short: tuple[World, Rogue]) -> None:
    world, _ = short
    agent, t = await world.task(("http", "read"))
    token = t["creds"]["http:read"]
    start = time.monotonic()
    r = await world.live.http.get(
        "/http/slow", headers=call_headers(agent, token, "GET", "/http/slow")
    )
    assert time.monotonic() - start < 2.5
    assert r.status_code in (502, 504)
    assert (await audit(world, t))[-1].code == "upstream_timeout"

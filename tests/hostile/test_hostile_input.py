"""Hostile input: every malformed request must be a clean 4xx (never a 500), persist
nothing, and leak nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx

from taskbound.core.model import TaskFilter
from tests.api.conftest import AGENT, REGISTRY, Live

from .helpers import READ, assert_clean_refusal, introspect

JSON = {"Content-Type": "application/json"}

BODY: dict[str, Any] = {
    "intent": {"purpose": "p"},
    "on_behalf_of": "alice",
    "scopes": [READ],
    "ttl_seconds": 300,
}


# --- JSON bodies ----------------------------------------------------------------------------


async def test_pathological_json_is_a_400(live: Live) -> None:
    agent = await live.agent()
    bodies = {
        "deep_array": b"[" * 50_000,
        "deep_object": b'{"a":' * 12_000,
        "deep_in_field": json.dumps({**BODY, "scopes": "X"})
        .encode()
        .replace(b'"X"', b"[" * 30_000),
        "huge_int": b'{"ttl_seconds": ' + b"9" * 5000 + b"}",
    }
    for name, raw in bodies.items():
        r = await agent.call("POST", "/v1/tasks", content=raw, headers=JSON)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["code"] == "invalid_request", name
    # The admin API parses JSON the same way.
    r = await live.http.post(
        "/v1/admin/owners", content=b"[" * 50_000, headers={**JSON, **live.admin}
    )
    assert r.status_code == 400, r.text


async def test_nul_characters_are_a_400(live: Live) -> None:
    agent = await live.agent()
    r = await agent.call("POST", "/v1/tasks", json={**BODY, "intent": {"purpose": "a\u0000b"}})
    assert_clean_refusal(r, 400)
    task = (await agent.call("POST", "/v1/tasks", json=BODY)).json()
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/cancel", json={"reason": "x\u0000"})
    assert_clean_refusal(r, 400)
    r = await live.http.post(
        "/v1/admin/owners", json={"id": "carol", "contact": "c\u0000"}, headers=live.admin
    )
    assert_clean_refusal(r, 400)


async def check_lone_surrogates_are_a_400(live: Live) -> None:
    agent = await live.agent()
    for body in (
        {**BODY, "intent": {"purpose": "\ud800"}},
        {**BODY, "on_behalf_of": "\ud800"},
        {**BODY, "scopes": [{"tool": "\udfff", "tier": "read"}]},
    ):
        r = await agent.call("POST", "/v1/tasks", content=json.dumps(body).encode(), headers=JSON)
        assert_clean_refusal(r, 400)
    assert await live.services.storage.list_tasks(TaskFilter()) == []


async def test_lone_surrogate_in_a_constraint_is_a_400(live: Live) -> None:
    agent = await live.agent()
    for value in ("\udfff", ["ok", "\ud800"]):
        body = {**BODY, "intent": {"purpose": "p", "constraints": {"k": value}}}
        r = await agent.call("POST", "/v1/tasks", content=json.dumps(body).encode(), headers=JSON)
        assert_clean_refusal(r, 400)


async def check_non_utf8_and_odd_bodies(live: Live) -> None:
    agent = await live.agent()
    for raw in (b"\xff\xfe{", b"\x00", b"", b"null", b"1e999999", b'{"a":NaN}', b"\xc3\x28"):
        r = await agent.call("POST", "/v1/tasks", content=raw, headers=JSON)
        assert_clean_refusal(r, 400)


async def check_many_scopes_and_actions_are_bounded(live: Live) -> None:
    agent = await live.agent()
    many = [{"tool": f"t{i}", "tier": "read"} for i in range(33)]
    r = await agent.call("POST", "/v1/tasks", json={**BODY, "scopes": many})
    assert_clean_refusal(r, 400)
    acts = [{**READ, "actions": ["list"] * 257}]
    r = await agent.call("POST", "/v1/tasks", json={**BODY, "scopes": acts})
    assert_clean_refusal(r, 400)
    constraints = {f"k{i}": "v" for i in range(33)}
    r = await agent.call(
        "POST", "/v1/tasks", json={**BODY, "intent": {"purpose": "p", "constraints": constraints}}
    )
    assert_clean_refusal(r, 400)
    nested = {"k": {"deeper": "x"}}
    r = await agent.call(
        "POST", "/v1/tasks", json={**BODY, "intent": {"purpose": "p", "constraints": nested}}
    )
    assert_clean_refusal(r, 400)


async def test_every_issued_credential_is_verifiable(live: Live) -> None:
    agent = await live.agent()
    constraints = {"repo": "x" * 9000}
    r = await agent.call(
        "POST", "/v1/tasks", json={**BODY, "intent": {"purpose": "p", "constraints": constraints}}
    )
    if r.status_code == 201:
        token = r.json()["credentials"][0]["access_token"]
        assert (await introspect(live, token))["active"] is True, len(token)
    else:
        assert_clean_refusal(r, 400)


# --- ids in paths and queries -------------------------------------------------------------


async def check_weird_ids_in_admin_paths_are_404_or_400(live: Live) -> None:
    weird = ["%00", "%FF", "x" * 3000, "%E2%80%AE", "..%2F..%2Fetc", "'%20OR%201=1--"]
    for w in weird:
        for method, path in (
            ("GET", f"/v1/tasks/{w}"),
            ("POST", f"/v1/tasks/{w}/cancel"),
            ("GET", f"/v1/admin/tasks/{w}/credentials"),
            ("POST", f"/v1/admin/tasks/{w}/revoke"),
            ("GET", f"/v1/admin/owners/{w}"),
            ("GET", f"/v1/admin/tools/{w}"),
            ("GET", f"/v1/admin/agents/{w}"),
            ("GET", f"/v1/admin/agents?owner={w}"),
            ("GET", f"/v1/admin/tasks?agent={w}&owner={w}"),
        ):
            r = await live.http.request(method, path, headers=live.admin)
            assert_clean_refusal(r) if r.status_code != 200 else None
            assert r.status_code in (200, 400, 404), (method, path, r.status_code, r.text)


async def check_agent_path_tricks(live: Live) -> None:
    ok = await live.http.get(f"/v1/admin/agents/{AGENT}", headers=live.admin)
    assert ok.status_code == 200
    for variant in (
        AGENT + "/",
        AGENT.upper(),
        AGENT.replace("bot", "bot%00"),
        AGENT.replace("spiffe://", "spiffe:/"),
        AGENT + "%20",
    ):
        r = await live.http.get(f"/v1/admin/agents/{variant}", headers=live.admin)
        assert r.status_code in (400, 404), (variant, r.status_code, r.text)
    # A PUT must name the same canonical ID in path and body; no variant re-targets it.
    spec = {"spiffe_id": AGENT, "owner": "alice", "ceiling": [READ], "state": "active"}
    for variant in (AGENT + "/", AGENT.upper(), AGENT + "%20"):
        r = await live.http.put(f"/v1/admin/agents/{variant}", json=spec, headers=live.admin)
        assert_clean_refusal(r)
        r = await live.http.put(
            f"/v1/admin/agents/{variant}", json={**spec, "spiffe_id": variant}, headers=live.admin
        )
        assert_clean_refusal(r)
    after = await live.http.get(f"/v1/admin/agents/{AGENT}", headers=live.admin)
    assert after.json() == ok.json()
    # Registering an agent under a non-canonical ID is refused.
    for bad in (AGENT + "/", "spiffe://taskbound.local/agents/b%6Ft", "spiffe://Taskbound.local/a"):
        r = await live.http.post(
            "/v1/admin/agents", json={**spec, "spiffe_id": bad}, headers=live.admin
        )
        assert_clean_refusal(r, 400)


# --- admin API misuse ---------------------------------------------------------------------


async def test_admin_query_parameters_are_validated(live: Live) -> None:
    r = await live.http.post("/v1/admin/keys/rotate?purpose=bogus", headers=live.admin)
    assert_clean_refusal(r, 400)
    r = await live.http.get("/v1/admin/tasks?limit=-1", headers=live.admin)
    assert_clean_refusal(r, 400)


async def test_dry_run_never_writes(live: Live) -> None:
    doc = {"owners": [{"id": "mallory", "contact": "m@example.com"}]}
    for value in ("True", "TRUE", "yes", "on"):
        r = await live.http.post(f"/v1/admin/apply?dry_run={value}", json=doc, headers=live.admin)
        if r.status_code == 200:
            assert r.json()["dry_run"] is True, (value, r.json())
        else:
            assert_clean_refusal(r, 400)
        assert await live.services.storage.get_owner("mallory") is None, value


async def test_apply_is_all_or_nothing(live: Live) -> None:
    doc = {
        "owners": [
            {"id": "aaa-first", "contact": "ok@example.com"},
            {"id": "zzz-second", "contact": "bad\u0000@example.com"},
        ]
    }
    r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
    assert_clean_refusal(r, 400)
    assert await live.services.storage.get_owner("aaa-first") is None


async def check_apply_cannot_share_an_audience_or_break_references(live: Live) -> None:
    tool = dict(REGISTRY["tools"][1])
    tool.update(id="shadow", audience="https://gw.example/issues")
    r = await live.http.post("/v1/admin/apply", json={"tools": [tool]}, headers=live.admin)
    assert_clean_refusal(r, 400)
    agent = {
        "spiffe_id": "spiffe://taskbound.local/agents/x",
        "owner": "alice",
        "ceiling": [{"tool": "issues", "tier": "admin"}, {"tool": "ghost", "tier": "read"}],
    }
    r = await live.http.post("/v1/admin/apply", json={"agents": [agent]}, headers=live.admin)
    assert_clean_refusal(r, 400)
    r = await live.http.post(
        "/v1/admin/tools",
        json={**tool, "audience": "https://gw.example/issues"},
        headers=live.admin,
    )
    assert_clean_refusal(r, 400)
    assert await live.services.storage.get_tool("shadow") is None


async def check_admin_endpoints_refuse_everything_but_an_admin_token(live: Live) -> None:
    agent = await live.agent()
    token = live.admin_token
    for auth in (
        None,
        "Bearer",
        "Bearer ",
        f"Basic {token}",
        f"Bearer {token[:-1]}",
        f"Bearer {token}x",
        f"Bearer {token.upper()}",
        f"Bearer tbat_{'A' * 300}",
        f"Bearer {agent.identity}",
        f"DPoP {token}",
        f"Bearer  {token}\u00a0",
    ):
        headers = {} if auth is None else {"Authorization": auth}
        for method, path in (
            ("GET", "/v1/admin/owners"),
            ("POST", "/v1/admin/keys/rotate"),
            ("POST", "/v1/admin/dev/identity"),
            ("POST", "/oauth/introspect"),
        ):
            try:
                r = await live.http.request(method, path, headers=headers)
            except (UnicodeEncodeError, httpx.LocalProtocolError):
                continue  # the client refuses to send it; so would any proxy
            assert_clean_refusal(r, 401)


# --- the checks above, grouped so that each server start is used for several -------------


async def test_malformed_task_bodies_are_clean_400s(live: Live) -> None:
    await check_lone_surrogates_are_a_400(live)
    await check_non_utf8_and_odd_bodies(live)
    await check_many_scopes_and_actions_are_bounded(live)


async def test_path_tricks(live: Live) -> None:
    await check_weird_ids_in_admin_paths_are_404_or_400(live)
    await check_agent_path_tricks(live)


async def test_admin_surface_guards(live: Live) -> None:
    await check_apply_cannot_share_an_audience_or_break_references(live)
    await check_admin_endpoints_refuse_everything_but_an_admin_token(live)

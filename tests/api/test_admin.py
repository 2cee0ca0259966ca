"""The admin API: authentication, registry, apply, secrets never returned."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .conftest import AGENT, REGISTRY, Live


async def test_admin_api_requires_an_admin_token(live: Live) -> None:
    for headers in ({}, {"Authorization": "Bearer tbat_forged"}, {"Authorization": "Basic eDp5"}):
        r = await live.http.get("/v1/admin/owners", headers=headers)
        assert r.status_code == 401
        assert r.json()["code"] == "invalid_admin_token"


async def test_agent_identity_is_not_an_admin_token(live: Live) -> None:
    identity = await live.identity()
    r = await live.http.get("/v1/admin/owners", headers={"Authorization": f"Bearer {identity}"})
    assert r.status_code == 401


async def test_tool_secret_is_never_returned(live: Live) -> None:
    for path in ("/v1/admin/tools", "/v1/admin/tools/issues"):
        r = await live.http.get(path, headers=live.admin)
        assert r.status_code == 200
        assert "upstream-secret-never-returned" not in r.text
    tool = (await live.http.get("/v1/admin/tools/issues", headers=live.admin)).json()
    assert tool["has_upstream_secret"] is True
    # Stored encrypted: the plaintext is not in storage, and it decrypts for the gateway.
    blob = await live.services.storage.get_tool_secret("issues")
    assert blob is not None
    assert b"upstream-secret-never-returned" not in blob
    assert (
        await live.services.registry.upstream_secret("issues") == "upstream-secret-never-returned"
    )


async def test_registry_crud(live: Live) -> None:
    r = await live.http.post(
        "/v1/admin/owners",
        json={"id": "carol", "contact": "carol@example.com", "roles": ["reviewer"]},
        headers=live.admin,
    )
    assert r.status_code == 201
    r = await live.http.post(
        "/v1/admin/owners", json={"id": "carol", "contact": "x"}, headers=live.admin
    )
    assert r.status_code == 409
    assert r.json()["code"] == "conflict"
    r = await live.http.post(
        "/v1/admin/agents",
        json={
            "spiffe_id": "spiffe://example.org/ci/builder",
            "owner": "carol",
            "ceiling": [{"tool": "deploy", "tier": "admin"}],
        },
        headers=live.admin,
    )
    assert r.status_code == 201, r.text
    r = await live.http.get("/v1/admin/agents/spiffe://example.org/ci/builder", headers=live.admin)
    assert r.json()["owner"] == "carol"
    r = await live.http.get("/v1/admin/agents", params={"owner": "carol"}, headers=live.admin)
    assert [a["spiffe_id"] for a in r.json()["agents"]] == ["spiffe://example.org/ci/builder"]


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (
            "/v1/admin/agents",
            {"spiffe_id": "spiffe://example.org/x", "owner": "ghost"},
            "unknown_reference",
        ),
        (
            "/v1/admin/agents",
            {"spiffe_id": "https://example.org/x", "owner": "alice"},
            "invalid_request",
        ),
        (
            "/v1/admin/agents",
            {"spiffe_id": "spiffe://example.org/../x", "owner": "alice"},
            "invalid_request",
        ),
        (
            "/v1/admin/agents",
            {
                "spiffe_id": "spiffe://example.org/x",
                "owner": "alice",
                "ceiling": [{"tool": "nope", "tier": "read"}],
            },
            "unknown_reference",
        ),
        (
            "/v1/admin/agents",
            {
                "spiffe_id": "spiffe://example.org/x",
                "owner": "alice",
                "ceiling": [{"tool": "deploy", "tier": "read"}],
            },
            "invalid_request",
        ),
        ("/v1/admin/owners", {"id": "Bad Id", "contact": "x"}, "invalid_request"),
        ("/v1/admin/owners", {"id": "ok", "contact": "x", "roles": ["god"]}, "invalid_request"),
        (
            "/v1/admin/tools",
            {
                "id": "t",
                "audience": "https://gw.example/t",
                "upstream_url": "https://u.example",
                "actions": [{"name": "a", "tier": "read", "mcp_tool": "x"}],
            },
            "invalid_request",
        ),
        (
            "/v1/admin/tools",
            {
                "id": "t",
                "audience": "https://gw.example/issues",
                "upstream_url": "https://u.example",
                "actions": [{"name": "a", "tier": "read", "method": "GET", "path": "/"}],
            },
            "invalid_request",
        ),
        (
            "/v1/admin/tools",
            {
                "id": "t",
                "audience": "not-a-url",
                "upstream_url": "https://u.example",
                "actions": [{"name": "a", "tier": "read", "method": "GET", "path": "/"}],
            },
            "invalid_request",
        ),
        (
            "/v1/admin/tools",
            {
                "id": "t",
                "audience": "https://gw.example/t",
                "upstream_url": "https://u.example",
                "actions": [
                    {"name": "a", "tier": "read", "method": "GET", "path": "/x"},
                    {"name": "b", "tier": "write", "method": "GET", "path": "/x"},
                ],
            },
            "invalid_request",
        ),
        (
            "/v1/admin/tools",
            {
                "id": "t",
                "audience": "https://gw.example/t",
                "upstream_url": "https://u.example",
                "actions": [],
            },
            "invalid_request",
        ),
    ],
)
async def test_registry_validation(live: Live, path: str, body: dict[str, Any], code: str) -> None:
    r = await live.http.post(path, json=body, headers=live.admin)
    assert r.status_code in (400, 409), r.text
    assert r.json()["code"] == code


async def test_apply_is_idempotent_and_validates_before_writing(live: Live) -> None:
    r = await live.http.post("/v1/admin/apply", json=REGISTRY, headers=live.admin)
    result = r.json()
    assert result["created"] == []
    # Tools that carry a secret are re-sealed on every apply (the secret cannot be compared).
    assert result["updated"] == ["tool/issues"]
    assert "agent/" + AGENT in result["unchanged"]

    broken = copy.deepcopy(REGISTRY)
    broken["owners"].append({"id": "dave", "contact": "dave@example.com"})
    broken["agents"].append({"spiffe_id": "spiffe://example.org/y", "owner": "nobody"})
    r = await live.http.post("/v1/admin/apply", json=broken, headers=live.admin)
    assert r.status_code == 400
    assert r.json()["code"] == "unknown_reference"
    assert (await live.http.get("/v1/admin/owners/dave", headers=live.admin)).status_code == 404

    dry = copy.deepcopy(REGISTRY)
    dry["owners"].append({"id": "erin", "contact": "erin@example.com"})
    r = await live.http.post(
        "/v1/admin/apply", params={"dry_run": "1"}, json=dry, headers=live.admin
    )
    assert r.json()["created"] == ["owner/erin"]
    assert (await live.http.get("/v1/admin/owners/erin", headers=live.admin)).status_code == 404


async def test_admin_revokes_a_task(live: Live) -> None:
    agent = await live.agent()
    task = (await agent.start()).json()
    r = await live.http.post(
        f"/v1/admin/tasks/{task['id']}/revoke", json={"reason": "incident 42"}, headers=live.admin
    )
    assert r.json()["state"] == "revoked"
    assert r.json()["end_reason"] == "incident 42"
    creds = (
        await live.http.get(f"/v1/admin/tasks/{task['id']}/credentials", headers=live.admin)
    ).json()
    assert all(c["revoke_reason"] == "incident 42" for c in creds["credentials"])
    r = await live.http.get("/v1/admin/tasks", params={"state": "revoked"}, headers=live.admin)
    assert [t["id"] for t in r.json()["tasks"]] == [task["id"]]
    r = await live.http.get("/v1/admin/tasks", params={"state": "bogus"}, headers=live.admin)
    assert r.status_code == 400


async def test_dev_issuer_only_mints_its_own_trust_domain(live: Live) -> None:
    r = await live.http.post(
        "/v1/admin/dev/identity",
        json={"spiffe_id": "spiffe://prod.example/agent"},
        headers=live.admin,
    )
    assert r.status_code == 403

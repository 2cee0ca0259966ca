"""HTTP tools through the gateway: allowed calls reach the upstream with its secret and
never the agent's credential; out-of-tier, out-of-constraint and unmatched calls are
refused; every call is audited."""

from __future__ import annotations

from .conftest import UPSTREAM_SECRET, World, call_headers


async def test_an_allowed_call_reaches_the_upstream_with_its_secret_only(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    path = "/issues/repos/acme/web/issues"
    r = await world.live.http.get(
        path + "?state=open", headers=call_headers(agent, token, "GET", path)
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "path": "/api/repos/acme/web/issues"}
    assert r.headers["x-upstream"] == "echo"
    (seen,) = world.echo.seen
    assert seen["query"] == "state=open"
    headers = seen["headers"]
    assert headers["authorization"] == UPSTREAM_SECRET  # injected
    assert "dpop" not in headers  # the agent's proof never goes upstream
    assert all(token not in v for v in headers.values())  # nor its credential
    (event,) = [
        e
        for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])
        if e.event == "gateway.call"
    ]
    assert (event.decision, event.tool, event.action, event.tier) == (
        "allow",
        "issues",
        "list_issues",
        "read",
    )
    assert event.upstream_status == 200
    assert event.policies == ("read-tier",)
    assert event.argument_digest is not None


async def test_out_of_tier_call_is_refused(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    path = "/issues/repos/acme/web/issues"
    r = await world.live.http.post(
        path, json={"title": "x"}, headers=call_headers(agent, token, "POST", path)
    )
    assert r.status_code == 403
    assert r.json()["code"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert world.echo.seen == []


async def test_out_of_constraint_call_is_refused(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    path = "/issues/repos/evil/web/issues"
    r = await world.live.http.get(path, headers=call_headers(agent, token, "GET", path))
    assert r.status_code == 403
    assert r.json()["code"] == "policy_denied"
    assert world.echo.seen == []
    events = [e for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])]
    assert events[-1].policies == ("org-constraint-binds-arguments",)


async def test_unmatched_requests_are_refused(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    for method, path in (
        ("GET", "/issues/repos/acme/web/secrets"),
        ("GET", "/issues/"),
        ("GET", "/issues/repos/acme/../web/issues"),
        ("HEAD", "/issues/repos/acme/web/issues"),
    ):
        r = await world.live.http.request(
            method, path, headers=call_headers(agent, token, method, path)
        )
        assert r.status_code == 403, (method, path, r.text)
        if method != "HEAD":
            assert r.json()["code"] == "no_matching_action"
    assert world.echo.seen == []


async def test_write_and_admin_flow_with_approval_gate(world: World) -> None:
    agent, t = await world.task(("issues", "write"), ("issues", "admin"))
    write, admin = t["creds"]["issues:write"], t["creds"]["issues:admin"]
    path = "/issues/repos/acme/web/issues"
    r = await world.live.http.post(
        path, json={"title": "bug"}, headers=call_headers(agent, write, "POST", path)
    )
    assert r.status_code == 200, r.text
    assert world.echo.seen[-1]["body"] == '{"title":"bug"}'
    path = "/issues/repos/acme/web"
    r = await world.live.http.delete(path, headers=call_headers(agent, admin, "DELETE", path))
    assert r.status_code == 403
    assert r.json()["code"] == "approval_required"
    events = [e for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])]
    assert events[-1].decision == "approval_required"


async def test_protected_resource_metadata(world: World) -> None:
    r = await world.live.http.get("/.well-known/oauth-protected-resource/issues")
    meta = r.json()
    assert meta["resource"] == f"{world.live.base}/issues"
    assert meta["authorization_servers"] == [world.live.base]
    assert meta["dpop_bound_access_tokens_required"] is True
    assert (
        await world.live.http.get("/.well-known/oauth-protected-resource/nope")
    ).status_code == 404


async def test_metrics_count_gateway_decisions(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token = t["creds"]["issues:read"]
    path = "/issues/repos/acme/web/issues"
    await world.live.http.get(path, headers=call_headers(agent, token, "GET", path))
    text = (await world.live.http.get("/metrics")).text
    assert 'taskbound_gateway_decisions_total{code="ok",outcome="allow"}' in text

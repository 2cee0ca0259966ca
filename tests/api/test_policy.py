"""The grant decision through Cedar, and the policy admin API, end to end."""

from __future__ import annotations

from .conftest import Live


async def test_writes_need_the_intent_to_allow_them(live: Live) -> None:
    agent = await live.agent()
    r = await agent.start(
        intent={"purpose": "triage", "constraints": {"org": "acme", "repo": "web"}},
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert [(g["tool"], g["tier"]) for g in task["granted"]] == [("issues", "read")]
    (denial,) = task["denied"]
    assert denial["code"] == "policy_denied"
    assert "comment" in denial["reason"]


async def test_policy_status_and_reload(live: Live) -> None:
    r = await live.http.get("/v1/admin/policy", headers=live.admin)
    status = r.json()
    assert status["version"].startswith("sha256:")
    assert {p["id"] for p in status["policies"]} >= {"read-tier", "admin-needs-approval"}
    r = await live.http.post("/v1/admin/policy/reload", headers=live.admin)
    assert r.status_code == 200
    assert r.json() == {"ok": True, "version": status["version"], "changed": False, "problems": []}
    r = await live.http.post("/v1/admin/policy/reload")
    assert r.status_code == 401

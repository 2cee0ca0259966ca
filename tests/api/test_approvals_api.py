"""The approvals API on a live server (SQLite and PostgreSQL): who may read an approval,
the long poll, the admin list and votes, and bad input answered with a stable code,
nothing changed, and the attempt audited."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from taskbound.core.model import Tier
from taskbound.service.approvals import HeldCall
from tests.api.conftest import AGENT, Agent, Live


async def people(live: Live) -> None:
    for owner_id in ("carol", "dan"):
        r = await live.http.post(
            "/v1/admin/owners",
            json={"id": owner_id, "contact": f"{owner_id}@example.com", "roles": ["approver"]},
            headers=live.admin,
        )
        assert r.status_code == 201, r.text


async def held(live: Live, *, tier: Tier = Tier.WRITE, n: str = "7") -> tuple[Agent, str, str]:
    """A task of the agent and an approval holding one of its calls: (agent, task, id)."""
    agent = await live.agent()
    r = await agent.start()
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    approval = await live.services.approvals.hold(
        HeldCall(
            task_id=task_id,
            agent_id=AGENT,
            owner_id="alice",
            agent_owner="alice",
            intent="triage acme/web",
            tool="issues",
            action="comment",
            tier=tier,
            target=f"/issues/{n}/comments",
            arguments={"n": n},
            binding={"path": {"n": n}, "query": "", "body": None, "content_type": None},
            method="POST",
            path=f"/issues/issues/{n}/comments",
            policies=("destructive-needs-approval",),
        )
    )
    return agent, task_id, approval.id


async def poll(live: Live, agent: Agent, approval_id: str, query: str = "") -> httpx.Response:
    path = f"/v1/approvals/{approval_id}"
    return await agent.call("GET", path + query, proof=agent.proof("GET", path))


async def vote(live: Live, approval_id: str, verb: str = "approve", **body: Any) -> httpx.Response:
    return await live.http.post(
        f"/v1/admin/approvals/{approval_id}/{verb}", json=body, headers=live.admin
    )


async def refusals(live: Live) -> list[Any]:
    return [
        e
        for _, e in await live.services.storage.list_audit(limit=1000)
        if e.event == "approval.refused"
    ]


async def test_who_may_read_an_approval(live: Live) -> None:
    agent, _, approval = await held(live)
    r = await poll(live, agent, approval)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert (r.json()["id"], r.json()["state"]) == (approval, "pending")
    # Another task's agent key, the same agent identity: not found, like an unknown id.
    other, _, _ = await held(live, n="8")
    for who, approval_id in ((other, approval), (agent, "apr_unknown")):
        r = await poll(live, who, approval_id)
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await live.http.get(f"/v1/approvals/{approval}")
    assert r.status_code == 400  # no identity at all
    r = await live.http.get(
        f"/v1/approvals/{approval}", headers={"Authorization": "Bearer tbat_forged"}
    )
    assert (r.status_code, r.json()["code"]) == (401, "invalid_admin_token")
    r = await live.http.get(f"/v1/approvals/{approval}", headers=live.admin)
    assert r.json()["summary"]["policies"] == ["destructive-needs-approval"]
    assert r.json()["votes"] == []


async def test_long_poll_bounds_and_answers(live: Live) -> None:
    await people(live)
    agent, _, approval = await held(live)
    for query in ("?wait=31", "?wait=-1", "?wait=soon", "?wait=nan"):
        r = await poll(live, agent, approval, query)
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request"), query
    started = time.monotonic()
    r = await poll(live, agent, approval, "?wait=0.5")
    assert 0.5 <= time.monotonic() - started < 5
    assert r.json()["state"] == "pending"
    waiting = asyncio.create_task(poll(live, agent, approval, "?wait=20"))
    await asyncio.sleep(0.3)
    assert (await vote(live, approval, as_owner="carol", reason="fine")).status_code == 200
    answer = await asyncio.wait_for(waiting, 5)
    assert (answer.json()["state"], answer.json()["reason"]) == ("approved", "fine")
    assert answer.json()["use_by"] is not None
    started = time.monotonic()
    r = await poll(live, agent, approval, "?wait=20")  # decided: answers at once
    assert time.monotonic() - started < 2
    assert r.json()["state"] == "approved"


async def test_admin_list(live: Live) -> None:
    await people(live)
    _, _, first = await held(live, n="1")
    live.clock.advance(1)
    _, _, second = await held(live, n="2")
    assert (await vote(live, first, as_owner="carol")).status_code == 200
    r = await live.http.get("/v1/admin/approvals", headers=live.admin)
    assert [a["id"] for a in r.json()["approvals"]] == [second, first]
    r = await live.http.get("/v1/admin/approvals?state=pending", headers=live.admin)
    assert [a["id"] for a in r.json()["approvals"]] == [second]
    assert r.json()["approvals"][0]["summary"]["arguments"] == {"n": "2"}
    r = await live.http.get("/v1/admin/approvals?state=approved&limit=1", headers=live.admin)
    assert [a["id"] for a in r.json()["approvals"]] == [first]
    for query in ("?state=bogus", "?limit=0", "?limit=1001", "?limit=x"):
        r = await live.http.get("/v1/admin/approvals" + query, headers=live.admin)
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request"), query
    r = await live.http.get("/v1/admin/approvals")
    assert (r.status_code, r.json()["code"]) == (401, "invalid_admin_token")


async def test_bad_votes_change_nothing_and_are_audited(live: Live) -> None:
    await people(live)
    _, _, approval = await held(live)
    before = (await live.http.get(f"/v1/approvals/{approval}", headers=live.admin)).json()
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("apr_unknown", "approve", {"as_owner": "carol"}, 404, "not_found"),
        (approval, "approve", {}, 403, "approver_not_allowed"),
        (approval, "approve", {"as_owner": "bob"}, 403, "approver_not_allowed"),
        (approval, "approve", {"as_owner": "alice"}, 403, "self_approval_not_allowed"),
        (approval, "deny", {"as_owner": "carol"}, 400, "reason_required"),
        (approval, "deny", {"as_owner": "carol", "reason": " "}, 400, "reason_required"),
    ]
    for approval_id, verb, body, status, code in cases:
        r = await vote(live, approval_id, verb, **body)
        assert (r.status_code, r.json()["code"]) == (status, code), (verb, body)
    after = (await live.http.get(f"/v1/approvals/{approval}", headers=live.admin)).json()
    assert after == before
    assert [e.code for e in await refusals(live)] == [code for *_, code in cases]
    # Malformed requests are refused before anyone is asked.
    path = f"/v1/admin/approvals/{approval}"
    r = await live.http.post(f"{path}/maybe", json={"as_owner": "carol"}, headers=live.admin)
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await vote(live, approval, as_owner="carol", extra=1)
    assert (r.status_code, r.json()["code"]) == (400, "unknown_field")
    r = await live.http.post(f"{path}/approve", content=b"as_owner=carol", headers=live.admin)
    assert (r.status_code, r.json()["code"]) == (415, "unsupported_media_type")
    r = await live.http.post(f"{path}/approve", json={"as_owner": "carol"})
    assert (r.status_code, r.json()["code"]) == (401, "invalid_admin_token")
    assert (await live.http.get(path.replace("/admin", ""), headers=live.admin)).json() == before


async def test_two_approvers_at_once_decide_once(live: Live) -> None:
    await people(live)
    _, _, approval = await held(live)
    answers = await asyncio.gather(
        vote(live, approval, as_owner="carol", reason="a"),
        vote(live, approval, as_owner="dan", reason="b"),
    )
    assert sorted(r.status_code for r in answers) == [200, 409]
    (lost,) = [r for r in answers if r.status_code == 409]
    assert lost.json()["code"] == "approval_not_pending"
    final = (await live.http.get(f"/v1/approvals/{approval}", headers=live.admin)).json()
    assert (final["state"], final["approvals"], len(final["votes"])) == ("approved", 1, 1)
    assert [e.code for e in await refusals(live)] == ["approval_not_pending"]


async def test_one_approver_twice_at_once_counts_once(live: Live) -> None:
    await people(live)
    _, _, approval = await held(live, tier=Tier.ADMIN)  # a quorum of two
    answers = await asyncio.gather(*(vote(live, approval, as_owner="carol") for _ in range(3)))
    assert sorted(r.status_code for r in answers) == [200, 409, 409]
    assert {r.json().get("code") for r in answers if r.status_code == 409} == {"already_voted"}
    final = (await live.http.get(f"/v1/approvals/{approval}", headers=live.admin)).json()
    assert (final["state"], final["approvals"], final["required"]) == ("pending", 1, 2)

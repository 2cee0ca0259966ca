"""Decisions acknowledged by the chat system the approval webhook notifies: signed with the
webhook secret; a forged, stale or replayed acknowledgement is refused with
`invalid_signature`, changes nothing and is audited; a genuine one is one person's vote
under every rule of a vote."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from taskbound.core.approvals import SIGNATURE_HEADER, sign_webhook
from taskbound.core.clock import FakeClock, to_epoch
from tests.api.conftest import Live, make_settings, start_live
from tests.api.test_approvals_api import held, people

SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture
async def bridged(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Live]:
    settings = make_settings(
        tmp_path,
        storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"},
        approvals={"webhook_secret": SECRET, "webhook_decisions": True},
    )
    async for live in start_live(settings, clock):
        await people(live)
        yield live


async def ack(
    live: Live, approval_id: str, body: dict[str, Any], *, secret: str = SECRET, age: int = 0
) -> Any:
    raw = json.dumps(body).encode()
    signature = sign_webhook(secret.encode(), int(to_epoch(live.clock.now())) - age, raw)
    return await ack_raw(live, approval_id, raw, signature)


async def ack_raw(live: Live, approval_id: str, raw: bytes, signature: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return await live.http.post(
        f"/v1/approvals/{approval_id}/acknowledge", content=raw, headers=headers
    )


async def refused(live: Live) -> list[Any]:
    return [
        e
        for _, e in await live.services.storage.list_audit(limit=500)
        if e.event == "approval.refused"
    ]


async def test_a_signed_acknowledgement_is_a_persons_vote(bridged: Live) -> None:
    live = bridged
    _, _, approval = await held(live)
    r = await ack(live, approval, {"decision": "approve", "approver": "carol"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "approved"
    assert r.json()["decided_by"] == "carol"
    decided = [e for _, e in await live.services.storage.list_audit(limit=500)]
    assert any("(webhook)" in (e.detail or "") for e in decided if e.event == "approval.approved")


async def test_forged_stale_and_replayed_acknowledgements_are_refused(bridged: Live) -> None:
    live = bridged
    _, _, approval = await held(live)
    body = {"decision": "approve", "approver": "carol"}
    raw = json.dumps(body).encode()
    cases = [
        await ack(live, approval, body, secret="not-the-secret-at-all"),
        await ack(live, approval, body, age=301),
        await ack_raw(live, approval, raw, None),
        await ack_raw(live, approval, raw, "t=1,v1=00"),
    ]
    for r in cases:
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "invalid_signature"
    assert (await live.services.approvals.get(approval)).approvals == 0
    assert [e.code for e in await refused(live)] == ["invalid_signature"] * 4
    # A genuine acknowledgement works once; the same signed request again is a replay.
    signature = sign_webhook(SECRET.encode(), int(to_epoch(live.clock.now())), raw)
    assert (await ack_raw(live, approval, raw, signature)).status_code == 200
    again = await ack_raw(live, approval, raw, signature)
    assert again.status_code == 401
    assert again.json()["code"] == "invalid_signature"


async def test_acknowledgements_follow_every_rule_of_a_vote(bridged: Live) -> None:
    live = bridged
    _, _, approval = await held(live)
    r = await ack(live, approval, {"decision": "approve", "approver": "alice"})
    assert r.status_code == 403
    assert r.json()["code"] == "self_approval_not_allowed"
    r = await ack(live, approval, {"decision": "deny", "approver": "carol"})
    assert r.json()["code"] == "reason_required"
    r = await ack(live, approval, {"decision": "maybe", "approver": "carol"})
    assert r.status_code == 400
    r = await ack_raw(
        live,
        approval,
        b"not json",
        sign_webhook(SECRET.encode(), int(to_epoch(live.clock.now())), b"not json"),
    )
    assert r.status_code == 400
    r = await ack(live, "apr-unknown", {"decision": "approve", "approver": "carol"})
    assert r.status_code == 404
    assert (await live.services.approvals.get(approval)).state.value == "pending"


async def test_without_the_setting_there_is_no_such_endpoint(live: Live) -> None:
    _, _, approval = await held(live)
    r = await ack(live, approval, {"decision": "approve", "approver": "carol"})
    assert r.status_code == 404

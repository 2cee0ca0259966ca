"""`taskbound approvals list|show|approve|deny` against a live server: human and --json
output, quorum, refusals printed with the server's stable code."""

from __future__ import annotations

from taskbound.core.model import Tier
from tests.api.conftest import Live
from tests.api.test_approvals_api import held, people

from .test_revocation_cli import cli, column


async def test_list_show_approve(live: Live) -> None:
    await people(live)
    _, task_id, approval = await held(live)
    run = await cli(live, "approvals", "list", "--state", "pending")
    assert run.code == 0, run.text
    assert column(run.stdout, 0) == approval
    assert column(run.stdout, 1) == "pending"
    assert column(run.stdout, 5) == "0/1"
    listed = (await cli(live, "approvals", "list", "--json")).json()
    assert [a["id"] for a in listed["approvals"]] == [approval]

    run = await cli(live, "approvals", "show", approval)
    assert run.code == 0, run.text
    for text in ("pending", "POST /issues/issues/7/comments", task_id, '"n": "7"', "0 of 1"):
        assert text in run.text, text
    assert (await cli(live, "approvals", "show", approval, "--json")).json()["id"] == approval

    run = await cli(live, "approvals", "approve", approval, "--as-owner", "carol", "--reason", "ok")
    assert run.code == 0, run.text
    assert f"approved {approval}" in run.text
    run = await cli(live, "approvals", "show", approval)
    assert "carol approved" in run.text
    assert (await cli(live, "approvals", "list", "--state", "pending", "--json")).json() == {
        "approvals": []
    }


async def test_quorum_deny_and_refusals(live: Live) -> None:
    await people(live)
    _, _, approval = await held(live, n="9")
    run = await cli(live, "approvals", "approve", approval, "--as-owner", "alice")
    assert run.code == 1
    assert "self_approval_not_allowed" in run.text
    run = await cli(live, "approvals", "deny", approval, "--as-owner", "carol")
    assert run.code == 2  # --reason is required
    run = await cli(live, "approvals", "deny", approval, "--as-owner", "carol", "--reason", "no")
    assert run.code == 0, run.text
    assert f"denied {approval}" in run.text
    run = await cli(live, "approvals", "approve", approval, "--as-owner", "dan", "--json")
    assert run.code == 1
    assert "approval_not_pending" in run.text
    run = await cli(live, "approvals", "show", "apr_nope")
    assert (run.code, "not_found" in run.text) == (1, True)


async def test_partial_quorum_is_reported(live: Live) -> None:
    await people(live)
    _, _, approval = await held(live, tier=Tier.ADMIN)
    run = await cli(live, "approvals", "approve", approval, "--as-owner", "carol")
    assert run.code == 0, run.text
    assert "1 of 2 approvals" in run.text
    data = (await cli(live, "approvals", "approve", approval, "--as-owner", "dan", "--json")).json()
    assert (data["state"], data["approvals"]) == ("approved", 2)

"""The approval state machine, the call summary and the webhook signature (pure)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskbound.core.actions import action_digest
from taskbound.core.approvals import (
    SUMMARY_MAX_BYTES,
    call_summary,
    cast_vote,
    due_to_expire,
    http_binding,
    required_approvals,
    sign_webhook,
    verify_webhook,
)
from taskbound.core.model import Approval, ApprovalState, Tier
from taskbound.errors import AlreadyVoted, ApprovalExpired, ApprovalNotPending, Conflict

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
USE = timedelta(minutes=5)


def pending(**changes: object) -> Approval:
    approval = Approval(
        id="apr-1",
        task_id="task-1",
        agent_id="spiffe://x/agent",
        owner_id="alice",
        tool="issues",
        action="delete_repo",
        tier=Tier.ADMIN,
        target="/repos/acme/web",
        argument_digest="sha256:a",
        action_digest="sha256:b",
        intent="tidy",
        summary={},
        required=1,
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )
    return replace(approval, **changes)  # type: ignore[arg-type]


def vote(approval: Approval, approver: str, approve: bool = True, **kw: object) -> Approval:
    args: dict[str, object] = {
        "approver": approver,
        "approve": approve,
        "reason": "ok",
        "now": NOW + timedelta(minutes=1),
        "use_ttl": USE,
        "voted": (),
    }
    args.update(kw)
    return cast_vote(approval, **args)  # type: ignore[arg-type]


def test_required_approvals() -> None:
    assert required_approvals(Tier.ADMIN, 2) == 2
    assert required_approvals(Tier.WRITE, 3) == 1
    assert required_approvals(Tier.READ, 2) == 1
    with pytest.raises(ValueError, match="quorum"):
        required_approvals(Tier.ADMIN, 0)


def test_one_approval_approves_for_a_while() -> None:
    approved = vote(pending(), "bob")
    assert approved.state is ApprovalState.APPROVED
    assert approved.use_by == NOW + timedelta(minutes=1) + USE
    assert (approved.decided_by, approved.reason, approved.approvals) == ("bob", "ok", 1)
    assert approved.state_at(approved.use_by - timedelta(microseconds=1)) is ApprovalState.APPROVED
    assert approved.state_at(approved.use_by) is ApprovalState.EXPIRED
    assert due_to_expire(approved, approved.use_by)


def test_quorum_and_deny() -> None:
    two = pending(required=2)
    first = vote(two, "bob")
    assert (first.state, first.approvals, first.decided_at) == (ApprovalState.PENDING, 1, None)
    with pytest.raises(AlreadyVoted):
        vote(first, "bob", voted={"bob"})
    with pytest.raises(AlreadyVoted):
        vote(first, "bob", approve=False, voted={"bob"})
    second = vote(first, "carol", voted={"bob"})
    assert (second.state, second.approvals, second.decided_by) == (
        ApprovalState.APPROVED,
        2,
        "carol",
    )
    denied = vote(first, "carol", approve=False, reason="no", voted={"bob"})
    assert (denied.state, denied.reason, denied.use_by) == (ApprovalState.DENIED, "no", None)


@pytest.mark.parametrize(
    "state", [ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.CONSUMED]
)
def test_decided_is_final(state: ApprovalState) -> None:
    decided = pending(state=state, use_by=NOW + timedelta(hours=1))
    with pytest.raises(ApprovalNotPending) as caught:
        vote(decided, "bob")
    assert isinstance(caught.value, Conflict)
    assert caught.value.code == "approval_not_pending"


def test_expired_is_refused() -> None:
    with pytest.raises(ApprovalExpired):
        vote(pending(), "bob", now=NOW + timedelta(minutes=15))
    with pytest.raises(ApprovalExpired):
        vote(pending(state=ApprovalState.EXPIRED), "bob")
    assert due_to_expire(pending(), NOW + timedelta(minutes=15))
    assert not due_to_expire(pending(), NOW + timedelta(minutes=14))
    assert not due_to_expire(pending(state=ApprovalState.DENIED), NOW + timedelta(days=1))


def test_the_binding_of_an_http_call() -> None:
    base = http_binding({"org": "acme"}, "force=1", b'{"a":1}', "application/json")
    digest = action_digest("issues", "merge", "/repos/acme/web/merge", base)
    for other in (
        http_binding({"org": "evil"}, "force=1", b'{"a":1}', "application/json"),
        http_binding({"org": "acme"}, "force=0", b'{"a":1}', "application/json"),
        http_binding({"org": "acme"}, "force=1", b'{"a": 1}', "application/json"),
        http_binding({"org": "acme"}, "force=1", b'{"a":1}', "text/plain"),
        http_binding({"org": "acme"}, "force=1", b"", "application/json"),
    ):
        assert action_digest("issues", "merge", "/repos/acme/web/merge", other) != digest
    assert action_digest("issues", "merge", "/repos/acme/web/merge", dict(base)) == digest
    assert base["body"].startswith("sha256:")
    assert http_binding({}, "", b"", None)["body"] is None


def test_summary_keeps_a_small_call_whole() -> None:
    summary = call_summary(
        method="DELETE",
        path="/issues/repos/acme/web",
        arguments={"org": "acme", "repo": "web"},
        policies=("admin-needs-approval",),
        extra={"query": "force=1"},
    )
    assert summary == {
        "method": "DELETE",
        "path": "/issues/repos/acme/web",
        "arguments": {"org": "acme", "repo": "web"},
        "policies": ["admin-needs-approval"],
        "query": "force=1",
        "truncated": False,
    }


def test_summary_cuts_large_arguments_and_says_so() -> None:
    arguments = {"text": "é" * 20_000, "n": 1}
    summary = call_summary(
        method="POST",
        path="/x",
        arguments=arguments,
        policies=("p",),
        extra={"body": {"blob": "b" * 20_000}},
    )
    encoded = json.dumps(summary, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(encoded) <= SUMMARY_MAX_BYTES
    assert summary["truncated"] is True
    assert isinstance(summary["arguments"], str)
    assert summary["arguments"].startswith('{"text":"ééé')
    assert summary["arguments"].endswith("…")
    assert summary["body"].startswith('{"blob":"bbb')
    assert (summary["method"], summary["path"], summary["policies"]) == ("POST", "/x", ["p"])


@given(
    st.dictionaries(
        st.text(max_size=40),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=3000),
            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner),
            max_leaves=20,
        ),
        max_size=8,
    ),
    st.text(max_size=5000),
)
def test_summary_is_always_bounded(arguments: dict[str, object], path: str) -> None:
    summary = call_summary(method="GET", path=path, arguments=arguments, policies=("a", "b"))
    encoded = json.dumps(summary, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(encoded) <= SUMMARY_MAX_BYTES
    if not summary["truncated"]:
        assert summary["arguments"] == arguments


def test_summary_of_values_json_cannot_hold() -> None:
    summary = call_summary(
        method="GET", path="/", arguments={"x": float("nan")}, policies=(), extra={"o": object()}
    )
    assert isinstance(summary["arguments"], str)
    assert isinstance(summary["o"], str)
    json.dumps(summary, allow_nan=False)


def test_webhook_signature() -> None:
    secret, body = b"s3cret-s3cret-s3cret", b'{"text":"hi"}'
    header = sign_webhook(secret, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert len(header.split("v1=")[1]) == 64
    assert verify_webhook(secret, header, body, now=1_700_000_100)
    assert not verify_webhook(secret, header, body + b" ", now=1_700_000_100)
    assert not verify_webhook(b"other-secret-other", header, body, now=1_700_000_100)
    assert not verify_webhook(secret, header, body, now=1_700_001_000)  # too old
    assert not verify_webhook(secret, None, body, now=1_700_000_000)
    assert not verify_webhook(secret, "v1=abc", body, now=1_700_000_000)
    tampered = header.replace("t=1700000000", "t=1700000001")
    assert not verify_webhook(secret, tampered, body, now=1_700_000_000)
    two_stamps = "t=1700000000,t=1700000001," + header.split(",", 1)[1]
    assert not verify_webhook(secret, two_stamps, body, now=1_700_000_000)

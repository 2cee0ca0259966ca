"""Posture computations on small exact inputs: granted and used, the recommendation's
texts, the timeline, and findings of an empty window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from taskbound.core.model import Action, Agent, AgentState, Scope, Tier, Tool, ToolKind
from taskbound.core.posture import (
    ActionRef,
    Deployment,
    Window,
    findings,
    granted_actions,
    policy_id_of,
    recommendation,
    rfc3339,
    share,
    usage_report,
)
from taskbound.core.usage import TimelineRow, UsageRow

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW = Window(T0, T0 + timedelta(days=3))
TOOL = Tool(
    "issues",
    "https://gw.example/issues",
    "https://up.example",
    ToolKind.HTTP,
    (
        Action("list", Tier.READ, "GET", "/issues"),
        Action("get", Tier.READ, "GET", "/issues/{n}"),
        Action("comment", Tier.WRITE, "POST", "/issues/{n}/comments"),
    ),
    T0,
    T0,
)
TOOLS = {"issues": TOOL}
AGENT = Agent(
    'spiffe://example.org/agents/"odd"',
    "alice",
    AgentState.ACTIVE,
    frozenset({Scope("issues", Tier.READ), Scope("issues", Tier.WRITE), Scope("gone", Tier.READ)}),
    T0,
    T0,
)


def row(action: str, decision: str = "allow", calls: int = 1) -> UsageRow:
    return UsageRow(AGENT.spiffe_id, "alice", "t", "issues", action, "read", decision, calls, T0)


def test_shares_and_times() -> None:
    assert share(2, 3) == 0.6667
    assert share(0, 0) == 0.0
    assert rfc3339(T0) == "2026-03-01T00:00:00Z"


def test_granted_skips_unknown_tools() -> None:
    assert granted_actions(AGENT, TOOLS) == [
        ActionRef("issues", "read", "get"),
        ActionRef("issues", "read", "list"),
        ActionRef("issues", "write", "comment"),
    ]


def test_recommendation_texts_quote_what_they_name() -> None:
    granted = granted_actions(AGENT, TOOLS)
    rec = recommendation(
        AGENT,
        granted,
        {ActionRef("issues", "read", "list"): 4},
        window=WINDOW,
        policy_files={},
        environment="prod",
    )
    assert rec is not None
    assert rec["ceiling"] == [{"tool": "issues", "tier": "read"}]
    assert rec["removed"] == [{"tool": "issues", "tier": "write"}]
    assert rec["forbidden_actions"] == [{"tool": "issues", "tier": "read", "action": "get"}]
    assert 'principal == Agent::"spiffe://example.org/agents/\\"odd\\""' in rec["cedar"]
    odd = policy_id_of(AGENT.spiffe_id)
    assert odd.startswith("least-privilege-example-org-agents-odd-")
    assert f'@id("{odd}")' in rec["cedar"]
    assert 'agent: "spiffe://example.org/agents/\\"odd\\""' in rec["cases_yaml"]
    assert 'situation: {environment: "prod"}' in rec["cases_yaml"]
    # a file of that name already in the set: the diff replaces it
    again = recommendation(
        AGENT,
        granted,
        {ActionRef("issues", "read", "list"): 4},
        window=WINDOW,
        policy_files={f"{odd}.cedar": "// old\n"},
        environment="prod",
    )
    assert again is not None
    assert again["diff"].startswith(f"--- a/{odd}.cedar\n+++ b/{odd}.cedar\n")
    assert "-// old\n" in again["diff"]


def test_no_recommendation_without_evidence_or_without_waste() -> None:
    granted = granted_actions(AGENT, TOOLS)
    kw = {"window": WINDOW, "policy_files": {}, "environment": "dev"}
    assert recommendation(AGENT, granted, {}, **kw) is None  # type: ignore[arg-type]
    everything = {r: 1 for r in granted}
    assert recommendation(AGENT, granted, everything, **kw) is None  # type: ignore[arg-type]


def test_whole_tier_removal_needs_no_policy_file() -> None:
    granted = granted_actions(AGENT, TOOLS)
    used = {ActionRef("issues", "read", "list"): 1, ActionRef("issues", "read", "get"): 1}
    rec = recommendation(AGENT, granted, used, window=WINDOW, policy_files={}, environment="d")
    assert rec is not None
    assert rec["removed"] == [{"tool": "issues", "tier": "write"}]
    assert (rec["forbidden_actions"], rec["cedar"], rec["diff"]) == ([], "", "")


def test_usage_report_timeline_is_filled_per_day() -> None:
    report = usage_report(
        window=WINDOW,
        now=T0,
        agents=[AGENT],
        tools=TOOLS,
        rows=[row("list", calls=2), row("get", "deny")],
        timeline=[TimelineRow("2026-03-02", "allow", 2), TimelineRow("2026-03-02", "deny", 1)],
        tasks=[],
        policy_files={},
        environment="dev",
    )
    assert [d["day"] for d in report["timeline"]] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert report["timeline"][1] == {
        "day": "2026-03-02", "allow": 2, "deny": 1, "approval_required": 0, "error": 0,
    }  # fmt: skip
    (entry,) = report["agents"]
    assert (entry["granted_count"], entry["used_count"], entry["unused_share"]) == (3, 1, 0.6667)
    assert (entry["calls"], entry["denied_calls"]) == (3, 1)


def test_an_empty_window_claims_nothing() -> None:
    report = usage_report(
        window=WINDOW,
        now=T0,
        agents=[AGENT],
        tools=TOOLS,
        rows=[],
        timeline=[],
        tasks=[],
        policy_files={},
        environment="dev",
    )
    assert report["empty"] is True
    assert report["totals"]["over_granted_agents"] == 0
    got = findings(
        usage=report,
        now=T0,
        agents=[AGENT],
        owners={},
        tools=TOOLS,
        rows=[],
        tasks=[],
        breakglass=[],
        deployment=Deployment(
            dpop_required=True,
            credential_ttl_cap_seconds=600,
            task_ttl_cap_seconds=3600,
            dev_issuer=False,
            breakglass_review_within=timedelta(days=3),
        ),
    )
    assert [(f["code"], f["severity"]) for f in got] == [
        ("agent_owner_missing", "high"),
        ("no_activity_observed", "low"),
    ]
    assert got[1]["subject"] == {
        "type": "window",
        "id": "2026-03-01T00:00:00Z/2026-03-04T00:00:00Z",
    }


def test_policy_ids_never_collide() -> None:
    # Two IDs the readable slug cannot tell apart still get their own policy and file.
    a, b = policy_id_of("spiffe://a.b/x"), policy_id_of("spiffe://a-b/X")
    assert a != b
    assert a.startswith("least-privilege-a-b-x-")
    assert b.startswith("least-privilege-a-b-x-")
    assert len(policy_id_of("spiffe://example.org/" + "x" * 500)) < 80

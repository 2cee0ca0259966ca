"""The registry-only grant decision (the Cedar decision point replaces it later)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.grant import CeilingDecider, GrantRequest, ScopeRequest
from taskbound.core.model import (
    Action,
    Agent,
    AgentState,
    Owner,
    Role,
    Scope,
    ScopeGrant,
    Tier,
    Tool,
    ToolKind,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALICE = Owner("alice", "alice@example.com", frozenset({Role.APPROVER}), T0, T0)
ISSUES = Tool(
    id="issues",
    audience="https://gw.example/issues",
    upstream_url="https://issues.example/api",
    kind=ToolKind.HTTP,
    actions=(
        Action("list", Tier.READ, "GET", "/issues"),
        Action("get", Tier.READ, "GET", "/issues/{n}"),
        Action("comment", Tier.WRITE, "POST", "/issues/{n}/comments"),
        Action("delete", Tier.ADMIN, "DELETE", "/issues/{n}"),
    ),
    created_at=T0,
    updated_at=T0,
)
AGENT = Agent(
    "spiffe://example.org/bot",
    "alice",
    AgentState.ACTIVE,
    frozenset({Scope("issues", Tier.READ), Scope("issues", Tier.WRITE)}),
    T0,
    T0,
)


def request(
    *scopes: ScopeRequest,
    agent: Agent = AGENT,
    owner: Owner | None = ALICE,
    owner_id: str = "alice",
) -> GrantRequest:
    return GrantRequest(
        agent=agent,
        owner=owner,
        owner_id=owner_id,
        purpose="triage",
        constraints={},
        scopes=scopes,
        ttl=timedelta(minutes=5),
        tools={"issues": ISSUES},
        now=T0,
    )


def test_grants_every_action_of_the_tier_when_none_named() -> None:
    d = CeilingDecider().decide(request(ScopeRequest("issues", Tier.READ)))
    assert d.refusal is None
    assert d.granted == (ScopeGrant("issues", Tier.READ, ("list", "get")),)
    assert d.denied == ()


def test_grants_only_the_named_actions_in_registry_order() -> None:
    d = CeilingDecider().decide(request(ScopeRequest("issues", Tier.READ, ("get", "list"))))
    assert d.granted == (ScopeGrant("issues", Tier.READ, ("list", "get")),)


@pytest.mark.parametrize(
    ("scope", "code"),
    [
        (ScopeRequest("issues", Tier.ADMIN), "beyond_ceiling"),
        (ScopeRequest("nope", Tier.READ), "unknown_tool"),
        (ScopeRequest("issues", Tier.READ, ("comment",)), "unknown_action"),
        (ScopeRequest("issues", Tier.READ, ("list", "bogus")), "unknown_action"),
    ],
)
def test_denies_scopes_outside_what_is_allowed(scope: ScopeRequest, code: str) -> None:
    d = CeilingDecider().decide(request(ScopeRequest("issues", Tier.READ), scope))
    assert [g.tier for g in d.granted] == [Tier.READ]
    assert [x.code for x in d.denied] == [code]


def test_tier_not_offered_by_tool() -> None:
    tool = Tool(
        "ro",
        "https://gw.example/ro",
        "https://ro.example",
        ToolKind.HTTP,
        (Action("list", Tier.READ, "GET", "/"),),
        T0,
        T0,
    )
    agent = Agent(
        "spiffe://example.org/bot",
        "alice",
        AgentState.ACTIVE,
        frozenset({Scope("ro", Tier.WRITE)}),
        T0,
        T0,
    )
    req = GrantRequest(
        agent=agent,
        owner=ALICE,
        owner_id="alice",
        purpose="p",
        constraints={},
        scopes=(ScopeRequest("ro", Tier.WRITE),),
        ttl=timedelta(minutes=1),
        tools={"ro": tool},
        now=T0,
    )
    d = CeilingDecider().decide(req)
    assert [x.code for x in d.denied] == ["tier_not_offered"]


@pytest.mark.parametrize(
    "state", [AgentState.SUSPENDED, AgentState.QUARANTINED, AgentState.RETIRED]
)
def test_inactive_agents_get_nothing(state: AgentState) -> None:
    agent = Agent(AGENT.spiffe_id, "alice", state, AGENT.ceiling, T0, T0)
    d = CeilingDecider().decide(request(ScopeRequest("issues", Tier.READ), agent=agent))
    assert d.refusal is not None
    assert d.refusal.code == "agent_not_active"
    assert d.granted == ()


def test_unknown_disabled_or_foreign_owner_is_refused() -> None:
    dec = CeilingDecider()
    assert dec.decide(
        request(ScopeRequest("issues", Tier.READ), owner=None, owner_id="bob")
    ).refusal
    disabled = Owner("alice", "a@x", frozenset(), T0, T0, disabled=True)
    assert dec.decide(request(ScopeRequest("issues", Tier.READ), owner=disabled)).refusal
    bob = Owner("bob", "b@x", frozenset(), T0, T0)
    refusal = dec.decide(
        request(ScopeRequest("issues", Tier.READ), owner=bob, owner_id="bob")
    ).refusal
    assert refusal is not None
    assert refusal.code == "owner_not_allowed"

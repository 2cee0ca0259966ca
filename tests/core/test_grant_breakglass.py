"""The registry-only grant decision with break-glass exceptions: a scope beyond the ceiling
is granted only while an active exception of that same agent adds it, and the grant names
the exception it relies on."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from taskbound.core.breakglass import BreakGlass
from taskbound.core.grant import CeilingDecider, GrantDecision, GrantRequest, ScopeRequest
from taskbound.core.model import Agent, AgentState, Scope, ScopeGrant, Tier
from tests.core.test_grant import AGENT, ALICE, ISSUES, T0

NOW = T0 + timedelta(minutes=10)
ADMIN = Scope("issues", Tier.ADMIN)
OTHER_AGENT = "spiffe://example.org/other"


def exception(
    bg_id: str = "bg_1",
    *,
    agent_id: str = AGENT.spiffe_id,
    scopes: frozenset[Scope] = frozenset({ADMIN}),
    created_at: timedelta = timedelta(minutes=-5),
    expires_at: timedelta = timedelta(minutes=30),
    ended_at: timedelta | None = None,
) -> BreakGlass:
    """An exception granted ``created_at`` from NOW until ``expires_at`` from NOW."""
    return BreakGlass(
        id=bg_id,
        agent_id=agent_id,
        scopes=scopes,
        justification="production incident INC-1234, rollback needed",
        granted_by="root",
        created_at=NOW + created_at,
        expires_at=NOW + expires_at,
        ended_at=None if ended_at is None else NOW + ended_at,
        ended_by=None if ended_at is None else "root",
    )


def decide(
    *scopes: ScopeRequest, exceptions: tuple[BreakGlass, ...] = (), agent: Agent = AGENT
) -> GrantDecision:
    return CeilingDecider().decide(
        GrantRequest(
            agent=agent,
            owner=ALICE,
            owner_id="alice",
            purpose="incident response",
            constraints={},
            scopes=scopes,
            ttl=timedelta(minutes=5),
            tools={"issues": ISSUES},
            now=NOW,
            exceptions=exceptions,
        )
    )


def test_beyond_the_ceiling_without_an_exception_is_denied() -> None:
    d = decide(ScopeRequest("issues", Tier.READ), ScopeRequest("issues", Tier.ADMIN))
    assert d.granted == (ScopeGrant("issues", Tier.READ, ("list", "get")),)
    assert [(x.tier, x.code) for x in d.denied] == [("admin", "beyond_ceiling")]


def test_an_active_exception_adds_its_scope_and_is_named_on_the_grant() -> None:
    d = decide(
        ScopeRequest("issues", Tier.READ),
        ScopeRequest("issues", Tier.ADMIN),
        exceptions=(exception(),),
    )
    assert d.refusal is None
    assert d.denied == ()
    # Only the scope beyond the ceiling relies on it; the ceiling's own does not.
    assert d.granted == (
        ScopeGrant("issues", Tier.READ, ("list", "get")),
        ScopeGrant("issues", Tier.ADMIN, ("delete",), "bg_1"),
    )


def test_an_exception_of_another_agent_is_ignored() -> None:
    d = decide(ScopeRequest("issues", Tier.ADMIN), exceptions=(exception(agent_id=OTHER_AGENT),))
    assert d.granted == ()
    assert [x.code for x in d.denied] == ["beyond_ceiling"]


@pytest.mark.parametrize(
    ("what", "bg"),
    [
        ("expired", exception(created_at=timedelta(hours=-2), expires_at=timedelta(minutes=-1))),
        ("expiring at this instant", exception(expires_at=timedelta(0))),
        ("ended early", exception(ended_at=timedelta(minutes=-1))),
        ("ended at this instant", exception(ended_at=timedelta(0))),
        ("not yet granted", exception(created_at=timedelta(seconds=1))),
    ],
)
def test_an_exception_not_active_now_is_ignored(what: str, bg: BreakGlass) -> None:
    assert not bg.active_at(NOW), what
    d = decide(ScopeRequest("issues", Tier.ADMIN), exceptions=(bg,))
    assert d.granted == ()
    assert [x.code for x in d.denied] == ["beyond_ceiling"], what


def test_an_exception_active_until_just_after_now_counts() -> None:
    bg = exception(expires_at=timedelta(microseconds=1))
    d = decide(ScopeRequest("issues", Tier.ADMIN), exceptions=(bg,))
    assert [g.exception for g in d.granted] == ["bg_1"]


def test_a_requested_subset_of_actions_keeps_the_exception() -> None:
    tool = replace(ISSUES, actions=(*ISSUES.actions, replace(ISSUES.actions[-1], name="lock")))
    d = CeilingDecider().decide(
        GrantRequest(
            agent=AGENT,
            owner=ALICE,
            owner_id="alice",
            purpose="incident response",
            constraints={},
            scopes=(ScopeRequest("issues", Tier.ADMIN, ("lock",)),),
            ttl=timedelta(minutes=5),
            tools={"issues": tool},
            now=NOW,
            exceptions=(exception(),),
        )
    )
    assert d.granted == (ScopeGrant("issues", Tier.ADMIN, ("lock",), "bg_1"),)


def test_an_exception_does_not_excuse_unknown_actions_tools_or_tiers() -> None:
    bg = exception(scopes=frozenset({ADMIN, Scope("nope", Tier.READ)}))
    d = decide(
        ScopeRequest("issues", Tier.ADMIN, ("delete", "bogus")),
        ScopeRequest("nope", Tier.READ),
        exceptions=(bg,),
    )
    assert d.granted == ()
    assert [x.code for x in d.denied] == ["unknown_action", "unknown_tool"]


def test_an_exception_adds_only_its_own_scopes() -> None:
    tool = replace(ISSUES, id="wiki", actions=(replace(ISSUES.actions[0], name="read_page"),))
    d = CeilingDecider().decide(
        GrantRequest(
            agent=AGENT,
            owner=ALICE,
            owner_id="alice",
            purpose="incident response",
            constraints={},
            scopes=(ScopeRequest("issues", Tier.ADMIN), ScopeRequest("wiki", Tier.READ)),
            ttl=timedelta(minutes=5),
            tools={"issues": ISSUES, "wiki": tool},
            now=NOW,
            exceptions=(exception(),),
        )
    )
    assert [(g.tool, g.exception) for g in d.granted] == [("issues", "bg_1")]
    assert [(x.tool, x.code) for x in d.denied] == [("wiki", "beyond_ceiling")]


def test_a_scope_within_the_ceiling_never_relies_on_an_exception() -> None:
    # An exception that (say, after the ceiling was widened) also names a ceiling scope.
    bg = exception(scopes=frozenset({ADMIN, Scope("issues", Tier.WRITE)}))
    d = decide(ScopeRequest("issues", Tier.WRITE), exceptions=(bg,))
    assert d.granted == (ScopeGrant("issues", Tier.WRITE, ("comment",)),)


def test_of_several_exceptions_the_one_ending_last_is_relied_on() -> None:
    short = exception("bg_short", expires_at=timedelta(minutes=10))
    long = exception("bg_long", expires_at=timedelta(minutes=50))
    ended = exception("bg_ended", expires_at=timedelta(hours=2), ended_at=timedelta(minutes=-1))
    for order in ((short, long, ended), (ended, long, short)):
        d = decide(ScopeRequest("issues", Tier.ADMIN), exceptions=order)
        assert [g.exception for g in d.granted] == ["bg_long"]


def test_an_inactive_agent_gets_nothing_even_with_an_exception() -> None:
    agent = replace(AGENT, state=AgentState.SUSPENDED)
    d = decide(ScopeRequest("issues", Tier.ADMIN), exceptions=(exception(),), agent=agent)
    assert d.refusal is not None
    assert d.refusal.code == "agent_not_active"
    assert d.granted == ()


def test_an_inherited_exception_never_widens_the_delegates_ceiling() -> None:
    # A delegation whose parent credential relies on an exception: policy is told so, but
    # the delegate's own ceiling (plus its own exceptions) still bounds the grant.
    d = CeilingDecider().decide(
        GrantRequest(
            agent=AGENT,
            owner=ALICE,
            owner_id="alice",
            purpose="incident response",
            constraints={},
            scopes=(ScopeRequest("issues", Tier.WRITE), ScopeRequest("issues", Tier.ADMIN)),
            ttl=timedelta(minutes=5),
            tools={"issues": ISSUES},
            now=NOW,
            delegation_depth=1,
            inherited_exception="bg_parent",
        )
    )
    assert d.granted == (ScopeGrant("issues", Tier.WRITE, ("comment",)),)
    assert [x.code for x in d.denied] == ["beyond_ceiling"]

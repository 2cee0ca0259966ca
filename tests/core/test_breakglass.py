"""Break-glass exceptions: grant validation, the ceiling in force, early end and review
(pure; fixed times, no clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskbound.core.breakglass import (
    MAX_SCOPES,
    BreakGlass,
    BreakGlassRefused,
    effective_ceiling,
    end,
    new_grant,
    relied_on,
    review,
)
from taskbound.core.model import Agent, AgentState, Scope, Tier

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
MAX = timedelta(hours=4)
WHY = "incident INC-42: restore the deploy pipeline"
AGENT_ID = "spiffe://example.org/agent/deployer"
READ = Scope("repo", Tier.READ)
WRITE = Scope("repo", Tier.WRITE)
ADMIN = Scope("repo", Tier.ADMIN)
DB_ADMIN = Scope("db", Tier.ADMIN)


def agent(ceiling: frozenset[Scope] = frozenset({READ}), spiffe_id: str = AGENT_ID) -> Agent:
    return Agent(
        spiffe_id=spiffe_id,
        owner_id="alice",
        state=AgentState.ACTIVE,
        ceiling=ceiling,
        created_at=NOW - timedelta(days=1),
        updated_at=NOW - timedelta(days=1),
    )


def grant(**changes: object) -> BreakGlass:
    args: dict[str, object] = {
        "id": "bg-1",
        "agent": agent(),
        "scopes": {WRITE},
        "justification": WHY,
        "granted_by": "admin-ann",
        "now": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "max_duration": MAX,
    }
    args.update(changes)
    return new_grant(**args)  # type: ignore[arg-type]


def assert_refused(excinfo: pytest.ExceptionInfo[BreakGlassRefused], code: str) -> None:
    assert excinfo.value.code == code
    assert excinfo.value.message
    assert str(excinfo.value) == excinfo.value.message


# --- new_grant ------------------------------------------------------------------------------


def test_grant_records_what_was_asked() -> None:
    bg = grant(justification=f"  {WHY}\n", scopes=[WRITE, DB_ADMIN, WRITE])
    assert bg == BreakGlass(
        id="bg-1",
        agent_id=AGENT_ID,
        scopes=frozenset({WRITE, DB_ADMIN}),
        justification=WHY,
        granted_by="admin-ann",
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    assert bg.ended_at is None
    assert bg.reviewed_at is None


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"justification": ""}, "justification_required"),
        ({"justification": "   \t\n "}, "justification_required"),
        ({"justification": "x" * 19}, "justification_too_short"),
        ({"justification": "   " + "x" * 19 + "   "}, "justification_too_short"),
        ({"justification": "urgent", "min_justification": 7}, "justification_too_short"),
        ({"scopes": set()}, "no_scopes"),
        ({"scopes": {READ}}, "already_in_ceiling"),
        ({"scopes": {WRITE, READ}}, "already_in_ceiling"),
        ({"expires_at": NOW}, "expiry_in_past"),
        ({"expires_at": NOW - timedelta(seconds=1)}, "expiry_in_past"),
        ({"expires_at": NOW + MAX + timedelta(seconds=1)}, "expiry_too_long"),
        ({"expires_at": NOW + timedelta(days=365)}, "expiry_too_long"),
    ],
)
def test_grant_refusals(changes: dict[str, object], code: str) -> None:
    with pytest.raises(BreakGlassRefused) as excinfo:
        grant(**changes)
    assert_refused(excinfo, code)


def test_too_many_scopes_is_refused_and_the_maximum_is_not() -> None:
    many = [Scope(f"tool-{i}", Tier.ADMIN) for i in range(MAX_SCOPES + 1)]
    assert len(grant(scopes=many[:MAX_SCOPES]).scopes) == MAX_SCOPES
    with pytest.raises(BreakGlassRefused) as excinfo:
        grant(scopes=many)
    assert_refused(excinfo, "too_many_scopes")


def test_duplicate_scopes_count_once_towards_the_maximum() -> None:
    many = [Scope(f"tool-{i}", Tier.ADMIN) for i in range(MAX_SCOPES)]
    assert len(grant(scopes=many + many).scopes) == MAX_SCOPES


def test_expiry_exactly_at_the_maximum_is_allowed() -> None:
    assert grant(expires_at=NOW + MAX).expires_at == NOW + MAX


def test_expiry_one_second_after_now_is_allowed() -> None:
    assert grant(expires_at=NOW + timedelta(seconds=1)).active_at(NOW)


def test_justification_exactly_at_the_minimum_is_allowed() -> None:
    assert grant(justification="x" * 20).justification == "x" * 20
    assert grant(justification="ok", min_justification=2).justification == "ok"


def test_already_in_ceiling_names_the_covered_scope() -> None:
    with pytest.raises(BreakGlassRefused) as excinfo:
        grant(scopes={WRITE, READ})
    assert "repo:read" in excinfo.value.message
    assert "repo:write" not in excinfo.value.message


def test_justification_is_checked_before_expiry() -> None:
    # Both wrong: the first rule in the documented order decides the code.
    with pytest.raises(BreakGlassRefused) as excinfo:
        grant(justification="", expires_at=NOW + timedelta(days=9))
    assert_refused(excinfo, "justification_required")


@pytest.mark.parametrize(
    "changes",
    [
        {"id": ""},
        {"granted_by": ""},
        {"max_duration": timedelta(0)},
        {"max_duration": timedelta(seconds=-1)},
        {"min_justification": 0},
        {"now": datetime(2026, 1, 1, 12)},  # naive
        {"expires_at": datetime(2026, 1, 1, 13)},  # naive
    ],
)
def test_caller_errors_are_value_errors(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        grant(**changes)


# --- the life of one exception --------------------------------------------------------------


def test_active_from_creation_until_just_before_expiry() -> None:
    bg = grant()
    assert not bg.active_at(NOW - timedelta(seconds=1))
    assert bg.active_at(NOW)
    assert bg.active_at(bg.expires_at - timedelta(microseconds=1))
    assert not bg.active_at(bg.expires_at)  # exactly at expiry: no longer active
    assert not bg.active_at(bg.expires_at + timedelta(seconds=1))


def test_needs_review_only_after_it_ends() -> None:
    bg = grant()
    assert not bg.needs_review(NOW)
    assert not bg.needs_review(bg.expires_at - timedelta(microseconds=1))
    assert bg.needs_review(bg.expires_at)
    assert bg.needs_review(bg.expires_at + timedelta(days=30))


def test_overdue_boundary() -> None:
    bg = grant()
    within = timedelta(days=2)
    deadline = bg.expires_at + within
    assert not bg.overdue(NOW, within)
    assert not bg.overdue(deadline - timedelta(seconds=1), within)
    assert bg.overdue(deadline, within)
    reviewed = review(bg, reviewer="rev-bob", note="checked the calls", now=deadline)
    assert not reviewed.overdue(deadline + timedelta(days=1), within)
    assert not reviewed.needs_review(deadline)


def test_early_end_stops_it_at_once_and_starts_the_review_clock() -> None:
    bg = grant()
    at = NOW + timedelta(minutes=10)
    ended = end(bg, by="admin-ann", now=at)
    assert ended.ended_at == at
    assert ended.ended_by == "admin-ann"
    assert ended.ended_at_or_expiry() == at
    assert ended.active_at(at - timedelta(microseconds=1))
    assert not ended.active_at(at)
    assert ended.needs_review(at)
    assert ended.overdue(at + timedelta(hours=1), timedelta(hours=1))
    assert not ended.overdue(at + timedelta(minutes=59), timedelta(hours=1))
    assert bg.ended_at is None  # the original value is unchanged


def test_ended_at_or_expiry_takes_the_earlier() -> None:
    bg = grant()
    assert bg.ended_at_or_expiry() == bg.expires_at
    # A (hand-built) end recorded after the expiry does not prolong it.
    late = replace(bg, ended_at=bg.expires_at + timedelta(hours=1))
    assert late.ended_at_or_expiry() == bg.expires_at
    assert not late.active_at(bg.expires_at)


def test_end_refusals() -> None:
    bg = grant()
    ended = end(bg, by="admin-ann", now=NOW + timedelta(minutes=1))
    with pytest.raises(BreakGlassRefused) as excinfo:
        end(ended, by="admin-ann", now=NOW + timedelta(minutes=2))
    assert_refused(excinfo, "already_ended")
    with pytest.raises(BreakGlassRefused) as excinfo:
        end(bg, by="admin-ann", now=bg.expires_at)  # exactly at expiry: ended by itself
    assert_refused(excinfo, "already_ended")
    assert "expired" in excinfo.value.message


def test_end_just_before_expiry_is_allowed() -> None:
    bg = grant()
    at = bg.expires_at - timedelta(microseconds=1)
    assert end(bg, by="admin-cy", now=at).ended_at == at


def test_end_caller_errors() -> None:
    bg = grant()
    with pytest.raises(ValueError, match="by"):
        end(bg, by="", now=NOW)
    with pytest.raises(ValueError, match="before"):
        end(bg, by="admin-ann", now=NOW - timedelta(seconds=1))


def test_review_after_expiry() -> None:
    bg = grant()
    at = bg.expires_at + timedelta(hours=2)
    done = review(bg, reviewer="rev-bob", note="  three calls, all justified \n", now=at)
    assert (done.reviewed_by, done.reviewed_at, done.review_note) == (
        "rev-bob",
        at,
        "three calls, all justified",
    )
    assert not done.needs_review(at)


def test_review_after_early_end() -> None:
    ended = end(grant(), by="admin-ann", now=NOW + timedelta(minutes=5))
    done = review(ended, reviewer="rev-bob", note="fine", now=NOW + timedelta(minutes=5))
    assert done.reviewed_by == "rev-bob"


def test_review_refusals() -> None:
    bg = grant()
    after = bg.expires_at
    cases: list[tuple[BreakGlass, str, str, datetime, str]] = [
        (bg, "rev-bob", "fine", bg.expires_at - timedelta(microseconds=1), "not_ended"),
        (bg, "rev-bob", "fine", NOW, "not_ended"),
        (bg, "admin-ann", "fine", after, "self_review_not_allowed"),
        (bg, "rev-bob", "", after, "review_note_required"),
        (bg, "rev-bob", " \n\t", after, "review_note_required"),
        (
            review(bg, reviewer="rev-bob", note="fine", now=after),
            "rev-cy",
            "again",
            after,
            "already_reviewed",
        ),
    ]
    for target, reviewer, note, now, code in cases:
        with pytest.raises(BreakGlassRefused) as excinfo:
            review(target, reviewer=reviewer, note=note, now=now)
        assert_refused(excinfo, code)


def test_self_review_is_refused_even_when_the_granter_ended_it_and_others_may_not_be() -> None:
    ended = end(grant(), by="rev-bob", now=NOW + timedelta(minutes=1))
    with pytest.raises(BreakGlassRefused) as excinfo:
        review(ended, reviewer="admin-ann", note="fine", now=NOW + timedelta(minutes=1))
    assert_refused(excinfo, "self_review_not_allowed")
    # Whoever ended it early is not the granter, and may review it.
    assert review(ended, reviewer="rev-bob", note="fine", now=NOW + timedelta(minutes=1))


def test_reviewer_is_compared_exactly() -> None:
    # Principal ids are canonical; a different id is a different person.
    done = review(grant(), reviewer="Admin-Ann", note="fine", now=NOW + timedelta(hours=1))
    assert done.reviewed_by == "Admin-Ann"


def test_review_caller_errors() -> None:
    with pytest.raises(ValueError, match="reviewer"):
        review(grant(), reviewer="", note="fine", now=NOW + timedelta(hours=1))
    with pytest.raises(ValueError, match="aware"):
        review(grant(), reviewer="rev-bob", note="fine", now=datetime(2026, 1, 2))


def test_refusal_repr_carries_the_code() -> None:
    err = BreakGlassRefused("no_scopes", "nothing asked")
    assert repr(err) == "BreakGlassRefused(code='no_scopes', message='nothing asked')"


# --- the ceiling in force -------------------------------------------------------------------


def test_no_exceptions_leaves_the_ceiling() -> None:
    a = agent(frozenset({READ, WRITE}))
    assert effective_ceiling(a, [], NOW) == (frozenset({READ, WRITE}), {})
    assert relied_on(a, ADMIN, [], NOW) is None


def test_active_exception_widens_the_ceiling() -> None:
    bg = grant(scopes={WRITE, DB_ADMIN})
    ceiling, by = effective_ceiling(agent(), [bg], NOW)
    assert ceiling == {READ, WRITE, DB_ADMIN}
    assert by == {WRITE: "bg-1", DB_ADMIN: "bg-1"}
    assert relied_on(agent(), WRITE, [bg], NOW) == bg
    assert relied_on(agent(), READ, [bg], NOW) is None  # the ceiling covers it
    assert relied_on(agent(), ADMIN, [bg], NOW) is None  # nothing covers it


def test_expired_ended_and_future_exceptions_do_not_count() -> None:
    bg = grant()
    ended = end(bg, by="admin-ann", now=NOW + timedelta(minutes=1))
    for exceptions, now in [
        ([bg], bg.expires_at),
        ([ended], NOW + timedelta(minutes=1)),
        ([bg], NOW - timedelta(seconds=1)),
    ]:
        assert effective_ceiling(agent(), exceptions, now) == (frozenset({READ}), {})
        assert relied_on(agent(), WRITE, exceptions, now) is None


def test_another_agents_exception_does_not_widen() -> None:
    other = agent(spiffe_id="spiffe://example.org/agent/other")
    bg = grant(agent=other)
    assert effective_ceiling(agent(), [bg], NOW) == (frozenset({READ}), {})
    assert relied_on(agent(), WRITE, [bg], NOW) is None
    assert relied_on(other, WRITE, [bg], NOW) == bg


def test_overlapping_exceptions_the_one_expiring_last_wins() -> None:
    short = grant(id="bg-short", scopes={WRITE, DB_ADMIN}, expires_at=NOW + timedelta(hours=1))
    long = grant(id="bg-long", scopes={WRITE}, expires_at=NOW + timedelta(hours=3))
    for order in ([short, long], [long, short]):
        ceiling, by = effective_ceiling(agent(), order, NOW)
        assert ceiling == {READ, WRITE, DB_ADMIN}
        assert by == {WRITE: "bg-long", DB_ADMIN: "bg-short"}
        assert relied_on(agent(), WRITE, order, NOW) == long
    # After the short one expires, the long one still holds WRITE, DB_ADMIN is gone.
    later = NOW + timedelta(hours=1)
    assert effective_ceiling(agent(), [short, long], later) == (
        frozenset({READ, WRITE}),
        {WRITE: "bg-long"},
    )


def test_an_early_end_hands_the_scope_to_the_other_exception() -> None:
    short = grant(id="bg-short", expires_at=NOW + timedelta(hours=1))
    long = grant(id="bg-long", expires_at=NOW + timedelta(hours=3))
    at = NOW + timedelta(minutes=30)
    assert relied_on(agent(), WRITE, [short, long], at) == long
    long_ended = end(long, by="admin-ann", now=at)
    # Once ended, the other one holds the scope; the ceiling in force does not shrink.
    assert relied_on(agent(), WRITE, [short, long_ended], at) == short
    assert effective_ceiling(agent(), [short, long_ended], at)[0] == {READ, WRITE}


def test_equal_expiries_are_broken_by_id() -> None:
    a = grant(id="bg-a")
    b = grant(id="bg-b")
    assert effective_ceiling(agent(), [a, b], NOW)[1] == {WRITE: "bg-b"}
    assert effective_ceiling(agent(), [b, a], NOW)[1] == {WRITE: "bg-b"}


def test_scope_later_added_to_the_ceiling_no_longer_relies_on_the_exception() -> None:
    bg = grant()
    widened = agent(frozenset({READ, WRITE}))
    assert effective_ceiling(widened, [bg], NOW) == (frozenset({READ, WRITE}), {})
    assert relied_on(widened, WRITE, [bg], NOW) is None


def test_exceptions_may_be_any_iterable() -> None:
    bg = grant()
    assert effective_ceiling(agent(), iter([bg]), NOW)[1] == {WRITE: "bg-1"}


# --- property: the ceiling in force lies between the ceiling and all it could add ----------

UNIVERSE = [Scope(tool, tier) for tool in ("repo", "db", "mail") for tier in Tier]
AGENTS = (AGENT_ID, "spiffe://example.org/agent/other")
scope_sets = st.frozensets(st.sampled_from(UNIVERSE))
exception_st = st.builds(
    lambda i, who, scopes, start, length, stop: BreakGlass(
        id=f"bg-{i}",
        agent_id=who,
        scopes=scopes,
        justification=WHY,
        granted_by="admin-ann",
        created_at=NOW + timedelta(minutes=start),
        expires_at=NOW + timedelta(minutes=start + length),
        ended_at=None if stop is None else NOW + timedelta(minutes=start + stop),
    ),
    st.integers(0, 50),
    st.sampled_from(AGENTS),
    scope_sets.filter(bool),
    st.integers(-120, 120),
    st.integers(1, 240),
    st.none() | st.integers(0, 240),
)


@given(
    ceiling=scope_sets,
    exceptions=st.lists(exception_st, max_size=8),
    at=st.integers(-180, 360),
)
def test_effective_ceiling_is_bounded(
    ceiling: frozenset[Scope], exceptions: list[BreakGlass], at: int
) -> None:
    a = agent(ceiling)
    now = NOW + timedelta(minutes=at)
    active = [bg for bg in exceptions if bg.agent_id == a.spiffe_id and bg.active_at(now)]
    reachable = ceiling.union(*(bg.scopes for bg in active))

    effective, by = effective_ceiling(a, exceptions, now)

    assert ceiling <= effective <= reachable
    assert effective == reachable  # every active scope is in force
    assert set(by) == effective - ceiling
    ids = {bg.id: bg for bg in active}
    for scope, bg_id in by.items():
        winner = relied_on(a, scope, exceptions, now)
        assert winner is not None
        assert winner.id == bg_id
        assert winner in active
        assert scope in winner.scopes
        # No active exception holding the scope outlasts the one relied on.
        assert all(
            bg.ended_at_or_expiry() <= winner.ended_at_or_expiry()
            for bg in active
            if scope in bg.scopes
        )
        assert bg_id in ids
    for scope in ceiling:
        assert relied_on(a, scope, exceptions, now) is None

"""The break-glass store, conformance-tested on memory, SQLite and PostgreSQL (conftest.py).

Also the columns that name the exception a credential, a task grant or an audit record
relies on, and the audit filters that find them. The races at the end use separate engines
on the SQL backends, as separate processes (two admins clicking at once) would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.breakglass import BreakGlass, BreakGlassRefused
from taskbound.core.clock import FakeClock
from taskbound.core.model import (
    CredentialRecord,
    Revocation,
    RevocationKind,
    Scope,
    ScopeGrant,
    TaskFilter,
    TaskState,
    Tier,
)
from taskbound.errors import Conflict, NotFound, ReferenceError_
from taskbound.storage import Storage
from tests.storage.conftest import Backend
from tests.storage.test_conformance import (
    AGENT,
    IST,
    OTHER_AGENT,
    full_audit,
    make_agent,
    make_audit,
    make_credential,
    make_owner,
    make_task,
)

SCOPES = frozenset({Scope("prod-db", Tier.ADMIN), Scope("github", Tier.ADMIN)})
LIFE = timedelta(hours=1)
REVIEW_WITHIN = timedelta(days=2)
GRANTER = "admin:root"
REASON = "the outage is over"
TICK = timedelta(microseconds=1)


def make_bg(
    now: datetime, bg_id: str = "bg-1", agent_id: str = AGENT, **changes: object
) -> BreakGlass:
    bg = BreakGlass(
        id=bg_id,
        agent_id=agent_id,
        scopes=SCOPES,
        justification="prod outage INC-42: restore the database from last night's backup",
        granted_by=GRANTER,
        created_at=now,
        expires_at=now + LIFE,
    )
    return replace(bg, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def registered(storage: Storage, clock: FakeClock) -> Storage:
    """``storage`` with the owner ``alice`` and the agents ``AGENT`` and ``OTHER_AGENT``."""
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    await storage.create_agent(make_agent(clock.now(), OTHER_AGENT))
    return storage


@dataclass(frozen=True)
class Snapshot:
    """Everything a break-glass transition may change, to show a refusal changed nothing."""

    exceptions: list[BreakGlass]
    credentials: list[CredentialRecord]
    revocations: list[Revocation]


async def snapshot(storage: Storage, now: datetime) -> Snapshot:
    credentials: list[CredentialRecord] = []
    for task in await storage.list_tasks(TaskFilter(limit=1000)):
        credentials += await storage.list_credentials(task.id)
    return Snapshot(
        await storage.list_breakglass(now=now, limit=1000),
        credentials,
        await storage.list_revocations(),
    )


async def refused(code: str, call: Awaitable[object]) -> None:
    """Await ``call`` and check it is refused with ``code``."""
    with pytest.raises(BreakGlassRefused) as caught:
        await call
    assert caught.value.code == code


def revoked_entry(cred: CredentialRecord, now: datetime, reason: str = REASON) -> Revocation:
    return Revocation(
        kind=RevocationKind.CREDENTIAL,
        subject=cred.jti,
        time=now,
        cause="breakglass",
        reason=reason,
        expires_at=cred.expires_at,
        agent_id=cred.agent_id,
        task_id=cred.task_id,
    )


def unnumbered(entries: list[Revocation]) -> set[Revocation]:
    return {replace(e, seq=0) for e in entries}


# --- create, get ---------------------------------------------------------------------------


async def test_round_trip(registered: Storage, clock: FakeClock) -> None:
    clock.advance(0.654321)
    bg = make_bg(
        clock.now().astimezone(IST),
        scopes=frozenset({Scope("prod-db", Tier.ADMIN), Scope("naïve ✓", Tier.WRITE)}),
        justification="an outage: ü, ✓ and 'quotes' are kept as they are",
    )
    await registered.create_breakglass(bg)
    got = await registered.get_breakglass("bg-1")
    assert got == bg
    assert got is not None
    assert got.scopes == bg.scopes
    assert all(isinstance(s.tier, Tier) for s in got.scopes)
    assert got.created_at.tzinfo is UTC
    assert got.expires_at.tzinfo is UTC
    assert got.created_at == clock.now()
    assert got.created_at.microsecond == 654321
    assert got.expires_at == clock.now() + LIFE
    assert (got.ended_at, got.ended_by) == (None, None)
    assert (got.reviewed_at, got.reviewed_by, got.review_note) == (None, None, None)
    assert await registered.get_breakglass("bg-nope") is None
    assert await registered.get_breakglass("bg\x00") is None


async def test_every_field_round_trips_after_end_and_review(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    await registered.create_breakglass(make_bg(start))
    ended_at = clock.advance(60.000007).astimezone(IST)
    _, revoked = await registered.end_breakglass("bg-1", "admin:carol", ended_at, reason=REASON)
    assert revoked == 0
    reviewed_at = clock.advance(3600.5)
    reviewed = await registered.review_breakglass(
        "bg-1", "admin:dave", "checked the logs", reviewed_at
    )
    expected = make_bg(
        start,
        ended_at=ended_at,
        ended_by="admin:carol",
        reviewed_by="admin:dave",
        reviewed_at=reviewed_at,
        review_note="checked the logs",
    )
    assert reviewed == expected
    got = await registered.get_breakglass("bg-1")
    assert got == expected
    assert got is not None
    assert got.ended_at is not None
    assert got.reviewed_at is not None
    assert got.ended_at.tzinfo is UTC
    assert got.reviewed_at.tzinfo is UTC
    assert got.ended_at.microsecond == 7
    assert got.reviewed_at.microsecond == 500007


async def test_create_refuses_what_cannot_be_new(registered: Storage, clock: FakeClock) -> None:
    now = clock.now()
    with pytest.raises(ReferenceError_):
        await registered.create_breakglass(make_bg(now, agent_id="spiffe://example.org/nobody"))
    for changes in (
        {"ended_at": now + TICK, "ended_by": "admin:carol"},
        {"ended_at": now + TICK},
        {
            "ended_at": now + TICK,
            "ended_by": "admin:carol",
            "reviewed_at": now + 2 * TICK,
            "reviewed_by": "admin:dave",
            "review_note": "fine",
        },
        {"reviewed_at": now + 2 * TICK, "reviewed_by": "admin:dave", "review_note": "fine"},
        {"reviewed_at": now + 2 * TICK},
    ):
        with pytest.raises(ValueError, match="neither ended nor reviewed"):
            await registered.create_breakglass(make_bg(now, **changes))
    with pytest.raises(ValueError, match="NUL"):
        await registered.create_breakglass(make_bg(now, justification="a\x00b"))
    with pytest.raises(ValueError, match="naive"):
        await registered.create_breakglass(make_bg(now.replace(tzinfo=None)))
    assert await registered.list_breakglass(now=now) == []

    original = make_bg(now)
    await registered.create_breakglass(original)
    with pytest.raises(Conflict):
        await registered.create_breakglass(
            make_bg(now + TICK, agent_id=OTHER_AGENT, granted_by="admin:other")
        )
    assert await registered.list_breakglass(now=now) == [original]


async def test_a_half_ended_or_half_reviewed_exception_is_not_new(
    registered: Storage, clock: FakeClock
) -> None:
    # Every backend refuses the same way: a new exception carries no trace of an end or a
    # review, whichever of those fields is set.
    now = clock.now()
    for changes in (
        {"ended_by": "admin:carol"},
        {"reviewed_by": "admin:dave"},
        {"review_note": "fine"},
    ):
        with pytest.raises(ValueError, match="neither ended nor reviewed"):
            await registered.create_breakglass(make_bg(now, **changes))
    assert await registered.list_breakglass(now=now) == []


async def test_create_refuses_an_empty_window(registered: Storage, clock: FakeClock) -> None:
    now = clock.now()
    for expires_at in (now, now - TICK):
        with pytest.raises(ValueError, match="expire after"):
            await registered.create_breakglass(make_bg(now, expires_at=expires_at))
    assert await registered.list_breakglass(now=now) == []


# --- list ----------------------------------------------------------------------------------


async def listed(storage: Storage, now: datetime, **kw: object) -> list[str]:
    return [bg.id for bg in await storage.list_breakglass(now=now, **kw)]  # type: ignore[arg-type]


@pytest.fixture
async def five(registered: Storage, clock: FakeClock) -> datetime:
    """Five exceptions granted 10 s apart from the start (returned), and at start + 60 s:
    bg-a (AGENT) and bg-b (OTHER_AGENT) active for an hour, bg-c (AGENT) active until
    start + 80 s, bg-d (AGENT) ended at start + 40 s, bg-e (OTHER_AGENT) ended at
    start + 50 s and reviewed at start + 60 s."""
    start = clock.now()
    at = [start + timedelta(seconds=10 * i) for i in range(7)]
    await registered.create_breakglass(make_bg(at[0], "bg-a"))
    await registered.create_breakglass(make_bg(at[1], "bg-b", OTHER_AGENT))
    await registered.create_breakglass(
        make_bg(at[2], "bg-c", expires_at=at[2] + timedelta(seconds=60))
    )
    await registered.create_breakglass(make_bg(at[3], "bg-d"))
    await registered.end_breakglass("bg-d", "admin:carol", at[4], reason=REASON)
    await registered.create_breakglass(make_bg(at[4], "bg-e", OTHER_AGENT))
    await registered.end_breakglass("bg-e", "admin:carol", at[5], reason=REASON)
    await registered.review_breakglass("bg-e", "admin:dave", "all fine", at[6])
    clock.set(at[6])
    return start


async def test_list_states_at_now(registered: Storage, five: datetime) -> None:
    start = five
    now = start + timedelta(seconds=60)
    assert await listed(registered, now) == ["bg-e", "bg-d", "bg-c", "bg-b", "bg-a"]
    assert await listed(registered, now, state=None) == ["bg-e", "bg-d", "bg-c", "bg-b", "bg-a"]
    assert await listed(registered, now, state="active") == ["bg-c", "bg-b", "bg-a"]
    assert await listed(registered, now, state="review") == ["bg-d"]
    assert await listed(registered, now, state="reviewed") == ["bg-e"]

    # At bg-c's expiry instant it is no longer active and waits for review.
    expiry = start + timedelta(seconds=80)
    assert await listed(registered, expiry - TICK, state="active") == ["bg-c", "bg-b", "bg-a"]
    assert await listed(registered, expiry - TICK, state="review") == ["bg-d"]
    assert await listed(registered, expiry, state="active") == ["bg-b", "bg-a"]
    assert await listed(registered, expiry, state="review") == ["bg-d", "bg-c"]

    # Before an exception is granted it is not active; before its end, not in review.
    early = start + timedelta(seconds=5)
    assert await listed(registered, early, state="active") == ["bg-a"]
    assert await listed(registered, early, state="review") == []
    # bg-d ended early at start + 40 s.
    assert await listed(registered, start + timedelta(seconds=40) - TICK, state="review") == []
    assert "bg-d" not in await listed(registered, start + timedelta(seconds=40), state="active")

    # A time in another zone is the same instant.
    assert await listed(registered, expiry.astimezone(IST), state="review") == ["bg-d", "bg-c"]


async def test_list_by_agent_and_limit(registered: Storage, five: datetime) -> None:
    now = five + timedelta(seconds=60)
    assert await listed(registered, now, agent_id=AGENT) == ["bg-d", "bg-c", "bg-a"]
    assert await listed(registered, now, agent_id=OTHER_AGENT) == ["bg-e", "bg-b"]
    assert await listed(registered, now, agent_id=AGENT, state="active") == ["bg-c", "bg-a"]
    assert await listed(registered, now, agent_id=OTHER_AGENT, state="active") == ["bg-b"]
    assert await listed(registered, now, agent_id=OTHER_AGENT, state="review") == []
    assert await listed(registered, now, agent_id=OTHER_AGENT, state="reviewed") == ["bg-e"]
    assert await listed(registered, now, agent_id="spiffe://example.org/nobody") == []
    assert await listed(registered, now, agent_id=AGENT + "\x00") == []
    assert await listed(registered, now, agent_id="spiffe://%") == []
    assert await listed(registered, now, limit=2) == ["bg-e", "bg-d"]
    assert await listed(registered, now, limit=1, state="active") == ["bg-c"]
    assert await listed(registered, now, limit=1, agent_id=OTHER_AGENT) == ["bg-e"]
    assert await listed(registered, now, limit=100) == ["bg-e", "bg-d", "bg-c", "bg-b", "bg-a"]


async def test_list_refuses_bad_queries(registered: Storage, five: datetime) -> None:
    now = five + timedelta(seconds=60)
    for state in ("ended", "", "ACTIVE", "expired"):
        with pytest.raises(ValueError, match="state"):
            await registered.list_breakglass(now=now, state=state)
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit"):
            await registered.list_breakglass(now=now, limit=limit)


async def test_list_ties_by_id_in_code_point_order(registered: Storage, clock: FakeClock) -> None:
    now = clock.now()
    for bg_id in ("bg-b", "bg-B", "bg-a", "bg-ä"):
        await registered.create_breakglass(make_bg(now, bg_id))
    await registered.create_breakglass(make_bg(now - TICK, "bg-0"))
    assert await listed(registered, now) == ["bg-B", "bg-a", "bg-b", "bg-ä", "bg-0"]


# --- end -----------------------------------------------------------------------------------


@pytest.fixture
async def relying(registered: Storage, clock: FakeClock) -> dict[str, CredentialRecord]:
    """bg-1 and bg-2 (AGENT) granted at the start, and credentials of task-1 (AGENT) and
    task-2 (OTHER_AGENT): ``root`` relies on bg-1 (given at create_task), ``late`` too (added
    later), ``child`` was derived from root, ``grandchild`` (task-2) from child, ``plain``
    relies on nothing, ``other`` on bg-2, ``gone`` on bg-1 but has expired by the time
    returned in the clock, ``leaked`` on bg-1 and was revoked before."""
    start = clock.now()
    await registered.create_breakglass(make_bg(start, "bg-1"))
    await registered.create_breakglass(make_bg(start, "bg-2"))
    task = make_task(start, ttl=3600)
    other = make_task(start, "task-2", agent_id=OTHER_AGENT, ttl=3600)
    creds = {
        "root": make_credential(task, "root", start, ttl=600, exception_id="bg-1"),
        "late": make_credential(task, "late", start, exception_id="bg-1", tier=Tier.ADMIN),
        "child": make_credential(task, "child", start, ttl=200, parent_jti="root"),
        "grandchild": make_credential(other, "grandchild", start, ttl=100, parent_jti="child"),
        "plain": make_credential(task, "plain", start),
        "other": make_credential(task, "other", start, ttl=3600, exception_id="bg-2"),
        "gone": make_credential(task, "gone", start, ttl=10, exception_id="bg-1"),
        "leaked": make_credential(task, "leaked", start, exception_id="bg-1"),
    }
    assert await registered.create_task(task, [creds["root"], creds["gone"]])
    assert await registered.create_task(other, [])
    for name in ("late", "child", "grandchild", "plain", "other", "leaked"):
        assert await registered.add_credential(creds[name], start)
    assert await registered.revoke_credential("leaked", "leaked", clock.advance(5))
    clock.advance(10)  # "gone" has expired
    return creds


async def test_credentials_carry_their_exception(
    registered: Storage, relying: dict[str, CredentialRecord]
) -> None:
    for name in ("root", "gone", "late", "child", "other", "plain"):
        assert await registered.get_credential(name) == relying[name]
    got = await registered.get_credential("late")
    assert got is not None
    assert got.exception_id == "bg-1"
    root = await registered.get_credential("root")
    assert root is not None
    assert root.exception_id == "bg-1"
    child = await registered.get_credential("child")
    assert child is not None
    assert child.exception_id is None
    by_jti = {c.jti: c.exception_id for c in await registered.list_credentials("task-1")}
    assert by_jti == {
        "root": "bg-1",
        "late": "bg-1",
        "child": None,
        "plain": None,
        "other": "bg-2",
        "gone": "bg-1",
        "leaked": "bg-1",
    }


async def test_a_derived_credential_carries_its_exception(
    registered: Storage, relying: dict[str, CredentialRecord], clock: FakeClock
) -> None:
    now = clock.now()
    task = await registered.get_task("task-2")
    assert task is not None
    derived = make_credential(task, "derived", now, parent_jti="plain", exception_id="bg-2")
    assert await registered.add_derived_credential(derived, now, single_use=False)
    assert await registered.get_credential("derived") == derived


async def test_end_revokes_what_relies_on_it(
    registered: Storage, relying: dict[str, CredentialRecord], clock: FakeClock
) -> None:
    creds = relying
    before = await registered.list_revocations()
    leaked = await registered.get_credential("leaked")
    now = clock.advance(30)
    ended, count = await registered.end_breakglass("bg-1", "admin:carol", now, reason=REASON)
    assert count == 4
    assert ended == replace(make_bg(ended.created_at, "bg-1"), ended_at=now, ended_by="admin:carol")
    assert await registered.get_breakglass("bg-1") == ended

    for name in ("root", "late", "child", "grandchild"):
        got = await registered.get_credential(name)
        assert got is not None
        assert (got.revoked_at, got.revoke_reason) == (now, REASON), name
    for name in ("plain", "other", "gone"):
        got = await registered.get_credential(name)
        assert got is not None
        assert (got.revoked_at, got.revoke_reason) == (None, None), name
    assert await registered.get_credential("leaked") == leaked  # revoked before, kept so

    after = await registered.list_revocations(after=before[-1].seq)
    assert unnumbered(after) == {
        revoked_entry(creds[name], now) for name in ("root", "late", "child", "grandchild")
    }
    assert [e.seq for e in after] == list(range(before[-1].seq + 1, before[-1].seq + 5))
    # Credentials are revoked, tasks are not; the other exception stays in force.
    for task_id in ("task-1", "task-2"):
        task = await registered.get_task(task_id)
        assert task is not None
        assert task.state is TaskState.ACTIVE
    assert await listed(registered, now, state="active") == ["bg-2"]
    assert await listed(registered, now, state="review") == ["bg-1"]


async def test_end_refusals_change_nothing(
    registered: Storage, relying: dict[str, CredentialRecord], clock: FakeClock
) -> None:
    now = clock.advance(30)
    ended, _ = await registered.end_breakglass("bg-1", "admin:carol", now, reason=REASON)
    state = await snapshot(registered, now)

    later = clock.advance(30)
    await refused(
        "already_ended", registered.end_breakglass("bg-1", "admin:dave", later, reason="x")
    )
    await refused(
        "already_ended", registered.end_breakglass("bg-1", "admin:carol", now, reason=REASON)
    )
    with pytest.raises(NotFound):
        await registered.end_breakglass("bg-nope", "admin:carol", later, reason=REASON)
    with pytest.raises(NotFound):
        await registered.end_breakglass("bg\x00", "admin:carol", later, reason=REASON)
    with pytest.raises(ValueError, match="NUL"):
        await registered.end_breakglass("bg-2", "admin:carol", later, reason="a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        await registered.end_breakglass("bg-2", "admin\x00", later, reason=REASON)
    assert await snapshot(registered, now) == state
    assert await registered.get_breakglass("bg-1") == ended


async def test_end_after_expiry_is_already_ended(
    registered: Storage, relying: dict[str, CredentialRecord], clock: FakeClock
) -> None:
    bg2 = await registered.get_breakglass("bg-2")
    assert bg2 is not None
    state = await snapshot(registered, bg2.expires_at)
    # At the expiry instant it has ended by itself.
    for when in (bg2.expires_at, bg2.expires_at + timedelta(days=1)):
        await refused(
            "already_ended", registered.end_breakglass("bg-2", "admin:carol", when, reason=REASON)
        )
    assert await snapshot(registered, bg2.expires_at) == state
    assert await registered.get_breakglass("bg-2") == bg2
    other = await registered.get_credential("other")
    assert other is not None
    assert other.revoked_at is None
    # One instant before, it can still be ended.
    ended, count = await registered.end_breakglass(
        "bg-2", "admin:carol", bg2.expires_at - TICK, reason=REASON
    )
    assert (ended.ended_at, count) == (bg2.expires_at - TICK, 1)


async def test_end_with_nothing_relying_logs_nothing(registered: Storage, clock: FakeClock) -> None:
    await registered.create_breakglass(make_bg(clock.now()))
    now = clock.advance(1)
    ended, count = await registered.end_breakglass("bg-1", "admin:carol", now, reason=REASON)
    assert count == 0
    assert (ended.ended_at, ended.ended_by) == (now, "admin:carol")
    assert await registered.list_revocations() == []


# --- review --------------------------------------------------------------------------------


async def test_review(registered: Storage, clock: FakeClock) -> None:
    await registered.create_breakglass(make_bg(clock.now()))
    active = await snapshot(registered, clock.now())
    await refused(
        "not_ended", registered.review_breakglass("bg-1", "admin:dave", "fine", clock.advance(1))
    )
    assert await snapshot(registered, clock.now()) == active

    ended, _ = await registered.end_breakglass(
        "bg-1", "admin:carol", clock.advance(1), reason=REASON
    )
    state = await snapshot(registered, clock.now())
    now = clock.advance(60)
    await refused(
        "self_review_not_allowed", registered.review_breakglass("bg-1", GRANTER, "fine", now)
    )
    for blank in ("", "   ", "\n\t"):
        await refused(
            "review_note_required", registered.review_breakglass("bg-1", "admin:dave", blank, now)
        )
    with pytest.raises(NotFound):
        await registered.review_breakglass("bg-nope", "admin:dave", "fine", now)
    with pytest.raises(NotFound):
        await registered.review_breakglass("bg\x00", "admin:dave", "fine", now)
    with pytest.raises(ValueError, match="NUL"):
        await registered.review_breakglass("bg-1", "admin:dave", "a\x00b", now)
    assert await snapshot(registered, now) == state
    assert await registered.get_breakglass("bg-1") == ended

    reviewed = await registered.review_breakglass(
        "bg-1", "admin:dave", "  checked the logs \n", now
    )
    assert reviewed == replace(
        ended, reviewed_by="admin:dave", reviewed_at=now, review_note="checked the logs"
    )
    assert await registered.get_breakglass("bg-1") == reviewed
    state = await snapshot(registered, now)

    later = clock.advance(60)
    for reviewer in ("admin:dave", "admin:erin", GRANTER):
        await refused(
            "already_reviewed", registered.review_breakglass("bg-1", reviewer, "again", later)
        )
    await refused(
        "already_ended", registered.end_breakglass("bg-1", "admin:carol", later, reason=REASON)
    )
    assert await snapshot(registered, later) == state
    assert await listed(registered, later, state="reviewed") == ["bg-1"]
    assert await listed(registered, later, state="review") == []


async def test_review_after_expiry_without_an_end(registered: Storage, clock: FakeClock) -> None:
    bg = make_bg(clock.now())
    await registered.create_breakglass(bg)
    await refused(
        "not_ended",
        registered.review_breakglass("bg-1", "admin:dave", "fine", bg.expires_at - TICK),
    )
    assert await registered.get_breakglass("bg-1") == bg
    reviewed = await registered.review_breakglass("bg-1", "admin:dave", "fine", bg.expires_at)
    assert (reviewed.ended_at, reviewed.ended_by) == (None, None)
    assert (reviewed.reviewed_by, reviewed.reviewed_at) == ("admin:dave", bg.expires_at)
    assert await registered.get_breakglass("bg-1") == reviewed


# --- overdue reviews -----------------------------------------------------------------------


async def test_count_overdue_at_the_deadline(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    await registered.create_breakglass(make_bg(start, "bg-early"))
    await registered.create_breakglass(make_bg(start, "bg-expiring"))
    await registered.create_breakglass(make_bg(start, "bg-active", expires_at=start + 2 * LIFE))
    ended_at = start + timedelta(minutes=10)
    await registered.end_breakglass("bg-early", "admin:carol", ended_at, reason=REASON)

    async def overdue(when: datetime) -> int:
        return await registered.count_overdue_breakglass(when, REVIEW_WITHIN)

    assert await overdue(start) == 0
    assert await overdue(ended_at + REVIEW_WITHIN - TICK) == 0
    assert await overdue(ended_at + REVIEW_WITHIN) == 1
    assert await overdue((ended_at + REVIEW_WITHIN).astimezone(IST)) == 1
    expiry = start + LIFE
    assert await overdue(expiry + REVIEW_WITHIN - TICK) == 1
    assert await overdue(expiry + REVIEW_WITHIN) == 2
    # The active one, once it expires, counts after its own deadline only.
    assert await overdue(start + 2 * LIFE + REVIEW_WITHIN - TICK) == 2
    assert await overdue(start + 2 * LIFE + REVIEW_WITHIN) == 3
    assert await registered.count_overdue_breakglass(ended_at, timedelta(0)) == 1

    late = expiry + REVIEW_WITHIN
    await registered.review_breakglass("bg-early", "admin:dave", "fine", late)
    assert await overdue(late) == 1
    await registered.review_breakglass("bg-expiring", "admin:dave", "fine", late)
    assert await overdue(late) == 0
    assert await overdue(late + timedelta(days=365)) == 1  # bg-active, never reviewed


# --- task grants and audit records name the exception --------------------------------------


async def test_task_grants_carry_their_exception(registered: Storage, clock: FakeClock) -> None:
    task = make_task(
        clock.now(),
        granted=(
            ScopeGrant("github", Tier.READ, ("get_repo",)),
            ScopeGrant("prod-db", Tier.ADMIN, ("restore", "drop"), exception="bg-1"),
            ScopeGrant("github", Tier.ADMIN, (), "bg-2"),
        ),
    )
    assert await registered.create_task(task, [])
    got = await registered.get_task("task-1")
    assert got == task
    assert got is not None
    assert [g.exception for g in got.granted] == [None, "bg-1", "bg-2"]
    assert await registered.list_tasks(TaskFilter(agent_id=AGENT)) == [task]


async def test_audit_exception_round_trips(storage: Storage, clock: FakeClock) -> None:
    full = full_audit(clock.now().astimezone(IST), txn="txn-1", exception_id="bg-1")
    bare = make_audit(clock.advance(1))
    assert await storage.append_audits([full, bare]) == [1, 2]
    assert await storage.list_audit() == [(1, full), (2, bare)]
    (_, first), (_, second) = await storage.list_audit()
    assert (first.exception_id, second.exception_id) == ("bg-1", None)
    with pytest.raises(ValueError, match="NUL"):
        await storage.append_audit(make_audit(clock.now(), exception_id="bg\x00"))
    assert len(await storage.list_audit()) == 2


async def test_audit_filters_by_owner_decision_and_exception(
    storage: Storage, clock: FakeClock
) -> None:
    rows = [
        ("alice", "allow", "bg-1"),
        ("bob", "deny", None),
        ("alice", "deny", "bg-1"),
        ("alice", "allow", None),
        (None, "allow", "bg-2"),
        ("bob", "allow", "bg-1"),
        ("alice", "allow", "bg-1"),
    ]
    seqs = [
        await storage.append_audit(
            make_audit(clock.advance(1), owner=o, decision=d, exception_id=e, agent=AGENT)
        )
        for o, d, e in rows
    ]
    s = dict(enumerate(seqs, start=1))

    async def found(**kw: object) -> list[int]:
        return [n for n, _ in await storage.list_audit(**kw)]  # type: ignore[arg-type]

    assert await found(owner="alice") == [s[1], s[3], s[4], s[7]]
    assert await found(decision="deny") == [s[2], s[3]]
    assert await found(exception="bg-1") == [s[1], s[3], s[6], s[7]]
    assert await found(exception="bg-2") == [s[5]]
    assert await found(owner="alice", decision="allow") == [s[1], s[4], s[7]]
    assert await found(owner="alice", exception="bg-1", decision="allow") == [s[1], s[7]]
    assert await found(owner="bob", exception="bg-1", agent=AGENT) == [s[6]]
    assert await found(owner="bob", exception="bg-1", agent=OTHER_AGENT) == []
    assert await found(owner="alice", task="task-1") == []
    assert await found(exception="bg-1", after=s[1], limit=2) == [s[3], s[6]]
    assert await found(exception="bg-1", limit=0) == []
    # Exact matches only; a NUL matches nothing.
    assert await found(owner="ali%") == []
    assert await found(exception="bg-%") == []
    assert await found(decision="allow\x00") == []
    assert await found(exception="bg-1\x00") == []
    assert await found(owner="alice\x00") == []
    events = await storage.list_audit(exception="bg-1", decision="deny")
    assert [(e.owner, e.decision, e.exception_id) for _, e in events] == [("alice", "deny", "bg-1")]


async def test_audit_newest_first(storage: Storage, clock: FakeClock) -> None:
    seqs = [
        await storage.append_audit(
            make_audit(clock.advance(1), exception_id="bg-1" if i % 2 else None)
        )
        for i in range(7)
    ]
    newest = seqs[::-1]

    async def found(**kw: object) -> list[int]:
        return [n for n, _ in await storage.list_audit(**kw)]  # type: ignore[arg-type]

    assert await found(descending=True) == newest
    assert await found(descending=True, limit=3) == newest[:3]
    assert await found(descending=True, limit=0) == []
    assert await found(descending=False) == seqs
    # ``after`` is ignored newest first.
    assert await found(descending=True, after=seqs[4]) == newest
    assert await found(descending=True, exception="bg-1") == [seqs[5], seqs[3], seqs[1]]
    assert await found(descending=True, exception="bg-1", limit=2) == [seqs[5], seqs[3]]
    got = await storage.list_audit(descending=True, limit=1)
    assert got == [(seqs[-1], make_audit(clock.now(), exception_id=None))]
    with pytest.raises(ValueError, match="limit"):
        await storage.list_audit(descending=True, limit=-1)
    with pytest.raises(ValueError, match="after"):
        await storage.list_audit(descending=True, after=-1)


# --- races ---------------------------------------------------------------------------------

HANDLES = 10


async def _handles(backend: Backend, count: int) -> list[Storage]:
    handles = [backend.another() for _ in range(count)]
    await asyncio.gather(*(h.check() for h in handles))
    return handles


async def _ready(backend: Backend, clock: FakeClock) -> Storage:
    storage = backend.storage
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    await storage.create_breakglass(make_bg(clock.now()))
    return storage


async def test_concurrent_reviews_apply_once(backend: Backend, clock: FakeClock) -> None:
    storage = await _ready(backend, clock)
    await storage.end_breakglass("bg-1", "admin:carol", clock.advance(1), reason=REASON)
    handles = await _handles(backend, HANDLES)
    now = clock.advance(1)
    results = await asyncio.gather(
        *(
            h.review_breakglass("bg-1", f"admin:reviewer-{i}", f"note {i}", now)
            for i, h in enumerate(handles)
        ),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, BreakGlass)]
    refusals = [r for r in results if not isinstance(r, BreakGlass)]
    assert len(accepted) == 1, results
    assert all(isinstance(r, BreakGlassRefused) for r in refusals), refusals
    assert {r.code for r in refusals if isinstance(r, BreakGlassRefused)} == {"already_reviewed"}
    (winner,) = accepted
    assert await storage.get_breakglass("bg-1") == winner
    assert winner.review_note == f"note {winner.reviewed_by.split('-')[-1]}"  # type: ignore[union-attr]


async def test_concurrent_ends_apply_once(backend: Backend, clock: FakeClock) -> None:
    storage = await _ready(backend, clock)
    task = make_task(clock.now(), ttl=3600)
    cred = make_credential(task, "root", clock.now(), exception_id="bg-1")
    child = make_credential(task, "child", clock.now(), parent_jti="root")
    assert await storage.create_task(task, [cred, child])
    handles = await _handles(backend, HANDLES)
    now = clock.advance(1)
    results = await asyncio.gather(
        *(
            h.end_breakglass("bg-1", f"admin:ender-{i}", now, reason=f"reason {i}")
            for i, h in enumerate(handles)
        ),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, tuple)]
    refusals = [r for r in results if not isinstance(r, tuple)]
    assert len(accepted) == 1, results
    assert all(isinstance(r, BreakGlassRefused) for r in refusals), refusals
    assert {r.code for r in refusals if isinstance(r, BreakGlassRefused)} == {"already_ended"}
    ((winner, count),) = accepted
    assert count == 2
    assert await storage.get_breakglass("bg-1") == winner
    assert winner.ended_by is not None
    reason = f"reason {winner.ended_by.split('-')[-1]}"
    log = await storage.list_revocations()
    assert unnumbered(log) == {revoked_entry(cred, now, reason), revoked_entry(child, now, reason)}
    for jti in ("root", "child"):
        got = await storage.get_credential(jti)
        assert got is not None
        assert (got.revoked_at, got.revoke_reason) == (now, reason)


async def test_credentials_relying_on_an_ended_exception_are_never_stored(
    registered: Storage, backend: Backend, clock: FakeClock
) -> None:
    """The grant decision reads the exceptions in force, then stores the credentials: an
    early end committed in between is caught when they are stored (under the exception's
    row lock), so no credential outlives the revocation of its exception."""
    storage = registered
    now = clock.now()
    await storage.create_breakglass(make_bg(now))
    task = make_task(now, "task-bg")
    relying = make_credential(task, "c-relying", now, exception_id="bg-1")
    await storage.end_breakglass("bg-1", "admin:ada", now, reason=REASON)
    with pytest.raises(Conflict) as info:
        await storage.create_task(task, [relying])
    assert info.value.code == "already_ended"
    assert await storage.get_task("task-bg") is None
    assert await storage.get_credential("c-relying") is None
    # A refresh of a live task, and an exchange, are refused the same way.
    plain = make_task(now, "task-plain")
    assert await storage.create_task(plain, [make_credential(plain, "c-plain", now)])
    with pytest.raises(Conflict) as info:
        await storage.add_credential(
            make_credential(plain, "c-refresh", now, exception_id="bg-1"), now
        )
    assert info.value.code == "already_ended"
    child = make_credential(plain, "c-child", now, parent_jti="c-plain", exception_id="bg-1")
    assert not await storage.add_derived_credential(child, now, single_use=False)
    assert await storage.get_credential("c-refresh") is None
    assert await storage.get_credential("c-child") is None
    # One in force is fine; past its expiry it is not.
    await storage.create_breakglass(make_bg(now, "bg-2"))
    ok = make_task(now, "task-ok")
    assert await storage.create_task(ok, [make_credential(ok, "c-ok", now, exception_id="bg-2")])
    late = make_task(now + LIFE, "task-late")
    with pytest.raises(Conflict) as info:
        await storage.create_task(
            replace(late, created_at=now + LIFE),
            [make_credential(late, "c-late", now + LIFE, exception_id="bg-2")],
        )
    assert info.value.code == "already_ended"

"""The revocation log's conformance suite: one set of tests, every backend (STYLE.md rule 4).

The contract is the docstrings of :mod:`taskbound.storage.base`: every revoking method
appends its entries in the same transaction as the change, numbered in commit order, and
nothing is logged when nothing changed. Each test runs against memory, SQLite and
PostgreSQL (see conftest.py); the ``NOTIFY`` and commit-order tests run on PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta

import psycopg
import pytest
from sqlalchemy.engine import make_url

from taskbound.core.clock import FakeClock
from taskbound.core.model import (
    AgentState,
    CredentialRecord,
    KeyPurpose,
    KeyState,
    Revocation,
    RevocationKind,
    Task,
    TaskState,
)
from taskbound.errors import Conflict, NotFound
from taskbound.storage import SqlStorage, Storage
from tests.services import postgres_conninfo
from tests.storage.conftest import Backend
from tests.storage.test_conformance import (
    AGENT,
    IST,
    OTHER_AGENT,
    make_agent,
    make_credential,
    make_key,
    make_owner,
    make_task,
)

CHANNEL = "taskbound_revocations"
NOTIFY_WAIT_S = 5.0
# How long to listen for a notification that must not come.
SILENCE_S = 0.5

TASK = RevocationKind.TASK
CREDENTIAL = RevocationKind.CREDENTIAL


@pytest.fixture
async def registered(storage: Storage, clock: FakeClock) -> Storage:
    """``storage`` with the owner ``alice`` and the agents ``AGENT`` and ``OTHER_AGENT``."""
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    await storage.create_agent(make_agent(clock.now(), OTHER_AGENT))
    return storage


# --- expected entries ----------------------------------------------------------------------


def task_entry(task: Task, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(
        kind=TASK,
        subject=task.id,
        time=now,
        cause=cause,
        reason=reason,
        expires_at=task.expires_at,
        agent_id=task.agent_id,
        task_id=task.id,
    )


def credential_entry(cred: CredentialRecord, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(
        kind=CREDENTIAL,
        subject=cred.jti,
        time=now,
        cause=cause,
        reason=reason,
        expires_at=cred.expires_at,
        agent_id=cred.agent_id,
        task_id=cred.task_id,
    )


def agent_entry(state: AgentState, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(
        kind=RevocationKind.AGENT,
        subject=AGENT,
        time=now,
        cause=cause,
        reason=reason,
        state=state.value,
        agent_id=AGENT,
    )


def owner_entry(state: str, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(
        kind=RevocationKind.OWNER,
        subject="alice",
        time=now,
        cause=cause,
        reason=reason,
        state=state,
    )


def key_entry(kid: str, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(kind=RevocationKind.KEY, subject=kid, time=now, cause=cause, reason=reason)


def unnumbered(entries: list[Revocation]) -> set[Revocation]:
    """The entries without their numbers, for comparing what one transaction logged (its
    entries' order among themselves is not part of the contract)."""
    plain = [replace(e, seq=0) for e in entries]
    assert len(set(plain)) == len(plain), f"an entry logged twice: {plain}"
    return set(plain)


async def new_entries(storage: Storage, after: int) -> list[Revocation]:
    """Entries numbered above ``after``; checks they are numbered consecutively from it (no
    failed insert happens in these tests, so PostgreSQL's identity skips nothing)."""
    got = await storage.list_revocations(after=after)
    assert [e.seq for e in got] == list(range(after + 1, after + 1 + len(got)))
    return got


async def assert_live(storage: Storage, *jtis: str) -> None:
    for jti in jtis:
        cred = await storage.get_credential(jti)
        assert cred is not None
        assert cred.revoked_at is None, jti


async def assert_revoked(storage: Storage, now: datetime, reason: str, *jtis: str) -> None:
    for jti in jtis:
        cred = await storage.get_credential(jti)
        assert cred is not None
        assert (cred.revoked_at, cred.revoke_reason) == (now, reason), jti


async def task_state(storage: Storage, task_id: str) -> TaskState:
    task = await storage.get_task(task_id)
    assert task is not None
    return task.state


# --- end_task ------------------------------------------------------------------------------


async def test_log_starts_empty(storage: Storage) -> None:
    assert await storage.list_revocations() == []
    assert await storage.last_revocation_seq() == 0


async def test_end_task_logs_one_task_entry(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    task = make_task(start, ttl=600)
    await registered.create_task(
        task, [make_credential(task, "c1", start), make_credential(task, "c2", start)]
    )
    assert await registered.list_revocations() == []

    end = clock.advance(5.25)
    result = await registered.end_task("task-1", TaskState.COMPLETED, "done", end.astimezone(IST))
    assert result is not None
    assert result[1] is True
    # One entry for the task: its own credentials are covered by it, not listed one by one.
    (entry,) = await registered.list_revocations()
    assert entry == replace(task_entry(task, end, "agent", "done"), seq=1)
    assert entry.time.tzinfo is not None
    assert entry.time.utcoffset() == timedelta(0)
    assert await registered.last_revocation_seq() == 1
    await assert_revoked(registered, end, "done", "c1", "c2")

    # Ending an ended task changes nothing and logs nothing.
    again = await registered.end_task(
        "task-1", TaskState.REVOKED, "again", clock.advance(1), cause="admin:tok-1"
    )
    assert again is not None
    assert again[1] is False
    assert await registered.list_revocations() == [entry]

    # The cause is recorded as given.
    other = make_task(clock.now(), "task-2", ttl=60)
    await registered.create_task(other, [])
    stop = clock.advance(2)
    await registered.end_task("task-2", TaskState.REVOKED, "stop", stop, cause="admin:tok-1")
    assert await new_entries(registered, 1) == [
        replace(task_entry(other, stop, "admin:tok-1", "stop"), seq=2)
    ]

    assert await registered.end_task("ghost", TaskState.COMPLETED, "x", clock.now()) is None
    assert await registered.last_revocation_seq() == 2


async def test_end_task_logs_derived_credentials_of_other_tasks(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    task = make_task(start, "task-a")
    own = make_credential(task, "a1", start)
    own_child = make_credential(task, "a2", start, parent_jti="a1")
    await registered.create_task(task, [own, own_child])
    # Another agent's task holds credentials derived from task-a's (a token exchange).
    other = make_task(start, "task-b", agent_id=OTHER_AGENT, ttl=900)
    derived = make_credential(other, "b1", start, ttl=700, parent_jti="a1")
    deeper = make_credential(other, "b2", start, ttl=800, parent_jti="b1")
    from_child = make_credential(other, "b3", start, ttl=600, parent_jti="a2")
    unrelated = make_credential(other, "b4", start)
    gone = make_credential(other, "b5", start, parent_jti="a1")
    await registered.create_task(other, [derived, deeper, from_child, unrelated, gone])
    earlier = clock.advance(1)
    assert await registered.revoke_credential("b5", "rotated", earlier) is True
    before = await registered.last_revocation_seq()

    end = clock.advance(1)
    await registered.end_task("task-a", TaskState.CANCELLED, "abandoned", end, cause="agent")
    got = await new_entries(registered, before)
    assert unnumbered(got) == {
        task_entry(task, end, "agent", "abandoned"),
        credential_entry(derived, end, "agent", "abandoned"),
        credential_entry(deeper, end, "agent", "abandoned"),
        credential_entry(from_child, end, "agent", "abandoned"),
    }
    await assert_revoked(registered, end, "abandoned", "a1", "a2", "b1", "b2", "b3")
    await assert_revoked(registered, earlier, "rotated", "b5")  # revoked before: not again
    await assert_live(registered, "b4")
    assert await task_state(registered, "task-b") is TaskState.ACTIVE


# --- revoke_credential ---------------------------------------------------------------------


async def chain(storage: Storage, clock: FakeClock) -> dict[str, CredentialRecord]:
    """root -> child -> grandchild (the last in another agent's task), and beside them
    sibling -> nephew, all live."""
    start = clock.now()
    task = make_task(start)
    other = make_task(start, "task-2", agent_id=OTHER_AGENT, ttl=1200)
    creds = {
        "root": make_credential(task, "root", start, ttl=300),
        "sibling": make_credential(task, "sibling", start),
        "child": make_credential(task, "child", start, ttl=200, parent_jti="root"),
        "nephew": make_credential(task, "nephew", start, parent_jti="sibling"),
        "grandchild": make_credential(other, "grandchild", start, ttl=900, parent_jti="child"),
    }
    for t in (task, other):
        assert await storage.create_task(t, [])
    for name in ("root", "sibling", "child", "nephew", "grandchild"):
        assert await storage.add_credential(creds[name], start)
    return creds


async def test_revoke_credential_logs_it_and_all_descendants(
    registered: Storage, clock: FakeClock
) -> None:
    creds = await chain(registered, clock)
    now = clock.advance(3)
    assert await registered.revoke_credential("root", "leaked", now, cause="admin:tok-1") is True
    got = await new_entries(registered, 0)
    assert unnumbered(got) == {
        credential_entry(creds[name], now, "admin:tok-1", "leaked")
        for name in ("root", "child", "grandchild")
    }
    await assert_revoked(registered, now, "leaked", "root", "child", "grandchild")
    await assert_live(registered, "sibling", "nephew")
    # Credentials are revoked, tasks are not.
    assert await task_state(registered, "task-1") is TaskState.ACTIVE
    assert await task_state(registered, "task-2") is TaskState.ACTIVE


async def test_revoking_a_child_leaves_its_parent(registered: Storage, clock: FakeClock) -> None:
    creds = await chain(registered, clock)
    now = clock.advance(3)
    assert await registered.revoke_credential("child", "misused", now) is True
    got = await new_entries(registered, 0)
    assert unnumbered(got) == {
        credential_entry(creds["child"], now, "system", "misused"),
        credential_entry(creds["grandchild"], now, "system", "misused"),
    }
    await assert_live(registered, "root", "sibling", "nephew")

    # Revoking the parent now logs only what was still live.
    later = clock.advance(3)
    assert await registered.revoke_credential("root", "leaked", later) is True
    assert await new_entries(registered, 2) == [
        replace(credential_entry(creds["root"], later, "system", "leaked"), seq=3)
    ]
    await assert_revoked(registered, now, "misused", "child", "grandchild")


async def test_refused_revocations_log_nothing(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    task = make_task(start)
    short = make_credential(task, "short", start, ttl=10)
    heir = make_credential(task, "heir", start, ttl=300, parent_jti="short")
    await registered.create_task(task, [make_credential(task, "c1", start), short, heir])
    assert await registered.revoke_credential("c1", "leaked", clock.advance(1)) is True
    logged = await registered.list_revocations()
    assert len(logged) == 1

    # Already revoked, unknown, or not storable as a key: nothing to do.
    assert await registered.revoke_credential("c1", "again", clock.advance(1)) is False
    assert await registered.revoke_credential("ghost", "x", clock.now()) is False
    assert await registered.revoke_credential("gh\x00st", "x", clock.now()) is False
    # Expired (at exactly its expiry, too): not live, so not revoked, and neither is what
    # was derived from it.
    assert (
        await registered.revoke_credential("short", "late", start + timedelta(seconds=10)) is False
    )
    assert await registered.revoke_credential("short", "late", clock.advance(60)) is False
    await assert_live(registered, "short", "heir")
    assert await registered.list_revocations() == logged
    assert await registered.last_revocation_seq() == 1


async def test_large_cascade_and_default_limit(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    task = make_task(start)
    root = make_credential(task, "root", start)
    children = [make_credential(task, f"c-{i:04d}", start, parent_jti="root") for i in range(1000)]
    await registered.create_task(task, [root, *children])
    now = clock.advance(1)
    assert await registered.revoke_credential("root", "leaked", now) is True
    first = await registered.list_revocations()
    assert [e.seq for e in first] == list(range(1, 1001))  # the default limit is 1000
    rest = await registered.list_revocations(after=1000)
    assert [e.seq for e in rest] == [1001]
    assert {e.subject for e in first + rest} == {"root", *(c.jti for c in children)}
    assert await registered.last_revocation_seq() == 1001


# --- expire_tasks --------------------------------------------------------------------------


async def test_expire_tasks_logs_with_cause_expiry(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    soon = make_task(start, "soon", ttl=5)
    also = make_task(start, "also", ttl=8)
    later = make_task(start, "later", ttl=3600)
    await registered.create_task(soon, [make_credential(soon, "s1", start)])
    await registered.create_task(also, [])
    derived = make_credential(later, "l1", start, ttl=1800, parent_jti="s1")
    await registered.create_task(later, [derived, make_credential(later, "l2", start)])

    now = clock.advance(10)
    assert await registered.expire_tasks(now) == ["also", "soon"]
    got = await new_entries(registered, 0)
    assert unnumbered(got) == {
        task_entry(soon, now, "expiry", "expired"),
        task_entry(also, now, "expiry", "expired"),
        credential_entry(derived, now, "expiry", "expired"),
    }
    await assert_live(registered, "l2")
    assert await registered.expire_tasks(clock.advance(1)) == []
    assert await registered.last_revocation_seq() == 3


@pytest.mark.parametrize("how", ["expiry", "suspension", "owner"])
async def test_tasks_ended_together_need_no_credential_entries(
    storage: Storage, clock: FakeClock, how: str
) -> None:
    """A credential derived across two tasks that end in the same call is covered by its
    own task's entry (as ``end_task`` logs only derived credentials of *other* tasks)."""
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    first = make_task(start, "t-a", ttl=5)
    second = make_task(start, "t-b", ttl=5)
    await storage.create_task(first, [make_credential(first, "a1", start)])
    await storage.create_task(second, [make_credential(second, "b1", start, parent_jti="a1")])
    now = clock.advance(10)
    if how == "expiry":
        assert await storage.expire_tasks(now) == ["t-a", "t-b"]
        cause, reason = "expiry", "expired"
        extra = set()
    elif how == "suspension":
        await storage.set_agent_state(AGENT, AgentState.SUSPENDED, now)
        cause, reason = "system", "agent suspended"
        extra = {agent_entry(AgentState.SUSPENDED, now, cause, reason)}
    else:
        await storage.update_owner(make_owner(start, disabled=True, updated_at=now))
        cause, reason = "system", "owner disabled"
        extra = {owner_entry("disabled", now, cause, reason)}
    assert unnumbered(await storage.list_revocations()) == {
        task_entry(first, now, cause, reason),
        task_entry(second, now, cause, reason),
        *extra,
    }


# --- agents --------------------------------------------------------------------------------


async def test_set_agent_state_logs_agent_and_tasks(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    t1 = make_task(start, "t1")
    t2 = make_task(start, "t2", ttl=60)
    done = make_task(start, "done")
    theirs = make_task(start, "theirs", agent_id=OTHER_AGENT)
    await registered.create_task(t1, [make_credential(t1, "c1", start)])
    await registered.create_task(t2, [])
    await registered.create_task(done, [])
    derived = make_credential(theirs, "x1", start, parent_jti="c1")
    await registered.create_task(theirs, [derived, make_credential(theirs, "x2", start)])
    await registered.end_task("done", TaskState.COMPLETED, "finished", start)
    before = await registered.last_revocation_seq()

    now = clock.advance(1)
    agent = await registered.set_agent_state(
        AGENT, AgentState.SUSPENDED, now.astimezone(IST), cause="admin:tok-1", reason="odd"
    )
    assert agent is not None
    assert (agent.state, agent.updated_at) == (AgentState.SUSPENDED, now)
    got = await new_entries(registered, before)
    assert unnumbered(got) == {
        agent_entry(AgentState.SUSPENDED, now, "admin:tok-1", "odd"),
        task_entry(t1, now, "admin:tok-1", "odd"),
        task_entry(t2, now, "admin:tok-1", "odd"),
        credential_entry(derived, now, "admin:tok-1", "odd"),
    }
    assert await task_state(registered, "theirs") is TaskState.ACTIVE
    await assert_live(registered, "x2")
    seq = await registered.last_revocation_seq()

    # The same state again: nothing changes, nothing is logged.
    await registered.set_agent_state(AGENT, AgentState.SUSPENDED, clock.advance(1))
    assert await registered.last_revocation_seq() == seq

    # Defaults: cause "system", reason "agent <state>"; resuming is logged too.
    quarantined = clock.advance(1)
    await registered.set_agent_state(AGENT, AgentState.QUARANTINED, quarantined)
    resumed = clock.advance(1)
    await registered.set_agent_state(AGENT, AgentState.ACTIVE, resumed)
    assert [replace(e, seq=0) for e in await new_entries(registered, seq)] == [
        agent_entry(AgentState.QUARANTINED, quarantined, "system", "agent quarantined"),
        agent_entry(AgentState.ACTIVE, resumed, "system", "agent active"),
    ]
    # Resuming brings no task back.
    assert await task_state(registered, "t1") is TaskState.REVOKED

    assert await registered.set_agent_state("spiffe://x/none", AgentState.RETIRED, resumed) is None
    assert await registered.last_revocation_seq() == seq + 2


async def test_default_reasons_of_revoked_tasks(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [make_credential(task, "c1", clock.now())])
    now = clock.advance(1)
    await registered.set_agent_state(AGENT, AgentState.SUSPENDED, now)
    assert unnumbered(await registered.list_revocations()) == {
        agent_entry(AgentState.SUSPENDED, now, "system", "agent suspended"),
        task_entry(task, now, "system", "agent suspended"),
    }
    ended = await registered.get_task("task-1")
    assert ended is not None
    assert ended.end_reason == "agent suspended"
    await assert_revoked(registered, now, "agent suspended", "c1")


async def test_update_agent_logs_changes_of_state_only(
    registered: Storage, clock: FakeClock
) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [])

    await registered.update_agent(
        make_agent(clock.now(), description="renamed", updated_at=clock.advance(1))
    )
    assert await registered.list_revocations() == []
    assert await task_state(registered, "task-1") is TaskState.ACTIVE

    now = clock.advance(1)
    await registered.update_agent(
        make_agent(clock.now(), state=AgentState.QUARANTINED, updated_at=now),
        cause="signal:siem",
        reason="credential stuffing",
    )
    assert unnumbered(await registered.list_revocations()) == {
        agent_entry(AgentState.QUARANTINED, now, "signal:siem", "credential stuffing"),
        task_entry(task, now, "signal:siem", "credential stuffing"),
    }

    # A new description in the same state logs nothing; a new state logs the new state.
    await registered.update_agent(
        make_agent(
            clock.now(), state=AgentState.QUARANTINED, description="x", updated_at=clock.advance(1)
        )
    )
    assert await registered.last_revocation_seq() == 2
    resumed = clock.advance(1)
    await registered.update_agent(make_agent(clock.now(), updated_at=resumed))
    assert await new_entries(registered, 2) == [
        replace(agent_entry(AgentState.ACTIVE, resumed, "system", "agent active"), seq=3)
    ]

    with pytest.raises(NotFound):
        await registered.update_agent(make_agent(clock.now(), "spiffe://x/none", state="retired"))
    assert await registered.last_revocation_seq() == 3


async def test_retired_is_final(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [])
    now = clock.advance(1)
    retired = await registered.set_agent_state(AGENT, AgentState.RETIRED, now, reason="gone")
    assert retired is not None
    assert unnumbered(await registered.list_revocations()) == {
        agent_entry(AgentState.RETIRED, now, "system", "gone"),
        task_entry(task, now, "system", "gone"),
    }

    for state in (AgentState.ACTIVE, AgentState.SUSPENDED, AgentState.QUARANTINED):
        with pytest.raises(Conflict):
            await registered.set_agent_state(AGENT, state, clock.advance(1))
        with pytest.raises(Conflict):
            await registered.update_agent(
                make_agent(clock.now(), state=state, description="back", updated_at=clock.now())
            )
    assert await registered.get_agent(AGENT) == retired
    assert await registered.last_revocation_seq() == 2

    # Retired to retired is no change of state: allowed, and not logged.
    again = clock.advance(1)
    got = await registered.set_agent_state(AGENT, AgentState.RETIRED, again)
    assert got == replace(retired, updated_at=again)
    await registered.update_agent(
        make_agent(clock.now(), state=AgentState.RETIRED, description="archived", updated_at=again)
    )
    agent = await registered.get_agent(AGENT)
    assert agent is not None
    assert (agent.state, agent.description) == (AgentState.RETIRED, "archived")
    assert await registered.last_revocation_seq() == 2


# --- owners --------------------------------------------------------------------------------


async def test_update_owner_logs_disabled_and_enabled(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    t1 = make_task(start, "t1")
    t2 = make_task(start, "t2", agent_id=OTHER_AGENT, ttl=90)
    await registered.create_task(t1, [make_credential(t1, "c1", start)])
    await registered.create_task(t2, [])

    # No change of ``disabled``: nothing logged.
    await registered.update_owner(make_owner(start, contact="a@x", updated_at=clock.advance(1)))
    assert await registered.list_revocations() == []

    off = clock.advance(1)
    await registered.update_owner(
        make_owner(start, disabled=True, updated_at=off), cause="admin:tok-1", reason="left"
    )
    assert unnumbered(await registered.list_revocations()) == {
        owner_entry("disabled", off, "admin:tok-1", "left"),
        task_entry(t1, off, "admin:tok-1", "left"),
        task_entry(t2, off, "admin:tok-1", "left"),
    }
    await assert_revoked(registered, off, "left", "c1")

    await registered.update_owner(
        make_owner(start, disabled=True, contact="b@x", updated_at=clock.advance(1))
    )
    assert await registered.last_revocation_seq() == 3

    on = clock.advance(1)
    await registered.update_owner(make_owner(start, updated_at=on))
    assert await new_entries(registered, 3) == [
        replace(owner_entry("enabled", on, "system", "owner enabled"), seq=4)
    ]
    assert await task_state(registered, "t1") is TaskState.REVOKED

    with pytest.raises(NotFound):
        await registered.update_owner(make_owner(start, "bob", disabled=True))
    assert await registered.last_revocation_seq() == 4


async def test_disabling_an_owner_default_reason(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [])
    off = clock.advance(1)
    await registered.update_owner(make_owner(clock.now(), disabled=True, updated_at=off))
    assert unnumbered(await registered.list_revocations()) == {
        owner_entry("disabled", off, "system", "owner disabled"),
        task_entry(task, off, "system", "owner disabled"),
    }


# --- signing keys --------------------------------------------------------------------------


async def test_withdraw_unknown_key(registered: Storage, clock: FakeClock) -> None:
    await registered.insert_active_key(make_key(clock.now(), "kid-1"))
    assert await registered.withdraw_key("ghost", clock.now(), None) is None
    assert await registered.withdraw_key("ghost", clock.now(), make_key(clock.now(), "n")) is None
    assert [k.kid for k in await registered.list_keys()] == ["kid-1"]
    assert await registered.list_revocations() == []


async def test_withdraw_retiring_key(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    await registered.insert_active_key(make_key(start, "kid-1"))
    await registered.rotate_key(make_key(clock.advance(1), "kid-2"), start + timedelta(hours=1))
    task = make_task(start)
    other = make_task(start, "task-2", agent_id=OTHER_AGENT)
    signed = make_credential(task, "a", start, ttl=300)
    stale = make_credential(task, "b", start, ttl=5)
    fresh = make_credential(task, "c", start, kid="kid-2")
    # Derived from a credential of the withdrawn key, though signed with the new one.
    derived = make_credential(other, "d", start, ttl=200, kid="kid-2", parent_jti="a")
    early = make_credential(task, "e", start)
    await registered.create_task(task, [signed, stale, fresh, early])
    await registered.create_task(other, [derived])
    assert await registered.revoke_credential("e", "rotated", clock.advance(1)) is True
    before = await registered.last_revocation_seq()

    now = clock.advance(10)  # "b" has expired
    revoked = await registered.withdraw_key(
        "kid-1", now, None, cause="admin:tok-1", reason="compromised"
    )
    assert revoked == 2
    assert [(k.kid, k.state) for k in await registered.list_keys()] == [("kid-2", KeyState.ACTIVE)]
    assert unnumbered(await new_entries(registered, before)) == {
        key_entry("kid-1", now, "admin:tok-1", "compromised"),
        credential_entry(signed, now, "admin:tok-1", "compromised"),
        credential_entry(derived, now, "admin:tok-1", "compromised"),
    }
    await assert_revoked(registered, now, "compromised", "a", "d")
    await assert_live(registered, "b", "c")
    early_now = await registered.get_credential("e")
    assert early_now is not None
    assert early_now.revoke_reason == "rotated"

    # Gone now: a second withdrawal finds nothing.
    assert await registered.withdraw_key("kid-1", clock.advance(1), None) is None
    assert await registered.last_revocation_seq() == before + 3


async def test_withdraw_active_key_needs_a_replacement(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    await registered.insert_active_key(make_key(start, "kid-1"))
    await registered.insert_active_key(make_key(start, "dev-1", KeyPurpose.DEV_IDENTITY))
    task = make_task(start)
    signed = make_credential(task, "a", start)
    await registered.create_task(task, [signed])
    keys = await registered.list_keys()

    with pytest.raises(ValueError, match="replacement"):
        await registered.withdraw_key("kid-1", clock.advance(1), None)
    assert await registered.list_keys() == keys
    await assert_live(registered, "a")
    assert await registered.list_revocations() == []

    now = clock.advance(1)
    replacement = make_key(now, "kid-9")
    assert await registered.withdraw_key("kid-1", now, replacement, reason="compromised") == 1
    assert await registered.list_keys(KeyPurpose.CREDENTIALS) == [replacement]
    assert [k.kid for k in await registered.list_keys(KeyPurpose.DEV_IDENTITY)] == ["dev-1"]
    assert await registered.insert_active_key(make_key(now, "kid-10")) == replacement
    assert unnumbered(await registered.list_revocations()) == {
        key_entry("kid-1", now, "system", "compromised"),
        credential_entry(signed, now, "system", "compromised"),
    }
    await assert_revoked(registered, now, "compromised", "a")


async def test_withdraw_with_a_replacement_of_another_purpose_changes_nothing(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    await registered.insert_active_key(make_key(start, "kid-1"))
    await registered.insert_active_key(make_key(start, "dev-1", KeyPurpose.DEV_IDENTITY))
    task = make_task(start)
    await registered.create_task(task, [make_credential(task, "a", start)])
    keys = await registered.list_keys()

    wrong = make_key(clock.advance(1), "sig-1", KeyPurpose.SIGNALS)
    with pytest.raises(ValueError, match="purpose"):
        await registered.withdraw_key("kid-1", clock.now(), wrong)
    # The SQL store checks the purpose after deleting, inside its transaction: the delete
    # must have been rolled back.
    assert await registered.list_keys() == keys
    assert await registered.list_keys(KeyPurpose.SIGNALS) == []
    await assert_live(registered, "a")
    assert await registered.list_revocations() == []


async def test_withdraw_with_a_replacement_kid_in_use_changes_nothing(
    registered: Storage, clock: FakeClock
) -> None:
    start = clock.now()
    await registered.insert_active_key(make_key(start, "kid-1"))
    await registered.insert_active_key(make_key(start, "dev-1", KeyPurpose.DEV_IDENTITY))
    task = make_task(start)
    await registered.create_task(task, [make_credential(task, "a", start)])
    keys = await registered.list_keys()

    with pytest.raises(Conflict):
        await registered.withdraw_key("kid-1", clock.advance(1), make_key(start, "dev-1"))
    assert await registered.list_keys() == keys
    await assert_live(registered, "a")
    assert await registered.list_revocations() == []


async def test_withdrawn_kid_cannot_be_its_own_replacement(
    storage: Storage, clock: FakeClock
) -> None:
    """A replacement under the withdrawn key's own kid is a kid already stored: Conflict,
    as for any other kid in use, and nothing changes (a compromised kid is never reissued)."""
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    original = make_key(start, "kid-1")
    await storage.insert_active_key(original)
    task = make_task(start)
    await storage.create_task(task, [make_credential(task, "a", start)])

    same_kid = replace(make_key(clock.advance(1), "kid-1"), private_ciphertext=b"new")
    with pytest.raises(Conflict):
        await storage.withdraw_key("kid-1", clock.now(), same_kid)
    assert await storage.list_keys() == [original]
    await assert_live(storage, "a")
    assert await storage.list_revocations() == []


# --- reading and pruning the log ----------------------------------------------------------


async def logged_four(storage: Storage, clock: FakeClock) -> datetime:
    """Log 1: task t1 (expires start+100), 2: agent OTHER_AGENT suspended (no expiry),
    3: task t2 (start+200), 4: task t3 (start+300). Returns start."""
    start = clock.now()
    for task_id, ttl in (("t1", 100), ("t2", 200), ("t3", 300)):
        await storage.create_task(make_task(start, task_id, ttl=ttl), [])
    await storage.end_task("t1", TaskState.COMPLETED, "done", clock.advance(1))
    await storage.set_agent_state(OTHER_AGENT, AgentState.SUSPENDED, clock.advance(1))
    await storage.end_task("t2", TaskState.COMPLETED, "done", clock.advance(1))
    await storage.end_task("t3", TaskState.COMPLETED, "done", clock.advance(1))
    return start


def seqs(entries: list[Revocation]) -> list[int]:
    return [e.seq for e in entries]


async def test_list_revocations_pages_and_filters(registered: Storage, clock: FakeClock) -> None:
    start = await logged_four(registered, clock)
    everything = await registered.list_revocations()
    assert seqs(everything) == [1, 2, 3, 4]
    assert [(e.kind, e.subject) for e in everything] == [
        (TASK, "t1"),
        (RevocationKind.AGENT, OTHER_AGENT),
        (TASK, "t2"),
        (TASK, "t3"),
    ]
    assert everything[1].expires_at is None
    assert await registered.last_revocation_seq() == 4

    assert seqs(await registered.list_revocations(after=1)) == [2, 3, 4]
    assert await registered.list_revocations(after=4) == []
    assert await registered.list_revocations(after=99) == []
    assert seqs(await registered.list_revocations(limit=2)) == [1, 2]
    assert seqs(await registered.list_revocations(after=2, limit=1)) == [3]

    def at(seconds: int) -> datetime:
        return start + timedelta(seconds=seconds)

    assert seqs(await registered.list_revocations(live_at=at(50))) == [1, 2, 3, 4]
    # Live means expiring later than then: an entry expiring exactly then no longer matters.
    assert seqs(await registered.list_revocations(live_at=at(100))) == [2, 3, 4]
    assert seqs(await registered.list_revocations(live_at=at(200).astimezone(IST))) == [2, 4]
    assert seqs(await registered.list_revocations(live_at=at(10_000))) == [2]
    assert seqs(await registered.list_revocations(after=2, live_at=at(150))) == [3, 4]
    # The limit counts the entries kept by the filter.
    assert seqs(await registered.list_revocations(live_at=at(250), limit=1)) == [2]
    assert seqs(await registered.list_revocations(after=2, live_at=at(250), limit=1)) == [4]
    assert await registered.list_revocations(after=4, live_at=at(0)) == []


async def test_list_revocations_refuses_bad_bounds(storage: Storage) -> None:
    with pytest.raises(ValueError, match="after"):
        await storage.list_revocations(after=-1)
    with pytest.raises(ValueError, match="limit"):
        await storage.list_revocations(limit=0)
    with pytest.raises(ValueError, match="limit"):
        await storage.list_revocations(limit=-5)


async def test_prune_revocations(registered: Storage, clock: FakeClock) -> None:
    start = await logged_four(registered, clock)
    assert await registered.prune_revocations(start + timedelta(seconds=99)) == 0
    # Up to and including ``now``.
    assert await registered.prune_revocations(start + timedelta(seconds=100)) == 1
    assert seqs(await registered.list_revocations()) == [2, 3, 4]
    assert await registered.prune_revocations(start + timedelta(seconds=250)) == 1
    assert seqs(await registered.list_revocations()) == [2, 4]
    # Entries without an expiry stay however late it is.
    assert await registered.prune_revocations(start + timedelta(days=3650)) == 1
    (kept,) = await registered.list_revocations()
    assert (kept.seq, kept.kind, kept.expires_at) == (2, RevocationKind.AGENT, None)
    assert await registered.prune_revocations(start + timedelta(days=3650)) == 0

    # Numbers are never reused: the next entry comes after every entry ever logged.
    task = make_task(clock.now(), "t4")
    await registered.create_task(task, [])
    await registered.end_task("t4", TaskState.COMPLETED, "done", clock.advance(1))
    newest = await registered.list_revocations(after=2)
    assert [(e.subject, e.seq > 4) for e in newest] == [("t4", True)]
    assert await registered.last_revocation_seq() == newest[0].seq
    # A reader that had seen up to 4 finds it.
    assert await registered.list_revocations(after=4) == newest


async def test_last_revocation_seq_is_the_highest_stored(
    storage: Storage, clock: FakeClock
) -> None:
    """``last_revocation_seq``: "The highest sequence number stored (0 when the log is
    empty)" -- also once pruning has emptied it."""
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    for task_id, ttl in (("t1", 100), ("t2", 200)):
        await storage.create_task(make_task(start, task_id, ttl=ttl), [])
        await storage.end_task(task_id, TaskState.COMPLETED, "done", clock.advance(1))
    assert await storage.last_revocation_seq() == 2
    assert await storage.prune_revocations(start + timedelta(seconds=200)) == 2
    assert await storage.list_revocations() == []
    assert await storage.last_revocation_seq() == 0


# --- Shared Signals cursors ---------------------------------------------------------------


async def test_signal_cursor_compare_and_set(storage: Storage, clock: FakeClock) -> None:
    now = clock.now()
    assert await storage.get_signal_cursor("rx") is None
    assert await storage.set_signal_cursor("rx", 5, now, expected=None) is True
    assert await storage.get_signal_cursor("rx") == 5
    # Create only once.
    assert await storage.set_signal_cursor("rx", 7, clock.advance(1), expected=None) is False
    assert await storage.get_signal_cursor("rx") == 5
    # Move only from the expected value.
    assert await storage.set_signal_cursor("rx", 9, clock.advance(1), expected=4) is False
    assert await storage.get_signal_cursor("rx") == 5
    assert await storage.set_signal_cursor("rx", 9, clock.advance(1), expected=5) is True
    assert await storage.get_signal_cursor("rx") == 9
    assert await storage.set_signal_cursor("rx", 12, clock.advance(1), expected=5) is False
    assert await storage.get_signal_cursor("rx") == 9

    # Receivers are independent; a missing cursor cannot be moved.
    assert await storage.get_signal_cursor("ry") is None
    assert await storage.set_signal_cursor("ry", 1, clock.now(), expected=9) is False
    assert await storage.get_signal_cursor("ry") is None
    assert await storage.set_signal_cursor("ry", 0, clock.now(), expected=None) is True
    assert await storage.get_signal_cursor("ry") == 0
    assert await storage.get_signal_cursor("rx") == 9

    with pytest.raises(ValueError, match="NUL"):
        await storage.set_signal_cursor("r\x00", 1, clock.now(), expected=None)
    assert await storage.get_signal_cursor("r\x00") is None
    # Cursors are not log entries.
    assert await storage.list_revocations() == []


async def test_concurrent_cursor_moves_succeed_once(backend: Backend, clock: FakeClock) -> None:
    await backend.storage.set_signal_cursor("rx", 10, clock.now(), expected=None)
    handles = [backend.another() for _ in range(6)]
    results = await asyncio.gather(
        *(
            h.set_signal_cursor("rx", 11 + i, clock.now(), expected=10)
            for i, h in enumerate(handles)
        )
    )
    assert results.count(True) == 1
    assert await backend.storage.get_signal_cursor("rx") == 11 + results.index(True)
    created = await asyncio.gather(
        *(h.set_signal_cursor("new", i, clock.now(), expected=None) for i, h in enumerate(handles))
    )
    assert created.count(True) == 1
    assert await backend.storage.get_signal_cursor("new") == created.index(True)


# --- text ----------------------------------------------------------------------------------


async def test_nul_in_cause_or_reason_writes_nothing(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    await registered.insert_active_key(make_key(start, "kid-1"))
    task = make_task(start)
    await registered.create_task(task, [make_credential(task, "c1", start)])
    keys = await registered.list_keys()
    owner = await registered.get_owner("alice")
    agent = await registered.get_agent(AGENT)
    now = clock.advance(1)
    bad = "a\x00b"
    replacement = make_key(now, "kid-2")

    calls = [
        registered.end_task("task-1", TaskState.REVOKED, bad, now),
        registered.end_task("task-1", TaskState.REVOKED, "ok", now, cause=bad),
        registered.revoke_credential("c1", bad, now),
        registered.revoke_credential("c1", "ok", now, cause=bad),
        registered.set_agent_state(AGENT, AgentState.SUSPENDED, now, cause=bad),
        registered.set_agent_state(AGENT, AgentState.SUSPENDED, now, reason=bad),
        registered.update_agent(
            make_agent(start, state=AgentState.SUSPENDED, updated_at=now), reason=bad
        ),
        registered.update_agent(
            make_agent(start, state=AgentState.SUSPENDED, updated_at=now), cause=bad
        ),
        registered.update_owner(make_owner(start, disabled=True, updated_at=now), cause=bad),
        registered.update_owner(make_owner(start, disabled=True, updated_at=now), reason=bad),
        registered.withdraw_key("kid-1", now, replacement, reason=bad),
        registered.withdraw_key("kid-1", now, replacement, cause=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="NUL"):
            await call

    assert await registered.list_revocations() == []
    assert await registered.last_revocation_seq() == 0
    assert await task_state(registered, "task-1") is TaskState.ACTIVE
    await assert_live(registered, "c1")
    assert await registered.get_agent(AGENT) == agent
    assert await registered.get_owner("alice") == owner
    assert await registered.list_keys() == keys


# --- PostgreSQL notifications -------------------------------------------------------------


Listener = psycopg.AsyncConnection[tuple[object, ...]]


# NOTIFY and the delaying trigger are PostgreSQL's: these run on that backend alone.
POSTGRES_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


class Tagged:
    """A storage on ``backend``'s schema whose connections carry a unique
    ``application_name``. The test server is shared (other test sessions, other schemas)
    and a NOTIFY channel is database-wide, so notifications and sleeping sessions are
    told apart by the backend process that sent them."""

    def __init__(self, backend: Backend) -> None:
        assert backend.name == "postgres", "NOTIFY and the delaying trigger are PostgreSQL's"
        assert backend.url is not None
        self.name = f"tb-test-{secrets.token_hex(6)}"
        self.conninfo = postgres_conninfo(backend.url)
        url = make_url(backend.url).update_query_dict({"application_name": self.name})
        self.storage = SqlStorage.from_url(url.render_as_string(hide_password=False))

    async def is_ours(self, pid: int) -> bool:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            row = await cur.fetchone()
        return row is not None and row[0] == self.name

    async def sleeping(self) -> bool:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event = 'PgSleep'",
                (self.name,),
            )
            row = await cur.fetchone()
        return row is not None and bool(row[0])

    async def listen(self) -> Listener:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        await conn.execute(f"LISTEN {CHANNEL}")
        return conn

    async def notified(self, conn: Listener, wait: float, *, first: bool) -> list[str]:
        """Payloads this storage sent on the channel within ``wait`` seconds; with
        ``first``, return as soon as there is one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        payloads: list[str] = []
        while (left := deadline - loop.time()) > 0:
            notes = [n async for n in conn.notifies(timeout=left, stop_after=1)]
            if not notes:
                break
            for note in notes:
                if note.channel == CHANNEL and await self.is_ours(note.pid):
                    payloads.append(note.payload)
            if first and payloads:
                break
        return payloads


@POSTGRES_ONLY
async def test_postgres_notifies_the_highest_new_seq(backend: Backend, clock: FakeClock) -> None:
    tagged = Tagged(backend)
    storage = tagged.storage
    conn = await tagged.listen()
    try:
        start = clock.now()
        await storage.create_owner(make_owner(start))
        await storage.create_agent(make_agent(start))
        await storage.create_agent(make_agent(start, OTHER_AGENT))
        task = make_task(start)
        other = make_task(start, "task-2", agent_id=OTHER_AGENT)
        await storage.create_task(task, [make_credential(task, "a1", start)])
        await storage.create_task(other, [make_credential(other, "b1", start, parent_jti="a1")])
        # Writes that log nothing notify nothing.
        assert await tagged.notified(conn, SILENCE_S, first=False) == []

        # Two entries in one transaction (the task, the derived credential): one
        # notification, carrying the higher number.
        await storage.end_task("task-1", TaskState.REVOKED, "stop", clock.advance(1))
        assert await storage.last_revocation_seq() == 2
        assert await tagged.notified(conn, NOTIFY_WAIT_S, first=True) == ["2"]
        assert await tagged.notified(conn, SILENCE_S, first=False) == []

        # Nothing changed, nothing logged, nothing sent.
        await storage.end_task("task-1", TaskState.REVOKED, "again", clock.advance(1))
        assert await storage.revoke_credential("b1", "again", clock.now()) is False
        assert await tagged.notified(conn, SILENCE_S, first=False) == []

        await storage.set_agent_state(OTHER_AGENT, AgentState.SUSPENDED, clock.advance(1))
        assert await storage.last_revocation_seq() == 4  # the agent and task-2
        assert await tagged.notified(conn, NOTIFY_WAIT_S, first=True) == ["4"]

        # A refused withdrawal rolls back and sends nothing.
        await storage.insert_active_key(make_key(start, "kid-1"))
        with pytest.raises(ValueError, match="purpose"):
            await storage.withdraw_key(
                "kid-1", clock.now(), make_key(start, "sig", KeyPurpose.SIGNALS)
            )
        assert await tagged.notified(conn, SILENCE_S, first=False) == []
    finally:
        await conn.close()
        await storage.close()


@POSTGRES_ONLY
async def test_postgres_numbers_follow_commit_order(backend: Backend, clock: FakeClock) -> None:
    """An entry numbered below another is visible once that other one is: a transaction
    that has taken a number and not yet committed holds back every later writer.

    A trigger (added to this test's schema only) makes the first writer sleep right after
    inserting its entry, before its commit."""
    tagged = Tagged(backend)
    slow_writer = tagged.storage
    storage = backend.storage
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    for task_id in ("slow", "fast"):
        await storage.create_task(make_task(start, task_id), [])
    fast_writer = backend.another()
    await asyncio.gather(slow_writer.check(), fast_writer.check())

    conn = await psycopg.AsyncConnection.connect(tagged.conninfo, autocommit=True)
    try:
        await conn.execute(
            "CREATE FUNCTION tb_test_slow_log() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF NEW.subject = 'slow' THEN PERFORM pg_sleep(1.5); END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER tb_test_slow_log AFTER INSERT ON revocations "
            "FOR EACH ROW EXECUTE FUNCTION tb_test_slow_log()"
        )
        now = clock.advance(1)
        slow = asyncio.ensure_future(slow_writer.end_task("slow", TaskState.REVOKED, "stop", now))
        # Wait until the slow writer sleeps inside its transaction, its entry inserted.
        for _ in range(200):
            if await tagged.sleeping():
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the slow writer never reached its trigger")
        await fast_writer.end_task("fast", TaskState.REVOKED, "stop", now)
        visible = await storage.list_revocations()
        await slow
    finally:
        await conn.execute("DROP TRIGGER IF EXISTS tb_test_slow_log ON revocations")
        await conn.execute("DROP FUNCTION IF EXISTS tb_test_slow_log()")
        await conn.close()
        await slow_writer.close()
    everything = await storage.list_revocations()
    assert sorted(e.subject for e in everything) == ["fast", "slow"]
    (fast_seq,) = [e.seq for e in visible if e.subject == "fast"]
    assert [e for e in visible if e.seq <= fast_seq] == [e for e in everything if e.seq <= fast_seq]


# --- concurrency ---------------------------------------------------------------------------


async def test_concurrent_ends_get_distinct_increasing_numbers(
    backend: Backend, clock: FakeClock
) -> None:
    storage = backend.storage
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    ids = [f"task-{i}" for i in range(8)]
    for task_id in ids:
        task = make_task(start, task_id)
        await storage.create_task(task, [make_credential(task, "c-" + task_id, start)])
    handles = [backend.another() for _ in ids]
    await asyncio.gather(*(h.check() for h in handles))

    now = clock.advance(1)
    results = await asyncio.gather(
        *(
            h.end_task(task_id, TaskState.COMPLETED, "done", now)
            for h, task_id in zip(handles, ids, strict=True)
        )
    )
    assert all(r is not None and r[1] for r in results)
    logged = await storage.list_revocations()
    assert sorted(e.subject for e in logged) == ids
    assert seqs(logged) == sorted(set(seqs(logged)))
    assert seqs(logged) == list(range(1, len(ids) + 1))


async def test_a_follower_misses_no_entry(backend: Backend, clock: FakeClock) -> None:
    """A reader following ``after=last`` while writers commit sees every entry: numbers
    are given in commit order, so none commits late below what it has already read."""
    storage = backend.storage
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    writers = [backend.another() for _ in range(4)]
    reader = backend.another()
    per_writer = 6
    for w in range(len(writers)):
        for i in range(per_writer):
            task = make_task(start, f"w{w}-{i}")
            await storage.create_task(task, [make_credential(task, f"c{w}-{i}", start)])
    done = asyncio.Event()

    async def write(w: int) -> None:
        for i in range(per_writer):
            if i % 2:
                await writers[w].end_task(f"w{w}-{i}", TaskState.REVOKED, "stop", clock.now())
            else:
                await writers[w].revoke_credential(f"c{w}-{i}", "leaked", clock.now())

    async def follow() -> list[Revocation]:
        seen: list[Revocation] = []
        last = 0
        while True:
            finished = done.is_set()
            batch = await reader.list_revocations(after=last)
            seen += batch
            if batch:
                last = batch[-1].seq
            if finished:
                return seen
            await asyncio.sleep(0)

    async def write_all() -> None:
        try:
            await asyncio.gather(*(write(w) for w in range(len(writers))))
        finally:
            done.set()

    seen, _ = await asyncio.gather(follow(), write_all())
    everything = await storage.list_revocations()
    assert len(everything) == len(writers) * per_writer
    assert seen == everything


async def test_overlapping_revocations_log_each_credential_once(
    backend: Backend, clock: FakeClock
) -> None:
    storage = backend.storage
    start = clock.now()
    await storage.create_owner(make_owner(start))
    await storage.create_agent(make_agent(start))
    await storage.create_agent(make_agent(start, OTHER_AGENT))
    handles = [backend.another() for _ in range(4)]
    await asyncio.gather(*(h.check() for h in handles))
    for round_ in range(3):
        task = make_task(start, f"r{round_}-a")
        other = make_task(start, f"r{round_}-b", agent_id=OTHER_AGENT)
        names = [f"r{round_}-{n}" for n in ("root", "mid", "leaf", "tip")]
        await storage.create_task(task, [make_credential(task, names[0], start)])
        await storage.create_task(
            other,
            [
                make_credential(other, names[1], start, parent_jti=names[0]),
                make_credential(other, names[2], start, parent_jti=names[1]),
                make_credential(other, names[3], start, parent_jti=names[2]),
            ],
        )
        before = await storage.last_revocation_seq()
        now = clock.advance(1)
        await asyncio.gather(
            handles[0].revoke_credential(names[0], "x", now),
            handles[1].revoke_credential(names[2], "x", now),
            handles[2].revoke_credential(names[1], "x", now),
            handles[3].end_task(task.id, TaskState.REVOKED, "x", now),
        )
        got = await storage.list_revocations(after=before)
        subjects = Counter(e.subject for e in got if e.kind is CREDENTIAL)
        assert all(count == 1 for count in subjects.values()), subjects
        # Every credential derived into the other task is logged once, whoever got there
        # first; only the root may be covered by its task's entry instead.
        assert set(subjects) - {names[0]} == set(names[1:])
        assert [e.subject for e in got if e.kind is TASK] == [task.id]
        for jti in names:
            cred = await storage.get_credential(jti)
            assert cred is not None
            assert cred.revoked_at == now

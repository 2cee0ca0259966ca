"""Aggregate reads of the audit log for the posture reports (docs/reports.md): usage
grouped in the store and a per-day timeline, on every backend; tasks by creation time, and
the agents of many tasks in one bulk read."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.model import AuditEvent, TaskFilter
from taskbound.core.usage import TimelineRow, UsageRow
from taskbound.storage import Storage, sql
from tests.storage.test_conformance import (
    AGENT,
    IST,
    OTHER_AGENT,
    make_agent,
    make_owner,
    make_task,
)

T0 = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)


def call(when: datetime, **changes: object) -> AuditEvent:
    event = AuditEvent(
        time=when,
        event="gateway.call",
        decision="allow",
        agent=AGENT,
        owner="alice",
        task="t1",
        tool="github",
        action="get_repo",
        tier="read",
    )
    return replace(event, **changes)  # type: ignore[arg-type]


async def seed(storage: Storage) -> None:
    await storage.append_audits(
        [
            call(T0 - timedelta(seconds=1)),  # before the window
            call(T0),  # first instant: in
            call(T0 + timedelta(minutes=30)),
            call(T0 + timedelta(minutes=50), decision="deny", code="policy_denied"),
            # the next UTC day (written with an offset: grouped by the UTC day)
            call((T0 + timedelta(hours=2)).astimezone(IST), action="search"),
            call(T0 + timedelta(hours=3), agent=OTHER_AGENT, owner="bob", task="t2"),
            call(
                T0 + timedelta(hours=4),
                decision="approval_required",
                action="merge",
                tier="write",
            ),
            # not a gateway call: never counted
            call(T0 + timedelta(hours=1), event="task.started", decision="info"),
            # a refused call with nothing known but the time
            AuditEvent(time=T0 + timedelta(hours=5), event="gateway.call", decision="error"),
            call(T0 + timedelta(days=2)),  # at `until`: out
        ]
    )


async def test_audit_usage_groups_gateway_calls_in_the_window(storage: Storage) -> None:
    await seed(storage)
    rows = await storage.audit_usage(since=T0, until=T0 + timedelta(days=2))
    key = lambda r: tuple(str(v) for v in (r.agent, r.task, r.action, r.decision))  # noqa: E731
    hour = timedelta(hours=1)
    gh = ("github",)
    expected = [
        UsageRow(AGENT, "alice", "t1", *gh, "get_repo", "read", "allow", 2, T0 + hour / 2),
        UsageRow(AGENT, "alice", "t1", *gh, "get_repo", "read", "deny", 1, T0 + hour * 5 / 6),
        UsageRow(AGENT, "alice", "t1", *gh, "search", "read", "allow", 1, T0 + 2 * hour),
        UsageRow(
            AGENT, "alice", "t1", *gh, "merge", "write", "approval_required", 1, T0 + 4 * hour
        ),
        UsageRow(OTHER_AGENT, "bob", "t2", *gh, "get_repo", "read", "allow", 1, T0 + 3 * hour),
        UsageRow(None, None, None, None, None, None, "error", 1, T0 + 5 * hour),
    ]
    assert sorted(rows, key=key) == sorted(expected, key=key)
    for row in rows:
        assert row.last_used.tzinfo is not None
        assert row.last_used.utcoffset() == timedelta(0)


async def test_audit_timeline_counts_per_utc_day_and_decision(storage: Storage) -> None:
    await seed(storage)
    rows = await storage.audit_timeline(since=T0, until=T0 + timedelta(days=2))
    assert sorted(rows, key=lambda r: (r.day, r.decision)) == [
        TimelineRow("2026-03-01", "allow", 2),
        TimelineRow("2026-03-01", "deny", 1),
        TimelineRow("2026-03-02", "allow", 2),
        TimelineRow("2026-03-02", "approval_required", 1),
        TimelineRow("2026-03-02", "error", 1),
    ]


async def test_audit_timeline_for_some_agents(storage: Storage) -> None:
    await seed(storage)
    window = {"since": T0, "until": T0 + timedelta(days=2)}
    rows = await storage.audit_timeline(**window, agents=[OTHER_AGENT, "spiffe://x/none"])
    assert rows == [TimelineRow("2026-03-02", "allow", 1)]
    assert await storage.audit_timeline(**window, agents=[]) == []
    assert await storage.audit_timeline(**window, agents=["nul\x00"]) == []


async def test_empty_windows_aggregate_to_nothing(storage: Storage) -> None:
    assert await storage.audit_usage(since=T0, until=T0 + timedelta(days=1)) == []
    assert await storage.audit_timeline(since=T0, until=T0 + timedelta(days=1)) == []
    await seed(storage)
    later = T0 + timedelta(days=30)
    assert await storage.audit_usage(since=later, until=later + timedelta(days=1)) == []
    assert await storage.audit_timeline(since=later, until=later + timedelta(days=1)) == []


async def test_list_tasks_by_creation_time(storage: Storage) -> None:
    clock = FakeClock(T0)
    await storage.create_owner(make_owner(T0))
    await storage.create_agent(make_agent(T0))
    for i in range(4):
        await storage.create_task(make_task(clock.now(), f"t{i}"), [])
        clock.advance(60)

    async def ids(**kw: object) -> list[str]:
        return [t.id for t in await storage.list_tasks(TaskFilter(**kw))]  # type: ignore[arg-type]

    assert await ids(created_since=T0 + timedelta(seconds=60)) == ["t3", "t2", "t1"]
    assert await ids(created_until=T0 + timedelta(seconds=120)) == ["t1", "t0"]
    assert await ids(
        created_since=(T0 + timedelta(seconds=60)).astimezone(IST),
        created_until=T0 + timedelta(seconds=180),
    ) == ["t2", "t1"]
    assert await ids(created_since=T0 + timedelta(days=1)) == []


async def test_task_agents_in_bulk(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(T0)
    await storage.create_owner(make_owner(T0))
    await storage.create_agent(make_agent(T0))
    await storage.create_agent(make_agent(T0, OTHER_AGENT))
    await storage.create_task(make_task(clock.now(), "t-mine"), [])
    await storage.create_task(make_task(clock.now(), "t-theirs", agent_id=OTHER_AGENT), [])
    assert await storage.task_agents([]) == {}
    assert await storage.task_agents(["t-none", "nul\x00"]) == {}
    both = {"t-mine": AGENT, "t-theirs": OTHER_AGENT}
    assert await storage.task_agents(["t-theirs", "t-mine", "t-none", "t-mine"]) == both
    # Several statements on SQL (the chunk is what keeps SQLite under its parameter
    # limit): known ids in different chunks, a duplicate across chunks, one answer.
    many = [f"t-{i}" for i in range(1_201)]
    many[0], many[700], many[-1] = "t-mine", "t-theirs", "t-mine"
    assert await storage.task_agents(many) == both
    monkeypatch.setattr(sql, "_ID_CHUNK", 2)
    assert await storage.task_agents(["t-none", "t-mine", "nul\x00", "t-x", "t-theirs"]) == both

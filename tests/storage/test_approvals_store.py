"""The approval store, conformance-tested on memory, SQLite and PostgreSQL (conftest.py).

The races at the end use separate engines on the SQL backends, as separate processes
(gateway replicas, approvers clicking at once) would.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.actions import action_digest, argument_digest
from taskbound.core.clock import FakeClock
from taskbound.core.model import Approval, ApprovalState, Tier
from taskbound.errors import (
    AlreadyVoted,
    ApprovalExpired,
    ApprovalNotPending,
    Conflict,
    NotFound,
    ReferenceError_,
)
from taskbound.storage import Storage
from tests.storage.conftest import Backend
from tests.storage.test_conformance import AGENT, IST, make_agent, make_owner, make_task

USE = timedelta(minutes=5)
PENDING_FOR = timedelta(minutes=15)


def make_approval(
    now: datetime,
    approval_id: str = "apr-1",
    task_id: str = "task-1",
    arguments: dict[str, object] | None = None,
    **changes: object,
) -> Approval:
    args = {"org": "acme", "repo": "web"} if arguments is None else arguments
    approval = Approval(
        id=approval_id,
        task_id=task_id,
        agent_id=AGENT,
        owner_id="alice",
        tool="github",
        action="delete_repo",
        tier=Tier.ADMIN,
        target="/repos/acme/web",
        argument_digest=argument_digest(args),
        action_digest=action_digest("github", "delete_repo", "/repos/acme/web", args),
        intent="clean up the test repos",
        summary={"method": "DELETE", "path": "/repos/acme/web", "arguments": args},
        required=1,
        created_at=now,
        expires_at=now + PENDING_FOR,
    )
    return replace(approval, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def tasks(storage: Storage, clock: FakeClock) -> Storage:
    """``storage`` with alice, the agent and two live tasks (task-1, task-2)."""
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    for task_id in ("task-1", "task-2"):
        await storage.create_task(make_task(clock.now(), task_id, ttl=3600), [])
    return storage


async def vote(
    storage: Storage,
    clock: FakeClock,
    approver: str,
    approve: bool = True,
    approval_id: str = "apr-1",
    reason: str | None = "looks right",
) -> Approval:
    return await storage.vote_approval(approval_id, approver, approve, reason, clock.now(), USE)


# --- request, get, list ------------------------------------------------------------------------


async def test_round_trip(tasks: Storage, clock: FakeClock) -> None:
    clock.advance(0.654321)
    approval = make_approval(
        clock.now().astimezone(IST),
        summary={"arguments": {"n": 1, "nested": [True, None, "ü"]}, "truncated": False},
        target=None,
    )
    stored = await tasks.request_approval(approval)
    assert stored == approval
    got = await tasks.get_approval("apr-1")
    assert got == approval
    assert got is not None
    assert got.state is ApprovalState.PENDING
    assert got.tier is Tier.ADMIN
    assert got.created_at.tzinfo is UTC
    assert got.created_at.microsecond == 654321
    assert got.summary == {"arguments": {"n": 1, "nested": [True, None, "ü"]}, "truncated": False}
    assert await tasks.get_approval("apr-nope") is None
    assert await tasks.get_approval("apr\x00") is None
    assert await tasks.list_approval_votes("apr-1") == []


async def test_one_open_approval_per_task_and_digest(tasks: Storage, clock: FakeClock) -> None:
    first = await tasks.request_approval(make_approval(clock.now()))
    clock.advance(10)
    again = await tasks.request_approval(make_approval(clock.now(), "apr-2"))
    assert again == first  # the existing one, nothing new stored
    assert await tasks.get_approval("apr-2") is None
    other_args = await tasks.request_approval(
        make_approval(clock.now(), "apr-3", arguments={"org": "acme", "repo": "api"})
    )
    other_task = await tasks.request_approval(make_approval(clock.now(), "apr-4", "task-2"))
    assert (other_args.id, other_task.id) == ("apr-3", "apr-4")
    assert len(await tasks.list_approvals()) == 3


async def test_request_refuses_what_cannot_be_new(tasks: Storage, clock: FakeClock) -> None:
    now = clock.now()
    with pytest.raises(ReferenceError_):
        await tasks.request_approval(make_approval(now, task_id="task-nope"))
    for changes in (
        {"state": ApprovalState.APPROVED},
        {"approvals": 1},
        {"use_by": now},
        {"expires_at": now},
    ):
        with pytest.raises(ValueError, match="approval"):
            await tasks.request_approval(make_approval(now, **changes))
    with pytest.raises(ValueError, match="NUL"):
        await tasks.request_approval(make_approval(now, intent="a\x00b"))
    await tasks.request_approval(make_approval(now))
    with pytest.raises(Conflict):  # the id is taken (another digest, so no open match)
        await tasks.request_approval(make_approval(now, arguments={"other": 1}))
    assert [a.id for a in await tasks.list_approvals()] == ["apr-1"]


async def test_an_expired_pending_approval_gives_way(tasks: Storage, clock: FakeClock) -> None:
    await tasks.request_approval(make_approval(clock.now()))
    clock.advance(PENDING_FOR.total_seconds())
    fresh = await tasks.request_approval(make_approval(clock.now(), "apr-2"))
    assert fresh.id == "apr-2"
    old = await tasks.get_approval("apr-1")
    assert old is not None
    assert old.state is ApprovalState.EXPIRED


async def test_list_order_filter_and_limit(tasks: Storage, clock: FakeClock) -> None:
    for i in range(4):
        await tasks.request_approval(
            make_approval(clock.now(), f"apr-{i}", "task-1" if i % 2 else "task-2", {"i": i})
        )
        clock.advance(1)
    await vote(tasks, clock, "bob", approval_id="apr-1")
    assert [a.id for a in await tasks.list_approvals()] == ["apr-3", "apr-2", "apr-1", "apr-0"]
    assert [a.id for a in await tasks.list_approvals(limit=2)] == ["apr-3", "apr-2"]
    pending = await tasks.list_approvals(state=ApprovalState.PENDING)
    assert [a.id for a in pending] == ["apr-3", "apr-2", "apr-0"]
    approved = await tasks.list_approvals(state=ApprovalState.APPROVED)
    assert [a.id for a in approved] == ["apr-1"]
    assert [a.id for a in await tasks.list_approvals(task_id="task-1")] == ["apr-3", "apr-1"]
    assert await tasks.list_approvals(task_id="task\x00") == []
    with pytest.raises(ValueError, match="limit"):
        await tasks.list_approvals(limit=-1)


# --- votes ---------------------------------------------------------------------------------


async def test_one_approval_approves(tasks: Storage, clock: FakeClock) -> None:
    await tasks.request_approval(make_approval(clock.now()))
    now = clock.advance(30)
    approved = await vote(tasks, clock, "bob")
    assert approved.state is ApprovalState.APPROVED
    assert (approved.approvals, approved.decided_by, approved.reason) == (1, "bob", "looks right")
    assert approved.decided_at == now
    assert approved.use_by == now + USE
    assert await tasks.get_approval("apr-1") == approved
    (cast,) = await tasks.list_approval_votes("apr-1")
    assert (cast.approver, cast.approve, cast.reason, cast.voted_at) == (
        "bob",
        True,
        "looks right",
        now,
    )
    with pytest.raises(ApprovalNotPending):
        await vote(tasks, clock, "carol")
    with pytest.raises(ApprovalNotPending):
        await vote(tasks, clock, "carol", approve=False)
    assert len(await tasks.list_approval_votes("apr-1")) == 1


async def test_a_deny_decides_at_once(tasks: Storage, clock: FakeClock) -> None:
    await tasks.request_approval(make_approval(clock.now(), required=2))
    await vote(tasks, clock, "bob")
    denied = await vote(tasks, clock, "carol", approve=False, reason="not today")
    assert denied.state is ApprovalState.DENIED
    assert (denied.decided_by, denied.reason, denied.use_by) == ("carol", "not today", None)
    assert denied.approvals == 1
    with pytest.raises(ApprovalNotPending):
        await vote(tasks, clock, "dave")
    assert await tasks.consume_approval("task-1", denied.action_digest, clock.now()) is None
    # Denied is final: asking again opens a new approval.
    again = await tasks.request_approval(make_approval(clock.now(), "apr-2"))
    assert (again.id, again.state) == ("apr-2", ApprovalState.PENDING)


async def test_a_quorum_needs_distinct_approvers(tasks: Storage, clock: FakeClock) -> None:
    await tasks.request_approval(make_approval(clock.now(), required=2))
    first = await vote(tasks, clock, "bob")
    assert (first.state, first.approvals, first.decided_by) == (ApprovalState.PENDING, 1, None)
    with pytest.raises(AlreadyVoted):
        await vote(tasks, clock, "bob")
    with pytest.raises(AlreadyVoted):
        await vote(tasks, clock, "bob", approve=False)
    assert (await tasks.get_approval("apr-1")) == first
    second = await vote(tasks, clock, "carol")
    assert (second.state, second.approvals, second.decided_by) == (
        ApprovalState.APPROVED,
        2,
        "carol",
    )
    assert [v.approver for v in await tasks.list_approval_votes("apr-1")] == ["bob", "carol"]


async def test_vote_on_unknown_approval(tasks: Storage, clock: FakeClock) -> None:
    with pytest.raises(NotFound):
        await vote(tasks, clock, "bob", approval_id="apr-nope")
    with pytest.raises(NotFound):
        await vote(tasks, clock, "bob", approval_id="apr\x00")
    await tasks.request_approval(make_approval(clock.now()))
    with pytest.raises(ValueError, match="NUL"):
        await vote(tasks, clock, "bob\x00")
    assert await tasks.list_approval_votes("apr-1") == []


async def test_a_vote_after_expiry_is_refused_and_the_expiry_kept(
    tasks: Storage, clock: FakeClock
) -> None:
    await tasks.request_approval(make_approval(clock.now()))
    clock.advance(PENDING_FOR.total_seconds())
    with pytest.raises(ApprovalExpired):
        await vote(tasks, clock, "bob")
    stored = await tasks.get_approval("apr-1")
    assert stored is not None
    assert stored.state is ApprovalState.EXPIRED
    assert stored.decided_by is None
    with pytest.raises(ApprovalExpired):
        await vote(tasks, clock, "carol")
    assert await tasks.list_approval_votes("apr-1") == []


# --- consumption -------------------------------------------------------------------------------


async def test_an_approval_is_consumed_once(tasks: Storage, clock: FakeClock) -> None:
    approval = await tasks.request_approval(make_approval(clock.now()))
    digest = approval.action_digest
    assert await tasks.consume_approval("task-1", digest, clock.now()) is None  # pending
    await vote(tasks, clock, "bob")
    assert await tasks.consume_approval("task-2", digest, clock.now()) is None
    assert await tasks.consume_approval("task-1", "sha256:other", clock.now()) is None
    now = clock.advance(60)
    consumed = await tasks.consume_approval("task-1", digest, now)
    assert consumed is not None
    assert (consumed.id, consumed.state, consumed.consumed_at) == (
        "apr-1",
        ApprovalState.CONSUMED,
        now,
    )
    assert await tasks.get_approval("apr-1") == consumed
    assert await tasks.consume_approval("task-1", digest, now) is None
    with pytest.raises(ApprovalNotPending):
        await vote(tasks, clock, "carol")
    # Used: the same call again needs a new approval.
    again = await tasks.request_approval(make_approval(clock.now(), "apr-2"))
    assert (again.id, again.state) == ("apr-2", ApprovalState.PENDING)


async def test_an_approved_call_waits_for_its_use(tasks: Storage, clock: FakeClock) -> None:
    await tasks.request_approval(make_approval(clock.now()))
    approved = await vote(tasks, clock, "bob")
    # Asking again while approved and unused finds the approved one.
    assert await tasks.request_approval(make_approval(clock.now(), "apr-2")) == approved


async def test_an_unused_approval_expires(tasks: Storage, clock: FakeClock) -> None:
    approval = await tasks.request_approval(make_approval(clock.now()))
    await vote(tasks, clock, "bob")
    clock.advance(USE.total_seconds())
    assert await tasks.consume_approval("task-1", approval.action_digest, clock.now()) is None
    fresh = await tasks.request_approval(make_approval(clock.now(), "apr-2"))
    assert fresh.id == "apr-2"
    old = await tasks.get_approval("apr-1")
    assert old is not None
    assert old.state is ApprovalState.EXPIRED


async def test_expire_approvals(tasks: Storage, clock: FakeClock) -> None:
    start = clock.now()
    await tasks.request_approval(make_approval(start, "apr-p", arguments={"a": 1}))
    await tasks.request_approval(make_approval(start, "apr-a", arguments={"a": 2}))
    await vote(tasks, clock, "bob", approval_id="apr-a")
    await tasks.request_approval(
        make_approval(start, "apr-late", arguments={"a": 3}, expires_at=start + 2 * PENDING_FOR)
    )
    clock.advance(USE.total_seconds())
    assert await tasks.expire_approvals(clock.now()) == 1  # the unused approved one
    clock.advance(PENDING_FOR.total_seconds())
    assert await tasks.expire_approvals(clock.now()) == 1  # the first pending one
    assert await tasks.expire_approvals(clock.now()) == 0
    states = {a.id: a.state for a in await tasks.list_approvals()}
    assert states == {
        "apr-p": ApprovalState.EXPIRED,
        "apr-a": ApprovalState.EXPIRED,
        "apr-late": ApprovalState.PENDING,
    }


# --- races -----------------------------------------------------------------------------------

HANDLES = 10
CONSUMERS = 50


async def _handles(backend: Backend, count: int) -> list[Storage]:
    handles = [backend.another() for _ in range(count)]
    await asyncio.gather(*(h.check() for h in handles))
    return handles


async def _ready(backend: Backend, clock: FakeClock) -> Storage:
    storage = backend.storage
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    await storage.create_task(make_task(clock.now(), "task-1", ttl=3600), [])
    return storage


async def test_fifty_concurrent_consumers_get_one_approval_once(
    backend: Backend, clock: FakeClock
) -> None:
    storage = await _ready(backend, clock)
    approval = await storage.request_approval(make_approval(clock.now()))
    await vote(storage, clock, "bob")
    handles = await _handles(backend, HANDLES)
    now = clock.advance(1)
    results = await asyncio.gather(
        *(
            handles[i % HANDLES].consume_approval("task-1", approval.action_digest, now)
            for i in range(CONSUMERS)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].state is ApprovalState.CONSUMED
    stored = await storage.get_approval("apr-1")
    assert stored == winners[0]


async def test_concurrent_requests_share_one_approval(backend: Backend, clock: FakeClock) -> None:
    storage = await _ready(backend, clock)
    handles = await _handles(backend, HANDLES)
    results = await asyncio.gather(
        *(h.request_approval(make_approval(clock.now(), f"apr-{i}")) for i, h in enumerate(handles))
    )
    assert len({r.id for r in results}) == 1
    assert len(await storage.list_approvals()) == 1


@pytest.mark.parametrize("required", [1, 2])
async def test_concurrent_approvers_decide_once(
    backend: Backend, clock: FakeClock, required: int
) -> None:
    storage = await _ready(backend, clock)
    await storage.request_approval(make_approval(clock.now(), required=required))
    handles = await _handles(backend, HANDLES)
    results = await asyncio.gather(
        *(
            h.vote_approval("apr-1", f"approver-{i}", True, "ok", clock.now(), USE)
            for i, h in enumerate(handles)
        ),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, Approval)]
    refused = [r for r in results if not isinstance(r, Approval)]
    assert len(accepted) == required
    assert all(isinstance(r, ApprovalNotPending) for r in refused), refused
    final = await storage.get_approval("apr-1")
    assert final is not None
    assert (final.state, final.approvals) == (ApprovalState.APPROVED, required)
    votes = await storage.list_approval_votes("apr-1")
    assert len(votes) == required
    assert final.decided_by in {v.approver for v in votes}


async def test_one_approver_twice_at_once_counts_once(backend: Backend, clock: FakeClock) -> None:
    storage = await _ready(backend, clock)
    await storage.request_approval(make_approval(clock.now(), required=2))
    handles = await _handles(backend, 4)
    results = await asyncio.gather(
        *(h.vote_approval("apr-1", "bob", True, "ok", clock.now(), USE) for h in handles),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, Approval)]
    assert len(accepted) == 1
    assert all(isinstance(r, AlreadyVoted) for r in results if r not in accepted)
    final = await storage.get_approval("apr-1")
    assert final is not None
    assert (final.state, final.approvals) == (ApprovalState.PENDING, 1)

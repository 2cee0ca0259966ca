"""The storage conformance suite (STYLE.md rule 4): one set of tests, every backend.

Each test runs against memory, SQLite and PostgreSQL (see conftest.py). The concurrency
tests at the end use separate engines on the SQL backends, as separate processes would.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.model import (
    Action,
    AdminToken,
    Agent,
    AgentState,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    KeyState,
    Owner,
    Risk,
    Role,
    Scope,
    ScopeDenial,
    ScopeGrant,
    SigningKey,
    Task,
    TaskFilter,
    TaskState,
    Tier,
    Tool,
    ToolKind,
)
from taskbound.errors import Conflict, NotFound, ReferenceError_
from taskbound.storage import Storage
from taskbound.storage.codec import AUDIT_DETAIL_MAX, AUDIT_TRUNCATED
from tests.storage.conftest import Backend

AGENT = "spiffe://example.org/agents/builder"
OTHER_AGENT = "spiffe://example.org/agents/reviewer"
# A zone east of UTC with a half-hour offset: stored values must come back as the same
# instant in UTC.
IST = timezone(timedelta(hours=5, minutes=30))


# --- values ------------------------------------------------------------------------------


def make_owner(now: datetime, owner_id: str = "alice", **changes: object) -> Owner:
    owner = Owner(
        id=owner_id,
        contact=f"{owner_id}@example.com",
        roles=frozenset({Role.APPROVER, Role.REVIEWER}),
        created_at=now,
        updated_at=now,
    )
    return replace(owner, **changes)  # type: ignore[arg-type]


def make_agent(
    now: datetime, spiffe_id: str = AGENT, owner_id: str = "alice", **changes: object
) -> Agent:
    agent = Agent(
        spiffe_id=spiffe_id,
        owner_id=owner_id,
        state=AgentState.ACTIVE,
        ceiling=frozenset({Scope("github", Tier.READ), Scope("github", Tier.WRITE)}),
        created_at=now,
        updated_at=now,
        description="builds things",
    )
    return replace(agent, **changes)  # type: ignore[arg-type]


def make_tool(now: datetime, tool_id: str = "github", **changes: object) -> Tool:
    tool = Tool(
        id=tool_id,
        audience=f"https://tools.example.org/{tool_id}",
        upstream_url="https://api.github.com",
        kind=ToolKind.HTTP,
        actions=(
            Action("get_repo", Tier.READ, method="GET", path="/repos/{owner}/{repo}"),
            Action(
                "merge",
                Tier.WRITE,
                method="PUT",
                path="/repos/{owner}/{repo}/pulls/{n}/merge",
                risk=Risk.HIGH,
                requires_approval=True,
            ),
            Action("search", Tier.READ, mcp_tool="search_code", risk=Risk.MEDIUM),
        ),
        created_at=now,
        updated_at=now,
        upstream_auth_header="X-Api-Key",
        description="source hosting",
    )
    return replace(tool, **changes)  # type: ignore[arg-type]


def make_task(now: datetime, task_id: str = "task-1", ttl: float = 600, **changes: object) -> Task:
    task = Task(
        id=task_id,
        agent_id=AGENT,
        owner_id="alice",
        purpose="fix the flaky test",
        constraints={"repo": "acme/web", "paths": ["src/", "tests/"], "limits": {"files": 3}},
        granted=(
            ScopeGrant("github", Tier.READ, ("get_repo", "search")),
            ScopeGrant("github", Tier.WRITE, ("merge",)),
        ),
        denied=(ScopeDenial("prod-db", "admin", "policy_denied", "admin is break-glass only"),),
        jkt="jkt-" + task_id,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl),
    )
    return replace(task, **changes)  # type: ignore[arg-type]


def make_credential(
    task: Task, jti: str, now: datetime, ttl: float = 300, **changes: object
) -> CredentialRecord:
    cred = CredentialRecord(
        jti=jti,
        task_id=task.id,
        agent_id=task.agent_id,
        tool="github",
        tier=Tier.READ,
        actions=("get_repo", "search"),
        jkt=task.jkt,
        kid="kid-1",
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl),
    )
    return replace(cred, **changes)  # type: ignore[arg-type]


def make_key(now: datetime, kid: str, purpose: KeyPurpose = KeyPurpose.CREDENTIALS) -> SigningKey:
    return SigningKey(
        kid=kid,
        purpose=purpose,
        alg="EdDSA",
        public_jwk={
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        },
        private_ciphertext=b"\x00\xffsealed:" + kid.encode(),
        created_at=now,
    )


def assert_utc(*values: datetime | None) -> None:
    for value in values:
        assert value is not None
        assert value.tzinfo is UTC


@pytest.fixture
async def registered(storage: Storage, clock: FakeClock) -> Storage:
    """``storage`` with the owner ``alice`` and the agent ``AGENT`` registered."""
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    return storage


# --- health ------------------------------------------------------------------------------


async def test_is_a_storage_and_answers_check(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    await storage.check()


# --- owners ------------------------------------------------------------------------------


async def test_owner_round_trip(storage: Storage, clock: FakeClock) -> None:
    clock.advance(0.123456)
    owner = make_owner(
        clock.now().astimezone(IST),
        roles=frozenset(Role),
        disabled=True,
        updated_at=clock.now() + timedelta(minutes=1),
    )
    await storage.create_owner(owner)

    got = await storage.get_owner("alice")
    assert got == owner
    assert got is not None
    assert got.roles == frozenset(Role)
    assert all(isinstance(r, Role) for r in got.roles)
    assert got.created_at == clock.now()
    assert got.created_at.microsecond == 123456
    assert_utc(got.created_at, got.updated_at)
    assert await storage.get_owner("nobody") is None


async def test_owner_duplicate_is_conflict(storage: Storage, clock: FakeClock) -> None:
    await storage.create_owner(make_owner(clock.now()))
    with pytest.raises(Conflict):
        await storage.create_owner(make_owner(clock.now(), contact="other@example.com"))
    got = await storage.get_owner("alice")
    assert got is not None
    assert got.contact == "alice@example.com"


async def test_update_owner_changes_all_but_created_at(storage: Storage, clock: FakeClock) -> None:
    created = clock.now()
    await storage.create_owner(make_owner(created))
    later = clock.advance(60)
    changed = make_owner(
        later,
        contact="team@example.com",
        roles=frozenset({Role.ADMIN}),
        disabled=True,
    )
    await storage.update_owner(changed)
    assert await storage.get_owner("alice") == replace(changed, created_at=created)


async def test_update_missing_owner_is_not_found(storage: Storage, clock: FakeClock) -> None:
    with pytest.raises(NotFound):
        await storage.update_owner(make_owner(clock.now()))
    assert await storage.list_owners() == []


async def test_list_owners_by_id(storage: Storage, clock: FakeClock) -> None:
    # Code point order: upper case before lower case, whatever the database's collation.
    for owner_id in ["bob", "Zed", "alice", "_ops"]:
        await storage.create_owner(make_owner(clock.now(), owner_id))
    assert [o.id for o in await storage.list_owners()] == ["Zed", "_ops", "alice", "bob"]


# --- agents ------------------------------------------------------------------------------


async def test_agent_round_trip(storage: Storage, clock: FakeClock) -> None:
    await storage.create_owner(make_owner(clock.now()))
    agent = make_agent(
        clock.now().astimezone(IST),
        state=AgentState.QUARANTINED,
        ceiling=frozenset({Scope("github", Tier.ADMIN), Scope("jira", Tier.READ)}),
    )
    await storage.create_agent(agent)
    got = await storage.get_agent(AGENT)
    assert got == agent
    assert got is not None
    assert got.state is AgentState.QUARANTINED
    assert all(isinstance(s.tier, Tier) for s in got.ceiling)
    assert_utc(got.created_at, got.updated_at)
    assert await storage.get_agent("spiffe://example.org/nobody") is None


async def test_agent_with_empty_ceiling(storage: Storage, clock: FakeClock) -> None:
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now(), ceiling=frozenset()))
    got = await storage.get_agent(AGENT)
    assert got is not None
    assert got.ceiling == frozenset()


async def test_create_agent_needs_its_owner(storage: Storage, clock: FakeClock) -> None:
    with pytest.raises(ReferenceError_):
        await storage.create_agent(make_agent(clock.now(), owner_id="ghost"))
    assert await storage.get_agent(AGENT) is None


async def test_agent_duplicate_is_conflict(registered: Storage, clock: FakeClock) -> None:
    with pytest.raises(Conflict):
        await registered.create_agent(make_agent(clock.now(), description="again"))


async def test_update_agent(registered: Storage, clock: FakeClock) -> None:
    created = clock.now()
    await registered.create_owner(make_owner(created, "bob"))
    changed = make_agent(
        clock.advance(5),
        owner_id="bob",
        state=AgentState.SUSPENDED,
        ceiling=frozenset({Scope("jira", Tier.WRITE)}),
        description="moved to bob",
    )
    await registered.update_agent(changed)
    assert await registered.get_agent(AGENT) == replace(changed, created_at=created)


async def test_update_agent_errors(registered: Storage, clock: FakeClock) -> None:
    with pytest.raises(NotFound):
        await registered.update_agent(make_agent(clock.now(), spiffe_id=OTHER_AGENT))
    with pytest.raises(ReferenceError_):
        await registered.update_agent(make_agent(clock.now(), owner_id="ghost"))
    got = await registered.get_agent(AGENT)
    assert got is not None
    assert got.owner_id == "alice"


async def test_list_agents_by_owner(registered: Storage, clock: FakeClock) -> None:
    await registered.create_owner(make_owner(clock.now(), "bob"))
    await registered.create_agent(make_agent(clock.now(), OTHER_AGENT, owner_id="bob"))
    await registered.create_agent(make_agent(clock.now(), "spiffe://example.org/a", "bob"))
    assert [a.spiffe_id for a in await registered.list_agents()] == [
        "spiffe://example.org/a",
        AGENT,
        OTHER_AGENT,
    ]
    assert [a.spiffe_id for a in await registered.list_agents("bob")] == [
        "spiffe://example.org/a",
        OTHER_AGENT,
    ]
    assert await registered.list_agents("nobody") == []


async def test_set_agent_state(registered: Storage, clock: FakeClock) -> None:
    created = clock.now()
    later = clock.advance(30)
    got = await registered.set_agent_state(AGENT, AgentState.SUSPENDED, later)
    assert got == replace(make_agent(created), state=AgentState.SUSPENDED, updated_at=later)
    assert await registered.get_agent(AGENT) == got
    assert await registered.set_agent_state(OTHER_AGENT, AgentState.RETIRED, later) is None


# --- tools -------------------------------------------------------------------------------


async def test_tool_round_trip_with_secret(storage: Storage, clock: FakeClock) -> None:
    tool = make_tool(clock.now().astimezone(IST), kind=ToolKind.MCP)
    await storage.create_tool(tool, b"\x00secret\xff")
    got = await storage.get_tool("github")
    assert got == tool
    assert got is not None
    assert isinstance(got.actions, tuple)
    assert got.actions[1].requires_approval is True
    assert got.actions[1].risk is Risk.HIGH
    assert got.kind is ToolKind.MCP
    assert_utc(got.created_at, got.updated_at)
    secret = await storage.get_tool_secret("github")
    assert secret == b"\x00secret\xff"
    assert type(secret) is bytes


async def test_tool_without_secret(storage: Storage, clock: FakeClock) -> None:
    await storage.create_tool(make_tool(clock.now(), actions=()), None)
    got = await storage.get_tool("github")
    assert got is not None
    assert got.actions == ()
    assert await storage.get_tool_secret("github") is None
    assert await storage.get_tool_secret("nothing") is None
    assert await storage.get_tool("nothing") is None


async def test_update_tool_keeps_or_replaces_secret(storage: Storage, clock: FakeClock) -> None:
    created = clock.now()
    await storage.create_tool(make_tool(created), b"first")
    changed = make_tool(
        clock.advance(10),
        upstream_url="https://github.example.com/api/v3",
        actions=(Action("list", Tier.READ, method="GET", path="/repos"),),
    )
    await storage.update_tool(changed, None)
    assert await storage.get_tool("github") == replace(changed, created_at=created)
    assert await storage.get_tool_secret("github") == b"first"
    await storage.update_tool(changed, b"second")
    assert await storage.get_tool_secret("github") == b"second"


async def test_tool_conflicts_and_not_found(storage: Storage, clock: FakeClock) -> None:
    await storage.create_tool(make_tool(clock.now()), None)
    with pytest.raises(Conflict):
        await storage.create_tool(make_tool(clock.now(), audience="https://elsewhere"), None)
    # A second tool may not claim the first one's audience (one audience, one destination).
    with pytest.raises(Conflict):
        await storage.create_tool(
            make_tool(clock.now(), "mirror", audience=make_tool(clock.now()).audience), None
        )
    await storage.create_tool(make_tool(clock.now(), "jira"), None)
    with pytest.raises(Conflict):
        await storage.update_tool(
            make_tool(clock.now(), "jira", audience=make_tool(clock.now()).audience), None
        )
    with pytest.raises(NotFound):
        await storage.update_tool(make_tool(clock.now(), "ghost"), b"x")
    assert [t.id for t in await storage.list_tools()] == ["github", "jira"]
    assert await storage.get_tool_secret("ghost") is None


# --- times -------------------------------------------------------------------------------


async def test_naive_datetimes_are_refused(storage: Storage, clock: FakeClock) -> None:
    naive = datetime(2026, 1, 1, 12, 0)
    with pytest.raises(ValueError, match="naive"):
        await storage.create_owner(make_owner(naive))
    assert await storage.list_owners() == []


async def test_nul_characters_are_never_stored(registered: Storage, clock: FakeClock) -> None:
    # PostgreSQL text cannot hold NUL, so every backend refuses it on write, and a lookup by
    # such a key finds nothing (rather than failing on one backend only).
    with pytest.raises(ValueError, match="NUL"):
        await registered.create_owner(make_owner(clock.now(), "bad\x00id"))
    with pytest.raises(ValueError, match="NUL"):
        await registered.update_agent(make_agent(clock.now(), description="a\x00b"))
    task = make_task(clock.now())
    await registered.create_task(task, [make_credential(task, "jti-1", clock.now())])
    with pytest.raises(ValueError, match="NUL"):
        await registered.create_task(make_task(clock.now(), "t-2", purpose="\x00"), [])
    with pytest.raises(ValueError, match="NUL"):
        await registered.add_credential(make_credential(task, "j\x00", clock.now()), clock.now())
    with pytest.raises(ValueError, match="NUL"):
        await registered.revoke_credential("jti-1", "why\x00", clock.now())
    with pytest.raises(ValueError, match="NUL"):
        await registered.end_task("task-1", TaskState.COMPLETED, "done\x00", clock.now())

    key = "x\x00"
    assert await registered.get_owner(key) is None
    assert await registered.get_agent(key) is None
    assert await registered.list_agents(key) == []
    assert await registered.set_agent_state(key, AgentState.RETIRED, clock.now()) is None
    assert await registered.get_tool(key) is None
    assert await registered.get_tool_secret(key) is None
    assert await registered.get_task(key) is None
    assert await registered.list_tasks(TaskFilter(agent_id=key)) == []
    assert await registered.list_tasks(TaskFilter(owner_id=key)) == []
    assert await registered.get_credential(key) is None
    assert await registered.list_credentials(key) == []
    assert await registered.end_task(key, TaskState.COMPLETED, "done", clock.now()) is None
    assert await registered.revoke_credential(key, "why", clock.now()) is False
    assert await registered.find_admin_token(key) is None
    got = await registered.get_task("task-1")
    assert got is not None
    assert got.state is TaskState.ACTIVE
    assert await registered.get_credential("jti-1") == make_credential(task, "jti-1", clock.now())


# --- tasks and credentials -----------------------------------------------------------------


async def test_task_round_trip_with_credentials(registered: Storage, clock: FakeClock) -> None:
    clock.advance(0.000001)
    now = clock.now()
    task = make_task(
        now.astimezone(IST),
        constraints={
            "repo": "acme/web",
            "nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}], "empty": {}},
            "unicode": "naïve ✓",
        },
    )
    first = make_credential(task, "jti-1", now)
    delegated = make_credential(
        task,
        "jti-2",
        now + timedelta(seconds=1),
        tier=Tier.WRITE,
        actions=("merge",),
        parent_jti="jti-1",
        revoked_at=now + timedelta(seconds=2),
        revoke_reason="superseded",
    )
    await registered.create_task(task, [delegated, first])

    got = await registered.get_task("task-1")
    assert got == task
    assert got is not None
    assert got.state is TaskState.ACTIVE
    assert got.ended_at is None
    assert got.end_reason is None
    assert isinstance(got.granted, tuple)
    assert isinstance(got.granted[0].actions, tuple)
    assert got.granted[0].tier is Tier.READ
    assert got.denied == task.denied
    assert got.constraints == task.constraints
    assert_utc(got.created_at, got.expires_at)

    assert await registered.list_credentials("task-1") == [first, delegated]
    cred = await registered.get_credential("jti-2")
    assert cred == delegated
    assert cred is not None
    assert cred.tier is Tier.WRITE
    assert cred.actions == ("merge",)
    assert_utc(cred.issued_at, cred.expires_at, cred.revoked_at)
    assert await registered.get_credential("jti-404") is None
    assert await registered.list_credentials("task-404") == []


async def test_task_constraints_are_copied(registered: Storage, clock: FakeClock) -> None:
    paths = ["src/"]
    constraints = {"repo": "acme/web", "paths": paths}
    await registered.create_task(make_task(clock.now(), constraints=constraints), [])
    paths.append("secrets/")
    got = await registered.get_task("task-1")
    assert got is not None
    assert got.constraints == {"repo": "acme/web", "paths": ["src/"]}


async def test_task_with_ended_state_round_trips(registered: Storage, clock: FakeClock) -> None:
    task = make_task(
        clock.now(),
        state=TaskState.CANCELLED,
        ended_at=clock.now() + timedelta(seconds=3),
        end_reason="user cancelled",
        denied=(),
        constraints={},
    )
    await registered.create_task(task, [])
    assert await registered.get_task("task-1") == task


async def test_create_task_reference_errors(registered: Storage, clock: FakeClock) -> None:
    with pytest.raises(ReferenceError_):
        await registered.create_task(make_task(clock.now(), agent_id=OTHER_AGENT), [])
    with pytest.raises(ReferenceError_):
        await registered.create_task(make_task(clock.now(), owner_id="ghost"), [])
    assert await registered.get_task("task-1") is None


async def test_create_task_is_all_or_nothing(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [make_credential(task, "jti-1", clock.now())])
    with pytest.raises(Conflict):
        await registered.create_task(task, [])

    second = make_task(clock.now(), "task-2")
    # A jti already used elsewhere: nothing of task-2 is written.
    with pytest.raises(Conflict):
        await registered.create_task(
            second,
            [
                make_credential(second, "jti-2", clock.now()),
                make_credential(second, "jti-1", clock.now()),
            ],
        )
    assert await registered.get_task("task-2") is None
    assert await registered.get_credential("jti-2") is None
    # The same jti twice in one call.
    with pytest.raises(Conflict):
        await registered.create_task(
            second,
            [
                make_credential(second, "jti-3", clock.now()),
                make_credential(second, "jti-3", clock.now()),
            ],
        )
    assert await registered.get_task("task-2") is None
    assert await registered.get_credential("jti-3") is None


async def test_list_tasks_filters_and_order(registered: Storage, clock: FakeClock) -> None:
    await registered.create_owner(make_owner(clock.now(), "bob"))
    await registered.create_agent(make_agent(clock.now(), OTHER_AGENT, owner_id="bob"))
    await registered.create_task(make_task(clock.now(), "t-b"), [])
    await registered.create_task(make_task(clock.now(), "t-a"), [])  # same instant: by id
    clock.advance(1)
    await registered.create_task(
        make_task(clock.now(), "t-c", agent_id=OTHER_AGENT, owner_id="bob"), []
    )
    clock.advance(1)
    await registered.create_task(make_task(clock.now(), "t-d"), [])
    await registered.end_task("t-d", TaskState.COMPLETED, "done", clock.now())

    async def ids(**kw: object) -> list[str]:
        return [t.id for t in await registered.list_tasks(TaskFilter(**kw))]  # type: ignore[arg-type]

    assert await ids() == ["t-d", "t-c", "t-a", "t-b"]
    assert await ids(limit=2) == ["t-d", "t-c"]
    assert await ids(limit=0) == []
    assert await ids(agent_id=AGENT) == ["t-d", "t-a", "t-b"]
    assert await ids(owner_id="bob") == ["t-c"]
    assert await ids(state=TaskState.ACTIVE) == ["t-c", "t-a", "t-b"]
    assert await ids(state=TaskState.COMPLETED, agent_id=AGENT) == ["t-d"]
    assert await ids(state=TaskState.EXPIRED) == []
    with pytest.raises(ValueError, match="limit"):
        await ids(limit=-1)


async def test_add_credential_to_live_task(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    await registered.create_task(task, [])
    cred = make_credential(task, "jti-1", clock.advance(10), parent_jti="jti-0")
    assert await registered.add_credential(cred, clock.now()) is True
    assert await registered.get_credential("jti-1") == cred
    with pytest.raises(Conflict):
        await registered.add_credential(cred, clock.now())


async def test_add_credential_refuses_dead_tasks(registered: Storage, clock: FakeClock) -> None:
    ended = make_task(clock.now(), "ended")
    expiring = make_task(clock.now(), "expiring", ttl=60)
    await registered.create_task(ended, [])
    await registered.create_task(expiring, [])
    await registered.end_task("ended", TaskState.CANCELLED, "stop", clock.now())

    assert not await registered.add_credential(
        make_credential(ended, "a", clock.now()), clock.now()
    )
    at_expiry = expiring.expires_at
    assert not await registered.add_credential(
        make_credential(expiring, "b", clock.now()), at_expiry
    )
    past = at_expiry + timedelta(microseconds=1)
    assert not await registered.add_credential(make_credential(expiring, "c", clock.now()), past)
    just_before = at_expiry - timedelta(microseconds=1)
    assert await registered.add_credential(make_credential(expiring, "d", clock.now()), just_before)
    ghost = make_task(clock.now(), "ghost")
    assert not await registered.add_credential(
        make_credential(ghost, "e", clock.now()), clock.now()
    )
    assert [c.jti for c in await registered.list_credentials("expiring")] == ["d"]
    assert await registered.list_credentials("ended") == []


async def test_end_task_revokes_everything_once(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    task = make_task(start)
    early = make_credential(task, "jti-1", start, revoked_at=start, revoke_reason="rotated")
    await registered.create_task(task, [early, make_credential(task, "jti-2", start)])
    await registered.add_credential(make_credential(task, "jti-3", clock.advance(1)), clock.now())

    end = clock.advance(5)
    result = await registered.end_task("task-1", TaskState.COMPLETED, "work done", end)
    assert result is not None
    ended, changed = result
    assert changed is True
    assert ended == replace(task, state=TaskState.COMPLETED, ended_at=end, end_reason="work done")
    assert_utc(ended.ended_at)
    assert await registered.get_task("task-1") == ended

    creds = {c.jti: c for c in await registered.list_credentials("task-1")}
    # An earlier revocation keeps its own time and reason.
    assert (creds["jti-1"].revoked_at, creds["jti-1"].revoke_reason) == (start, "rotated")
    for jti in ("jti-2", "jti-3"):
        assert (creds[jti].revoked_at, creds[jti].revoke_reason) == (end, "work done")
    assert not any(c.live_at(end) for c in creds.values())

    again = await registered.end_task("task-1", TaskState.REVOKED, "again", clock.advance(5))
    assert again == (ended, False)
    assert await registered.get_task("task-1") == ended
    assert await registered.end_task("nope", TaskState.COMPLETED, "x", clock.now()) is None


async def test_end_task_refuses_active_state(registered: Storage, clock: FakeClock) -> None:
    await registered.create_task(make_task(clock.now()), [])
    with pytest.raises(ValueError, match="ACTIVE"):
        await registered.end_task("task-1", TaskState.ACTIVE, "no", clock.now())
    got = await registered.get_task("task-1")
    assert got is not None
    assert got.state is TaskState.ACTIVE


async def test_revoke_credential(registered: Storage, clock: FakeClock) -> None:
    task = make_task(clock.now())
    short = make_credential(task, "short", clock.now(), ttl=10)
    await registered.create_task(task, [make_credential(task, "jti-1", clock.now()), short])

    now = clock.advance(1)
    assert await registered.revoke_credential("jti-1", "leaked", now) is True
    got = await registered.get_credential("jti-1")
    assert got is not None
    assert (got.revoked_at, got.revoke_reason) == (now, "leaked")
    assert_utc(got.revoked_at)
    # Idempotent: the first revocation stands.
    assert await registered.revoke_credential("jti-1", "again", clock.advance(1)) is False
    assert await registered.get_credential("jti-1") == got
    # An expired credential is not live, so there is nothing to revoke.
    assert await registered.revoke_credential("short", "late", clock.advance(60)) is False
    expired = await registered.get_credential("short")
    assert expired is not None
    assert expired.revoked_at is None
    assert await registered.revoke_credential("ghost", "x", clock.now()) is False


async def test_expire_tasks(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    soon_b = make_task(start, "soon-b", ttl=60)
    soon_a = make_task(start, "soon-a", ttl=30)
    later = make_task(start, "later", ttl=3600)
    done = make_task(start, "done", ttl=10)
    await registered.create_task(soon_b, [make_credential(soon_b, "b1", start)])
    await registered.create_task(soon_a, [make_credential(soon_a, "a1", start)])
    await registered.create_task(later, [make_credential(later, "l1", start)])
    await registered.create_task(done, [])
    await registered.end_task("done", TaskState.COMPLETED, "finished", start)

    assert await registered.expire_tasks(start + timedelta(seconds=29)) == []
    now = start + timedelta(seconds=60)  # exactly soon-b's expiry: due
    assert await registered.expire_tasks(now) == ["soon-a", "soon-b"]
    for task_id, jti in (("soon-a", "a1"), ("soon-b", "b1")):
        task = await registered.get_task(task_id)
        assert task is not None
        assert (task.state, task.ended_at, task.end_reason) == (TaskState.EXPIRED, now, "expired")
        cred = await registered.get_credential(jti)
        assert cred is not None
        assert (cred.revoked_at, cred.revoke_reason) == (now, "expired")
    untouched = await registered.get_credential("l1")
    assert untouched is not None
    assert untouched.revoked_at is None
    finished = await registered.get_task("done")
    assert finished is not None
    assert finished.state is TaskState.COMPLETED
    assert await registered.expire_tasks(now + timedelta(seconds=1)) == []


async def test_expire_many_tasks(registered: Storage, clock: FakeClock) -> None:
    start = clock.now()
    # More than one chunk of the SQL backend's per-statement id list.
    count = 620
    tasks = [make_task(start, f"t-{i:05d}", ttl=10) for i in range(count)]
    for task in tasks[:3]:
        await registered.create_task(task, [make_credential(task, "c-" + task.id, start)])
    for task in tasks[3:]:
        await registered.create_task(task, [])
    last = tasks[-1]
    assert await registered.add_credential(make_credential(last, "c-last", start), start)
    expired = await registered.expire_tasks(start + timedelta(seconds=10))
    assert expired == [t.id for t in tasks]
    for jti in ("c-t-00000", "c-t-00002", "c-last"):
        cred = await registered.get_credential(jti)
        assert cred is not None
        assert cred.revoked_at is not None


# --- signing keys --------------------------------------------------------------------------


async def test_insert_active_key_first_wins(storage: Storage, clock: FakeClock) -> None:
    first = make_key(clock.now().astimezone(IST), "kid-1")
    assert await storage.insert_active_key(first) == first
    second = make_key(clock.advance(1), "kid-2")
    got = await storage.insert_active_key(second)
    assert got == first
    assert got.state is KeyState.ACTIVE
    assert got.retire_after is None
    assert type(got.private_ciphertext) is bytes
    assert got.public_jwk == first.public_jwk
    assert_utc(got.created_at)
    assert await storage.list_keys() == [first]
    # Purposes are independent.
    identity = make_key(clock.now(), "kid-3", KeyPurpose.DEV_IDENTITY)
    assert await storage.insert_active_key(identity) == identity
    assert await storage.list_keys(KeyPurpose.DEV_IDENTITY) == [identity]


async def test_insert_active_key_refuses_non_active_keys(
    storage: Storage, clock: FakeClock
) -> None:
    retiring = replace(
        make_key(clock.now(), "kid-1"),
        state=KeyState.RETIRING,
        retire_after=clock.now(),
    )
    with pytest.raises(ValueError, match="ACTIVE"):
        await storage.insert_active_key(retiring)
    with pytest.raises(ValueError, match="ACTIVE"):
        await storage.rotate_key(retiring, clock.now())
    assert await storage.list_keys() == []


async def test_rotate_and_prune_keys(storage: Storage, clock: FakeClock) -> None:
    k1 = make_key(clock.now(), "kid-1")
    await storage.insert_active_key(k1)
    k2 = make_key(clock.advance(60), "kid-2")
    retire_k1 = clock.now() + timedelta(hours=1)
    await storage.rotate_key(k2, retire_k1)
    k3 = make_key(clock.advance(60), "kid-3")
    retire_k2 = clock.now() + timedelta(hours=2)
    await storage.rotate_key(k3, retire_k2.astimezone(IST))

    keys = await storage.list_keys(KeyPurpose.CREDENTIALS)
    assert [k.kid for k in keys] == ["kid-3", "kid-2", "kid-1"]
    assert keys[0] == k3
    assert keys[1] == replace(k2, state=KeyState.RETIRING, retire_after=retire_k2)
    assert keys[2] == replace(k1, state=KeyState.RETIRING, retire_after=retire_k1)
    assert_utc(keys[1].retire_after, keys[2].retire_after)
    assert await storage.insert_active_key(make_key(clock.now(), "kid-9")) == k3

    assert await storage.prune_keys(retire_k1 - timedelta(microseconds=1)) == 0
    assert await storage.prune_keys(retire_k1) == 1
    assert [k.kid for k in await storage.list_keys()] == ["kid-3", "kid-2"]
    assert await storage.prune_keys(retire_k2 + timedelta(days=365)) == 1
    assert await storage.list_keys() == [k3]  # the active key is never pruned


async def test_rotate_without_active_key_inserts(storage: Storage, clock: FakeClock) -> None:
    key = make_key(clock.now(), "kid-1", KeyPurpose.DEV_IDENTITY)
    await storage.rotate_key(key, clock.now())
    assert await storage.list_keys() == [key]


async def test_rotate_to_existing_kid_changes_nothing(storage: Storage, clock: FakeClock) -> None:
    k1 = make_key(clock.now(), "kid-1")
    await storage.insert_active_key(k1)
    with pytest.raises(Conflict):
        await storage.rotate_key(make_key(clock.advance(1), "kid-1"), clock.now())
    assert await storage.list_keys() == [k1]


async def test_list_keys_order_and_filter(storage: Storage, clock: FakeClock) -> None:
    t0 = clock.now()
    await storage.insert_active_key(make_key(t0, "cred-b"))
    await storage.rotate_key(make_key(t0, "cred-a"), t0 + timedelta(hours=1))  # same instant
    await storage.insert_active_key(make_key(clock.advance(1), "ident", KeyPurpose.DEV_IDENTITY))
    # Newest first; at the same instant the active key comes first.
    assert [k.kid for k in await storage.list_keys()] == ["ident", "cred-a", "cred-b"]
    assert [k.kid for k in await storage.list_keys(KeyPurpose.CREDENTIALS)] == [
        "cred-a",
        "cred-b",
    ]


# --- admin tokens --------------------------------------------------------------------------


async def test_admin_tokens(storage: Storage, clock: FakeClock) -> None:
    first = AdminToken("tok-b", "a" * 64, "ops laptop", clock.now().astimezone(IST))
    revoked = AdminToken(
        "tok-a", "b" * 64, "old", clock.now(), revoked_at=clock.now() + timedelta(days=1)
    )
    newest = AdminToken("tok-0", "c" * 64, "ci", clock.advance(5))
    for token in (newest, first, revoked):
        await storage.add_admin_token(token)

    assert await storage.find_admin_token("a" * 64) == first
    found = await storage.find_admin_token("b" * 64)
    assert found == revoked
    assert found is not None
    assert_utc(found.created_at, found.revoked_at)
    assert await storage.find_admin_token("f" * 64) is None
    assert [t.id for t in await storage.list_admin_tokens()] == ["tok-a", "tok-b", "tok-0"]

    with pytest.raises(Conflict):
        await storage.add_admin_token(replace(first, token_hash="d" * 64))
    with pytest.raises(Conflict):
        await storage.add_admin_token(replace(first, id="tok-new"))
    assert len(await storage.list_admin_tokens()) == 3


# --- concurrency -----------------------------------------------------------------------------

RACERS = 10


async def _handles(backend: Backend, count: int) -> list[Storage]:
    """``count`` storages on the backend's data, connected before the race starts."""
    handles = [backend.another() for _ in range(count)]
    await asyncio.gather(*(h.check() for h in handles))
    return handles


async def test_concurrent_first_keys_agree(backend: Backend, clock: FakeClock) -> None:
    handles = await _handles(backend, RACERS)
    keys = [make_key(clock.now(), f"kid-{i}") for i in range(RACERS)]
    results = await asyncio.gather(
        *(h.insert_active_key(k) for h, k in zip(handles, keys, strict=True))
    )
    winners = {r.kid for r in results}
    assert len(winners) == 1
    stored = await backend.storage.list_keys()
    assert [k.kid for k in stored] == list(winners)
    assert stored[0].state is KeyState.ACTIVE


async def test_concurrent_end_task_changes_once(backend: Backend, clock: FakeClock) -> None:
    storage = backend.storage
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    task = make_task(clock.now())
    await storage.create_task(
        task, [make_credential(task, f"jti-{i}", clock.now()) for i in range(3)]
    )
    handles = await _handles(backend, RACERS)
    end = clock.advance(1)
    states = [TaskState.COMPLETED, TaskState.CANCELLED, TaskState.REVOKED]
    results = await asyncio.gather(
        *(
            h.end_task("task-1", states[i % 3], f"reason-{i}", end + timedelta(microseconds=i))
            for i, h in enumerate(handles)
        )
    )
    assert all(r is not None for r in results)
    outcomes = [r for r in results if r is not None]
    winners = [t for t, changed in outcomes if changed]
    assert len(winners) == 1
    winner = winners[0]
    assert all(t == winner for t, _ in outcomes)
    assert await storage.get_task("task-1") == winner
    for cred in await storage.list_credentials("task-1"):
        assert (cred.revoked_at, cred.revoke_reason) == (winner.ended_at, winner.end_reason)


async def test_add_credential_never_outlives_end_task(backend: Backend, clock: FakeClock) -> None:
    storage = backend.storage
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    handles = await _handles(backend, RACERS)
    for round_ in range(4):
        task = make_task(clock.now(), f"task-{round_}")
        await storage.create_task(task, [])
        now = clock.advance(1)
        adds = [
            h.add_credential(make_credential(task, f"r{round_}-{i}", now), now)
            for i, h in enumerate(handles[1:])
        ]
        # The end goes in the middle so it interleaves with the adds.
        middle = len(adds) // 2
        calls = [
            *adds[:middle],
            handles[0].end_task(task.id, TaskState.REVOKED, "kill", now),
            *adds[middle:],
        ]
        results = await asyncio.gather(*calls)
        added = [r for i, r in enumerate(results) if i != middle]
        creds = {c.jti: c for c in await storage.list_credentials(task.id)}
        assert not any(c.live_at(now) for c in creds.values())
        for i, ok in enumerate(added):
            assert (f"r{round_}-{i}" in creds) is ok


async def test_expire_and_end_race_end_each_task_once(backend: Backend, clock: FakeClock) -> None:
    storage = backend.storage
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_agent(make_agent(clock.now()))
    ids = [f"task-{i}" for i in range(6)]
    for task_id in ids:
        await storage.create_task(make_task(clock.now(), task_id, ttl=5), [])
    sweeper, *enders = await _handles(backend, len(ids) + 1)
    now = clock.advance(10)
    expired, ended = await asyncio.gather(
        sweeper.expire_tasks(now),
        asyncio.gather(
            *(
                h.end_task(task_id, TaskState.COMPLETED, "done", now)
                for h, task_id in zip(enders, ids, strict=True)
            )
        ),
    )
    changed_by_end = {
        task_id for task_id, r in zip(ids, ended, strict=True) if r is not None and r[1]
    }
    assert set(expired).isdisjoint(changed_by_end)
    assert set(expired) | changed_by_end == set(ids)
    for task_id in ids:
        task = await storage.get_task(task_id)
        assert task is not None
        expected = TaskState.EXPIRED if task_id in expired else TaskState.COMPLETED
        assert task.state is expected


async def test_load_grant_inputs_reads_one_snapshot(storage: Storage, clock: FakeClock) -> None:
    now = clock.now()
    await storage.create_owner(make_owner(now))
    await storage.create_agent(make_agent(now))
    await storage.create_tool(make_tool(now), None)
    await storage.create_tool(make_tool(now, "jira"), None)
    got = await storage.load_grant_inputs(AGENT, "alice", ["github", "jira", "absent", "github"])
    assert got.agent == await storage.get_agent(AGENT)
    assert got.owner == await storage.get_owner("alice")
    assert dict(got.tools) == {
        "github": await storage.get_tool("github"),
        "jira": await storage.get_tool("jira"),
    }
    missing = await storage.load_grant_inputs("spiffe://example.org/nobody", "nobody", [])
    assert (missing.agent, missing.owner, dict(missing.tools)) == (None, None, {})
    nul = await storage.load_grant_inputs(AGENT + "\x00", "alice\x00", ["github\x00"])
    assert (nul.agent, nul.owner, dict(nul.tools)) == (None, None, {})


# --- a non-active agent or a disabled owner has no live task ----------------------------


async def seeded(storage: Storage, now: datetime) -> Task:
    await storage.create_owner(make_owner(now))
    await storage.create_agent(make_agent(now))
    task = make_task(now)
    assert await storage.create_task(task, [make_credential(task, "c1", now)]) is True
    return task


@pytest.mark.parametrize(
    "state", [AgentState.SUSPENDED, AgentState.QUARANTINED, AgentState.RETIRED]
)
async def test_leaving_active_revokes_the_agents_tasks_for_good(
    storage: Storage, clock: FakeClock, state: AgentState
) -> None:
    task = await seeded(storage, clock.now())
    later = clock.advance(5)
    await storage.update_agent(make_agent(clock.now(), state=state, updated_at=later))
    got = await storage.get_task(task.id)
    assert got is not None
    assert got.state is TaskState.REVOKED
    assert got.end_reason == f"agent {state.value}"
    assert got.ended_at == later
    (cred,) = await storage.list_credentials(task.id)
    assert cred.revoked_at == later
    # Re-activating brings nothing back; a retired agent cannot come back at all.
    if state is AgentState.RETIRED:
        with pytest.raises(Conflict):
            await storage.update_agent(make_agent(clock.now(), updated_at=clock.advance(5)))
        assert (await storage.get_agent(AGENT)).state is AgentState.RETIRED  # type: ignore[union-attr]
    else:
        await storage.update_agent(make_agent(clock.now(), updated_at=clock.advance(5)))
    assert (await storage.get_task(task.id)).state is TaskState.REVOKED  # type: ignore[union-attr]
    assert (await storage.get_credential("c1")).revoked_at == later  # type: ignore[union-attr]


async def test_set_agent_state_revokes_too(storage: Storage, clock: FakeClock) -> None:
    task = await seeded(storage, clock.now())
    await storage.set_agent_state(AGENT, AgentState.QUARANTINED, clock.advance(1))
    assert (await storage.get_task(task.id)).state is TaskState.REVOKED  # type: ignore[union-attr]
    assert await storage.create_task(make_task(clock.now(), "task-2"), []) is False
    assert await storage.get_task("task-2") is None


async def test_disabling_the_owner_revokes_its_tasks(storage: Storage, clock: FakeClock) -> None:
    task = await seeded(storage, clock.now())
    await storage.update_owner(make_owner(clock.now(), disabled=True, updated_at=clock.advance(1)))
    got = await storage.get_task(task.id)
    assert got is not None
    assert got.state is TaskState.REVOKED
    assert got.end_reason == "owner disabled"
    assert await storage.create_task(make_task(clock.now(), "task-2"), []) is False
    # Another owner's update revokes nothing.
    await storage.create_owner(make_owner(clock.now(), "bob"))
    await storage.update_owner(make_owner(clock.now(), "bob", contact="b@x"))


async def test_create_task_races_with_suspension(backend: Backend, clock: FakeClock) -> None:
    """Whatever the interleaving, a suspended agent is never left with a live task."""
    now = clock.now()
    await backend.storage.create_owner(make_owner(now))
    await backend.storage.create_agent(make_agent(now))
    writers = [backend.another() for _ in range(6)]
    suspender = backend.another()

    async def start(i: int) -> bool:
        task = make_task(now, f"race-{i}")
        return await writers[i].create_task(task, [make_credential(task, f"rc-{i}", now)])

    async def suspend() -> None:
        await suspender.update_agent(make_agent(now, state=AgentState.SUSPENDED, updated_at=now))

    await asyncio.gather(*(start(i) for i in range(6)), suspend())
    for task in await backend.storage.list_tasks(TaskFilter(agent_id=AGENT)):
        assert task.state is TaskState.REVOKED
        assert all(
            c.revoked_at is not None for c in await backend.storage.list_credentials(task.id)
        )


async def test_mcp_input_schema_round_trips(storage: Storage, clock: FakeClock) -> None:
    schema = {
        "type": "object",
        "properties": {
            "repo": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["repo"],
    }
    tool = make_tool(clock.now(), "mcp-issues", kind=ToolKind.MCP)
    tool = replace(
        tool,
        actions=(Action("create_issue", Tier.WRITE, mcp_tool="create_issue", input_schema=schema),),
    )
    await storage.create_tool(tool, None)
    got = await storage.get_tool("mcp-issues")
    assert got is not None
    assert got.actions[0].input_schema == schema


# --- audit log ---------------------------------------------------------------------------


def make_audit(now: datetime, **changes: object) -> AuditEvent:
    event = AuditEvent(time=now, event="gateway.call", decision="allow")
    return replace(event, **changes)  # type: ignore[arg-type]


def full_audit(now: datetime, **changes: object) -> AuditEvent:
    """An event with every field set."""
    event = AuditEvent(
        time=now,
        event="gateway.call",
        decision="deny",
        code="policy_denied",
        agent=AGENT,
        owner="alice",
        task="task-1",
        intent="merge the fix for the flaky test",
        jti="jti-1",
        tool="github",
        action="merge",
        tier="write",
        argument_digest="sha256:" + "ab" * 32,
        policies=("default/writes.cedar:12", "org/naïve ✓.cedar:3"),
        policy_version="pv-2026-01-01",
        latency_ms=12.345678,
        upstream_status=503,
        detail="forbid: merge outside business hours",
    )
    return replace(event, **changes)  # type: ignore[arg-type]


async def test_audit_round_trip_of_every_field(storage: Storage, clock: FakeClock) -> None:
    clock.advance(0.654321)
    full = full_audit(clock.now().astimezone(IST))
    bare = make_audit(clock.advance(1), event="task.started", decision="info")
    assert await storage.append_audit(full) == 1
    assert await storage.append_audit(bare) == 2

    got = await storage.list_audit()
    assert got == [(1, full), (2, bare)]
    (_, first), (_, second) = got
    assert first.time == clock.now() - timedelta(seconds=1)
    assert first.time.microsecond == 654321
    assert_utc(first.time, second.time)
    assert isinstance(first.policies, tuple)
    assert type(first.latency_ms) is float
    assert type(first.upstream_status) is int
    assert second.policies == ()
    assert (second.latency_ms, second.upstream_status, second.detail) == (None, None, None)


# A call's arguments as the gateway records them (already redacted): every JSON shape.
RECORDED_ARGUMENTS: list[object] = [
    {
        "project": "WEB",
        "password": "[redacted]",
        "items": [{"n": 1, "price": 9.99, "ok": True, "none": None}, [], {}],
        "unicode": "naïve ✓ 🎉 \t\n \\u0000 (text, not a NUL)",
        "small": 1e-7,
        "large": 1.5e300,
        "safe": 2**53 - 1,
        "negative": -(2**53) + 1,
        "half": -0.5,
    },
    {},
    [],
    "[redacted]",
    0,
    False,
    {"truncated": True, "bytes": 5000},
]


async def test_audit_round_trip_of_recorded_arguments(storage: Storage, clock: FakeClock) -> None:
    events = [full_audit(clock.advance(1), arguments=value) for value in RECORDED_ARGUMENTS]
    events.append(full_audit(clock.advance(1)))  # none recorded
    await storage.append_audits(events[:2])
    for event in events[2:]:
        await storage.append_audit(event)
    got = [e for _, e in await storage.list_audit()]
    assert got == events
    assert [e.arguments for e in got] == [*RECORDED_ARGUMENTS, None]
    first = got[0].arguments
    assert isinstance(first, dict)
    assert type(first["safe"]) is int
    assert type(first["small"]) is float
    assert await storage.list_audit(tool="github", limit=1) == [(1, events[0])]


async def test_recorded_arguments_are_detached_from_the_callers_objects(
    storage: Storage, clock: FakeClock
) -> None:
    arguments = {"items": [{"n": 1}], "tuple": (1, 2)}
    await storage.append_audit(make_audit(clock.now(), arguments=arguments))
    arguments["items"][0]["n"] = 2  # type: ignore[index]
    ((_, got),) = await storage.list_audit()
    # A tuple comes back as JSON has it: a list.
    assert got.arguments == {"items": [{"n": 1}], "tuple": [1, 2]}


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"note": "a\x00b"}, "NUL"),
        ({"a\x00": 1}, "NUL"),
        ([["deep", "\x00"]], "NUL"),
        ({"n": float("nan")}, "arguments"),
        ({"n": float("inf")}, "arguments"),
        ({"n": 2**60}, "arguments"),
        ({1: "x"}, "arguments"),
        ({"b": b"bytes"}, "arguments"),
        ({"s": {1, 2}}, "arguments"),
        ("\ud800", "arguments"),
    ],
    ids=["nul", "nul-name", "nul-deep", "nan", "inf", "huge", "key", "bytes", "set", "surrogate"],
)
async def test_audit_refuses_arguments_no_store_can_keep(
    storage: Storage, clock: FakeClock, arguments: object, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        await storage.append_audit(full_audit(clock.now(), arguments=arguments))
    with pytest.raises(ValueError, match=problem):
        await storage.append_audits(
            [make_audit(clock.now()), make_audit(clock.now(), arguments=arguments)]
        )
    assert await storage.list_audit() == []
    assert await storage.append_audit(make_audit(clock.now(), arguments={"ok": 1})) == 1


async def test_audit_sequence_increases_and_pages(storage: Storage, clock: FakeClock) -> None:
    assert await storage.list_audit() == []
    seqs = [await storage.append_audit(make_audit(clock.advance(1), jti=f"j{i}")) for i in range(7)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 7
    assert seqs[0] == 1
    assert [s for s, _ in await storage.list_audit()] == seqs
    assert [s for s, _ in await storage.list_audit(after=seqs[2])] == seqs[3:]
    assert [s for s, _ in await storage.list_audit(after=seqs[2], limit=2)] == seqs[3:5]
    assert await storage.list_audit(limit=0) == []
    assert await storage.list_audit(after=seqs[-1]) == []
    # Paging with the last number seen reads everything exactly once.
    paged: list[int] = []
    after = 0
    while page := await storage.list_audit(after=after, limit=3):
        paged += [s for s, _ in page]
        after = page[-1][0]
    assert paged == seqs
    with pytest.raises(ValueError, match="limit"):
        await storage.list_audit(limit=-1)
    with pytest.raises(ValueError, match="after"):
        await storage.list_audit(after=-1)


async def test_audit_default_limit_is_100(storage: Storage, clock: FakeClock) -> None:
    for _ in range(105):
        await storage.append_audit(make_audit(clock.now()))
    got = await storage.list_audit()
    assert [s for s, _ in got] == list(range(1, 101))


async def test_audit_filters(storage: Storage, clock: FakeClock) -> None:
    # No foreign keys: an audit record may name agents and tasks that do not exist.
    rows = [
        ("a1", "t1"),
        ("a2", "t2"),
        ("a1", "t2"),
        ("a1", None),
        (None, "t1"),
        ("a1", "t1"),
    ]
    seqs = [
        await storage.append_audit(make_audit(clock.advance(1), agent=a, task=t)) for a, t in rows
    ]

    async def found(**kw: object) -> list[int]:
        return [s for s, _ in await storage.list_audit(**kw)]  # type: ignore[arg-type]

    assert await found(agent="a1") == [seqs[0], seqs[2], seqs[3], seqs[5]]
    assert await found(task="t1") == [seqs[0], seqs[4], seqs[5]]
    assert await found(task="t2", agent="a1") == [seqs[2]]
    assert await found(agent="a1", after=seqs[0], limit=2) == [seqs[2], seqs[3]]
    assert await found(task="t1", agent="a2") == []
    assert await found(agent="nobody") == []
    # Filters are exact matches, not patterns.
    assert await found(agent="a%") == []
    assert await found(agent="a1\x00") == []
    assert await found(task="t1\x00") == []
    events = await storage.list_audit(task="t2")
    assert [(e.agent, e.task) for _, e in events] == [("a2", "t2"), ("a1", "t2")]


async def test_audit_detail_is_bounded(storage: Storage, clock: FakeClock) -> None:
    at_limit = "d" * AUDIT_DETAIL_MAX
    await storage.append_audit(make_audit(clock.now(), detail=at_limit))
    await storage.append_audit(make_audit(clock.now(), detail="x" * 10_000))
    # Beyond the limit the cut text may even hold what could never be stored.
    await storage.append_audit(make_audit(clock.now(), detail="é" * 2_500 + "\x00"))
    (_, kept), (_, cut), (_, cut_nul) = await storage.list_audit()
    assert kept.detail == at_limit
    assert cut.detail is not None
    assert len(cut.detail) == AUDIT_DETAIL_MAX
    assert cut.detail.endswith(AUDIT_TRUNCATED)
    assert cut.detail == "x" * (AUDIT_DETAIL_MAX - len(AUDIT_TRUNCATED)) + AUDIT_TRUNCATED
    assert cut_nul.detail is not None
    assert cut_nul.detail.startswith("é")
    assert len(cut_nul.detail) == AUDIT_DETAIL_MAX


@pytest.mark.parametrize(
    "field",
    [
        "event",
        "decision",
        "code",
        "agent",
        "owner",
        "task",
        "intent",
        "jti",
        "tool",
        "action",
        "tier",
        "argument_digest",
        "policy_version",
        "detail",
    ],
)
async def test_audit_refuses_nul_in_text(storage: Storage, clock: FakeClock, field: str) -> None:
    with pytest.raises(ValueError, match="NUL"):
        await storage.append_audit(full_audit(clock.now(), **{field: "bad\x00value"}))
    assert await storage.list_audit() == []


async def test_audit_refuses_unstorable_values(storage: Storage, clock: FakeClock) -> None:
    bad: list[tuple[dict[str, object], str]] = [
        ({"policies": ("ok", "no\x00")}, "NUL"),
        ({"latency_ms": float("nan")}, "finite"),
        ({"latency_ms": float("inf")}, "finite"),
        ({"upstream_status": 2**31}, "32-bit"),
        ({"upstream_status": True}, "32-bit"),
    ]
    for changes, problem in bad:
        with pytest.raises(ValueError, match=problem):
            await storage.append_audit(full_audit(clock.now(), **changes))
    with pytest.raises(TypeError):
        await storage.append_audit(make_audit(clock.now(), policies=("ok", 3)))
    with pytest.raises(ValueError, match="naive"):
        await storage.append_audit(make_audit(datetime(2026, 1, 1, 12)))
    assert await storage.list_audit() == []
    # Refused before the database is asked: the next record is still number 1.
    assert await storage.append_audit(make_audit(clock.now(), latency_ms=0)) == 1
    got = await storage.list_audit()
    assert [s for s, _ in got] == [1]
    assert got[0][1].latency_ms == 0.0


async def test_concurrent_audit_appends_lose_nothing(backend: Backend, clock: FakeClock) -> None:
    writers = await _handles(backend, 8)
    per_writer = 5

    async def write(w: int) -> list[tuple[int, AuditEvent]]:
        out = []
        for i in range(per_writer):
            event = make_audit(clock.now(), agent=f"agent-{w}", jti=f"w{w}-{i}")
            out.append((await writers[w].append_audit(event), event))
        return out

    results = await asyncio.gather(*(write(w) for w in range(len(writers))))
    appended = [pair for chunk in results for pair in chunk]
    seqs = [s for s, _ in appended]
    assert len(set(seqs)) == len(seqs) == 8 * per_writer
    # Each writer's own appends are numbered in the order it made them.
    for chunk in results:
        assert [s for s, _ in chunk] == sorted(s for s, _ in chunk)
    listed = await backend.storage.list_audit(limit=1000)
    assert listed == sorted(appended, key=lambda pair: pair[0])
    assert [s for s, _ in await backend.storage.list_audit(agent="agent-3")] == [
        s for s, _ in results[3]
    ]


async def test_append_audits_is_one_ordered_all_or_nothing_batch(
    storage: Storage, clock: FakeClock
) -> None:
    events = [make_audit(clock.now(), detail=f"n{i}") for i in range(5)]
    seqs = await storage.append_audits(events)
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5
    listed = await storage.list_audit()
    assert [e.detail for _, e in listed] == [f"n{i}" for i in range(5)]
    bad = [make_audit(clock.now(), detail="ok"), make_audit(clock.now(), tool="bad\x00tool")]
    with pytest.raises(ValueError, match="NUL"):
        await storage.append_audits(bad)
    assert len(await storage.list_audit()) == 5  # nothing of the failed batch was written
    assert await storage.append_audits([]) == []

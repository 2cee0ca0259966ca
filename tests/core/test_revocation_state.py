"""The in-memory revocation state (core/revocation.py): what each kind of log entry refuses,
idempotence, order, pruning at its minute boundaries, and a property test against a
reference model built from plain dicts and sets."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbound.core.model import AgentState, Revocation, RevocationKind
from taskbound.core.revocation import RevocationState, Standing

# A whole minute, so that minute boundaries are easy to name.
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
assert T0.timestamp() % 60 == 0

STANDING = Standing(
    jti="cred-1",
    task_id="task-1",
    agent_id="spiffe://example.org/agents/bot",
    owner_id="alice",
    kid="kid-1",
)


def entry(
    kind: RevocationKind,
    subject: str,
    *,
    seq: int = 1,
    state: str | None = None,
    expires_at: datetime | None = None,
) -> Revocation:
    return Revocation(
        kind=kind,
        subject=subject,
        time=T0,
        cause="admin:tok-1",
        reason="test",
        expires_at=expires_at,
        state=state,
        seq=seq,
    )


def credential(jti: str = "cred-1", seq: int = 1, expires: float = 600) -> Revocation:
    return entry(
        RevocationKind.CREDENTIAL, jti, seq=seq, expires_at=T0 + timedelta(seconds=expires)
    )


def task(task_id: str = "task-1", seq: int = 1, expires: float = 600) -> Revocation:
    return entry(RevocationKind.TASK, task_id, seq=seq, expires_at=T0 + timedelta(seconds=expires))


def agent(state: AgentState | None, seq: int = 1, spiffe_id: str = STANDING.agent_id) -> Revocation:
    return entry(
        RevocationKind.AGENT, spiffe_id, seq=seq, state=None if state is None else state.value
    )


def owner(state: str, seq: int = 1, owner_id: str = "alice") -> Revocation:
    return entry(RevocationKind.OWNER, owner_id, seq=seq, state=state)


def key(kid: str = "kid-1", seq: int = 1) -> Revocation:
    return entry(RevocationKind.KEY, kid, seq=seq)


def standing(**changes: str) -> Standing:
    values = {
        "jti": STANDING.jti,
        "task_id": STANDING.task_id,
        "agent_id": STANDING.agent_id,
        "owner_id": STANDING.owner_id,
        "kid": STANDING.kid,
    }
    values.update(changes)
    return Standing(**values)


# --- each kind -----------------------------------------------------------------------------


def test_an_empty_state_refuses_nothing() -> None:
    state = RevocationState()
    assert state.refusal(STANDING) is None
    assert len(state) == 0
    assert state.seq == 0


@pytest.mark.parametrize(
    ("revocation", "why", "unaffected"),
    [
        (credential(), "credential revoked", standing(jti="cred-2")),
        (task(), "task ended", standing(task_id="task-2")),
        (agent(AgentState.SUSPENDED), "agent suspended", standing(agent_id="spiffe://x/y")),
        (agent(AgentState.QUARANTINED), "agent quarantined", standing(agent_id="spiffe://x/y")),
        (agent(AgentState.RETIRED), "agent retired", standing(agent_id="spiffe://x/y")),
        (agent(None), "agent not active", standing(agent_id="spiffe://x/y")),
        (owner("disabled"), "owner disabled", standing(owner_id="bob")),
        (key(), "signing key withdrawn", standing(kid="kid-2")),
    ],
    ids=[
        "credential",
        "task",
        "suspended",
        "quarantined",
        "retired",
        "agent-without-state",
        "owner",
        "key",
    ],
)
def test_each_kind_refuses_what_it_names_only(
    revocation: Revocation, why: str, unaffected: Standing
) -> None:
    state = RevocationState()
    state.apply(revocation)
    assert state.refusal(STANDING) == why
    assert state.refusal(unaffected) is None
    assert len(state) == 1
    assert state.seq == 1


def test_a_credential_and_a_task_with_the_same_name_are_distinct() -> None:
    state = RevocationState()
    state.apply(credential("same"))
    assert state.refusal(standing(jti="same")) == "credential revoked"
    assert state.refusal(standing(task_id="same")) is None
    state.apply(task("other"))
    assert state.refusal(standing(jti="other")) is None


def test_resume_restores_an_agent() -> None:
    state = RevocationState()
    for seq, suspended in enumerate((AgentState.SUSPENDED, AgentState.QUARANTINED), start=1):
        state.apply(agent(suspended, seq=2 * seq - 1))
        assert state.refusal(STANDING) == f"agent {suspended.value}"
        state.apply(agent(AgentState.ACTIVE, seq=2 * seq))
        assert state.refusal(STANDING) is None
    assert len(state) == 0
    # Resuming an agent that was never held is harmless.
    state.apply(agent(AgentState.ACTIVE, seq=5, spiffe_id="spiffe://x/never"))
    assert len(state) == 0


def test_enabling_an_owner_restores_it() -> None:
    state = RevocationState()
    state.apply(owner("disabled", seq=1))
    assert state.refusal(STANDING) == "owner disabled"
    state.apply(owner("enabled", seq=2))
    assert state.refusal(STANDING) is None
    assert len(state) == 0
    state.apply(owner("enabled", seq=3, owner_id="bob"))
    assert len(state) == 0


def test_an_ended_task_and_its_revoked_credential_stay_dead_when_the_agent_resumes() -> None:
    state = RevocationState()
    state.apply(task(seq=1))
    state.apply(credential(seq=2))
    state.apply(agent(AgentState.SUSPENDED, seq=3))
    state.apply(agent(AgentState.ACTIVE, seq=4))
    assert state.refusal(STANDING) == "credential revoked"
    assert state.refusal(standing(jti="cred-2")) == "task ended"
    assert state.refusal(standing(jti="cred-2", task_id="task-2")) is None


def test_refusals_name_the_most_specific_cause_first() -> None:
    state = RevocationState()
    for revocation in (key(), owner("disabled"), agent(AgentState.SUSPENDED), task(), credential()):
        state.apply(revocation)
    assert state.refusal(STANDING) == "credential revoked"
    assert state.refusal(standing(jti="x")) == "task ended"
    assert state.refusal(standing(jti="x", task_id="x")) == "agent suspended"
    assert state.refusal(standing(jti="x", task_id="x", agent_id="x")) == "owner disabled"
    assert state.refusal(standing(jti="x", task_id="x", agent_id="x", owner_id="x")) == (
        "signing key withdrawn"
    )
    assert state.refusal(Standing("x", "x", "x", "x", "x")) is None


# --- idempotence, order, seq ---------------------------------------------------------------


def test_applying_an_entry_twice_changes_nothing() -> None:
    entries = [
        credential(seq=1),
        task(seq=2),
        agent(AgentState.SUSPENDED, seq=3),
        owner("disabled", seq=4),
        key(seq=5),
    ]
    once, twice = RevocationState(), RevocationState()
    for e in entries:
        once.apply(e)
        twice.apply(e)
        twice.apply(e)
    assert len(once) == len(twice) == 5
    assert once.seq == twice.seq == 5
    for s in (STANDING, standing(jti="x"), standing(jti="x", task_id="x")):
        assert once.refusal(s) == twice.refusal(s)
    # A duplicated credential is held once, so it is pruned once.
    assert twice.prune(T0 + timedelta(hours=1)) == 2
    assert len(twice) == 3


def test_the_later_agent_entry_wins() -> None:
    state = RevocationState()
    state.apply(agent(AgentState.ACTIVE, seq=1))
    state.apply(agent(AgentState.SUSPENDED, seq=2))
    assert state.refusal(STANDING) == "agent suspended"
    state.apply(agent(AgentState.QUARANTINED, seq=3))
    assert state.refusal(STANDING) == "agent quarantined"
    state.apply(agent(AgentState.ACTIVE, seq=4))
    assert state.refusal(STANDING) is None
    state.apply(agent(AgentState.RETIRED, seq=5))
    assert state.refusal(STANDING) == "agent retired"
    assert len(state) == 1


def test_the_later_owner_entry_wins() -> None:
    state = RevocationState()
    state.apply(owner("enabled", seq=1))
    state.apply(owner("disabled", seq=2))
    state.apply(owner("disabled", seq=3))
    state.apply(owner("enabled", seq=4))
    assert state.refusal(STANDING) is None
    state.apply(owner("disabled", seq=5))
    assert state.refusal(STANDING) == "owner disabled"


def test_seq_is_the_highest_applied() -> None:
    state = RevocationState()
    state.apply(credential("a", seq=7))
    assert state.seq == 7
    state.apply(credential("b", seq=3))  # an old entry seen again (a reload) never goes back
    assert state.seq == 7
    state.apply(key(seq=12))
    assert state.seq == 12
    state.prune(T0 + timedelta(days=1))
    assert state.seq == 12


# --- prune ---------------------------------------------------------------------------------


def test_prune_at_exactly_the_expiry_minute() -> None:
    state = RevocationState()
    state.apply(credential("on-the-minute", expires=120))  # 12:02:00
    state.apply(task("a-second-later", expires=121))  # 12:02:01
    assert state.prune(T0 + timedelta(seconds=119)) == 0
    assert state.prune(T0 + timedelta(seconds=119, microseconds=999_999)) == 0
    assert state.refusal(standing(jti="on-the-minute")) == "credential revoked"
    # At its expiry, exactly: what it protects is expired by itself.
    assert state.prune(T0 + timedelta(seconds=120)) == 1
    assert state.refusal(standing(jti="on-the-minute")) is None
    assert state.refusal(standing(jti="x", task_id="a-second-later")) == "task ended"
    # Held for the rest of its minute: never dropped before its own expiry.
    assert state.prune(T0 + timedelta(seconds=121)) == 0
    assert state.prune(T0 + timedelta(seconds=179)) == 0
    assert state.refusal(standing(jti="x", task_id="a-second-later")) == "task ended"
    assert state.prune(T0 + timedelta(seconds=180)) == 1
    assert state.refusal(standing(jti="x", task_id="a-second-later")) is None
    assert len(state) == 0


def test_prune_drops_only_expired_buckets() -> None:
    state = RevocationState()
    for i in range(10):
        state.apply(credential(f"c{i}", seq=i + 1, expires=60 * (i + 1)))
    assert state.prune(T0 + timedelta(seconds=60 * 4 + 30)) == 4
    for i in range(10):
        why = state.refusal(standing(jti=f"c{i}", task_id="x"))
        assert why == (None if i < 4 else "credential revoked"), i
    assert len(state) == 6
    # Pruning again at the same time, or earlier, drops nothing more.
    assert state.prune(T0 + timedelta(seconds=60 * 4 + 30)) == 0
    assert state.prune(T0) == 0
    assert len(state) == 6


def test_prune_keeps_standing_changes_and_entries_without_expiry() -> None:
    state = RevocationState()
    state.apply(entry(RevocationKind.CREDENTIAL, "forever", seq=1))  # no expiry known
    state.apply(agent(AgentState.SUSPENDED, seq=2))
    state.apply(owner("disabled", seq=3))
    state.apply(key(seq=4))
    assert state.prune(T0 + timedelta(days=3650)) == 0
    assert len(state) == 4
    assert state.refusal(standing(jti="forever")) == "credential revoked"


def test_an_entry_applied_again_after_its_prune_is_held_again() -> None:
    state = RevocationState()
    state.apply(credential(expires=60))
    assert state.prune(T0 + timedelta(seconds=60)) == 1
    state.apply(credential(expires=60))
    assert state.refusal(STANDING) == "credential revoked"
    assert state.prune(T0 + timedelta(seconds=60)) == 1


# --- property: the state against a reference model -----------------------------------------

JTIS = [f"c{i}" for i in range(6)]
TASKS = [f"t{i}" for i in range(4)]
AGENTS = [f"spiffe://example.org/a{i}" for i in range(3)]
OWNERS = ["alice", "bob", "carol"]
KIDS = ["k0", "k1", "k2"]
AGENT_STATES = [s.value for s in AgentState]


def expiry_of(subject: str) -> datetime:
    # One expiry per subject, as in the log (a credential or task expires once), spread
    # over a few minutes and off the minute boundaries.
    return T0 + timedelta(seconds=37 * (zlib.crc32(subject.encode()) % 17) + 7)


@dataclass
class Model:
    """The obvious implementation: sets and dicts, nothing hashed, no buckets."""

    dead: dict[tuple[str, str], datetime] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    seq: int = 0
    pruned_at: datetime | None = None

    def apply(self, e: Revocation) -> None:
        if e.kind in (RevocationKind.CREDENTIAL, RevocationKind.TASK):
            assert e.expires_at is not None
            self.dead[(e.kind.value, e.subject)] = e.expires_at
        elif e.kind is RevocationKind.AGENT:
            assert e.state is not None
            self.agents[e.subject] = e.state
        elif e.kind is RevocationKind.OWNER:
            assert e.state is not None
            self.owners[e.subject] = e.state
        else:
            self.keys.add(e.subject)
        self.seq = max(self.seq, e.seq)

    def prune(self, now: datetime) -> tuple[int, int]:
        """(how many must be dropped at least, how many may be dropped at most)."""
        must = [k for k, exp in self.dead.items() if exp <= now - timedelta(seconds=60)]
        may = [k for k, exp in self.dead.items() if exp <= now]
        for k in may:
            del self.dead[k]
        return len(must), len(may)

    def standing_refusal(self, s: Standing) -> str | None:
        state = self.agents.get(s.agent_id, "active")
        if state != "active":
            return f"agent {state}"
        if self.owners.get(s.owner_id, "enabled") != "enabled":
            return "owner disabled"
        if s.kid in self.keys:
            return "signing key withdrawn"
        return None


kinds = st.sampled_from(["credential", "task", "agent", "owner", "key", "prune"])


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, str, str | None, int]]:
    ops = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(kinds)
        if kind == "credential":
            ops.append((kind, draw(st.sampled_from(JTIS)), None, 0))
        elif kind == "task":
            ops.append((kind, draw(st.sampled_from(TASKS)), None, 0))
        elif kind == "agent":
            ops.append(
                (kind, draw(st.sampled_from(AGENTS)), draw(st.sampled_from(AGENT_STATES)), 0)
            )
        elif kind == "owner":
            state = draw(st.sampled_from(["enabled", "disabled"]))
            ops.append((kind, draw(st.sampled_from(OWNERS)), state, 0))
        elif kind == "key":
            ops.append((kind, draw(st.sampled_from(KIDS)), None, 0))
        else:
            ops.append((kind, "", None, draw(st.integers(0, 1200))))
    return ops


@given(operations())
@settings(max_examples=300, deadline=None)
def test_the_state_agrees_with_a_reference_model(
    ops: list[tuple[str, str, str | None, int]],
) -> None:
    state, model = RevocationState(), Model()
    # Dead entries the model has dropped but the state may still hold (within a minute).
    maybe: dict[tuple[str, str], datetime] = {}
    seq = 0
    for kind, subject, value, seconds in ops:
        if kind == "prune":
            now = T0 + timedelta(seconds=seconds)
            before = dict(model.dead)
            must, may = model.prune(now)
            dropped = state.prune(now)
            # Never before expiry (checked below); always within a minute after it.
            assert must <= dropped <= may + len(maybe)
            for k, exp in before.items():
                if k not in model.dead:
                    maybe[k] = exp
            maybe = {k: exp for k, exp in maybe.items() if exp > now - timedelta(seconds=60)}
            continue
        seq += 1
        if kind in ("credential", "task"):
            e = entry(RevocationKind(kind), subject, seq=seq, expires_at=expiry_of(subject))
            maybe.pop((kind, subject), None)
        else:
            e = entry(RevocationKind(kind), subject, seq=seq, state=value)
        state.apply(e)
        model.apply(e)
        assert state.seq == model.seq == seq

    # Credentials and tasks, one dimension at a time.
    for kind, names, why in (
        ("credential", JTIS, "credential revoked"),
        ("task", TASKS, "task ended"),
    ):
        for name in names:
            s = standing(
                jti=name if kind == "credential" else "-",
                task_id=name if kind == "task" else "-",
                agent_id="-",
                owner_id="-",
                kid="-",
            )
            got = state.refusal(s)
            if (kind, name) in model.dead:
                assert got == why, (kind, name)
            elif (kind, name) not in maybe:
                assert got is None, (kind, name)
            else:
                assert got in (None, why), (kind, name)
    # Standing changes: every combination, in the documented order.
    for agent_id in [*AGENTS, "spiffe://example.org/never"]:
        for owner_id in [*OWNERS, "dave"]:
            for kid in [*KIDS, "k9"]:
                s = Standing("-", "-", agent_id, owner_id, kid)
                assert state.refusal(s) == model.standing_refusal(s), s
    held = (
        sum(1 for st_ in model.agents.values() if st_ != "active")
        + sum(1 for st_ in model.owners.values() if st_ != "enabled")
        + len(model.keys)
    )
    assert held + len(model.dead) <= len(state) <= held + len(model.dead) + len(maybe)

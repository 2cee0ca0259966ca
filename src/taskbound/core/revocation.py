"""The live revocation state a gateway keeps in memory (DESIGN.md §3 flow 7).

It is fed the entries of the revocation log (:class:`~taskbound.core.model.Revocation`) in
sequence order and answers, for one call, whether its credential, task, agent, owner or
signing key has been revoked. Nothing here does I/O; time is passed in.

Sized for millions of entries: a revoked credential or ended task is held as one 64-bit
hash of its kind and identifier in a set, plus a reference in the bucket of the minute it
expires in, so that entries are pruned once what they protect has expired by itself. A
hash collision can only make a live credential look revoked (a refusal, never a pass),
with a chance of about n / 2^64 per call for n entries. Agents, owners and keys are few,
and held by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from taskbound.core.clock import to_epoch
from taskbound.core.model import AgentState, Revocation, RevocationKind

_BUCKET_SECONDS = 60


def _key(kind: str, subject: str) -> int:
    # The per-process salted SipHash of CPython: fast, 64 bits, not predictable from outside.
    return hash(kind + "\x00" + subject)


@dataclass(frozen=True, slots=True)
class Standing:
    """What a call's credential stands on: checked against the state on every call."""

    jti: str
    task_id: str
    agent_id: str
    owner_id: str
    kid: str
    # Delegation: the credentials this one was exchanged from and the agents acting in
    # the chain; revoking any of them revokes this one.
    parents: tuple[str, ...] = ()
    actors: tuple[str, ...] = ()


class RevocationState:
    def __init__(self) -> None:
        self._dead: set[int] = set()
        # Expiry bucket (epoch minute, rounded up) -> keys that may be dropped after it.
        self._buckets: dict[int, list[int]] = {}
        self._agents: dict[str, str] = {}  # SPIFFE ID -> a state other than active
        self._owners: set[str] = set()  # disabled owners
        self._keys: set[str] = set()  # withdrawn kids
        self.seq = 0  # the highest sequence number applied

    def __len__(self) -> int:
        return len(self._dead) + len(self._agents) + len(self._owners) + len(self._keys)

    def apply(self, rev: Revocation) -> None:
        """Apply one entry. Idempotent; entries must come in sequence order for standing
        changes (the later state of an agent or owner wins)."""
        kind = RevocationKind(rev.kind)
        if kind is RevocationKind.CREDENTIAL or kind is RevocationKind.TASK:
            key = _key(kind.value, rev.subject)
            if key not in self._dead:
                self._dead.add(key)
                bucket = (
                    -1
                    if rev.expires_at is None
                    else math.ceil(to_epoch(rev.expires_at) / _BUCKET_SECONDS)
                )
                self._buckets.setdefault(bucket, []).append(key)
        elif kind is RevocationKind.AGENT:
            if rev.state == AgentState.ACTIVE.value:
                self._agents.pop(rev.subject, None)
            else:
                self._agents[rev.subject] = rev.state or "not active"
        elif kind is RevocationKind.OWNER:
            if rev.state == "enabled":
                self._owners.discard(rev.subject)
            else:
                self._owners.add(rev.subject)
        else:
            self._keys.add(rev.subject)
        self.seq = max(self.seq, rev.seq)

    def refusal(self, standing: Standing) -> str | None:
        """Why a call on ``standing`` must be refused, or None when nothing revoked it."""
        if _key(RevocationKind.CREDENTIAL.value, standing.jti) in self._dead:
            return "credential revoked"
        if _key(RevocationKind.TASK.value, standing.task_id) in self._dead:
            return "task ended"
        for parent in standing.parents:
            if _key(RevocationKind.CREDENTIAL.value, parent) in self._dead:
                return "a credential it was delegated from is revoked"
        for agent in (standing.agent_id, *standing.actors):
            state = self._agents.get(agent)
            if state is not None:
                return f"agent {state}"
        if standing.owner_id in self._owners:
            return "owner disabled"
        if standing.kid in self._keys:
            return "signing key withdrawn"
        return None

    def prune(self, now: datetime) -> int:
        """Forget credentials and tasks whose own expiry has passed; how many."""
        limit = to_epoch(now) // _BUCKET_SECONDS
        due = [b for b in self._buckets if 0 <= b <= limit]
        dropped = 0
        for bucket in due:
            for key in self._buckets.pop(bucket):
                self._dead.discard(key)
                dropped += 1
        return dropped

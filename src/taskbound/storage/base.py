"""Storage ports: small Protocols, each with an in-memory twin and SQL implementations.

Every implementation passes the one conformance suite in ``tests/storage/``. Concurrency
is the database's job (unique constraints, conditional updates inside transactions), never
a process-local lock, so several server processes can share one PostgreSQL.

Errors: a uniqueness violation raises :class:`taskbound.errors.Conflict`; a reference to a
missing row (an agent's owner, a task's agent) raises :class:`taskbound.errors.ReferenceError_`;
updating a missing row raises :class:`taskbound.errors.NotFound`; a lost or failing backend
raises :class:`taskbound.errors.StorageError`. Nothing is half-written: each method is one
transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from taskbound.core.audit import ChainRecord, Checkpoint
from taskbound.core.breakglass import BreakGlass
from taskbound.core.model import (
    AdminToken,
    Agent,
    AgentState,
    Approval,
    ApprovalState,
    ApprovalVote,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    Owner,
    Revocation,
    SigningKey,
    Task,
    TaskFilter,
    TaskState,
    Tool,
    UiSession,
)
from taskbound.core.usage import TimelineRow, UsageRow


@dataclass(frozen=True, slots=True)
class GrantInputs:
    agent: Agent | None
    owner: Owner | None
    tools: Mapping[str, Tool]


class RegistryStore(Protocol):
    """Owners, agents and tools (DESIGN.md §2)."""

    async def create_owner(self, owner: Owner) -> None: ...
    async def update_owner(
        self, owner: Owner, *, cause: str = "system", reason: str | None = None
    ) -> None:
        """Disabling an owner (``disabled=True``) ends every ACTIVE task on its behalf as
        REVOKED, with their credentials, in the same transaction (at ``updated_at``).
        A change of ``disabled`` is logged (an OWNER entry), and so is each task revoked."""
        ...

    async def get_owner(self, owner_id: str) -> Owner | None: ...
    async def list_owners(self) -> list[Owner]: ...

    async def create_agent(self, agent: Agent) -> None:
        """Raises ReferenceError_ when ``agent.owner_id`` is not a registered owner."""
        ...

    async def update_agent(
        self, agent: Agent, *, cause: str = "system", reason: str | None = None
    ) -> None:
        """An agent that is not ACTIVE has no live task: a state other than ACTIVE ends every
        ACTIVE task of the agent as REVOKED, with their credentials, in the same
        transaction (at ``updated_at``). Re-activating brings none of them back. A change of
        state is logged (an AGENT entry), and so is each task revoked. RETIRED is final:
        moving a retired agent to another state is a Conflict, and nothing changes."""
        ...

    async def get_agent(self, spiffe_id: str) -> Agent | None: ...
    async def list_agents(self, owner_id: str | None = None) -> list[Agent]: ...

    async def set_agent_state(
        self,
        spiffe_id: str,
        state: AgentState,
        now: datetime,
        *,
        cause: str = "system",
        reason: str | None = None,
    ) -> Agent | None:
        """Set the state (and ``updated_at``); None when the agent does not exist. Logs and
        revokes as ``update_agent`` does (Conflict for a retired agent)."""
        ...

    async def change_agent_state(
        self,
        spiffe_id: str,
        state: AgentState,
        now: datetime,
        *,
        cause: str = "system",
        reason: str | None = None,
    ) -> tuple[Agent, bool] | None:
        """As ``set_agent_state``, but an agent already in ``state`` is left untouched, and
        the answer says whether this call changed it (decided under the row lock, so of
        concurrent identical calls exactly one reports a change). None: no such agent."""
        ...

    async def create_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None: ...

    async def update_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None:
        """``secret_ciphertext=None`` keeps the stored secret unchanged."""
        ...

    async def get_tool(self, tool_id: str) -> Tool | None: ...
    async def list_tools(self) -> list[Tool]: ...
    async def get_tool_secret(self, tool_id: str) -> bytes | None: ...

    async def load_grant_inputs(
        self, spiffe_id: str, owner_id: str, tool_ids: Sequence[str]
    ) -> GrantInputs:
        """The agent, the owner and the named tools (those that exist), read in one
        transaction: everything a grant decision needs, from one consistent snapshot."""
        ...


class KeyStore(Protocol):
    """Signing keys. At most one ACTIVE key per purpose, enforced by the database."""

    async def insert_active_key(self, key: SigningKey) -> SigningKey:
        """Insert ``key`` as the active key of its purpose unless one exists already.

        Returns whichever key is active afterwards (the given one, or the one another
        process inserted first). Used on first start, so concurrent starts agree on one key.
        """
        ...

    async def rotate_key(self, new_key: SigningKey, retire_after: datetime) -> None:
        """In one transaction: mark the purpose's active key RETIRING with ``retire_after``
        and make ``new_key`` the active key."""
        ...

    async def list_keys(self, purpose: KeyPurpose | None = None) -> list[SigningKey]:
        """All stored keys (active and retiring), newest first."""
        ...

    async def prune_keys(self, now: datetime) -> int:
        """Delete retiring keys whose ``retire_after`` has passed; returns how many."""
        ...

    async def withdraw_key(
        self,
        kid: str,
        now: datetime,
        replacement: SigningKey | None,
        *,
        cause: str = "system",
        reason: str = "signing key withdrawn",
    ) -> int | None:
        """Withdraw a (compromised) signing key in one transaction: delete it, make
        ``replacement`` the active key of its purpose when it was the active one (required
        then; ValueError without it), revoke every unexpired credential it signed with all
        their descendants, and log a KEY entry plus one CREDENTIAL entry per credential.
        Returns how many credentials were revoked; None when no such key is stored."""
        ...


class TaskStore(Protocol):
    """Tasks and the credentials issued for them."""

    async def create_task(self, task: Task, credentials: Sequence[CredentialRecord]) -> bool:
        """Insert the task and its first credentials in one transaction, only while the
        task's agent is ACTIVE and its owner enabled (checked under lock in that same
        transaction). False, and nothing written, when they are not."""
        ...

    async def get_task(self, task_id: str) -> Task | None: ...
    async def list_tasks(self, flt: TaskFilter) -> list[Task]: ...

    async def task_agents(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Each known task of ``task_ids`` mapped to its agent (the task's own agent, never
        a delegate's), in one bulk read however many ids (split into statements the
        backend's parameter limit allows). Unknown ids, and ids no task can have (a NUL),
        are left out; duplicates are read once."""
        ...

    async def add_credential(self, credential: CredentialRecord, now: datetime) -> bool:
        """Record a fresh credential only if its task is ACTIVE and not past ``expires_at``
        at ``now`` (checked in the same statement/transaction). False when it is not."""
        ...

    async def add_derived_credential(
        self, credential: CredentialRecord, now: datetime, *, single_use: bool
    ) -> bool:
        """Record a credential obtained by token exchange from ``credential.parent_jti``,
        in one transaction: only while that parent is live at ``now`` (not revoked, not
        expired), the task is ACTIVE and unexpired, and — with ``single_use`` — nothing was
        exchanged from the parent before; the exchange is counted on the parent (a
        conditional UPDATE, so concurrent exchanges of one parent cannot both win). False,
        and nothing written, otherwise. ValueError without a ``parent_jti``."""
        ...

    async def get_credential(self, jti: str) -> CredentialRecord | None: ...
    async def list_credentials(self, task_id: str) -> list[CredentialRecord]: ...

    async def end_task(
        self, task_id: str, state: TaskState, reason: str, now: datetime, *, cause: str = "agent"
    ) -> tuple[Task, bool] | None:
        """End an ACTIVE task: set ``state``/``ended_at``/``end_reason`` and revoke every
        credential of the task and every credential derived from them (``revoked_at=now``,
        ``revoke_reason=reason``), and log a TASK entry (plus a CREDENTIAL entry for each
        derived credential of another task), atomically.

        Returns ``(task, changed)``: ``changed`` is False when the task had already ended
        (it is then returned unchanged). None when no such task exists. ``state`` must not
        be ACTIVE.
        """
        ...

    async def revoke_credential(
        self, jti: str, reason: str, now: datetime, *, cause: str = "system"
    ) -> bool:
        """Revoke one credential and all its descendants (``parent_jti``, any depth), each
        logged as a CREDENTIAL entry; True if the named one was live and is now revoked
        (False, and nothing changed, otherwise)."""
        ...

    async def expire_tasks(self, now: datetime) -> list[str]:
        """End every ACTIVE task whose ``expires_at`` <= now as EXPIRED (credentials revoked
        and logged as in ``end_task``, cause "expiry"). Returns their ids."""
        ...


class RevocationStore(Protocol):
    """The revocation log every gateway follows, and the Shared Signals cursors.

    Entries are appended only by the revoking methods above, in the same transaction as
    the change. ``seq`` is strictly increasing in commit order, so ``seq > last`` is a safe
    catch-up. On PostgreSQL each writing transaction notifies the channel
    ``taskbound_revocations`` on commit.
    """

    async def list_revocations(
        self, *, after: int = 0, limit: int = 1000, live_at: datetime | None = None
    ) -> list[Revocation]:
        """Entries with ``seq > after``, ascending, at most ``limit`` (>= 1); with
        ``live_at``, only those that still matter then (``expires_at`` None or later)."""
        ...

    async def last_revocation_seq(self) -> int:
        """The highest sequence number stored (0 when the log is empty)."""
        ...

    async def prune_revocations(self, now: datetime) -> int:
        """Delete entries whose ``expires_at`` <= now; returns how many."""
        ...

    async def get_signal_cursor(self, receiver: str) -> int | None:
        """The last sequence number delivered to ``receiver``; None if never set."""
        ...

    async def set_signal_cursor(
        self, receiver: str, seq: int, now: datetime, *, expected: int | None
    ) -> bool:
        """Compare-and-set: create the cursor when ``expected`` is None (False if it
        exists), else move it to ``seq`` only if it still is ``expected``."""
        ...


class AdminTokenStore(Protocol):
    async def add_admin_token(self, token: AdminToken) -> None: ...
    async def find_admin_token(self, token_hash: str) -> AdminToken | None: ...
    async def list_admin_tokens(self) -> list[AdminToken]: ...


class AuditStore(Protocol):
    """The append-only audit log: one record per gateway call or lifecycle event.

    Records are never updated or deleted through this port. Each gets a sequence number:
    strictly increasing, from 1, assigned in commit order, so a reader that has seen ``n``
    never later finds a new record numbered ``n`` or below (``list_audit(after=n)`` is a
    safe tail). Numbers may skip (a failed insert on PostgreSQL uses one up), so count
    records, not numbers. (With the chain, numbers no longer skip: each append numbers
    its records after the head it reads under the chain's lock.)

    Text fields hold no NUL character (``ValueError``, nothing stored, as for all text);
    ``detail`` is cut to 2,000 characters, ending in a marker, instead of failing.
    ``latency_ms`` must be finite and ``upstream_status`` a 32-bit integer (``ValueError``).
    """

    async def append_audit(self, event: AuditEvent) -> int:
        """Store ``event``; durable when this returns. Returns its sequence number."""
        ...

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append several events in ONE transaction (group commit), in the given order;
        all or none. Their sequence numbers, in order."""
        ...

    async def list_audit(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        task: str | None = None,
        agent: str | None = None,
        owner: str | None = None,
        decision: str | None = None,
        exception: str | None = None,
        tool: str | None = None,
        txn: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        descending: bool = False,
    ) -> list[tuple[int, AuditEvent]]:
        """``(seq, event)`` pairs with ``seq > after``, ascending (``descending``: the
        newest first, and ``after`` is ignored), at most ``limit`` of them, only those
        matching every filter given (``exception``: the break-glass exception relied on;
        ``since`` inclusive, ``until`` exclusive).
        A negative ``after`` or ``limit`` is a ``ValueError``."""
        ...

    async def audit_usage(self, *, since: datetime, until: datetime) -> list[UsageRow]:
        """The ``gateway.call`` records with ``since <= time < until``, grouped by (agent,
        owner, task, tool, action, tier, decision): each group's count and latest time, in
        no particular order. Aggregated by the store (an index on (event, time) serves the
        range), so the answer grows with the distinct groups, not with the records."""
        ...

    async def audit_timeline(
        self, *, since: datetime, until: datetime, agents: Sequence[str] | None = None
    ) -> list[TimelineRow]:
        """The ``gateway.call`` records with ``since <= time < until`` (and, with
        ``agents``, whose agent is one of them) counted per UTC day and decision, in no
        particular order."""
        ...


class AuditChainStore(Protocol):
    """The audit chain (docs/audit-format.md): every appended record is numbered after the
    head and linked to it by hash in the same transaction, serialised in the database
    (PostgreSQL: an advisory lock held to the commit; SQLite: one writer at a time), so
    that every replica extends one chain with gapless sequence numbers. Signed checkpoints
    of the head are kept beside it."""

    async def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; ``(0, GENESIS)`` for an empty chain."""
        ...

    async def list_chain(self, *, after: int = 0, limit: int = 1000) -> list[ChainRecord]:
        """Records with ``seq > after`` as the chain holds them, ascending."""
        ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a signed checkpoint; Conflict when one for that seq exists."""
        ...

    async def list_checkpoints(self, *, after: int = -1, limit: int = 1000) -> list[Checkpoint]:
        """Checkpoints with ``seq > after``, ascending."""
        ...

    async def delete_audit_through(self, seq: int) -> int:
        """Retention: delete the records up to and including ``seq`` once they have been
        archived. Refused (ValueError) for the head or when no checkpoint pins ``seq``
        (the live chain must stay verifiable from it). How many were deleted."""
        ...


class ApprovalStore(Protocol):
    """Human approvals of one exact action (DESIGN.md §3 flow 8) and the votes on them.

    At most one approval per (task, action digest) is open, pending or approved, at any
    time, whichever process asks; an approver votes once per approval; an approved
    approval is consumed at most once. The transitions are those of
    :mod:`taskbound.core.approvals`. Lists are newest ``created_at`` first, then by id.
    """

    async def request_approval(self, approval: Approval) -> Approval:
        """Store ``approval`` (PENDING, no votes; ``created_at`` is now), unless its (task,
        action digest) has an open approval still in time: then that one is returned and
        nothing is stored. Open ones past their time are marked EXPIRED first. Atomic:
        concurrent requests for one (task, digest) all get the same approval.
        ReferenceError_ for an unknown task; ValueError for an approval not PENDING."""
        ...

    async def get_approval(self, approval_id: str) -> Approval | None: ...

    async def list_approvals(
        self,
        *,
        state: ApprovalState | None = None,
        task_id: str | None = None,
        limit: int = 100,
    ) -> list[Approval]:
        """Approvals in the stored ``state`` (all when None) and of ``task_id`` (any when
        None), newest first, at most ``limit`` (ValueError when negative)."""
        ...

    async def list_approval_votes(self, approval_id: str) -> list[ApprovalVote]:
        """The votes on one approval, in the order they were cast (then by approver)."""
        ...

    async def vote_approval(
        self,
        approval_id: str,
        approver: str,
        approve: bool,
        reason: str | None,
        now: datetime,
        use_ttl: timedelta,
    ) -> Approval:
        """Record one vote and apply it (:func:`taskbound.core.approvals.cast_vote`) in one
        transaction; concurrent votes are applied one after the other. Returns the
        approval afterwards. Raises NotFound (no such approval), ApprovalExpired (it is
        expired; a pending one past its time is marked EXPIRED, and that is kept),
        ApprovalNotPending (decided already) or AlreadyVoted (this approver voted before),
        all Conflicts but NotFound; the vote is then not recorded."""
        ...

    async def consume_approval(
        self, task_id: str, action_digest: str, now: datetime
    ) -> Approval | None:
        """Consume the APPROVED approval of this (task, action digest) whose ``use_by`` is
        after ``now``: one conditional UPDATE, so of any number of concurrent consumers
        exactly one gets it. The consumed approval, or None when there was none."""
        ...

    async def expire_approvals(self, now: datetime) -> int:
        """Mark EXPIRED every pending approval past ``expires_at`` and every approved one
        past ``use_by``; how many."""
        ...


class BreakGlassStore(Protocol):
    """Break-glass exceptions (DESIGN.md §3 flow 9): their grant, early end and review.

    The transitions are those of :mod:`taskbound.core.breakglass`, applied under the row's
    lock so that concurrent ends or reviews of one exception apply once. Lists are newest
    ``created_at`` first, then by id.
    """

    async def create_breakglass(self, bg: BreakGlass) -> None:
        """Store a new exception. ReferenceError_ for an unknown agent, Conflict for a
        duplicate id, ValueError for one already ended or reviewed."""
        ...

    async def get_breakglass(self, bg_id: str) -> BreakGlass | None: ...

    async def list_breakglass(
        self,
        *,
        now: datetime,
        state: str | None = None,
        agent_id: str | None = None,
        limit: int = 100,
    ) -> list[BreakGlass]:
        """Exceptions in ``state`` at ``now`` (``active``: relied on now; ``review``: ended
        and not reviewed; ``reviewed``; all when None) and of ``agent_id`` (any when None),
        newest first, at most ``limit``. ValueError for another state or limit < 1."""
        ...

    async def end_breakglass(
        self, bg_id: str, by: str, now: datetime, *, reason: str
    ) -> tuple[BreakGlass, int]:
        """End an active exception early (:func:`taskbound.core.breakglass.end`) and, in
        the same transaction, revoke every live credential relying on it (and what was
        derived from them), logged with cause ``breakglass``. Returns the exception and
        how many credentials were revoked. NotFound; BreakGlassRefused as the core says."""
        ...

    async def review_breakglass(
        self, bg_id: str, reviewer: str, note: str, now: datetime
    ) -> BreakGlass:
        """Sign off an ended exception (:func:`taskbound.core.breakglass.review`); of
        concurrent reviews one wins, the others get ``already_reviewed``. NotFound;
        BreakGlassRefused as the core says."""
        ...

    async def count_overdue_breakglass(self, now: datetime, review_within: timedelta) -> int:
        """How many exceptions wait for review longer than ``review_within``."""
        ...


class UiStore(Protocol):
    """The web UI's sign-in: local passwords (hashes only) and server-side sessions."""

    async def set_owner_password(self, owner_id: str, password_hash: str, now: datetime) -> None:
        """Set (or replace) an owner's password hash; their sessions end (signed out
        everywhere). ReferenceError_ for an unknown owner."""
        ...

    async def get_owner_password(self, owner_id: str) -> str | None: ...

    async def create_session(self, session: UiSession) -> None: ...

    async def get_session(self, id_hash: str, now: datetime) -> UiSession | None:
        """The session with this id hash if it has not expired at ``now``."""
        ...

    async def delete_session(self, id_hash: str) -> None: ...

    async def prune_sessions(self, now: datetime) -> int:
        """Delete expired sessions; how many."""
        ...


@runtime_checkable
class Storage(
    RegistryStore,
    KeyStore,
    TaskStore,
    RevocationStore,
    AdminTokenStore,
    AuditStore,
    AuditChainStore,
    ApprovalStore,
    BreakGlassStore,
    UiStore,
    Protocol,
):
    """Everything the broker stores. One object per process, shared by all requests."""

    async def check(self) -> None:
        """Health probe: return when the backend answers a trivial query (``SELECT 1``),
        raise StorageError when it does not."""
        ...

    async def close(self) -> None: ...


class ReplayCache(Protocol):
    """Keys seen recently (DPoP proof ``jti``s, RFC 9449 §11.1), each remembered until it
    expires."""

    async def seen(self, key: str, expires_at: datetime, now: datetime) -> bool:
        """True if ``key`` was recorded before and has not expired at ``now``; otherwise
        record it until ``expires_at`` and return False.

        Fails closed: a cache too full of unexpired keys to record a new one answers True,
        so the caller refuses the proof; a failing backend raises StorageError.

        A key with ``expires_at <= now`` is never recorded and answers True: a proof whose
        acceptance window has passed is refused (callers check freshness first anyway).
        """
        ...

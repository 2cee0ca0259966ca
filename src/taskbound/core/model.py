"""The domain objects of DESIGN.md §2, as frozen values.

Nothing here does I/O. Times are timezone-aware UTC ``datetime`` values; the storage
adapters must hand them back the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Tier(StrEnum):
    """A privilege tier. A credential never spans two tiers."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class AgentState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    QUARANTINED = "quarantined"
    RETIRED = "retired"


class TaskState(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REVOKED = "revoked"


class ToolKind(StrEnum):
    HTTP = "http"
    MCP = "mcp"


class Role(StrEnum):
    APPROVER = "approver"
    REVIEWER = "reviewer"
    ADMIN = "admin"


class Risk(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class KeyState(StrEnum):
    ACTIVE = "active"
    RETIRING = "retiring"


class KeyPurpose(StrEnum):
    """What a signing key signs. Each purpose has at most one active key."""

    CREDENTIALS = "credentials"
    DEV_IDENTITY = "dev_identity"
    SIGNALS = "signals"  # Security Event Tokens sent to Shared Signals receivers
    TRANSACTION = "transaction"  # Txn-Tokens the gateway sends to tools with each call
    AUDIT = "audit"  # checkpoints of the audit chain's head


@dataclass(frozen=True, slots=True)
class Owner:
    id: str
    contact: str
    roles: frozenset[Role]
    created_at: datetime
    updated_at: datetime
    disabled: bool = False


@dataclass(frozen=True, slots=True, order=True)
class Scope:
    """A (tool, tier) pair: one entry of an agent's ceiling, one credential's reach."""

    tool: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class Agent:
    spiffe_id: str
    owner_id: str
    state: AgentState
    ceiling: frozenset[Scope]
    created_at: datetime
    updated_at: datetime
    description: str = ""


@dataclass(frozen=True, slots=True)
class Action:
    """One operation of a tool (DESIGN.md §2).

    An HTTP action has ``method`` and ``path`` (a template such as ``/repos/{owner}/{repo}``);
    an MCP action has ``mcp_tool``.
    """

    name: str
    tier: Tier
    method: str | None = None
    path: str | None = None
    mcp_tool: str | None = None
    risk: Risk = Risk.LOW
    requires_approval: bool = False
    # An MCP tool's JSON Schema for its arguments (its `inputSchema`); policy sees the
    # arguments typed from it.
    input_schema: Mapping[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class UpstreamExchange:
    """Per-task upstream credentials for a tool: the gateway obtains a token from the
    upstream's own authorization server by RFC 8693 token exchange, presenting a Txn-Token
    for ``audience`` as the subject token and authenticating as ``client_id``.

    The client secret is not part of this value: it is stored encrypted in the tool's
    secret slot (a tool has either a static upstream secret or an exchange, never both).
    """

    token_endpoint: str
    audience: str
    client_id: str
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    """A destination agents call through the gateway.

    The upstream secret is not part of this value: it is stored encrypted beside it and
    only the gateway ever decrypts it (invariant 4).
    """

    id: str
    audience: str
    upstream_url: str
    kind: ToolKind
    actions: tuple[Action, ...]
    created_at: datetime
    updated_at: datetime
    upstream_auth_header: str = "Authorization"
    description: str = ""
    # None: the gateway injects the tool's static secret (if any).
    upstream_exchange: UpstreamExchange | None = None

    def tiers(self) -> frozenset[Tier]:
        return frozenset(a.tier for a in self.actions)

    def actions_of(self, tier: Tier) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.tier == tier)


@dataclass(frozen=True, slots=True)
class ScopeGrant:
    """What a task was granted for one (tool, tier): the actions of that tier it may use."""

    tool: str
    tier: Tier
    actions: tuple[str, ...]
    # The break-glass exception this grant relies on (beyond the agent's own ceiling).
    exception: str | None = None

    @property
    def scope(self) -> Scope:
        return Scope(self.tool, self.tier)


@dataclass(frozen=True, slots=True)
class ScopeDenial:
    """A requested scope that was refused, with a stable code and a reason."""

    tool: str
    tier: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    agent_id: str
    owner_id: str
    purpose: str
    constraints: Mapping[str, Any]
    granted: tuple[ScopeGrant, ...]
    denied: tuple[ScopeDenial, ...]
    jkt: str
    created_at: datetime
    expires_at: datetime
    state: TaskState = TaskState.ACTIVE
    ended_at: datetime | None = None
    end_reason: str | None = None
    # RFC 8693 §4.4: the one agent the task's credentials may be delegated to (None: any
    # agent policy allows).
    may_act: str | None = None

    def state_at(self, now: datetime) -> TaskState:
        """The state as of ``now``: an active task past its TTL is expired even before the
        sweeper records it."""
        if self.state is TaskState.ACTIVE and now >= self.expires_at:
            return TaskState.EXPIRED
        return self.state

    def grant_for(self, tool: str, tier: Tier) -> ScopeGrant | None:
        for g in self.granted:
            if g.tool == tool and g.tier == tier:
                return g
        return None


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """The server's record of one issued credential, kept under its task for revocation."""

    jti: str
    task_id: str
    agent_id: str
    tool: str
    tier: Tier
    actions: tuple[str, ...]
    jkt: str
    kid: str
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    parent_jti: str | None = None
    # The break-glass exception the credential relies on; ending it early revokes it.
    exception_id: str | None = None

    def live_at(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A signing key as stored: the private half is encrypted with the KEK."""

    kid: str
    purpose: KeyPurpose
    alg: str
    public_jwk: Mapping[str, str]
    private_ciphertext: bytes
    created_at: datetime
    state: KeyState = KeyState.ACTIVE
    # For a retiring key: published and trusted until this time, then pruned.
    retire_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class AdminToken:
    """An admin API token, stored only as its SHA-256 hash (hex)."""

    id: str
    token_hash: str
    description: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskFilter:
    agent_id: str | None = None
    owner_id: str | None = None
    state: TaskState | None = None
    limit: int = 100
    # Tasks created in [created_since, created_until) (either bound optional).
    created_since: datetime | None = None
    created_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One record of the append-only audit log: what happened, to whom, and the decision.

    Stored with a sequence number the store assigns. ``detail`` is an internal reason (never
    a secret); stores keep at most its first 2,000 characters.
    """

    time: datetime
    event: str  # e.g. "gateway.call", "task.started"
    decision: str  # "allow" | "deny" | "approval_required" | "error" | "info"
    code: str | None = None  # stable refusal code
    agent: str | None = None
    owner: str | None = None
    task: str | None = None
    intent: str | None = None
    jti: str | None = None
    tool: str | None = None
    action: str | None = None
    tier: str | None = None
    argument_digest: str | None = None
    policies: tuple[str, ...] = ()
    policy_version: str | None = None
    latency_ms: float | None = None
    upstream_status: int | None = None
    detail: str | None = None  # internal reason, never a secret
    txn: str | None = None  # the transaction id of the task's delegation chain
    exception_id: str | None = None  # the break-glass exception the event relied on
    # The call's arguments as recorded (a JSON value, already redacted: core/redact.py);
    # None when the tool is not configured to record them (audit.arguments_tools).
    arguments: Any | None = field(default=None, hash=False)


class RevocationKind(StrEnum):
    """What one entry of the revocation log is about (its ``subject``)."""

    CREDENTIAL = "credential"  # subject: the credential's jti
    TASK = "task"  # subject: the task id; every credential of the task is dead
    AGENT = "agent"  # subject: the SPIFFE ID; ``state`` is the agent's new state
    OWNER = "owner"  # subject: the owner id; ``state`` is "disabled" or "enabled"
    KEY = "key"  # subject: the kid of a withdrawn signing key


@dataclass(frozen=True, slots=True)
class Revocation:
    """One entry of the revocation log: a change that ends or restores standing.

    Entries are written in the same transaction as the change they describe, numbered
    ``seq`` in commit order (strictly increasing), so a reader catching up with
    ``seq > last`` misses none. ``expires_at`` is when the entry stops mattering (the
    credential's or task's own expiry); None for standing changes (agent, owner, key), which
    matter until a later entry for the same subject.
    """

    kind: RevocationKind
    subject: str
    time: datetime
    cause: str  # who or what caused it: "admin:<token id>", "agent", "expiry", "signal:<name>"
    reason: str
    expires_at: datetime | None = None
    state: str | None = None  # AGENT: the new AgentState value; OWNER: "disabled" | "enabled"
    agent_id: str | None = None  # the agent concerned (task and credential entries)
    task_id: str | None = None  # the task concerned (credential entries)
    seq: int = 0  # assigned by the store


class ApprovalState(StrEnum):
    """Where a human approval of one action stands (DESIGN.md §3 flow 8)."""

    PENDING = "pending"  # waiting for approvers, until ``expires_at``
    APPROVED = "approved"  # usable once by the same call, until ``use_by``
    DENIED = "denied"
    EXPIRED = "expired"  # nobody decided in time, or the approved call never came
    CONSUMED = "consumed"  # the approved call was made (once)

    @property
    def open(self) -> bool:
        """Pending or approved: the one approval of its (task, action digest) that counts."""
        return self in (ApprovalState.PENDING, ApprovalState.APPROVED)


@dataclass(frozen=True, slots=True)
class Approval:
    """A human decision on one exact action of one task (DESIGN.md §2).

    ``action_digest`` binds the tool, the action, the target and the call's canonical
    arguments (RFC 8785); an approved approval authorises that digest, for ``task_id``,
    once, before ``use_by``. ``summary`` is what a human needs to decide (method, path, the
    arguments as the gateway decoded them, bounded, and the policies that asked for it).
    """

    id: str
    task_id: str
    agent_id: str  # the acting agent (a delegate, for a delegated credential)
    owner_id: str  # the task's accountable owner
    tool: str
    action: str
    tier: Tier
    target: str | None
    argument_digest: str
    action_digest: str
    intent: str
    summary: Mapping[str, Any]
    required: int  # distinct approvers needed (2 or more: a quorum)
    created_at: datetime
    expires_at: datetime  # a pending approval nobody decided by then is expired
    state: ApprovalState = ApprovalState.PENDING
    approvals: int = 0  # approve votes so far
    decided_at: datetime | None = None
    decided_by: str | None = None  # the approver whose vote decided it
    reason: str | None = None  # the deciding vote's reason
    use_by: datetime | None = None  # approved: the call must come before this
    consumed_at: datetime | None = None

    def state_at(self, now: datetime) -> ApprovalState:
        """The state as of ``now``: a pending approval past ``expires_at``, or an approved
        one past ``use_by``, is expired even before the store records it."""
        if self.state is ApprovalState.PENDING and now >= self.expires_at:
            return ApprovalState.EXPIRED
        if self.state is ApprovalState.APPROVED and self.use_by is not None and now >= self.use_by:
            return ApprovalState.EXPIRED
        return self.state


@dataclass(frozen=True, slots=True)
class ApprovalVote:
    """One approver's vote on one approval; an approver votes once."""

    approval_id: str
    approver: str  # the owner id of the human who voted
    approve: bool
    reason: str | None
    voted_at: datetime


@dataclass(frozen=True, slots=True)
class UiSession:
    """A person's signed-in session of the web UI, kept server-side: the cookie holds a
    random value whose SHA-256 is ``id_hash``; ``csrf`` is the session's anti-forgery token."""

    id_hash: str
    owner_id: str
    method: str  # "password" | "oidc"
    csrf: str
    created_at: datetime
    expires_at: datetime

"""Rows <-> domain values, shared by the SQL and the in-memory backends.

Both backends go through these functions, so a value read back is built the same way
whichever stores it: sets come back as frozensets, sequences as tuples, enums as enums,
times as timezone-aware UTC, and JSON fields as fresh objects that went through JSON (a
tuple inside ``constraints`` comes back as a list; a value JSON cannot carry, or NaN, is a
``TypeError``/``ValueError`` on write, before anything is stored). Text holding a NUL
character is a ``ValueError`` on write everywhere, because PostgreSQL cannot store it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import rfc8785

from taskbound.core import audit
from taskbound.core.breakglass import BreakGlass
from taskbound.core.model import (
    Action,
    AdminToken,
    Agent,
    AgentState,
    Approval,
    ApprovalState,
    ApprovalVote,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    KeyState,
    Owner,
    Revocation,
    RevocationKind,
    Risk,
    Role,
    Scope,
    ScopeDenial,
    ScopeGrant,
    SigningKey,
    Task,
    TaskState,
    Tier,
    Tool,
    ToolKind,
    UiSession,
    UpstreamExchange,
)

Row = dict[str, Any]

# The value of signing_keys.active_slot for the active key of a purpose (see schema.py).
ACTIVE_SLOT = 1

# The end_reason of tasks ended by ``expire_tasks``, and the revoke_reason of their credentials.
EXPIRED_REASON = "expired"
OWNER_DISABLED_REASON = "owner disabled"


def agent_state_reason(state: AgentState | str) -> str:
    """The revocation reason recorded when an agent leaves the active state."""
    return f"agent {AgentState(state).value}"


def utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is a ``ValueError``."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("naive datetime: taskbound stores timezone-aware UTC times only")
    return when.astimezone(UTC)


def utc_or_none(when: datetime | None) -> datetime | None:
    return None if when is None else utc(when)


def dump_json(value: Any) -> str:
    """Compact JSON; NaN and infinities are refused (PostgreSQL's JSON cannot hold them)."""
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def load_json(text: str) -> Any:
    return json.loads(text)


def _json(value: Any) -> Any:
    # The round trip validates the value and detaches it from the caller's objects.
    return load_json(dump_json(value))


def has_nul(*values: str | None) -> bool:
    """Whether any value holds a NUL character. No backend stores one (PostgreSQL text
    cannot), so a lookup by such a key finds nothing."""
    return any(v is not None and "\x00" in v for v in values)


def check_text(**fields: str | None) -> None:
    """``ValueError`` when a text value to be stored holds a NUL character."""
    for name, value in fields.items():
        if has_nul(value):
            raise ValueError(f"{name}: text with a NUL character cannot be stored")


def _text_checked(row: Row) -> Row:
    check_text(**{k: v for k, v in row.items() if isinstance(v, str)})
    return row


# --- owners ------------------------------------------------------------------------------


def owner_row(owner: Owner) -> Row:
    return _text_checked(
        {
            "id": owner.id,
            "contact": owner.contact,
            "roles": sorted(Role(r).value for r in owner.roles),
            "disabled": bool(owner.disabled),
            "created_at": utc(owner.created_at),
            "updated_at": utc(owner.updated_at),
        }
    )


def owner_from(row: Mapping[Any, Any]) -> Owner:
    return Owner(
        id=row["id"],
        contact=row["contact"],
        roles=frozenset(Role(r) for r in row["roles"]),
        disabled=bool(row["disabled"]),
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
    )


# --- agents ------------------------------------------------------------------------------


def agent_row(agent: Agent) -> Row:
    return _text_checked(
        {
            "spiffe_id": agent.spiffe_id,
            "owner_id": agent.owner_id,
            "state": AgentState(agent.state).value,
            "ceiling": [
                {"tool": s.tool, "tier": Tier(s.tier).value} for s in sorted(agent.ceiling)
            ],
            "description": agent.description,
            "created_at": utc(agent.created_at),
            "updated_at": utc(agent.updated_at),
        }
    )


def agent_from(row: Mapping[Any, Any]) -> Agent:
    return Agent(
        spiffe_id=row["spiffe_id"],
        owner_id=row["owner_id"],
        state=AgentState(row["state"]),
        ceiling=frozenset(Scope(s["tool"], Tier(s["tier"])) for s in row["ceiling"]),
        description=row["description"],
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
    )


# --- tools -------------------------------------------------------------------------------


def _action_json(action: Action) -> dict[str, Any]:
    return {
        "name": action.name,
        "tier": Tier(action.tier).value,
        "method": action.method,
        "path": action.path,
        "mcp_tool": action.mcp_tool,
        "risk": Risk(action.risk).value,
        "requires_approval": bool(action.requires_approval),
        "input_schema": None if action.input_schema is None else dict(action.input_schema),
    }


def _action_from(data: Mapping[str, Any]) -> Action:
    return Action(
        name=data["name"],
        tier=Tier(data["tier"]),
        method=data["method"],
        path=data["path"],
        mcp_tool=data["mcp_tool"],
        risk=Risk(data["risk"]),
        requires_approval=bool(data["requires_approval"]),
        # Absent in rows written before input schemas existed.
        input_schema=data.get("input_schema"),
    )


def tool_row(tool: Tool) -> Row:
    """The tool's columns, without ``secret_ciphertext`` (stored and updated on its own)."""
    return _text_checked(
        {
            "id": tool.id,
            "audience": tool.audience,
            "upstream_url": tool.upstream_url,
            "kind": ToolKind(tool.kind).value,
            "actions": [_action_json(a) for a in tool.actions],
            "upstream_auth_header": tool.upstream_auth_header,
            "description": tool.description,
            "upstream_exchange": _exchange_json(tool.upstream_exchange),
            "created_at": utc(tool.created_at),
            "updated_at": utc(tool.updated_at),
        }
    )


def _exchange_json(exchange: UpstreamExchange | None) -> dict[str, Any] | None:
    if exchange is None:
        return None
    check_text(
        token_endpoint=exchange.token_endpoint,
        audience=exchange.audience,
        client_id=exchange.client_id,
        scope=exchange.scope,
    )
    return {
        "token_endpoint": exchange.token_endpoint,
        "audience": exchange.audience,
        "client_id": exchange.client_id,
        "scope": exchange.scope,
    }


def _exchange_from(data: Mapping[str, Any] | None) -> UpstreamExchange | None:
    # SQL NULL, or JSON null (how a JSON column may store None), is "no exchange".
    if data is None:
        return None
    return UpstreamExchange(
        token_endpoint=data["token_endpoint"],
        audience=data["audience"],
        client_id=data["client_id"],
        scope=data.get("scope"),
    )


def tool_from(row: Mapping[Any, Any]) -> Tool:
    return Tool(
        id=row["id"],
        audience=row["audience"],
        upstream_url=row["upstream_url"],
        kind=ToolKind(row["kind"]),
        actions=tuple(_action_from(a) for a in row["actions"]),
        upstream_auth_header=row["upstream_auth_header"],
        description=row["description"],
        # Absent in rows written before upstream exchange existed.
        upstream_exchange=_exchange_from(row.get("upstream_exchange")),
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
    )


# --- tasks and credentials ---------------------------------------------------------------


def task_row(task: Task) -> Row:
    return _text_checked(
        {
            "id": task.id,
            "agent_id": task.agent_id,
            "owner_id": task.owner_id,
            "purpose": task.purpose,
            "constraints": _json(dict(task.constraints)),
            "granted": [
                {"tool": g.tool, "tier": Tier(g.tier).value, "actions": list(g.actions)}
                | ({"exception": g.exception} if g.exception is not None else {})
                for g in task.granted
            ],
            "denied": [
                {"tool": d.tool, "tier": d.tier, "code": d.code, "reason": d.reason}
                for d in task.denied
            ],
            "jkt": task.jkt,
            "state": TaskState(task.state).value,
            "created_at": utc(task.created_at),
            "expires_at": utc(task.expires_at),
            "ended_at": utc_or_none(task.ended_at),
            "end_reason": task.end_reason,
            "may_act": task.may_act,
        }
    )


def task_from(row: Mapping[Any, Any]) -> Task:
    return Task(
        id=row["id"],
        agent_id=row["agent_id"],
        owner_id=row["owner_id"],
        purpose=row["purpose"],
        constraints=row["constraints"],
        granted=tuple(
            ScopeGrant(g["tool"], Tier(g["tier"]), tuple(g["actions"]), g.get("exception"))
            for g in row["granted"]
        ),
        denied=tuple(
            ScopeDenial(d["tool"], d["tier"], d["code"], d["reason"]) for d in row["denied"]
        ),
        jkt=row["jkt"],
        state=TaskState(row["state"]),
        created_at=utc(row["created_at"]),
        expires_at=utc(row["expires_at"]),
        ended_at=utc_or_none(row["ended_at"]),
        end_reason=row["end_reason"],
        may_act=row["may_act"],
    )


def credential_row(cred: CredentialRecord) -> Row:
    return _text_checked(
        {
            "jti": cred.jti,
            "task_id": cred.task_id,
            "agent_id": cred.agent_id,
            "tool": cred.tool,
            "tier": Tier(cred.tier).value,
            "actions": list(cred.actions),
            "jkt": cred.jkt,
            "kid": cred.kid,
            "issued_at": utc(cred.issued_at),
            "expires_at": utc(cred.expires_at),
            "revoked_at": utc_or_none(cred.revoked_at),
            "revoke_reason": cred.revoke_reason,
            "parent_jti": cred.parent_jti,
            "exchange_count": 0,
            "exception_id": cred.exception_id,
        }
    )


def credential_from(row: Mapping[Any, Any]) -> CredentialRecord:
    return CredentialRecord(
        jti=row["jti"],
        task_id=row["task_id"],
        agent_id=row["agent_id"],
        tool=row["tool"],
        tier=Tier(row["tier"]),
        actions=tuple(row["actions"]),
        jkt=row["jkt"],
        kid=row["kid"],
        issued_at=utc(row["issued_at"]),
        expires_at=utc(row["expires_at"]),
        revoked_at=utc_or_none(row["revoked_at"]),
        revoke_reason=row["revoke_reason"],
        parent_jti=row["parent_jti"],
        exception_id=row["exception_id"],
    )


# --- signing keys ------------------------------------------------------------------------


def key_row(key: SigningKey) -> Row:
    state = KeyState(key.state)
    return _text_checked(
        {
            "kid": key.kid,
            "purpose": KeyPurpose(key.purpose).value,
            "alg": key.alg,
            "public_jwk": _json(dict(key.public_jwk)),
            "private_ciphertext": bytes(key.private_ciphertext),
            "state": state.value,
            "created_at": utc(key.created_at),
            "retire_after": utc_or_none(key.retire_after),
            "active_slot": ACTIVE_SLOT if state is KeyState.ACTIVE else None,
        }
    )


def new_active_key_row(key: SigningKey) -> Row:
    """The row of ``key`` as its purpose's new active key; a key that says otherwise is a
    ``ValueError``."""
    if key.state is not KeyState.ACTIVE or key.retire_after is not None:
        raise ValueError("a new signing key must be ACTIVE without retire_after")
    return key_row(key)


def key_from(row: Mapping[Any, Any]) -> SigningKey:
    return SigningKey(
        kid=row["kid"],
        purpose=KeyPurpose(row["purpose"]),
        alg=row["alg"],
        public_jwk=row["public_jwk"],
        private_ciphertext=bytes(row["private_ciphertext"]),
        state=KeyState(row["state"]),
        created_at=utc(row["created_at"]),
        retire_after=utc_or_none(row["retire_after"]),
    )


# --- admin tokens ------------------------------------------------------------------------


def admin_token_row(token: AdminToken) -> Row:
    return _text_checked(
        {
            "id": token.id,
            "token_hash": token.token_hash,
            "description": token.description,
            "created_at": utc(token.created_at),
            "revoked_at": utc_or_none(token.revoked_at),
        }
    )


def admin_token_from(row: Mapping[Any, Any]) -> AdminToken:
    return AdminToken(
        id=row["id"],
        token_hash=row["token_hash"],
        description=row["description"],
        created_at=utc(row["created_at"]),
        revoked_at=utc_or_none(row["revoked_at"]),
    )


# --- audit events --------------------------------------------------------------------------

# The longest ``detail`` stored; a longer one is cut to this length, ending in the marker.
AUDIT_DETAIL_MAX = 2_000
AUDIT_TRUNCATED = "…[truncated]"

_INT32 = range(-(2**31), 2**31)


def bounded_detail(detail: str | None) -> str | None:
    """``detail`` cut to :data:`AUDIT_DETAIL_MAX` characters (the marker included)."""
    if detail is None or len(detail) <= AUDIT_DETAIL_MAX:
        return detail
    return detail[: AUDIT_DETAIL_MAX - len(AUDIT_TRUNCATED)] + AUDIT_TRUNCATED


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def audit_arguments(value: Any) -> Any:
    """A call's recorded arguments, checked and detached from the caller's objects: a JSON
    value the chain can hash (RFC 8785: no NaN, no integer beyond 2**53 - 1, member names
    strings) and every store can keep (no NUL, in a name or a string). ``None``: none
    recorded."""
    if value is None:
        return None
    try:
        rfc8785.dumps(value)
        detached = _json(value)
        nul = _holds_nul(detached)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"arguments: {exc}") from None
    except RecursionError:
        raise ValueError("arguments: nested too deeply") from None
    if nul:
        raise ValueError("arguments: text with a NUL character cannot be stored")
    return detached


def audit_row(event: AuditEvent) -> Row:
    """The columns of ``event``, without ``seq`` (the store assigns it)."""
    policies = list(event.policies)
    if not all(isinstance(p, str) for p in policies):
        raise TypeError("policies: every entry must be a string")
    check_text(**{f"policies[{i}]": p for i, p in enumerate(policies)})
    latency = event.latency_ms
    if latency is not None:
        latency = float(latency)
        if not math.isfinite(latency):
            raise ValueError("latency_ms must be a finite number")
    status = event.upstream_status
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or status not in _INT32
    ):
        raise ValueError("upstream_status must be a 32-bit integer")
    return _text_checked(
        {
            "time": utc(event.time),
            "event": event.event,
            "decision": event.decision,
            "code": event.code,
            "agent": event.agent,
            "owner": event.owner,
            "task": event.task,
            "intent": event.intent,
            "jti": event.jti,
            "tool": event.tool,
            "action": event.action,
            "tier": event.tier,
            "argument_digest": event.argument_digest,
            "policies": policies,
            "policy_version": event.policy_version,
            "latency_ms": latency,
            "upstream_status": status,
            "detail": bounded_detail(event.detail),
            "txn": event.txn,
            "exception_id": event.exception_id,
            "arguments": audit_arguments(event.arguments),
        }
    )


def audit_from(row: Mapping[Any, Any]) -> tuple[int, AuditEvent]:
    latency = row["latency_ms"]
    return int(row["seq"]), AuditEvent(
        time=utc(row["time"]),
        event=row["event"],
        decision=row["decision"],
        code=row["code"],
        agent=row["agent"],
        owner=row["owner"],
        task=row["task"],
        intent=row["intent"],
        jti=row["jti"],
        tool=row["tool"],
        action=row["action"],
        tier=row["tier"],
        argument_digest=row["argument_digest"],
        policies=tuple(row["policies"]),
        policy_version=row["policy_version"],
        latency_ms=None if latency is None else float(latency),
        upstream_status=row["upstream_status"],
        detail=row["detail"],
        txn=row["txn"],
        exception_id=row["exception_id"],
        arguments=row["arguments"],
    )


def check_audit_query(after: int, limit: int) -> None:
    """``ValueError`` for a negative ``after`` or ``limit`` of ``list_audit``."""
    if after < 0:
        raise ValueError("list_audit: after must not be negative")
    if limit < 0:
        raise ValueError("list_audit: limit must not be negative")


# --- revocation log ----------------------------------------------------------------------


def revocation_row(rev: Revocation) -> Row:
    """The columns of ``rev``, without ``seq`` (the store assigns it)."""
    return _text_checked(
        {
            "kind": RevocationKind(rev.kind).value,
            "subject": rev.subject,
            "time": utc(rev.time),
            "cause": rev.cause,
            "reason": rev.reason,
            "expires_at": utc_or_none(rev.expires_at),
            "state": rev.state,
            "agent_id": rev.agent_id,
            "task_id": rev.task_id,
        }
    )


def revocation_from(row: Mapping[Any, Any]) -> Revocation:
    return Revocation(
        seq=int(row["seq"]),
        kind=RevocationKind(row["kind"]),
        subject=row["subject"],
        time=utc(row["time"]),
        cause=row["cause"],
        reason=row["reason"],
        expires_at=utc_or_none(row["expires_at"]),
        state=row["state"],
        agent_id=row["agent_id"],
        task_id=row["task_id"],
    )


def check_revocation_query(after: int, limit: int) -> None:
    """``ValueError`` for a negative ``after`` or a ``limit`` below 1 of ``list_revocations``."""
    if after < 0:
        raise ValueError("list_revocations: after must not be negative")
    if limit < 1:
        raise ValueError("list_revocations: limit must be at least 1")


RETIRED_IS_FINAL = "a retired agent cannot change state"


def task_entry(
    task_id: str, agent_id: str, expires_at: datetime, now: datetime, cause: str, reason: str
) -> Revocation:
    """The log entry of an ended task: it matters until the task's own expiry, past which
    none of its credentials verifies anyway."""
    return Revocation(
        kind=RevocationKind.TASK,
        subject=task_id,
        time=now,
        cause=cause,
        reason=reason,
        expires_at=utc(expires_at),
        agent_id=agent_id,
        task_id=task_id,
    )


def credential_entry(row: Any, now: datetime, cause: str, reason: str) -> Revocation:
    """The log entry of one revoked credential, from a (jti, task_id, agent_id, expires_at)
    row."""
    return Revocation(
        kind=RevocationKind.CREDENTIAL,
        subject=row.jti,
        time=now,
        cause=cause,
        reason=reason,
        expires_at=utc(row.expires_at),
        agent_id=row.agent_id,
        task_id=row.task_id,
    )


def agent_entry(
    spiffe_id: str, state: AgentState, now: datetime, cause: str, reason: str | None
) -> Revocation:
    return Revocation(
        kind=RevocationKind.AGENT,
        subject=spiffe_id,
        time=now,
        cause=cause,
        reason=reason or agent_state_reason(state),
        state=AgentState(state).value,
        agent_id=spiffe_id,
    )


def owner_entry(owner: Owner, now: datetime, cause: str, reason: str | None) -> Revocation:
    state = "disabled" if owner.disabled else "enabled"
    return Revocation(
        kind=RevocationKind.OWNER,
        subject=owner.id,
        time=now,
        cause=cause,
        reason=reason or f"owner {state}",
        state=state,
    )


def key_entry(kid: str, now: datetime, cause: str, reason: str) -> Revocation:
    return Revocation(kind=RevocationKind.KEY, subject=kid, time=now, cause=cause, reason=reason)


# --- approvals ---------------------------------------------------------------------------

# approvals.open_slot: 1 while an approval is pending or approved (at most one such row per
# task and action digest, by a unique constraint), NULL once it is decided for good.
OPEN_SLOT = 1


def approval_row(approval: Approval) -> Row:
    state = ApprovalState(approval.state)
    if approval.required < 1 or approval.approvals < 0:
        raise ValueError("an approval needs required >= 1 and approvals >= 0")
    return _text_checked(
        {
            "id": approval.id,
            "task_id": approval.task_id,
            "agent_id": approval.agent_id,
            "owner_id": approval.owner_id,
            "tool": approval.tool,
            "action": approval.action,
            "tier": Tier(approval.tier).value,
            "target": approval.target,
            "argument_digest": approval.argument_digest,
            "action_digest": approval.action_digest,
            "intent": approval.intent,
            "summary": _json(dict(approval.summary)),
            "required": int(approval.required),
            "state": state.value,
            "open_slot": OPEN_SLOT if state.open else None,
            "approvals": int(approval.approvals),
            "created_at": utc(approval.created_at),
            "expires_at": utc(approval.expires_at),
            "decided_at": utc_or_none(approval.decided_at),
            "decided_by": approval.decided_by,
            "reason": approval.reason,
            "use_by": utc_or_none(approval.use_by),
            "consumed_at": utc_or_none(approval.consumed_at),
        }
    )


def approval_from(row: Mapping[Any, Any]) -> Approval:
    return Approval(
        id=row["id"],
        task_id=row["task_id"],
        agent_id=row["agent_id"],
        owner_id=row["owner_id"],
        tool=row["tool"],
        action=row["action"],
        tier=Tier(row["tier"]),
        target=row["target"],
        argument_digest=row["argument_digest"],
        action_digest=row["action_digest"],
        intent=row["intent"],
        summary=row["summary"],
        required=int(row["required"]),
        state=ApprovalState(row["state"]),
        approvals=int(row["approvals"]),
        created_at=utc(row["created_at"]),
        expires_at=utc(row["expires_at"]),
        decided_at=utc_or_none(row["decided_at"]),
        decided_by=row["decided_by"],
        reason=row["reason"],
        use_by=utc_or_none(row["use_by"]),
        consumed_at=utc_or_none(row["consumed_at"]),
    )


def approval_changes(approval: Approval) -> Row:
    """The columns a vote, an expiry or a consumption may change."""
    row = approval_row(approval)
    keep = (
        "state",
        "open_slot",
        "approvals",
        "decided_at",
        "decided_by",
        "reason",
        "use_by",
        "consumed_at",
    )
    return {k: row[k] for k in keep}


def vote_row(vote: ApprovalVote) -> Row:
    return _text_checked(
        {
            "approval_id": vote.approval_id,
            "approver": vote.approver,
            "approve": bool(vote.approve),
            "reason": vote.reason,
            "voted_at": utc(vote.voted_at),
        }
    )


def vote_from(row: Mapping[Any, Any]) -> ApprovalVote:
    return ApprovalVote(
        approval_id=row["approval_id"],
        approver=row["approver"],
        approve=bool(row["approve"]),
        reason=row["reason"],
        voted_at=utc(row["voted_at"]),
    )


def check_approval_query(limit: int) -> None:
    """``ValueError`` for a negative ``limit`` of ``list_approvals``."""
    if limit < 0:
        raise ValueError("list_approvals: limit must not be negative")


def check_new_approval(approval: Approval) -> None:
    """``ValueError`` unless ``approval`` is a new one: PENDING, without votes or decision."""
    if (
        ApprovalState(approval.state) is not ApprovalState.PENDING
        or approval.approvals != 0
        or approval.decided_at is not None
        or approval.use_by is not None
        or approval.consumed_at is not None
    ):
        raise ValueError("a new approval must be PENDING, without votes or a decision")
    if utc(approval.expires_at) <= utc(approval.created_at):
        raise ValueError("an approval must expire after it is created")


# --- break-glass exceptions -------------------------------------------------------------


def breakglass_row(bg: BreakGlass) -> Row:
    return _text_checked(
        {
            "id": bg.id,
            "agent_id": bg.agent_id,
            "scopes": [{"tool": s.tool, "tier": Tier(s.tier).value} for s in sorted(bg.scopes)],
            "justification": bg.justification,
            "granted_by": bg.granted_by,
            "created_at": utc(bg.created_at),
            "expires_at": utc(bg.expires_at),
            "ended_at": utc_or_none(bg.ended_at),
            "ended_by": bg.ended_by,
            "reviewed_by": bg.reviewed_by,
            "reviewed_at": utc_or_none(bg.reviewed_at),
            "review_note": bg.review_note,
        }
    )


def breakglass_from(row: Mapping[Any, Any]) -> BreakGlass:
    return BreakGlass(
        id=row["id"],
        agent_id=row["agent_id"],
        scopes=frozenset(Scope(s["tool"], Tier(s["tier"])) for s in row["scopes"]),
        justification=row["justification"],
        granted_by=row["granted_by"],
        created_at=utc(row["created_at"]),
        expires_at=utc(row["expires_at"]),
        ended_at=utc_or_none(row["ended_at"]),
        ended_by=row["ended_by"],
        reviewed_by=row["reviewed_by"],
        reviewed_at=utc_or_none(row["reviewed_at"]),
        review_note=row["review_note"],
    )


def check_new_breakglass(bg: BreakGlass) -> None:
    """``ValueError`` unless ``bg`` can be stored as new: no trace of an end or a review,
    and an expiry after its grant (the rules the SQL schema's checks would otherwise
    enforce with a different error, or not at all)."""
    if any(
        v is not None
        for v in (bg.ended_at, bg.ended_by, bg.reviewed_at, bg.reviewed_by, bg.review_note)
    ):
        raise ValueError("a new break-glass exception is neither ended nor reviewed")
    if utc(bg.expires_at) <= utc(bg.created_at):
        raise ValueError("a break-glass exception must expire after it is granted")


#: The states ``list_breakglass`` filters by, decided at the ``now`` it is given.
BREAKGLASS_STATES = frozenset({"active", "review", "reviewed"})


def check_breakglass_query(state: str | None, limit: int) -> None:
    if state is not None and state not in BREAKGLASS_STATES:
        raise ValueError(f"list_breakglass: state must be one of {sorted(BREAKGLASS_STATES)}")
    if limit < 1:
        raise ValueError("list_breakglass: limit must be positive")


# --- web UI sign-in ---------------------------------------------------------------------


def session_row(session: UiSession) -> Row:
    return _text_checked(
        {
            "id_hash": session.id_hash,
            "owner_id": session.owner_id,
            "method": session.method,
            "csrf": session.csrf,
            "created_at": utc(session.created_at),
            "expires_at": utc(session.expires_at),
        }
    )


def session_from(row: Mapping[Any, Any]) -> UiSession:
    return UiSession(
        id_hash=row["id_hash"],
        owner_id=row["owner_id"],
        method=row["method"],
        csrf=row["csrf"],
        created_at=utc(row["created_at"]),
        expires_at=utc(row["expires_at"]),
    )


# --- the audit chain ----------------------------------------------------------------------


def audit_body(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The chain body (docs/audit-format.md) of a stored audit row: built from the stored
    values, so that a record verifies exactly as it reads back."""
    return audit.body_of(audit_from(row)[1])


def chain_rows(rows: list[Row], head_seq: int, head_hash: str) -> list[Row]:
    """``rows`` (from :func:`audit_row`) numbered after the head and chained to it."""
    events = [audit_from({**row, "seq": 0})[1] for row in rows]
    records = audit.chain(head_seq, head_hash, events)
    return [
        {**row, "seq": rec.seq, "prev_hash": rec.prev, "hash": rec.hash}
        for row, rec in zip(rows, records, strict=True)
    ]


def chain_record_from(row: Mapping[Any, Any]) -> audit.ChainRecord:
    return audit.ChainRecord(
        seq=int(row["seq"]), prev=row["prev_hash"], hash=row["hash"], body=audit_body(row)
    )


def checkpoint_row(cp: audit.Checkpoint) -> Row:
    return _text_checked(
        {"seq": cp.seq, "hash": cp.hash, "time": utc(cp.time), "kid": cp.kid, "jws": cp.jws}
    )


def checkpoint_from(row: Mapping[Any, Any], issuer: str = "") -> audit.Checkpoint:
    return audit.Checkpoint(
        seq=int(row["seq"]),
        hash=row["hash"],
        time=utc(row["time"]),
        issuer=issuer,
        kid=row["kid"],
        jws=row["jws"],
    )

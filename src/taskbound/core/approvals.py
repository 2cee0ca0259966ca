"""The approval state machine (DESIGN.md §3 flow 8), and what an approval binds to.

An approval names one exact action of one task: the tool, the action, the target and the
call's canonical arguments, hashed together by :func:`~taskbound.core.actions.action_digest`
(RFC 8785, SHA-256). Its life::

    pending --approve, fewer than `required` so far--> pending
    pending --approve, `required` reached----------> approved (use_by = now + use TTL)
    pending --deny---------------------------------> denied
    pending --now >= expires_at--------------------> expired
    approved --the same call, once, before use_by--> consumed
    approved --now >= use_by-----------------------> expired

Denied, expired and consumed are final. An approver votes once per approval. The storage
backends apply :func:`cast_vote` under their own locks, so the rules live here once.

Pure: no I/O, no clock; ``now`` is a parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Final

from taskbound.core.model import Approval, ApprovalState, Tier
from taskbound.errors import AlreadyVoted, ApprovalExpired, ApprovalNotPending

__all__ = [
    "MAX_FIELD_CHARS",
    "SIGNATURE_HEADER",
    "SUMMARY_MAX_BYTES",
    "call_summary",
    "cast_vote",
    "due_to_expire",
    "http_binding",
    "required_approvals",
    "sign_webhook",
    "verify_webhook",
]

#: The largest summary stored with an approval (its JSON, UTF-8); larger arguments are cut
#: to a preview and the summary says ``"truncated": true``.
SUMMARY_MAX_BYTES: Final = 8 * 1024
#: The header that carries a webhook body's signature: ``t=<unix time>,v1=<hex HMAC>``.
SIGNATURE_HEADER: Final = "X-Taskbound-Signature"
#: The longest path or query kept in a summary.
MAX_FIELD_CHARS: Final = 1024
_MARK: Final = "…"
# The members of a summary that may be large, cut in this order of preference.
_LARGE: Final = ("arguments", "body")


def required_approvals(tier: Tier, admin_quorum: int) -> int:
    """Distinct approvers an action of ``tier`` needs: the quorum for the admin tier, one
    otherwise."""
    if admin_quorum < 1:
        raise ValueError("admin_quorum must be at least 1")
    return admin_quorum if Tier(tier) is Tier.ADMIN else 1


def http_binding(
    params: Mapping[str, str], query: str, body: bytes, content_type: str | None
) -> dict[str, Any]:
    """What an approval of an HTTP call binds to besides tool, action and path: the path
    parameters, the exact query string, a SHA-256 of the exact body and its media type. A
    retry that changes any of them is another action and needs its own approval."""
    return {
        "path": dict(params),
        "query": query,
        "body": "sha256:" + hashlib.sha256(body).hexdigest() if body else None,
        "content_type": content_type,
    }


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json_safe(value: Any) -> Any:
    """``value`` if it is plain JSON (no NaN), else its ``repr`` as text."""
    try:
        _dump(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:MAX_FIELD_CHARS]
    return value


def _cut(text: str, max_bytes: int) -> str:
    """``text`` within ``max_bytes`` of UTF-8 (the mark included), cut on a character."""
    if len(text.encode()) <= max_bytes:
        return text
    room = max(0, max_bytes - len(_MARK.encode()))
    return text.encode()[:room].decode("utf-8", "ignore") + _MARK


def call_summary(
    *,
    method: str,
    path: str,
    arguments: Mapping[str, Any],
    policies: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    max_bytes: int = SUMMARY_MAX_BYTES,
) -> dict[str, Any]:
    """What a human needs to decide: the method, the path, the call's arguments as the
    gateway decoded them, the policies that asked for approval, and ``extra`` (an HTTP
    body, an MCP tool name). At most ``max_bytes`` as JSON: past that, the large members
    (``arguments``, then ``body``) become a text preview and ``truncated`` is true."""
    summary: dict[str, Any] = {
        "method": method[:32],
        "path": _cut(path, MAX_FIELD_CHARS),
        "arguments": _json_safe(dict(arguments)),
        "policies": [str(p) for p in policies],
    }
    for key, value in (extra or {}).items():
        summary[key] = _json_safe(value)
    summary["truncated"] = False
    if len(_dump(summary).encode()) <= max_bytes:
        return summary
    summary["truncated"] = True
    large = [k for k in _LARGE if k in summary]
    previews = {k: _dump(summary[k]) for k in large}
    for key in large:
        summary[key] = ""
    # Whatever is left over after the small members is shared among the large ones.
    room = max_bytes - len(_dump(summary).encode()) - 16 * len(large)
    for index, key in enumerate(large):
        share = max(0, room // (len(large) - index))
        summary[key] = _cut(previews[key], share)
        room -= len(_dump(summary[key]).encode())
    if len(_dump(summary).encode()) > max_bytes:  # the small members alone are too big
        for key in large:
            summary[key] = _MARK
        for key in [k for k in summary if k not in (*_LARGE, "truncated")]:
            if isinstance(summary[key], str):
                summary[key] = _cut(summary[key], 256)
            elif key != "policies":
                summary[key] = _cut(_dump(summary[key]), 256)
    return summary


def due_to_expire(approval: Approval, now: datetime) -> bool:
    """Whether ``approval`` is open but past its time: pending at or after ``expires_at``,
    or approved at or after ``use_by``."""
    return approval.state.open and approval.state_at(now) is ApprovalState.EXPIRED


def cast_vote(
    approval: Approval,
    *,
    approver: str,
    approve: bool,
    reason: str | None,
    now: datetime,
    use_ttl: timedelta,
    voted: Collection[str],
) -> Approval:
    """The approval after ``approver``'s vote, given who has ``voted`` already.

    Raises :class:`ApprovalExpired` when it is expired (recorded, or pending past
    ``expires_at``: the caller then records the expiry), :class:`ApprovalNotPending` when
    it is decided already, and :class:`AlreadyVoted` for a second vote of one approver.
    A deny decides at once; approvals decide when ``required`` distinct approvers agree,
    and the approved action must then come before ``now + use_ttl``.
    """
    state = approval.state_at(now)
    if state is ApprovalState.EXPIRED:
        raise ApprovalExpired(internal=f"approval {approval.id} expired at {approval.expires_at}")
    if state is not ApprovalState.PENDING:
        raise ApprovalNotPending(internal=f"approval {approval.id} is {state.value}")
    if approver in voted:
        raise AlreadyVoted(internal=f"{approver} has voted on approval {approval.id} already")
    if use_ttl <= timedelta(0):
        raise ValueError("use_ttl must be positive")
    if not approve:
        return replace(
            approval,
            state=ApprovalState.DENIED,
            decided_at=now,
            decided_by=approver,
            reason=reason,
        )
    count = approval.approvals + 1
    if count < approval.required:
        return replace(approval, approvals=count)
    return replace(
        approval,
        state=ApprovalState.APPROVED,
        approvals=count,
        decided_at=now,
        decided_by=approver,
        reason=reason,
        use_by=now + use_ttl,
    )


# --- webhook signatures -------------------------------------------------------------------


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign_webhook(secret: bytes, timestamp: int, body: bytes) -> str:
    """The :data:`SIGNATURE_HEADER` value for ``body`` sent at ``timestamp`` (Unix
    seconds): ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_webhook(
    secret: bytes, header: str | None, body: bytes, *, now: int, tolerance: int = 300
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` by ``secret``, made within
    ``tolerance`` seconds of ``now`` (a receiver's check; the comparison is constant-time)."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > tolerance:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))

"""Typed errors for agent code, carrying the server's stable codes (DESIGN.md §9).

Every refusal taskbound makes has a stable ``code``; the SDK raises the class that code
maps to, so agent code can ``except ApprovalRequired`` rather than parse bodies. Codes
the SDK does not know yet still arrive, as :class:`Refused` with that ``code``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "IdentityUnavailable",
    "NotGranted",
    "Refused",
    "ServiceUnavailable",
    "TaskEnded",
    "TaskboundClientError",
    "Unauthorized",
    "error_from",
]

#: The problem ``type`` prefix of taskbound's own refusals (RFC 9457 bodies).
PROBLEM_TYPE = "https://taskbound.dev/problems/"


class TaskboundClientError(Exception):
    """Base of every error the SDK raises. ``code`` is the server's stable code (or one of
    the SDK's own: ``identity_unavailable``, ``not_granted``, ``invalid_response``,
    ``wrong_destination``, ``delegation_elsewhere``, ``not_resendable``,
    ``mcp_unavailable``)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status
        self.body: Mapping[str, Any] = body or {}


class Refused(TaskboundClientError):
    """The server (broker or gateway) refused the request, with a stable code."""


class Unauthorized(Refused):
    """The credential, proof or identity was not accepted (``invalid_token``,
    ``invalid_dpop_proof``, ``use_dpop_nonce``, ``invalid_identity_token``,
    ``unauthenticated``…)."""


class TaskEnded(Refused):
    """The task is no longer active (``task_not_active``): completed, cancelled, expired
    or revoked. Its credentials are dead."""


class ApprovalRequired(Refused):
    """The call waits for a human approval of exactly this call (``approval_required``).

    ``approval_id`` names it; :meth:`taskbound.sdk.Task.wait_for_approval` waits for the
    decision and :meth:`taskbound.sdk.Task.retry_when_approved` re-sends the very same call
    once it is approved."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, status=status, body=body)
        body = self.body
        self.approval_id: str = str(body.get("approval_id", ""))
        self.poll: str | None = body.get("poll")
        self.expires_at: str | None = body.get("expires_at")
        # Re-sends exactly the call that was held (set by the client that made it).
        # Async for Client, a plain call for SyncClient.
        self.resend: Callable[[], Awaitable[Any]] | Callable[[], Any] | None = None


class ApprovalDenied(Refused):
    """The approval a call waited for was denied, or expired undecided; ``state`` says
    which, ``reason`` what the approver wrote (when they did)."""

    def __init__(self, approval_id: str, state: str, reason: str | None = None) -> None:
        message = f"approval {approval_id} is {state}" + (f": {reason}" if reason else "")
        super().__init__(f"approval_{state}", message)
        self.approval_id = approval_id
        self.state = state
        self.reason = reason


class NotGranted(TaskboundClientError):
    """The task holds no credential for what the code asked (a tool or tier that was not
    requested, or was denied at task start)."""

    def __init__(self, message: str) -> None:
        super().__init__("not_granted", message)


class IdentityUnavailable(TaskboundClientError):
    """No workload identity could be obtained (no source configured, the Workload API or
    token file unreadable, the development issuer refusing)."""

    def __init__(self, message: str) -> None:
        super().__init__("identity_unavailable", message)


class ServiceUnavailable(TaskboundClientError):
    """taskbound could not answer (5xx: storage, audit store, revocation feed…). Nothing
    was granted; retrying later is safe."""


_BY_CODE: dict[str, type[TaskboundClientError]] = {
    "approval_required": ApprovalRequired,
    "task_not_active": TaskEnded,
    "invalid_token": Unauthorized,
    "invalid_dpop_proof": Unauthorized,
    "use_dpop_nonce": Unauthorized,
    "invalid_identity_token": Unauthorized,
    "unauthenticated": Unauthorized,
    "invalid_client": Unauthorized,
}


def error_from(status: int, body: Any) -> TaskboundClientError:
    """The typed error for a refusal: an RFC 9457 problem (``code``, ``detail``) or an
    OAuth error (``error``, ``error_description``); anything else is ``invalid_response``."""
    data: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    code = data.get("code") or data.get("error")
    message = data.get("detail") or data.get("error_description") or ""
    if not isinstance(code, str) or not code:
        code, message = "invalid_response", f"HTTP {status} without a taskbound error body"
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = ServiceUnavailable if status >= 500 else Refused
    return cls(code, str(message), status=status, body=data)

"""One exception tree for taskbound.

Every error has a stable machine-readable ``code`` and an HTTP ``status``. The
``detail`` is safe to show to the caller; ``internal`` carries the full reason for
logs and the audit trail and is never sent on the wire (STYLE.md rule 3: fail
closed, visibly; cryptography's opaque ``InvalidToken``).
"""

from __future__ import annotations

from typing import ClassVar


class TaskboundError(Exception):
    """Base of every error taskbound raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_detail: ClassVar[str] = "internal error"

    def __init__(self, detail: str | None = None, *, internal: str | None = None) -> None:
        self.detail = detail or self.default_detail
        self.internal = internal or self.detail
        super().__init__(self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, detail={self.detail!r})"


# --- 4xx: the caller's request is wrong ---------------------------------------------------


class InvalidRequest(TaskboundError):
    code = "invalid_request"
    status = 400
    default_detail = "the request is malformed"


class UnknownField(InvalidRequest):
    code = "unknown_field"
    default_detail = "the request has a field this endpoint does not accept"


class TTLExceedsCap(InvalidRequest):
    code = "ttl_exceeds_cap"
    default_detail = "the requested TTL is above the configured cap"


class PayloadTooLarge(TaskboundError):
    code = "payload_too_large"
    status = 413
    default_detail = "the request body is too large"


class HeadersTooLarge(TaskboundError):
    code = "headers_too_large"
    status = 431
    default_detail = "the request headers are too large"


class UnsupportedGrantType(TaskboundError):
    code = "unsupported_grant_type"
    status = 400
    default_detail = "the token endpoint supports only token exchange (RFC 8693)"


class UnsupportedMediaType(TaskboundError):
    code = "unsupported_media_type"
    status = 415
    default_detail = "the request body must be application/json"


class Unauthenticated(TaskboundError):
    code = "unauthenticated"
    status = 401
    default_detail = "authentication is required"


class InvalidIdentity(Unauthenticated):
    """The workload identity token (JWT-SVID or OIDC) is not acceptable."""

    code = "invalid_identity_token"
    default_detail = "the workload identity token is not valid"


class InvalidToken(Unauthenticated):
    """A taskbound credential failed verification (forged, expired, malformed: one answer)."""

    code = "invalid_token"
    default_detail = "the access token is not valid"


class InvalidDPoPProof(Unauthenticated):
    code = "invalid_dpop_proof"
    default_detail = "the DPoP proof is missing or not valid"


class UseDPoPNonce(InvalidDPoPProof):
    code = "use_dpop_nonce"
    default_detail = "the server requires a DPoP nonce"


class InvalidAdminToken(Unauthenticated):
    code = "invalid_admin_token"
    default_detail = "the admin token is missing or not valid"


class Forbidden(TaskboundError):
    code = "forbidden"
    status = 403
    default_detail = "this action is not allowed"


class UnknownAgent(Forbidden):
    code = "unknown_agent"
    default_detail = "the workload is not a registered agent"


class AgentNotActive(Forbidden):
    code = "agent_not_active"
    default_detail = "the agent is not active"


class OwnerNotAllowed(Forbidden):
    code = "owner_not_allowed"
    default_detail = "the agent may not act on behalf of this owner"


class NoScopeGranted(Forbidden):
    code = "no_scope_granted"
    default_detail = "none of the requested scopes can be granted"


class TaskNotActive(TaskboundError):
    code = "task_not_active"
    status = 409
    default_detail = "the task is no longer active"


class NotFound(TaskboundError):
    code = "not_found"
    status = 404
    default_detail = "not found"


class Conflict(TaskboundError):
    code = "conflict"
    status = 409
    default_detail = "the resource already exists or changed concurrently"


class ApprovalNotPending(Conflict):
    """A vote on an approval that is already decided (approved, denied or consumed)."""

    code = "approval_not_pending"
    default_detail = "the approval is no longer pending"


class ApprovalExpired(Conflict):
    """A vote on an approval whose pending time is over."""

    code = "approval_expired"
    default_detail = "the approval has expired"


class AlreadyVoted(Conflict):
    """The same approver a second time on one approval."""

    code = "already_voted"
    default_detail = "this approver has already voted on the approval"


class ApproverNotAllowed(Forbidden):
    """Not someone who may decide this approval: an unknown or disabled owner, one
    without the approver role, or the requester's own owner where policy forbids it."""

    code = "approver_not_allowed"
    default_detail = "this approver may not decide the approval"


class SelfApproval(ApproverNotAllowed):
    """The owner of the agent asking (or of its task) deciding its own call, where
    ``approvals.owner_may_approve`` is off (separation of duties)."""

    code = "self_approval_not_allowed"
    default_detail = "the requester's own owner may not decide this approval"


class ReasonRequired(InvalidRequest):
    code = "reason_required"
    default_detail = "a reason is required"


class ReferenceError_(InvalidRequest):
    """A registry object names another that does not exist (e.g. an agent's owner)."""

    code = "unknown_reference"
    default_detail = "the request names an object that does not exist"


class MethodNotAllowed(TaskboundError):
    code = "method_not_allowed"
    status = 405
    default_detail = "method not allowed"


# --- 5xx: taskbound cannot decide, so it refuses --------------------------------------------


class ConfigError(TaskboundError):
    code = "config_error"
    status = 500
    default_detail = "the configuration is not valid"


class StorageError(TaskboundError):
    code = "storage_unavailable"
    status = 503
    default_detail = "the storage backend is unavailable"


class IdentityProviderUnavailable(TaskboundError):
    """Trust material (a SPIFFE bundle, an OIDC issuer's JWKS or discovery document) could
    not be obtained, so no identity token can be judged: refuse, and say it is us."""

    code = "identity_provider_unavailable"
    status = 503
    default_detail = "the identity provider's keys cannot be obtained right now"


class KeyUnavailable(TaskboundError):
    code = "key_unavailable"
    status = 503
    default_detail = "no signing key is available"


class DecryptionFailed(TaskboundError):
    code = "decryption_failed"
    status = 500
    default_detail = "a secret could not be decrypted with the configured key-encryption key"


# --- break-glass exceptions (the codes of taskbound.core.breakglass.BreakGlassRefused) ---


class RoleRequired(Forbidden):
    """The person acting lacks the role the operation needs (admin, reviewer, approver),
    or is not a known, enabled owner."""

    code = "role_required"
    default_detail = "this person does not have the role this needs"


_BREAKGLASS_BASES: dict[str, type[TaskboundError]] = {
    "justification_required": InvalidRequest,
    "justification_too_short": InvalidRequest,
    "no_scopes": InvalidRequest,
    "too_many_scopes": InvalidRequest,
    "already_in_ceiling": InvalidRequest,
    "expiry_in_past": InvalidRequest,
    "expiry_too_long": InvalidRequest,
    "review_note_required": InvalidRequest,
    "already_ended": Conflict,
    "not_ended": Conflict,
    "already_reviewed": Conflict,
    "self_review_not_allowed": Forbidden,
}

#: One error class per break-glass refusal code, so every refusal keeps its stable code.
BREAKGLASS_ERRORS: dict[str, type[TaskboundError]] = {
    code: type(f"BreakGlass_{code}", (base,), {"code": code})
    for code, base in _BREAKGLASS_BASES.items()
}


class InvalidSignature(TaskboundError):
    """A signed request (a webhook acknowledgement) whose HMAC signature is missing, wrong,
    stale or replayed."""

    code = "invalid_signature"
    status = 401
    default_detail = "the request's signature is not valid"

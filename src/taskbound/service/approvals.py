"""Human approvals (DESIGN.md §3 flow 8, docs/approvals.md): hold a call for a person,
let people decide it, and let the same call through once.

* :meth:`Approvals.hold` creates (or finds) the pending approval naming exactly the held
  call; :meth:`Approvals.consume` uses an approved one up, once, when that call comes again.
* :meth:`Approvals.decide` applies one person's vote with separation of duties: agents
  never vote (votes come from owners with the ``approver`` role); the accountable owner of
  the task or of the acting agent decides its own agent's call only where
  ``approvals.owner_may_approve`` says so; admin-tier actions need
  ``approvals.admin_quorum`` distinct approvers. Approving never touches a credential.
* Every request, vote, consumption and refused attempt is an audit record naming the
  approval (events ``approval.requested|voted|approved|denied|consumed|refused``).
* :class:`ApprovalWebhook` tells people about new approvals: a Slack-compatible message,
  signed with HMAC-SHA256, delivered in the background with bounded retries. A failed
  delivery is logged; it never holds up or fails the gateway.

Until people sign in (the web UI), a vote is made through the admin API or CLI with an
admin token *and* the approver's owner id (``as_owner``); both are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import httpx

from taskbound.config import ApprovalsConfig, Settings
from taskbound.core.actions import action_digest, argument_digest
from taskbound.core.approvals import (
    SIGNATURE_HEADER,
    call_summary,
    required_approvals,
    sign_webhook,
    verify_webhook,
)
from taskbound.core.clock import Clock, to_epoch
from taskbound.core.model import (
    Approval,
    ApprovalState,
    ApprovalVote,
    AuditEvent,
    Role,
    TaskState,
    Tier,
)
from taskbound.errors import (
    ApproverNotAllowed,
    InvalidRequest,
    InvalidSignature,
    NotFound,
    ReasonRequired,
    SelfApproval,
    TaskboundError,
    TaskNotActive,
)
from taskbound.service.broker import new_id
from taskbound.storage.base import ReplayCache, Storage

__all__ = ["POLL_INTERVAL", "ApprovalWebhook", "Approvals", "HeldCall", "slack_message"]

log = logging.getLogger("taskbound.approvals")

#: How often a long poll re-reads the store (a decision in this process wakes it at once).
POLL_INTERVAL: Final = 0.25
#: The longest long poll.
MAX_WAIT: Final = 30.0
_MAX_DELIVERIES: Final = 1000
_MAX_BACKOFF: Final = 60.0
#: How old a signed acknowledgement may be (seconds).
ACK_TOLERANCE: Final = 300


@dataclass(frozen=True, slots=True)
class HeldCall:
    """A call the gateway holds for approval, as it decided it."""

    task_id: str
    agent_id: str  # the acting agent (a delegate for a delegated credential)
    owner_id: str  # the task's accountable owner
    agent_owner: str  # the acting agent's owner
    intent: str
    tool: str
    action: str
    tier: Tier
    target: str | None
    arguments: Mapping[str, Any]  # as the decision saw them
    binding: Mapping[str, Any]  # what the action digest covers (HTTP: also query and body)
    method: str
    path: str
    policies: tuple[str, ...]
    policy_version: str | None = None
    jti: str | None = None
    txn: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The break-glass exception the call's credential relies on (flagged in the audit).
    exception: str | None = None

    @property
    def action_digest(self) -> str:
        return action_digest(self.tool, self.action, self.target, self.binding)


class Approvals:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        clock: Clock,
        http: httpx.AsyncClient,
    ) -> None:
        self._config: ApprovalsConfig = settings.approvals
        self._storage = storage
        self._clock = clock
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.webhook: ApprovalWebhook | None = None
        config = self._config
        if config.webhook_url is not None and config.webhook_secret is not None:
            self.webhook = ApprovalWebhook(
                config.webhook_url,
                config.webhook_secret.get_secret_value().encode(),
                http,
                clock,
                retries=config.webhook_retries,
                timeout=config.webhook_timeout_seconds,
                public_url=settings.public_url,
            )

    @property
    def use_ttl(self) -> timedelta:
        return timedelta(seconds=self._config.use_ttl_seconds)

    # --- the gateway's side ------------------------------------------------------------

    async def hold(self, call: HeldCall) -> Approval:
        """The open approval of this call's (task, action digest): a new pending one, or
        the one already waiting. A new one is audited and announced."""
        now = self._clock.now()
        extra = dict(call.extra)
        if call.agent_owner != call.owner_id:
            extra["agent_owner"] = call.agent_owner
        candidate = Approval(
            id=new_id("apr"),
            task_id=call.task_id,
            agent_id=call.agent_id,
            owner_id=call.owner_id,
            tool=call.tool,
            action=call.action,
            tier=call.tier,
            target=call.target,
            argument_digest=argument_digest(call.arguments),
            action_digest=call.action_digest,
            intent=call.intent,
            summary=call_summary(
                method=call.method,
                path=call.path,
                arguments=call.arguments,
                policies=call.policies,
                extra=extra,
            ),
            required=required_approvals(call.tier, self._config.admin_quorum),
            created_at=now,
            expires_at=now + timedelta(seconds=self._config.pending_ttl_seconds),
        )
        approval = await self._storage.request_approval(candidate)
        if approval.id == candidate.id:
            await self._audit(
                approval,
                "approval.requested",
                "approval_required",
                "approval_required",
                f"approval {approval.id} requested; needs {approval.required} approver(s) "
                f"by {approval.expires_at.isoformat()}",
                policies=call.policies,
                policy_version=call.policy_version,
                jti=call.jti,
                txn=call.txn,
                exception_id=call.exception,
            )
            log.info(
                "approval requested",
                extra={"event": "approval.requested", "approval_id": approval.id},
            )
            if self.webhook is not None:
                self.webhook.notify(approval)
        return approval

    async def consume(self, call: HeldCall) -> Approval | None:
        """Use up the approved approval of exactly this call, once; None when there is
        none (pending, denied, expired, used, or another call's)."""
        approval = await self._storage.consume_approval(
            call.task_id, call.action_digest, self._clock.now()
        )
        if approval is not None:
            await self._audit(
                approval,
                "approval.consumed",
                "allow",
                None,
                f"approval {approval.id} consumed by the approved call",
                jti=call.jti,
                txn=call.txn,
                exception_id=call.exception,
            )
            self._wake(approval.id)
        return approval

    # --- people's side -----------------------------------------------------------------

    async def get(self, approval_id: str) -> Approval:
        approval = await self._storage.get_approval(approval_id)
        if approval is None:
            raise NotFound("no such approval")
        return approval

    async def votes(self, approval_id: str) -> list[ApprovalVote]:
        return await self._storage.list_approval_votes(approval_id)

    async def list_approvals(
        self, state: ApprovalState | None = None, limit: int = 100
    ) -> list[Approval]:
        """Newest first. A state filter is on the state as of now: what is past its time is
        recorded as expired first, so a pending approval past its time is listed as
        expired, not pending."""
        if state is None:
            return await self._storage.list_approvals(limit=limit)
        now = self._clock.now()
        await self._storage.expire_approvals(now)
        found = await self._storage.list_approvals(state=state, limit=limit)
        return [a for a in found if a.state_at(now) is state]

    async def decide(
        self,
        approval_id: str,
        *,
        as_owner: str,
        approve: bool,
        reason: str | None,
        cause: str,
    ) -> Approval:
        """One person's vote. Refusals (each with its stable code, the approval unchanged,
        and audited): ``not_found``, ``reason_required`` (a deny needs one),
        ``approver_not_allowed`` (unknown or disabled owner, no approver role),
        ``self_approval_not_allowed``, ``task_not_active`` (approving a call of an ended
        task), ``approval_expired``, ``approval_not_pending``, ``already_voted``."""
        verb = "approve" if approve else "deny"
        approval: Approval | None = None
        try:
            approval = await self.get(approval_id)
            reason = (reason or "").strip() or None
            if not approve and reason is None:
                raise ReasonRequired("a deny needs a reason")
            await self._check_approver(approval, as_owner)
            if approve:
                task = await self._storage.get_task(approval.task_id)
                now = self._clock.now()
                if task is None or task.state_at(now) is not TaskState.ACTIVE:
                    state = "gone" if task is None else task.state_at(now).value
                    raise TaskNotActive(f"the task is {state}: its calls cannot be approved")
            decided = await self._storage.vote_approval(
                approval.id, as_owner, approve, reason, self._clock.now(), self.use_ttl
            )
        except TaskboundError as err:
            await self._refused(approval, approval_id, as_owner, verb, cause, err)
            raise
        event, decision = {
            ApprovalState.APPROVED: ("approval.approved", "allow"),
            ApprovalState.DENIED: ("approval.denied", "deny"),
        }.get(decided.state, ("approval.voted", "info"))
        await self._audit(
            decided,
            event,
            decision,
            None,
            f"approval {decided.id}: {verb} by owner {as_owner} ({cause}); "
            f"{decided.approvals} of {decided.required} approvals"
            + (f"; reason: {reason}" if reason else ""),
        )
        log.info(
            "approval vote",
            extra={
                "event": event,
                "approval_id": decided.id,
                "approver": as_owner,
                "state": decided.state.value,
            },
        )
        self._wake(decided.id)
        return decided

    async def acknowledge(
        self, approval_id: str, *, body: bytes, signature: str | None, replay: ReplayCache
    ) -> Approval:
        """A decision relayed by the chat system the webhook notified: ``body`` is
        ``{"decision": "approve"|"deny", "approver": "<owner id>", "reason": "…"}``, signed
        like the webhook itself (``X-Taskbound-Signature``, HMAC-SHA256 with
        ``approvals.webhook_secret``, at most five minutes old, each signature used once).
        A forged, stale or replayed one is ``invalid_signature``, audited, nothing changed;
        a genuine one is one person's vote with every rule of :meth:`decide`."""
        secret = self._config.webhook_secret
        if not self._config.webhook_decisions or secret is None:
            raise NotFound("webhook decisions are not enabled")
        now = self._clock.now()
        try:
            if not verify_webhook(
                secret.get_secret_value().encode(), signature, body, now=int(to_epoch(now))
            ):
                raise InvalidSignature(internal="signature missing, wrong or stale")
            assert signature is not None
            until = now + timedelta(seconds=2 * ACK_TOLERANCE)
            if await replay.seen(f"approval-ack:{signature}", until, now):
                raise InvalidSignature(internal="acknowledgement replayed")
            try:
                ack = json.loads(body)
                verdict, approver = ack["decision"], ack["approver"]
                reason = ack.get("reason") or None
            except (ValueError, KeyError, TypeError):
                raise InvalidRequest("the acknowledgement is not the expected JSON") from None
            if verdict not in ("approve", "deny") or not isinstance(approver, str):
                raise InvalidRequest("decision must be approve or deny, approver an owner id")
            if reason is not None and not isinstance(reason, str):
                raise InvalidRequest("reason must be a string")
        except TaskboundError as err:
            found = await self._storage.get_approval(approval_id)
            await self._refused(found, approval_id, "", "acknowledge", "webhook", err)
            raise
        return await self.decide(
            approval_id,
            as_owner=approver,
            approve=verdict == "approve",
            reason=(reason or "")[:1000],
            cause="webhook",
        )

    async def _check_approver(self, approval: Approval, as_owner: str) -> None:
        owner = await self._storage.get_owner(as_owner) if as_owner else None
        if owner is None or owner.disabled:
            raise ApproverNotAllowed(internal=f"owner {as_owner!r} is unknown or disabled")
        if Role.APPROVER not in owner.roles:
            raise ApproverNotAllowed(
                "this owner does not have the approver role",
                internal=f"owner {as_owner!r} lacks the approver role",
            )
        requesters = {approval.owner_id, approval.summary.get("agent_owner")}
        if as_owner in requesters and not self._config.owner_may_approve:
            raise SelfApproval(
                internal=f"owner {as_owner!r} is accountable for the requesting agent or task "
                "and approvals.owner_may_approve is off"
            )

    async def wait(self, approval_id: str, seconds: float) -> Approval:
        """The approval once it is no longer pending (as of now), or as it is after
        ``seconds`` (at most :data:`MAX_WAIT`). Wakes at once for a decision made in this
        process, and re-reads the store every :data:`POLL_INTERVAL` for the others."""
        deadline = time.monotonic() + max(0.0, min(seconds, MAX_WAIT))
        event = asyncio.Event()
        self._waiters.setdefault(approval_id, set()).add(event)
        try:
            while True:
                approval = await self.get(approval_id)
                left = deadline - time.monotonic()
                if approval.state_at(self._clock.now()) is not ApprovalState.PENDING or left <= 0:
                    return approval
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=min(POLL_INTERVAL, left))
        finally:
            waiting = self._waiters.get(approval_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[approval_id]

    def _wake(self, approval_id: str) -> None:
        for event in self._waiters.get(approval_id, ()):
            event.set()

    async def sweep(self) -> int:
        """Record the expiry of approvals past their time (the views say so already)."""
        return await self._storage.expire_approvals(self._clock.now())

    async def aclose(self) -> None:
        if self.webhook is not None:
            await self.webhook.aclose()

    # --- audit -------------------------------------------------------------------------

    async def _audit(
        self,
        approval: Approval,
        event: str,
        decision: str,
        code: str | None,
        detail: str,
        *,
        policies: tuple[str, ...] = (),
        policy_version: str | None = None,
        jti: str | None = None,
        txn: str | None = None,
        exception_id: str | None = None,
    ) -> None:
        await self._storage.append_audit(
            AuditEvent(
                time=self._clock.now(),
                event=event,
                decision=decision,
                code=code,
                agent=approval.agent_id,
                owner=approval.owner_id,
                task=approval.task_id,
                intent=approval.intent,
                jti=jti,
                tool=approval.tool,
                action=approval.action,
                tier=approval.tier.value,
                argument_digest=approval.argument_digest,
                policies=policies or tuple(approval.summary.get("policies", ())),
                policy_version=policy_version,
                detail=detail,
                txn=txn,
                exception_id=exception_id,
            )
        )

    async def _refused(
        self,
        approval: Approval | None,
        approval_id: str,
        as_owner: str,
        verb: str,
        cause: str,
        err: TaskboundError,
    ) -> None:
        detail = f"approval {approval_id[:100]}: {verb} by owner {as_owner[:100]!r} ({cause}) "
        detail += f"refused: {err.internal}"
        log.warning(
            "approval vote refused",
            extra={"event": "approval.refused", "approval_id": approval_id, "code": err.code},
        )
        if approval is not None:
            await self._audit(approval, "approval.refused", "deny", err.code, detail)
            return
        await self._storage.append_audit(
            AuditEvent(
                time=self._clock.now(),
                event="approval.refused",
                decision="deny",
                code=err.code,
                detail=detail,
            )
        )


# --- notifications -----------------------------------------------------------------------


def _escape(text: str) -> str:
    """Slack mrkdwn control characters, escaped as Slack asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(approval: Approval, public_url: str) -> dict[str, Any]:
    """A Slack-compatible message (``text`` plus Block Kit ``blocks``) announcing a new
    approval: who asks, for what exactly, and how to decide it."""
    summary = approval.summary
    what = f"{approval.tool}.{approval.action} ({approval.tier.value})"
    text = (
        f"Approval needed: {approval.agent_id} asks to call {what} for task "
        f"{approval.task_id} — approval {approval.id}"
    )
    arguments = json.dumps(
        summary.get("arguments", {}), ensure_ascii=False, indent=1, sort_keys=True
    )
    if len(arguments) > 1500:
        arguments = arguments[:1500] + "…"
    call = f"{summary.get('method', '')} {summary.get('path', '')}".strip()
    quorum = "" if approval.required == 1 else f" ({approval.required} approvers needed)"
    decide = (
        f"taskbound approvals approve {approval.id} --as-owner <you> --reason …  "
        f"|  taskbound approvals deny {approval.id} --as-owner <you> --reason …"
    )
    return {
        "text": text,
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"*Approval needed*{quorum}: `{_escape(what)}`\n"
                    f"_{_escape(approval.intent[:500])}_",
                },
            },
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": f"*Agent*\n{_escape(approval.agent_id)}"},
                    {"type": "mrkdwn", "text": f"*Owner*\n{_escape(approval.owner_id)}"},
                    {"type": "mrkdwn", "text": f"*Task*\n`{_escape(approval.task_id)}`"},
                    {"type": "mrkdwn", "text": f"*Call*\n`{_escape(call[:200])}`"},
                    {
                        "type": "mrkdwn",
                        "text": f"*Expires*\n{approval.expires_at.isoformat()}",
                    },
                    {
                        "type": "mrkdwn",
                        "text": "*Policies*\n"
                        + _escape(", ".join(summary.get("policies", ())) or "—"),
                    },
                ],
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"```{_escape(arguments)}```"},
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"Approval `{approval.id}` at {_escape(public_url)}: "
                        f"{_escape(decide)}",
                    }
                ],
            },
        ],
    }


class ApprovalWebhook:
    """Announces new approvals to one URL: a Slack-compatible JSON body, signed in the
    :data:`~taskbound.core.approvals.SIGNATURE_HEADER` header. Each delivery runs in the
    background, is retried on connection errors, timeouts, 5xx, 408 and 429 with
    exponential backoff (``backoff`` × 2ⁿ, capped), and is given up after ``retries``
    further attempts, with a log line. At most 1,000 deliveries wait at once; more are
    dropped (logged), never queued without bound."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        retries: int,
        timeout: float,
        public_url: str,
        backoff: float = 0.5,
    ) -> None:
        self._url = url
        self._secret = secret
        self._http = http
        self._clock = clock
        self._retries = retries
        self._timeout = timeout
        self._public_url = public_url
        self._backoff = backoff
        self._deliveries: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def notify(self, approval: Approval) -> None:
        """Deliver in the background; returns at once."""
        if len(self._deliveries) >= _MAX_DELIVERIES:
            self.failed += 1
            log.warning(
                "approval webhook backlog full; notification dropped",
                extra={"event": "approval.webhook_dropped", "approval_id": approval.id},
            )
            return
        task = asyncio.create_task(self._deliver(approval))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, approval: Approval) -> None:
        body = json.dumps(
            slack_message(approval, self._public_url), ensure_ascii=False, separators=(",", ":")
        ).encode()
        why = "not attempted"
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(min(self._backoff * 2 ** (attempt - 1), _MAX_BACKOFF))
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign_webhook(self._secret, to_epoch(self._clock.now()), body),
            }
            try:
                response = await self._http.post(
                    self._url, content=body, headers=headers, timeout=self._timeout
                )
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= response.status_code < 300:
                self.delivered += 1
                return
            why = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code not in (408, 429):
                break  # the receiver refuses this message: sending it again will not help
        self.failed += 1
        log.warning(
            "approval webhook delivery failed",
            extra={
                "event": "approval.webhook_failed",
                "approval_id": approval.id,
                "reason": why[:300],
            },
        )

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        while self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*list(self._deliveries), return_exceptions=True)

"""The broker: tasks and the task-bound credentials issued for them (DESIGN.md §3 flows 3-4,
§9). Orchestrates the pure core (identity, DPoP, grant decision, token minting) with storage.

Every refusal raises a :class:`taskbound.errors.TaskboundError` with a stable code, is
logged with its full internal reason, and persists nothing but its audit record.

Audit (issue 8): a task's start (``task.started``, one ``credential.issued`` per
credential) and end (``task.ended``: completed, cancelled, revoked, expired), a refreshed
credential (``credential.issued``), a revoked one (``credential.revoked``) and a refused
start or refresh (``task.refused``, ``credential.refused``) are audit records, durable
before the method returns. A credential is handed out only once its record is durable;
when the record cannot be written, the task or credential (already committed) is ended
again, best effort, and the error propagates.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from taskbound.config import Settings
from taskbound.core.breakglass import BreakGlass
from taskbound.core.clock import Clock, to_epoch
from taskbound.core.dpop import DPoPProof, verify_dpop_proof
from taskbound.core.exchange import (
    ACCESS_TOKEN_TYPE,
    ACTOR_TOKEN_TYPES,
    ExchangeRefused,
    Narrowing,
    narrow,
    narrowing_digest,
)
from taskbound.core.grant import GrantDecider, GrantRequest, ScopeRequest
from taskbound.core.identity import WorkloadIdentity
from taskbound.core.model import (
    AgentState,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    ScopeGrant,
    Task,
    TaskState,
    Tier,
)
from taskbound.core.tokens import CredentialClaims, mint_credential, verify_credential
from taskbound.errors import (
    AgentNotActive,
    Forbidden,
    IdentityProviderUnavailable,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    NoScopeGranted,
    NotFound,
    OwnerNotAllowed,
    TaskboundError,
    TaskNotActive,
    TTLExceedsCap,
    UnknownAgent,
)
from taskbound.service.audit_records import INFO, clip, listing
from taskbound.service.events import Change, Events
from taskbound.service.identity import IdentityVerifier, unverified_kid
from taskbound.service.keys import KeyManager
from taskbound.storage.base import ReplayCache, Storage
from taskbound.storage.pending import recorded

log = logging.getLogger("taskbound.broker")

# The length verify_credential accepts by default: every issued credential must verify.
MAX_CREDENTIAL_LENGTH = 8192
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a secret

_REFUSAL_ERRORS: Mapping[str, type[TaskboundError]] = {
    "agent_not_active": AgentNotActive,
    "owner_not_allowed": OwnerNotAllowed,
}


def new_id(prefix: str) -> str:
    """An unguessable identifier: 128 random bits, URL-safe, with a readable prefix."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


@dataclass(frozen=True, slots=True)
class StartTaskRequest:
    purpose: str
    constraints: Mapping[str, Any]
    on_behalf_of: str
    scopes: tuple[ScopeRequest, ...]
    ttl_seconds: int
    may_act: str | None = None  # the one agent the task's credentials may be delegated to


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    access_token: str
    record: CredentialRecord
    expires_in: int

    @property
    def scope(self) -> str:
        return f"{self.record.tool}:{self.record.tier.value}"


@dataclass(frozen=True, slots=True)
class TaskStarted:
    task: Task
    credentials: tuple[IssuedCredential, ...]


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """An RFC 8693 §2.1 token exchange request, as received."""

    subject_token: str
    subject_token_type: str | None
    actor_token: str | None
    actor_token_type: str | None
    requested_token_type: str | None
    narrowing: Narrowing
    dpop_headers: Sequence[str]
    subject_dpop: str | None


@dataclass(frozen=True, slots=True)
class Exchanged:
    credential: IssuedCredential
    claims: CredentialClaims
    decided_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AgentCaller:
    """An agent authenticated for one request: its identity and its DPoP proof."""

    identity: WorkloadIdentity
    proof: DPoPProof


class Broker:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        keys: KeyManager,
        identity: IdentityVerifier,
        decider: GrantDecider,
        replay: ReplayCache,
        clock: Clock,
        ids: Callable[[str], str] = new_id,
        events: Events | None = None,
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._keys = keys
        self._identity = identity
        self._decider = decider
        self._replay = replay
        self._clock = clock
        self._ids = ids
        self._events = events or Events()
        creds = settings.credentials
        self._cred_cap = timedelta(seconds=creds.max_ttl_seconds)
        self._leeway = timedelta(seconds=creds.clock_leeway_seconds)
        self._iat_window = timedelta(seconds=settings.dpop.iat_window_seconds)

    @property
    def decider(self) -> GrantDecider:
        return self._decider

    # --- authentication of agents -------------------------------------------------------

    async def authenticate_agent(
        self,
        *,
        identity_token: str | None,
        dpop_headers: Sequence[str],
        method: str,
        path: str,
    ) -> AgentCaller:
        """Verify the workload identity token and the request's DPoP proof (RFC 9449 §4.3),
        including the one-time use of the proof's ``jti``."""
        if not identity_token:
            raise InvalidRequest(
                "a workload identity token is required as 'Authorization: Bearer <token>'"
            )
        identity = await self._identity.verify(identity_token)
        if len(dpop_headers) != 1:
            raise InvalidDPoPProof(internal=f"{len(dpop_headers)} DPoP headers, expected one")
        now = self._clock.now()
        proof = verify_dpop_proof(
            dpop_headers[0],
            method=method,
            url=self._settings.public_url + path,
            now=now,
            algorithms=self._settings.dpop.algorithms,
            iat_window=self._iat_window,
        )
        # Only a registered, active agent may spend an entry of the replay cache, so that a
        # stranger with a valid identity cannot fill it and lock the agents out.
        agent = await self._storage.get_agent(identity.spiffe_id)
        if agent is None:
            raise UnknownAgent(internal=f"no agent registered for {identity.spiffe_id}")
        if agent.state is not AgentState.ACTIVE:
            raise AgentNotActive(internal=f"agent state is {agent.state.value}")
        # The proof stays acceptable until iat + window; remember its jti that long.
        expires = proof.issued_at + self._iat_window + self._leeway
        if await self._replay.seen(f"dpop:{proof.jkt}:{proof.jti}", expires, now):
            raise InvalidDPoPProof(internal=f"DPoP proof jti {proof.jti!r} replayed")
        return AgentCaller(identity, proof)

    # --- tasks -------------------------------------------------------------------------

    async def start_task(self, caller: AgentCaller, req: StartTaskRequest) -> TaskStarted:
        """Decide and start a task, minting a credential per granted scope. Its records
        (``task.started`` and a ``credential.issued`` per credential, in one transaction)
        are durable before it returns; a refusal is a ``task.refused`` record."""
        try:
            started = await self._start_task(caller, req)
        except TaskboundError as err:
            if err.status < 500:
                await self._refused(
                    "task.refused",
                    err,
                    agent=caller.identity.spiffe_id,
                    owner=clip(req.on_behalf_of, 64),
                    intent=req.purpose,
                    detail="scopes requested: "
                    + listing(f"{s.tool}:{s.tier.value}" for s in req.scopes),
                )
            raise
        return started

    async def _start_task(self, caller: AgentCaller, req: StartTaskRequest) -> TaskStarted:
        now = self._clock.now()
        spiffe_id = caller.identity.spiffe_id
        cap = self._settings.credentials.task_max_ttl_seconds
        if req.ttl_seconds > cap:
            raise TTLExceedsCap(f"ttl_seconds must be at most {cap}")
        inputs = await self._storage.load_grant_inputs(
            spiffe_id, req.on_behalf_of, [s.tool for s in req.scopes]
        )
        agent, tools = inputs.agent, inputs.tools
        if agent is None:
            raise UnknownAgent(internal=f"no agent registered for {spiffe_id}")
        exceptions = await self._exceptions(spiffe_id, now)
        decision = self._decider.decide(
            GrantRequest(
                agent=agent,
                owner=inputs.owner,
                owner_id=req.on_behalf_of,
                purpose=req.purpose,
                constraints=req.constraints,
                scopes=req.scopes,
                ttl=timedelta(seconds=req.ttl_seconds),
                tools=tools,
                now=now,
                exceptions=tuple(exceptions.values()),
            )
        )
        if decision.refusal is not None:
            err = _REFUSAL_ERRORS.get(decision.refusal.code, Forbidden)
            raise err(internal=decision.refusal.reason)
        if not decision.granted:
            raise NoScopeGranted(internal="; ".join(d.reason for d in decision.denied))
        task = Task(
            id=self._ids("tsk"),
            agent_id=spiffe_id,
            owner_id=req.on_behalf_of,
            purpose=req.purpose,
            constraints=dict(req.constraints),
            granted=decision.granted,
            denied=decision.denied,
            jkt=caller.proof.jkt,
            created_at=now,
            expires_at=now + timedelta(seconds=req.ttl_seconds),
            may_act=req.may_act,
        )
        issued = tuple(
            self._mint(task, grant, now, tools[grant.tool].audience, exceptions)
            for grant in task.granted
        )
        started = TaskStarted(task, issued)
        # The task, its credentials and their records land in one transaction: no
        # credential is ever live, let alone handed out, without its record.
        async with recorded(self._storage, *self._start_events(started, decision.determined_by)):
            if not await self._storage.create_task(task, [c.record for c in issued]):
                # The agent was suspended or its owner disabled while we decided.
                raise AgentNotActive(internal="agent or owner changed state during task start")
        log.info(
            "task started",
            extra={
                "event": "task.started",
                "task_id": task.id,
                "agent": spiffe_id,
                "owner": task.owner_id,
                "granted": [f"{g.tool}:{g.tier.value}" for g in task.granted],
                "denied": [f"{d.tool}:{d.tier}:{d.code}" for d in task.denied],
                "decided_by": list(decision.determined_by),
            },
        )
        return started

    def _start_events(self, started: TaskStarted, decided_by: tuple[str, ...]) -> list[AuditEvent]:
        task = started.task
        granted = listing(f"{g.tool}:{g.tier.value} ({', '.join(g.actions)})" for g in task.granted)
        denied = listing(f"{d.tool}:{d.tier} ({d.code})" for d in task.denied)
        detail = f"granted {granted}; denied {denied}; expires {task.expires_at.isoformat()}"
        if task.may_act is not None:
            detail += f"; may be delegated to {clip(task.may_act)}"
        return [
            self._task_event(task, "task.started", detail, policies=decided_by),
            *(self._issued_event(task, c, decided_by) for c in started.credentials),
        ]

    async def _exceptions(self, agent_id: str, now: datetime) -> dict[str, BreakGlass]:
        """The break-glass exceptions of ``agent_id`` active at ``now``, by id."""
        found = await self._storage.list_breakglass(
            now=now, state="active", agent_id=agent_id, limit=1000
        )
        return {bg.id: bg for bg in found}

    def _mint(
        self,
        task: Task,
        grant: ScopeGrant,
        now: datetime,
        audience: str,
        exceptions: Mapping[str, BreakGlass],
    ) -> IssuedCredential:
        expires = min(task.expires_at, now + self._cred_cap)
        if grant.exception is not None:
            # A credential relying on an exception dies with it, whatever else it could live.
            expires = min(expires, exceptions[grant.exception].ended_at_or_expiry())
        claims = CredentialClaims(
            issuer=self._settings.issuer,
            subject=task.agent_id,
            audience=audience,
            client_id=task.agent_id,
            jti=self._ids("cred"),
            issued_at=now,
            not_before=now,
            expires_at=expires,
            task_id=task.id,
            owner_id=task.owner_id,
            purpose=task.purpose,
            constraints=task.constraints,
            tool=grant.tool,
            tier=grant.tier,
            actions=grant.actions,
            jkt=task.jkt,
            # The task is the transaction: every credential and call of its chain shares it.
            txn=task.id,
            may_act=task.may_act,
            exception=grant.exception,
        )
        return self._sign(claims)

    def _sign(self, claims: CredentialClaims) -> IssuedCredential:
        """Sign ``claims`` with the active credentials key, and the record kept of it."""
        signer = self._keys.signer(KeyPurpose.CREDENTIALS)
        token = mint_credential(claims, signer)
        if len(token) > MAX_CREDENTIAL_LENGTH:
            # Every verifier caps token length; never issue what cannot be verified.
            raise InvalidRequest("the task's intent is too large to fit in a credential")
        record = CredentialRecord(
            jti=claims.jti,
            task_id=claims.task_id,
            agent_id=claims.holder,
            tool=claims.tool,
            tier=claims.tier,
            actions=claims.actions,
            jkt=claims.jkt,
            kid=signer.kid,
            issued_at=claims.issued_at,
            expires_at=claims.expires_at,
            parent_jti=claims.parents[0] if claims.parents else None,
            exception_id=claims.exception,
        )
        span = to_epoch(claims.expires_at) - to_epoch(claims.issued_at)
        return IssuedCredential(token, record, max(0, span))

    # --- audit -------------------------------------------------------------------------

    def _task_event(
        self,
        task: Task,
        event: str,
        detail: str,
        *,
        policies: tuple[str, ...] = (),
    ) -> AuditEvent:
        return AuditEvent(
            time=self._clock.now(),
            event=event,
            decision=INFO,
            agent=task.agent_id,
            owner=task.owner_id,
            task=task.id,
            intent=task.purpose,
            policies=policies,
            detail=detail,
            txn=task.id,
        )

    def _issued_event(
        self, task: Task, issued: IssuedCredential, policies: tuple[str, ...]
    ) -> AuditEvent:
        record = issued.record
        detail = (
            f"actions {listing(record.actions)}; expires {record.expires_at.isoformat()}; "
            f"signed by {record.kid}"
        )
        if record.exception_id is not None:
            detail += f"; relies on break-glass exception {record.exception_id}"
        return AuditEvent(
            time=self._clock.now(),
            event="credential.issued",
            decision=INFO,
            agent=record.agent_id,
            owner=task.owner_id,
            task=task.id,
            intent=task.purpose,
            jti=record.jti,
            tool=record.tool,
            tier=record.tier.value,
            policies=policies,
            detail=detail,
            txn=task.id,
            exception_id=record.exception_id,
        )

    async def _refused(
        self,
        event: str,
        err: TaskboundError,
        *,
        agent: str,
        detail: str,
        owner: str | None = None,
        task: Task | None = None,
        intent: str | None = None,
        tool: str | None = None,
        tier: str | None = None,
    ) -> None:
        await self._storage.append_audit(
            AuditEvent(
                time=self._clock.now(),
                event=event,
                decision="deny",
                code=err.code,
                agent=agent,
                owner=task.owner_id if task is not None else owner,
                task=task.id if task is not None else None,
                intent=task.purpose if task is not None else intent,
                tool=tool,
                tier=tier,
                detail=f"{detail}; refused: {err.internal}",
                txn=task.id if task is not None else None,
            )
        )

    async def _own_task(self, caller: AgentCaller, task_id: str) -> Task:
        """The task, if this caller is its agent holding its DPoP key; otherwise not found
        (a caller learns nothing about other agents' tasks)."""
        task = await self._storage.get_task(task_id)
        if (
            task is None
            or not secrets.compare_digest(task.agent_id, caller.identity.spiffe_id)
            or not secrets.compare_digest(task.jkt, caller.proof.jkt)
        ):
            raise NotFound("no such task")
        return task

    async def issue_credential(
        self, caller: AgentCaller, task_id: str, tool: str, tier: Tier
    ) -> IssuedCredential:
        """A fresh credential for a granted (tool, tier) of a live task, same DPoP key. Its
        ``credential.issued`` record is durable before it returns; a refusal is a
        ``credential.refused`` record (naming the task only when it is the caller's)."""
        task: Task | None = None
        try:
            task = await self._own_task(caller, task_id)
            issued = await self._refresh(task, tool, tier)
        except TaskboundError as err:
            if err.status < 500:
                await self._refused(
                    "credential.refused",
                    err,
                    agent=caller.identity.spiffe_id,
                    task=task,
                    tool=clip(tool, 64),
                    tier=tier.value,
                    detail=f"refresh for task {clip(task_id, 100)}",
                )
            raise
        log.info(
            "credential issued",
            extra={"event": "credential.issued", "task_id": task.id, "jti": issued.record.jti},
        )
        return issued

    async def _refresh(self, task: Task, tool: str, tier: Tier) -> IssuedCredential:
        now = self._clock.now()
        if task.state_at(now) is not TaskState.ACTIVE:
            raise TaskNotActive(f"the task is {task.state_at(now).value}")
        granted = task.grant_for(tool, tier)
        if granted is None:
            raise Forbidden(
                f"the task was not granted {tool}:{tier.value}",
                internal=f"credential refresh for ungranted {tool}:{tier.value}",
            )
        grant, audience, exceptions, decided_by = await self._regrant(task, granted, now)
        issued = self._mint(task, grant, now, audience, exceptions)
        # The credential and its record land together, or neither does.
        async with recorded(self._storage, self._issued_event(task, issued, decided_by)):
            if not await self._storage.add_credential(issued.record, now):
                raise TaskNotActive("the task is no longer active")
        return issued

    async def _regrant(
        self, task: Task, granted: ScopeGrant, now: datetime
    ) -> tuple[ScopeGrant, str, dict[str, BreakGlass], tuple[str, ...]]:
        """Decide a refresh again on today's registry: the agent, owner, ceiling and the
        tool's tiers as they are now. The result is the task's grant narrowed to what is
        still allowed (actions moved to another tier drop out); it never widens."""
        inputs = await self._storage.load_grant_inputs(task.agent_id, task.owner_id, [granted.tool])
        tool = inputs.tools.get(granted.tool)
        if inputs.agent is None or tool is None:
            raise Forbidden("the task's agent or tool is no longer registered")
        still = {a.name for a in tool.actions_of(granted.tier)}
        actions = tuple(a for a in granted.actions if a in still)
        if not actions:
            raise Forbidden(
                f"{granted.tool}:{granted.tier.value} no longer offers the task's actions",
                internal=f"refresh: no granted action left in {granted.tool}:{granted.tier.value}",
            )
        exceptions = await self._exceptions(task.agent_id, now)
        decision = self._decider.decide(
            GrantRequest(
                agent=inputs.agent,
                owner=inputs.owner,
                owner_id=task.owner_id,
                purpose=task.purpose,
                constraints=task.constraints,
                scopes=(ScopeRequest(granted.tool, granted.tier, actions),),
                ttl=task.expires_at - now,
                tools=inputs.tools,
                now=now,
                exceptions=tuple(exceptions.values()),
            )
        )
        if decision.refusal is not None:
            raise _REFUSAL_ERRORS.get(decision.refusal.code, Forbidden)(
                internal=f"refresh refused: {decision.refusal.reason}"
            )
        if not decision.granted:
            raise Forbidden(
                f"{granted.tool}:{granted.tier.value} is no longer allowed for this task",
                internal="refresh denied: " + "; ".join(d.reason for d in decision.denied),
            )
        (grant,) = decision.granted
        if not set(grant.actions) <= set(granted.actions) or grant.scope != granted.scope:
            raise Forbidden(internal="refresh decision tried to widen the grant")
        return grant, tool.audience, exceptions, tuple(decision.determined_by)

    async def task_for_agent(self, caller: AgentCaller, task_id: str) -> Task:
        return await self._own_task(caller, task_id)

    async def get_task(self, task_id: str) -> Task:
        task = await self._storage.get_task(task_id)
        if task is None:
            raise NotFound("no such task")
        return task

    async def end_task(
        self, task_id: str, state: TaskState, reason: str, *, cause: str = "agent"
    ) -> tuple[Task, bool]:
        """End a task and revoke everything issued for it. Idempotent: ending an ended
        task changes nothing and says so (``changed`` False). ``cause`` says who ended it
        ("agent", "admin:<token id>"). A change is a ``task.ended`` record, durable before
        this returns (the end itself is committed first, in the store's transaction)."""
        if state is TaskState.ACTIVE:
            raise InvalidRequest("a task cannot be ended into the active state")
        result = await self._storage.end_task(
            task_id, state, reason, self._clock.now(), cause=cause
        )
        if result is None:
            raise NotFound("no such task")
        task, changed = result
        if changed:
            self._events.publish(Change.TASK_ENDED, task_id)
            await self._storage.append_audit(
                self._task_event(
                    task,
                    "task.ended",
                    f"{task.state.value}: {clip(reason)}; its credentials and every credential "
                    f"derived from them revoked (by {clip(cause)})",
                )
            )
        log.info(
            "task ended",
            extra={
                "event": "task.ended",
                "task_id": task_id,
                "state": task.state.value,
                "reason": reason,
                "cause": cause,
                "changed": changed,
            },
        )
        return task, changed

    async def credentials_of(self, task_id: str) -> list[CredentialRecord]:
        return await self._storage.list_credentials(task_id)

    # --- RFC 8693 token exchange: delegation ------------------------------------------

    async def exchange(self, req: ExchangeRequest, facts: dict[str, Any]) -> Exchanged:
        """Delegate a task credential to another agent (DESIGN.md §3 flow 6).

        The request is made by the delegate: ``actor_token`` is its workload identity, the
        ``DPoP`` header proves the key the new credential is bound to, and
        ``subject_dpop`` is a proof, made by the parent with the subject token's key for
        this endpoint and this token (``ath``), that the holder of the subject consents.
        The child is a strict attenuation of the parent, decided by Cedar for the
        delegate with the chain depth in context, recorded as the parent's child.
        Every refusal is :class:`ExchangeRefused` with the RFC error; nothing is stored.
        ``facts`` is filled with what was verified so far (for the audit of a refusal)."""
        now = self._clock.now()
        url = self._settings.public_url + TOKEN_PATH
        cfg = self._settings.delegation
        if req.subject_token_type != ACCESS_TOKEN_TYPE:
            raise ExchangeRefused("invalid_request", "subject_token_type must be access_token")
        if req.requested_token_type not in (None, ACCESS_TOKEN_TYPE):
            raise ExchangeRefused("invalid_request", "only access tokens can be requested")
        if not req.actor_token or req.actor_token_type not in ACTOR_TOKEN_TYPES:
            raise ExchangeRefused(
                "invalid_request", "an actor_token (jwt or id_token) identifying the delegate"
            )
        # 1. the subject: one of our credentials, with its holder's consent
        try:
            parent = await self._verify_own(req.subject_token)
        except InvalidToken as exc:
            raise ExchangeRefused(
                "invalid_request", "the subject_token is not a valid credential", exc.internal
            ) from None
        facts.update(
            owner=parent.owner_id,
            task=parent.task_id,
            intent=parent.purpose,
            jti=parent.jti,
            tool=parent.tool,
            tier=parent.tier.value,
            txn=parent.txn or parent.task_id,
            exception_id=parent.exception,
        )
        try:
            consent = verify_dpop_proof(
                req.subject_dpop or "",
                method="POST",
                url=url,
                now=now,
                algorithms=self._settings.dpop.algorithms,
                iat_window=self._iat_window,
                access_token=req.subject_token,
                expected_jkt=parent.jkt,
            )
        except InvalidDPoPProof as exc:
            raise ExchangeRefused(
                "invalid_request",
                "the subject_token is DPoP-bound: subject_dpop must prove its key",
                exc.internal,
            ) from None
        # A holder that bound its consent to one narrowing consented to that one only: a
        # delegate cannot edit what it was handed (wider actions, fewer constraints).
        if consent.narrowing is not None and not secrets.compare_digest(
            consent.narrowing, narrowing_digest(req.narrowing)
        ):
            raise ExchangeRefused(
                "invalid_grant",
                "the request is not the narrowing the subject token's holder consented to",
            )
        # 2. the delegate: its identity and the key its credential will be bound to
        try:
            actor = await self._identity.verify(req.actor_token)
        except IdentityProviderUnavailable:
            raise
        except TaskboundError as exc:
            raise ExchangeRefused(
                "invalid_request", "the actor_token is not a valid identity", exc.internal
            ) from None
        if len(req.dpop_headers) != 1:
            raise ExchangeRefused("invalid_dpop_proof", "exactly one DPoP proof is required")
        try:
            proof = verify_dpop_proof(
                req.dpop_headers[0],
                method="POST",
                url=url,
                now=now,
                algorithms=self._settings.dpop.algorithms,
                iat_window=self._iat_window,
            )
        except InvalidDPoPProof as exc:
            raise ExchangeRefused(
                "invalid_dpop_proof", "the DPoP proof is not valid", exc.internal
            ) from None
        facts["agent"] = actor.spiffe_id
        delegate = await self._storage.get_agent(actor.spiffe_id)
        if delegate is None or delegate.state is not AgentState.ACTIVE:
            raise ExchangeRefused(
                "invalid_request",
                "the actor is not an active agent",
                f"actor {actor.spiffe_id} is {'unknown' if delegate is None else delegate.state}",
            )
        # 3. the chain: every credential and agent in it still live
        record = await self._storage.get_credential(parent.jti)
        task = await self._storage.get_task(parent.task_id)
        inputs = await self._storage.load_grant_inputs(
            parent.subject, parent.owner_id, [parent.tool]
        )
        tool = inputs.tools.get(parent.tool)
        if (
            record is None
            or not record.live_at(now)
            or record.agent_id != parent.holder
            or record.jkt != parent.jkt
            or record.parent_jti != (parent.parents[0] if parent.parents else None)
            or task is None
            or task.state_at(now) is not TaskState.ACTIVE
            or inputs.agent is None
            or inputs.agent.state is not AgentState.ACTIVE
            or inputs.owner is None
            or inputs.owner.disabled
            or tool is None
            or tool.audience != parent.audience
        ):
            raise ExchangeRefused(
                "invalid_request", "the subject_token is not active", "subject not live"
            )
        for ancestor in parent.parents:
            found = await self._storage.get_credential(ancestor)
            if found is None or not found.live_at(now):
                raise ExchangeRefused(
                    "invalid_request", "the subject_token is not active", f"{ancestor} not live"
                )
        chain = [inputs.agent]
        for acting in parent.actors:
            agent = await self._storage.get_agent(acting)
            if agent is None or agent.state is not AgentState.ACTIVE:
                raise ExchangeRefused(
                    "invalid_request", "the subject_token is not active", f"{acting} not active"
                )
            acting_owner = await self._storage.get_owner(agent.owner_id)
            if acting_owner is None or acting_owner.disabled:
                raise ExchangeRefused(
                    "invalid_request",
                    "the subject_token is not active",
                    f"the owner of {acting} is disabled",
                )
            chain.append(agent)
        delegate_owner = await self._storage.get_owner(delegate.owner_id)
        if delegate_owner is None or delegate_owner.disabled:
            raise ExchangeRefused(
                "invalid_request", "the actor's owner is disabled", f"owner {delegate.owner_id}"
            )
        # 4. narrow, then let policy decide for the delegate
        child = narrow(parent, req.narrowing, actor=actor.spiffe_id, max_depth=cfg.max_depth)
        exceptions = await self._exceptions(delegate.spiffe_id, now)
        decision = self._decider.decide(
            GrantRequest(
                agent=delegate,
                owner=inputs.owner,
                owner_id=parent.owner_id,
                purpose=parent.purpose,
                constraints=child.constraints,
                scopes=(ScopeRequest(parent.tool, parent.tier, child.actions),),
                ttl=max(parent.expires_at - now, timedelta(seconds=1)),
                tools=inputs.tools,
                now=now,
                delegation_depth=child.depth,
                others=tuple(chain),
                other_owners=(delegate_owner,),
                exceptions=tuple(exceptions.values()),
                inherited_exception=parent.exception,
            )
        )
        if decision.refusal is not None or not decision.granted:
            why = (
                decision.refusal.reason
                if decision.refusal is not None
                else "; ".join(d.reason for d in decision.denied)
            )
            raise ExchangeRefused("invalid_scope", "policy does not allow this delegation", why)
        (grant,) = decision.granted
        actions = tuple(a for a in child.actions if a in set(grant.actions))
        if not actions or grant.tool != parent.tool or grant.tier is not parent.tier:
            raise ExchangeRefused("invalid_scope", "policy does not allow this delegation")
        # 5. mint, bound to the delegate's key, and record it under its parent
        if await self._replay.seen(
            f"dpop:{consent.jkt}:{consent.jti}",
            consent.issued_at + self._iat_window + self._leeway,
            now,
        ) or await self._replay.seen(
            f"dpop:{proof.jkt}:{proof.jti}", proof.issued_at + self._iat_window + self._leeway, now
        ):
            raise ExchangeRefused("invalid_dpop_proof", "a DPoP proof was used before")
        expires = min(parent.expires_at, now + self._cred_cap)
        if grant.exception is not None:
            expires = min(expires, exceptions[grant.exception].ended_at_or_expiry())
        claims = CredentialClaims(
            issuer=self._settings.issuer,
            subject=parent.subject,
            audience=parent.audience,
            client_id=actor.spiffe_id,
            jti=self._ids("cred"),
            issued_at=now,
            not_before=now,
            expires_at=expires,
            task_id=parent.task_id,
            owner_id=parent.owner_id,
            purpose=parent.purpose,
            constraints=child.constraints,
            tool=parent.tool,
            tier=parent.tier,
            actions=actions,
            jkt=proof.jkt,
            txn=parent.txn or parent.task_id,
            actors=(actor.spiffe_id, *parent.actors),
            parents=(parent.jti, *parent.parents),
            # A parent that named who may act passes the restriction on: that actor is now
            # in the chain, so the child can be delegated no further.
            may_act=parent.may_act,
            # Relying on the delegate's own exception, or on the parent's (inherited: the
            # child's authority comes from it, and is flagged like the parent's).
            exception=grant.exception or parent.exception,
        )
        try:
            issued = self._sign(claims)
        except InvalidRequest:
            raise ExchangeRefused(
                "invalid_request", "the delegated credential would be too large"
            ) from None
        if not await self._storage.add_derived_credential(
            issued.record, now, single_use=cfg.single_use
        ):
            raise ExchangeRefused(
                "invalid_grant" if cfg.single_use and record.live_at(now) else "invalid_request",
                "the subject_token was already exchanged or is no longer active",
            )
        log.info(
            "credential delegated",
            extra={
                "event": "credential.exchanged",
                "task_id": parent.task_id,
                "parent": parent.jti,
                "jti": claims.jti,
                "actor": actor.spiffe_id,
                "depth": child.depth,
                "actions": list(actions),
            },
        )
        return Exchanged(issued, claims, tuple(decision.determined_by))

    # --- RFC 7662 / RFC 7009 -----------------------------------------------------------

    async def _verify_own(self, token: str) -> CredentialClaims:
        audiences = {t.audience for t in await self._storage.list_tools()}
        kwargs: dict[str, Any] = {
            "issuer": self._settings.issuer,
            "audiences": audiences,
            "algorithms": (self._keys.signer().alg,),
            "now": self._clock.now(),
            "leeway": self._leeway,
        }
        try:
            return verify_credential(token, keys=self._keys.keyring(), **kwargs)
        except InvalidToken:
            # A rotation made by another replica may have brought a key we do not hold yet;
            # only a well-formed token naming an unknown kid is worth a (rate-limited) reload.
            if not await self._keys.reload_for_unknown_kid(unverified_kid(token)):
                raise
            return verify_credential(token, keys=self._keys.keyring(), **kwargs)

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 §2.2: ``active`` only when the credential verifies and it, its task and
        its agent are all live now. Nothing about an inactive token is revealed."""
        inactive: dict[str, Any] = {"active": False}
        try:
            claims = await self._verify_own(token)
        except InvalidToken:
            return inactive
        now = self._clock.now()
        record = await self._storage.get_credential(claims.jti)
        task = await self._storage.get_task(claims.task_id)
        inputs = await self._storage.load_grant_inputs(
            claims.subject, claims.owner_id, [claims.tool]
        )
        tool = inputs.tools.get(claims.tool)
        if (
            record is None
            or not record.live_at(now)
            # The record and the token must describe the same credential, and the token's
            # audience must still be its own tool's: a credential never moves to another.
            or (record.task_id, record.tool, record.tier, record.jkt)
            != (claims.task_id, claims.tool, claims.tier, claims.jkt)
            or tool is None
            or tool.audience != claims.audience
            or task is None
            or task.state_at(now) is not TaskState.ACTIVE
            or inputs.agent is None
            or inputs.agent.state is not AgentState.ACTIVE
            or inputs.owner is None
            or inputs.owner.disabled
        ):
            return inactive
        out: dict[str, Any] = {
            "active": True,
            "iss": claims.issuer,
            "sub": claims.subject,
            "aud": claims.audience,
            "client_id": claims.client_id,
            "jti": claims.jti,
            "iat": to_epoch(claims.issued_at),
            "nbf": to_epoch(claims.not_before),
            "exp": to_epoch(claims.expires_at),
            "scope": f"{claims.tool}:{claims.tier.value}",
            "token_type": "DPoP",
            "cnf": {"jkt": claims.jkt},
            "tsk": claims.task_id,
            "owner": claims.owner_id,
            "intent": claims.purpose,
            "authorization_details": [
                {
                    "type": "taskbound_tool",
                    "tool": claims.tool,
                    "tier": claims.tier.value,
                    "actions": list(claims.actions),
                    "constraints": dict(claims.constraints),
                }
            ],
        }
        if claims.txn is not None:
            out["txn"] = claims.txn
        if claims.actors:
            # RFC 8693 §4.1: the current actor outermost, earlier ones nested.
            act: dict[str, Any] | None = None
            for actor in reversed(claims.actors):
                act = {"sub": actor} if act is None else {"sub": actor, "act": act}
            out["act"] = act
        return out

    async def revoke_token(self, token: str, reason: str) -> bool:
        """RFC 7009 §2.1: revoke a credential presented by anyone holding it. Unknown or
        invalid tokens are not an error (§2.2); returns whether something was revoked."""
        try:
            claims = await self._verify_own(token)
        except InvalidToken:
            return False
        return await self.revoke_credential(claims.jti, reason, cause="token holder")

    async def revoke_credential(self, jti: str, reason: str, *, cause: str) -> bool:
        """Revoke one credential and everything derived from it. Idempotent: False when it
        was unknown, expired or already revoked. A revocation is a ``credential.revoked``
        record, durable before this returns."""
        revoked = await self._storage.revoke_credential(jti, reason, self._clock.now(), cause=cause)
        if revoked:
            self._events.publish(Change.CREDENTIAL_REVOKED, jti)
            await self._audit_revoked(jti, reason, cause)
        log.info(
            "credential revoked",
            extra={"event": "credential.revoked", "jti": jti, "changed": revoked, "cause": cause},
        )
        return revoked

    async def _audit_revoked(self, jti: str, reason: str, cause: str) -> None:
        record = await self._storage.get_credential(jti)
        task = await self._storage.get_task(record.task_id) if record is not None else None
        await self._storage.append_audit(
            AuditEvent(
                time=self._clock.now(),
                event="credential.revoked",
                decision=INFO,
                agent=record.agent_id if record is not None else None,
                owner=task.owner_id if task is not None else None,
                task=task.id if task is not None else None,
                intent=task.purpose if task is not None else None,
                jti=jti,
                tool=record.tool if record is not None else None,
                tier=record.tier.value if record is not None else None,
                detail=f"{clip(reason)}; every credential derived from it revoked too "
                f"(by {clip(cause)})",
                txn=task.id if task is not None else None,
                exception_id=record.exception_id if record is not None else None,
            )
        )

    # --- housekeeping ------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """Expire tasks past their TTL (revoking their credentials; a ``task.ended``
        record each) and prune keys past their overlap. Safe to run in every replica at
        once: a task is expired, and recorded, by one of them."""
        expired = await self._storage.expire_tasks(self._clock.now())
        for task_id in expired:
            self._events.publish(Change.TASK_ENDED, task_id)
            log.info("task expired", extra={"event": "task.expired", "task_id": task_id})
        if expired:
            await self._audit_expired(expired)
        await self._keys.prune()
        # Entries past their own expiry protect nothing (the leeway keeps them a little
        # longer than any verifier accepts the credentials they name).
        await self._storage.prune_revocations(self._clock.now() - self._leeway)
        return expired

    async def _audit_expired(self, task_ids: list[str]) -> None:
        events = []
        for task_id in task_ids:
            task = await self._storage.get_task(task_id)
            if task is not None:
                detail = (
                    f"expired: its time ran out at {task.expires_at.isoformat()}; its "
                    "credentials and every credential derived from them revoked (by expiry)"
                )
                events.append(self._task_event(task, "task.ended", detail))
        try:
            await self._storage.append_audits(events)
        except Exception:
            # The expiry is committed and the next sweep will not see these tasks again:
            # name them in the log, where an operator can still find them.
            log.exception(
                "the audit records of expired tasks could not be written",
                extra={"event": "task.expired_unrecorded", "task_ids": task_ids},
            )
            raise

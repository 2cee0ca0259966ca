"""The broker's ASGI application (DESIGN.md §9): agent endpoints, OAuth endpoints, the
admin API and operational endpoints. Handlers only adapt HTTP to the services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from taskbound.api.http import (
    LimitsMiddleware,
    bearer,
    flag,
    json_response,
    log_refusal,
    oauth_error,
    problem,
    read_form,
    read_form_lists,
    read_json,
)
from taskbound.config import Settings
from taskbound.core import audit as audit_report
from taskbound.core.approvals import SIGNATURE_HEADER
from taskbound.core.breakglass import BreakGlass
from taskbound.core.clock import to_epoch
from taskbound.core.exchange import ACCESS_TOKEN_TYPE, GRANT_TYPE, ExchangeRefused, Narrowing
from taskbound.core.grant import ScopeRequest
from taskbound.core.identity import mint_jwt_svid, parse_spiffe_id
from taskbound.core.model import (
    AgentState,
    Approval,
    ApprovalState,
    ApprovalVote,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    Revocation,
    Scope,
    Task,
    TaskFilter,
    TaskState,
    Tier,
)
from taskbound.core.signals import MAX_SET_LENGTH, SignalRejected
from taskbound.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    StorageError,
    TaskboundError,
    UnsupportedGrantType,
)
from taskbound.gateway.app import Gateway, gateway_routes
from taskbound.service.admin import authenticate_admin
from taskbound.service.audit_chain import ocsf
from taskbound.service.broker import (
    AgentCaller,
    ExchangeRequest,
    IssuedCredential,
    StartTaskRequest,
    new_id,
)
from taskbound.service.registry import (
    AgentSpec,
    OwnerSpec,
    RegistryDocument,
    ToolSpec,
    agent_view,
    owner_view,
    tool_view,
)
from taskbound.service.report_html import html_headers, render_report
from taskbound.service.report_request import parse_report_request, run_report
from taskbound.service.runtime import Services, open_services
from taskbound.service.signals import PUSH_DELIVERY_METHOD, rejection_body
from taskbound.ui.app import ui_mount

log = logging.getLogger("taskbound.api")

BROKER_PREFIXES = (
    "/v1/",
    "/oauth/",
    "/.well-known/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/ui/",
)

# --- request bodies ----------------------------------------------------------------------

# Constraints travel inside every credential: keep them small and flat.
ShortText = Annotated[str, Field(max_length=256)]
ConstraintValue = ShortText | int | bool | Annotated[list[ShortText], Field(max_length=32)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntentBody(_Body):
    purpose: str = Field(min_length=1, max_length=1000)
    constraints: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], ConstraintValue
    ] = Field(default_factory=dict, max_length=32)


class ScopeBody(_Body):
    tool: str = Field(min_length=1, max_length=64)
    tier: Tier
    actions: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=256)


class StartTaskBody(_Body):
    intent: IntentBody
    on_behalf_of: str = Field(min_length=1, max_length=64)
    scopes: list[ScopeBody] = Field(min_length=1, max_length=32)
    ttl_seconds: int = Field(ge=10)
    # RFC 8693 §4.4: the one agent (SPIFFE ID) the task's credentials may be delegated to.
    may_act: str | None = Field(None, max_length=2048)


class CredentialBody(_Body):
    tool: str = Field(min_length=1, max_length=64)
    tier: Tier


class EndTaskBody(_Body):
    reason: str = Field("", max_length=500)


# The agent operations of `POST /v1/admin/agents/{spiffe_id}/{verb}`.
AGENT_VERBS = {
    "suspend": AgentState.SUSPENDED,
    "quarantine": AgentState.QUARANTINED,
    "resume": AgentState.ACTIVE,
    "retire": AgentState.RETIRED,
}


class VoteBody(_Body):
    # Until people sign in (the web UI), the approver is named here, beside the admin token.
    as_owner: str = Field("", max_length=256)
    reason: str = Field("", max_length=1000)


# The operations of `POST /v1/admin/approvals/{id}/{verb}`.
APPROVAL_VERBS = {"approve": True, "deny": False}
# The longest long poll of `GET /v1/approvals/{id}?wait=N`.
MAX_APPROVAL_WAIT = 30.0


class BreakGlassScopeBody(_Body):
    tool: str = Field(min_length=1, max_length=64)
    tier: Tier


class BreakGlassBody(_Body):
    agent: str = Field(min_length=1, max_length=2048)
    scopes: list[BreakGlassScopeBody] = Field(min_length=1, max_length=32)
    justification: str = Field("", max_length=4000)
    # Seconds from now; breakglass.default_duration_seconds when absent.
    expires_in_seconds: int | None = Field(None, ge=1, le=90 * 24 * 3600)
    # The granting admin's owner id (an owner with the admin role).
    as_owner: str = Field("", max_length=256)


class BreakGlassEndBody(_Body):
    as_owner: str = Field("", max_length=256)
    reason: str = Field("", max_length=1000)


class BreakGlassReviewBody(_Body):
    as_owner: str = Field("", max_length=256)
    note: str = Field("", max_length=4000)


class MintIdentityBody(_Body):
    spiffe_id: str = Field(max_length=2048)
    ttl_seconds: int = Field(300, ge=10, le=3600)
    audience: str | None = Field(None, max_length=1024)


# --- presentation ------------------------------------------------------------------------


def task_view(task: Task, now: Any) -> dict[str, Any]:
    return {
        "id": task.id,
        "state": task.state_at(now).value,
        "agent": task.agent_id,
        "on_behalf_of": task.owner_id,
        "intent": {"purpose": task.purpose, "constraints": dict(task.constraints)},
        "created_at": task.created_at.isoformat(),
        "expires_at": task.expires_at.isoformat(),
        "ended_at": task.ended_at.isoformat() if task.ended_at else None,
        "end_reason": task.end_reason,
        "may_act": task.may_act,
        "granted": [
            {"tool": g.tool, "tier": g.tier.value, "actions": list(g.actions)}
            | ({"exception": g.exception} if g.exception is not None else {})
            for g in task.granted
        ],
        "denied": [
            {"tool": d.tool, "tier": d.tier, "code": d.code, "reason": d.reason}
            for d in task.denied
        ],
    }


def credential_view(c: IssuedCredential) -> dict[str, Any]:
    return {
        "access_token": c.access_token,
        "token_type": "DPoP",
        "expires_in": c.expires_in,
        "tool": c.record.tool,
        "tier": c.record.tier.value,
        "scope": c.scope,
        "actions": list(c.record.actions),
        "jti": c.record.jti,
    } | ({"exception": c.record.exception_id} if c.record.exception_id is not None else {})


def credential_record_view(c: CredentialRecord) -> dict[str, Any]:
    return {
        "jti": c.jti,
        "tool": c.tool,
        "tier": c.tier.value,
        "actions": list(c.actions),
        "kid": c.kid,
        "issued_at": c.issued_at.isoformat(),
        "expires_at": c.expires_at.isoformat(),
        "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None,
        "revoke_reason": c.revoke_reason,
        "parent_jti": c.parent_jti,
        "exception": c.exception_id,
    }


def approval_view(
    a: Approval, now: Any, *, full: bool, votes: list[ApprovalVote] | None = None
) -> dict[str, Any]:
    """An approval as its agent sees it, or (``full``) as an admin or approver does: the
    request summary, the owner, the intent, who decided and every vote."""

    def at(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    out: dict[str, Any] = {
        "id": a.id,
        "state": a.state_at(now).value,
        "task": a.task_id,
        "agent": a.agent_id,
        "tool": a.tool,
        "action": a.action,
        "tier": a.tier.value,
        "target": a.target,
        "argument_digest": a.argument_digest,
        "action_digest": a.action_digest,
        "required": a.required,
        "approvals": a.approvals,
        "created_at": at(a.created_at),
        "expires_at": at(a.expires_at),
        "decided_at": at(a.decided_at),
        "reason": a.reason,
        "use_by": at(a.use_by),
        "consumed_at": at(a.consumed_at),
    }
    if full:
        out["owner"] = a.owner_id
        out["intent"] = a.intent
        out["summary"] = dict(a.summary)
        out["decided_by"] = a.decided_by
        out["votes"] = [
            {
                "approver": v.approver,
                "approve": v.approve,
                "reason": v.reason,
                "voted_at": at(v.voted_at),
            }
            for v in votes or ()
        ]
    return out


def breakglass_view(bg: BreakGlass, state: str) -> dict[str, Any]:
    def at(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": bg.id,
        "state": state,
        "agent": bg.agent_id,
        "scopes": [{"tool": s.tool, "tier": s.tier.value} for s in sorted(bg.scopes)],
        "justification": bg.justification,
        "granted_by": bg.granted_by,
        "created_at": at(bg.created_at),
        "expires_at": at(bg.expires_at),
        "ended_at": at(bg.ended_at),
        "ended_by": bg.ended_by,
        "reviewed_by": bg.reviewed_by,
        "reviewed_at": at(bg.reviewed_at),
        "review_note": bg.review_note,
    }


def audit_view(seq: int, e: AuditEvent) -> dict[str, Any]:
    """One audit record as the admin API shows it."""
    return {
        "seq": seq,
        "time": e.time.isoformat(),
        "event": e.event,
        "decision": e.decision,
        "code": e.code,
        "agent": e.agent,
        "owner": e.owner,
        "task": e.task,
        "intent": e.intent,
        "jti": e.jti,
        "txn": e.txn,
        "tool": e.tool,
        "action": e.action,
        "tier": e.tier,
        "argument_digest": e.argument_digest,
        "policies": list(e.policies),
        "policy_version": e.policy_version,
        "latency_ms": e.latency_ms,
        "upstream_status": e.upstream_status,
        "exception": e.exception_id,
        "detail": e.detail,
        # The call's recorded (redacted) arguments; null when none were recorded.
        "arguments": e.arguments,
    }


# The equality filters of `GET /v1/admin/audit`.
AUDIT_FILTERS = ("agent", "task", "owner", "tool", "decision", "txn", "exception")


def report_view(report: audit_report.Report) -> dict[str, Any]:
    problem = report.problem
    return {
        "ok": report.ok,
        "records": report.records,
        "checkpoints": report.checkpoints,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "head": report.head,
        "problem": None
        if problem is None
        else {"kind": problem.kind, "seq": problem.seq, "detail": problem.detail},
    }


def revocation_view(r: Revocation) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "kind": r.kind.value,
        "subject": r.subject,
        "time": r.time.isoformat(),
        "cause": r.cause,
        "reason": r.reason,
        "expires_at": r.expires_at.isoformat() if r.expires_at else None,
        "state": r.state,
        "agent": r.agent_id,
        "task": r.task_id,
    }


# --- metrics -----------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "taskbound_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskbound_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "taskbound_refusals_total", "Refused requests by code", ["code"], registry=self.registry
        )
        self.tasks_started = Counter(
            "taskbound_tasks_started_total", "Tasks started", registry=self.registry
        )
        self.credentials_issued = Counter(
            "taskbound_credentials_issued_total", "Credentials issued", registry=self.registry
        )
        self.tasks_ended = Counter(
            "taskbound_tasks_ended_total", "Tasks ended by state", ["state"], registry=self.registry
        )
        self.gateway_decisions = Counter(
            "taskbound_gateway_decisions_total",
            "Gateway decisions by outcome and code",
            ["outcome", "code"],
            registry=self.registry,
        )
        self.gateway_latency = Histogram(
            "taskbound_gateway_check_seconds",
            "Gateway time from request to audit record (checks, decision, upstream headers)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )


class FeedCollector(Collector):
    """The revocation feed's health, read at scrape time (DESIGN.md §3 flow 7)."""

    def __init__(self, services: Callable[[], Services | None]) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        services = self._services()
        if services is None:
            return
        feed = services.revocations
        age = feed.age()
        yield GaugeMetricFamily(
            "taskbound_revocation_feed_age_seconds",
            "Seconds since this process last confirmed its revocation feed",
            value=float("inf") if age is None else age,
        )
        yield GaugeMetricFamily(
            "taskbound_revocation_feed_stale",
            "1 while gateway calls are refused because the revocation feed is stale",
            value=0.0 if feed.stale() is None else 1.0,
        )
        yield GaugeMetricFamily(
            "taskbound_revocation_seq", "Last revocation log entry applied", value=feed.state.seq
        )
        yield GaugeMetricFamily(
            "taskbound_revocation_entries",
            "Revocations held in memory (credentials, tasks, agents, owners, keys)",
            value=len(feed.state),
        )
        yield CounterMetricFamily(
            "taskbound_revocations_applied",
            "Revocation log entries applied since start",
            value=feed.applied,
        )
        yield CounterMetricFamily(
            "taskbound_revocation_feed_failures",
            "Failed connections or catch-ups of the revocation feed (retried with backoff)",
            value=feed.failures,
        )
        sender = services.signal_sender
        if sender is not None:
            pushed = CounterMetricFamily(
                "taskbound_signals_pushed",
                "Security Event Tokens pushed to receivers, by result",
                labels=["result"],
            )
            pushed.add_metric(["delivered"], sender.delivered)
            pushed.add_metric(["rejected"], sender.rejected)
            pushed.add_metric(["failed"], sender.failures)
            yield pushed
        receiver = services.signal_receiver
        if receiver is not None:
            received = CounterMetricFamily(
                "taskbound_signals_received",
                "Security Event Tokens received from transmitters, by result",
                labels=["result"],
            )
            received.add_metric(["accepted"], receiver.accepted)
            received.add_metric(["refused"], receiver.refused)
            yield received


Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    sweep: bool = True,
    broker: bool = True,
) -> Starlette:
    """The ASGI app. Services are opened in the lifespan unless given (tests)."""
    metrics = Metrics()
    state: dict[str, Services] = {} if services is None else {"services": services}
    metrics.registry.register(FeedCollector(lambda: state.get("services")))
    overdue = Gauge(
        "taskbound_breakglass_reviews_overdue",
        "Ended break-glass exceptions waiting for review longer than breakglass.review_within",
        registry=metrics.registry,
    )
    gateways: list[Gateway] = []

    def svc() -> Services:
        return state["services"]

    def gateway() -> Gateway:
        if not gateways:
            gateways.append(Gateway(svc(), metrics))
        return gateways[0]

    def route(path: str, *, methods: list[str], oauth: bool = False) -> Callable[[Handler], Route]:
        def wrap(fn: Handler) -> Route:
            async def endpoint(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    response = await fn(request)
                except TaskboundError as err:
                    log_refusal(request, err)
                    metrics.refusals.labels(err.code).inc()
                    response = oauth_error(err) if oauth else problem(err)
                except Exception as exc:
                    log.exception("unhandled error", extra={"path": request.url.path})
                    err2: TaskboundError = (
                        StorageError() if "sqlalchemy" in type(exc).__module__ else TaskboundError()
                    )
                    metrics.refusals.labels(err2.code).inc()
                    response = oauth_error(err2) if oauth else problem(err2)
                metrics.requests.labels(path, str(response.status_code)).inc()
                metrics.latency.labels(path).observe(time.perf_counter() - started)
                return response

            return Route(path, endpoint, methods=methods)

        return wrap

    async def admin(request: Request) -> str:
        """Authenticate an admin; the cause recorded with what the admin changes."""
        token = await authenticate_admin(svc().storage, bearer(request))
        return f"admin:{token.id}"

    async def agent_caller(request: Request) -> AgentCaller:
        return await svc().broker.authenticate_agent(
            identity_token=bearer(request),
            dpop_headers=request.headers.getlist("dpop"),
            method=request.method,
            path=request.url.path,
        )

    # --- discovery and keys ------------------------------------------------------------

    @route("/.well-known/oauth-authorization-server", methods=["GET"])
    async def metadata(request: Request) -> Response:
        base = settings.public_url
        return json_response(
            {
                "issuer": settings.issuer,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "introspection_endpoint": f"{base}/oauth/introspect",
                "introspection_endpoint_auth_methods_supported": ["bearer"],
                "revocation_endpoint": f"{base}/oauth/revoke",
                "revocation_endpoint_auth_methods_supported": ["none"],
                "dpop_signing_alg_values_supported": list(settings.dpop.algorithms),
                "authorization_details_types_supported": ["taskbound_tool"],
                "scopes_supported": [],
                "grant_types_supported": [GRANT_TYPE],
                "token_endpoint": f"{base}/oauth/token",
                "token_endpoint_auth_methods_supported": ["none"],
                "response_types_supported": [],
                "taskbound_task_endpoint": f"{base}/v1/tasks",
            }
        )

    @route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(request: Request) -> Response:
        return JSONResponse(
            svc().keys.jwks(KeyPurpose.CREDENTIALS),
            headers={"Cache-Control": "public, max-age=60"},
        )

    @route("/.well-known/txn-jwks.json", methods=["GET"])
    async def txn_jwks(request: Request) -> Response:
        """The keys of the Txn-Tokens the gateway sends to tools (docs/gateway.md)."""
        return JSONResponse(
            svc().keys.jwks(KeyPurpose.TRANSACTION),
            headers={"Cache-Control": "public, max-age=60"},
        )

    # --- Shared Signals (docs/signals.md) ----------------------------------------------

    @route("/.well-known/ssf-configuration", methods=["GET"])
    async def ssf_configuration(request: Request) -> Response:
        """SSF 1.0 §7.1 transmitter metadata; only when there are receivers to push to."""
        if not settings.signals.receivers:
            raise NotFound("this server transmits no Shared Signals")
        return json_response(
            {
                "spec_version": "1_0",
                "issuer": settings.issuer,
                "jwks_uri": f"{settings.public_url}/.well-known/ssf-jwks.json",
                "delivery_methods_supported": [PUSH_DELIVERY_METHOD],
            }
        )

    @route("/.well-known/ssf-jwks.json", methods=["GET"])
    async def ssf_jwks(request: Request) -> Response:
        """The keys the SETs this server sends are signed with (active and retiring)."""
        return JSONResponse(
            svc().keys.jwks(KeyPurpose.SIGNALS),
            headers={"Cache-Control": "public, max-age=60"},
        )

    @route("/v1/signals/{transmitter}", methods=["POST"])
    async def receive_signal(request: Request) -> Response:
        """RFC 8935 push endpoint for a configured transmitter: 202 and no body when the
        SET is accepted, 400 ``{"err", "description"}`` (RFC 8935 §2.3) when refused."""
        receiver = svc().signal_receiver
        name = request.path_params["transmitter"]
        if receiver is None or not receiver.knows(name):
            raise NotFound("no such transmitter")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_SET_LENGTH:
                break  # enough to refuse it; the rest is never read
        try:
            await receiver.receive(
                name,
                bytes(body),
                content_type=request.headers.get("content-type"),
                authorization=request.headers.get("authorization"),
            )
        except SignalRejected as exc:
            return json_response(rejection_body(exc.err), 400, no_store=True)
        return Response(status_code=202)

    # --- agents: tasks and credentials -------------------------------------------------

    @route("/v1/tasks", methods=["POST"])
    async def start_task(request: Request) -> Response:
        caller = await agent_caller(request)
        body = await read_json(request, StartTaskBody)
        started = await svc().broker.start_task(
            caller,
            StartTaskRequest(
                purpose=body.intent.purpose,
                constraints=body.intent.constraints,
                on_behalf_of=body.on_behalf_of,
                scopes=_scopes(body.scopes),
                ttl_seconds=body.ttl_seconds,
                may_act=_spiffe_or_none(body.may_act),
            ),
        )
        metrics.tasks_started.inc()
        metrics.credentials_issued.inc(len(started.credentials))
        out = task_view(started.task, svc().clock.now())
        out["credentials"] = [credential_view(c) for c in started.credentials]
        return json_response(out, 201, no_store=True)

    @route("/v1/tasks/{task_id}/credentials", methods=["POST"])
    async def fresh_credential(request: Request) -> Response:
        caller = await agent_caller(request)
        body = await read_json(request, CredentialBody)
        issued = await svc().broker.issue_credential(
            caller, request.path_params["task_id"], body.tool, body.tier
        )
        metrics.credentials_issued.inc()
        return json_response(credential_view(issued), 201, no_store=True)

    async def task_caller_or_admin(request: Request) -> tuple[Task, str]:
        """The task for its own agent (identity + DPoP of the task's key) or an admin, and
        who that is (the cause recorded with a revocation)."""
        task_id = request.path_params["task_id"]
        token = bearer(request)
        if token is not None and token.startswith("tbat_"):
            cause = await admin(request)
            return await svc().broker.get_task(task_id), cause
        caller = await agent_caller(request)
        return await svc().broker.task_for_agent(caller, task_id), "agent"

    @route("/v1/approvals/{approval_id}/acknowledge", methods=["POST"])
    async def acknowledge_approval(request: Request) -> Response:
        """A decision relayed by the chat system the approval webhook notified, signed with
        the webhook secret (``approvals.webhook_decisions``); forged ones are refused."""
        approvals = svc().approvals
        decided = await approvals.acknowledge(
            request.path_params["approval_id"],
            body=await request.body(),
            signature=request.headers.get(SIGNATURE_HEADER),
            replay=svc().replay,
        )
        votes = await approvals.votes(decided.id)
        return json_response(
            approval_view(decided, svc().clock.now(), full=True, votes=votes), no_store=True
        )

    @route("/v1/approvals/{approval_id}", methods=["GET"])
    async def get_approval(request: Request) -> Response:
        """The state of an approval, for the agent whose call it holds (identity + DPoP
        of its task's key; another task's approval is not found) or an admin (the full
        view). ``?wait=N`` (≤ 30 s) answers as soon as it is no longer pending."""
        raw_wait = request.query_params.get("wait")
        try:
            wait = float(raw_wait) if raw_wait is not None else 0.0
        except ValueError:
            raise InvalidRequest("wait must be a number of seconds") from None
        if not 0 <= wait <= MAX_APPROVAL_WAIT:
            raise InvalidRequest(f"wait must be between 0 and {MAX_APPROVAL_WAIT:g} seconds")
        approval_id = request.path_params["approval_id"]
        approvals = svc().approvals
        token = bearer(request)
        full = token is not None and token.startswith("tbat_")
        if full:
            await admin(request)
            approval = await approvals.get(approval_id)
        else:
            caller = await agent_caller(request)
            approval = await approvals.get(approval_id)
            try:
                await svc().broker.task_for_agent(caller, approval.task_id)
            except NotFound:
                raise NotFound("no such approval") from None
        if wait:
            approval = await approvals.wait(approval.id, wait)
        votes = await approvals.votes(approval.id) if full else None
        return json_response(
            approval_view(approval, svc().clock.now(), full=full, votes=votes), no_store=True
        )

    @route("/v1/tasks/{task_id}", methods=["GET"])
    async def get_task(request: Request) -> Response:
        task, _ = await task_caller_or_admin(request)
        return json_response(task_view(task, svc().clock.now()), no_store=True)

    def ender(state: TaskState) -> Handler:
        async def end(request: Request) -> Response:
            task, cause = await task_caller_or_admin(request)
            reason = "ended by the agent" if cause == "agent" else "ended by an admin"
            if await request.body():
                reason = (await read_json(request, EndTaskBody)).reason or reason
            ended, changed = await svc().broker.end_task(task.id, state, reason, cause=cause)
            if changed:
                metrics.tasks_ended.labels(state.value).inc()
            out = task_view(ended, svc().clock.now())
            out["changed"] = changed
            return json_response(out, no_store=True)

        return end

    complete = route("/v1/tasks/{task_id}/complete", methods=["POST"])(ender(TaskState.COMPLETED))
    cancel = route("/v1/tasks/{task_id}/cancel", methods=["POST"])(ender(TaskState.CANCELLED))

    # --- OAuth: RFC 7662 introspection, RFC 7009 revocation ------------------------------

    @route("/oauth/token", methods=["POST"], oauth=True)
    async def token(request: Request) -> Response:
        """RFC 8693 token exchange: delegate a task credential to another agent, narrower,
        bound to its key (docs/delegation.md). Every refusal is an RFC 6749 §5.2 error and
        is audited, malformed requests included."""
        started = time.perf_counter()
        facts: dict[str, Any] = {}

        async def audit(decision: str, code: str | None, **more: Any) -> None:
            await svc().storage.append_audit(
                AuditEvent(
                    time=svc().clock.now(),
                    event="token.exchange",
                    decision=decision,
                    code=code,
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    **facts,
                    **more,
                )
            )

        try:
            req = await _exchange_request(request)
            out = await svc().broker.exchange(req, facts)
        except ExchangeRefused as exc:
            log.warning(
                "token exchange refused",
                extra={
                    "event": "token.exchange_refused",
                    "error": exc.error,
                    "reason": exc.internal,
                },
            )
            metrics.refusals.labels(exc.error).inc()
            await audit("deny", exc.error, detail=exc.internal)
            return JSONResponse(
                {"error": exc.error, "error_description": exc.description},
                status_code=400,
                headers={"Cache-Control": "no-store"},
            )
        except Exception as exc:
            # Not decidable (an identity provider or the database down, a bug): refused by
            # the route's handler; recorded here when the audit store can still take it.
            code = exc.code if isinstance(exc, TaskboundError) else "internal_error"
            with contextlib.suppress(Exception):
                await audit("error", code, detail=getattr(exc, "internal", None) or repr(exc))
            raise
        c = out.claims
        facts["jti"] = c.jti
        facts["exception_id"] = c.exception
        await audit(
            "allow",
            None,
            policies=out.decided_by,
            detail=f"delegated from {c.parents[0]} to {c.holder} (depth {c.depth})",
        )
        metrics.credentials_issued.inc()
        return json_response(
            {
                "access_token": out.credential.access_token,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "DPoP",
                "expires_in": out.credential.expires_in,
                "scope": c.scope,
                "authorization_details": [
                    {
                        "type": "taskbound_tool",
                        "tool": c.tool,
                        "tier": c.tier.value,
                        "actions": list(c.actions),
                        "constraints": dict(c.constraints),
                    }
                ],
            },
            no_store=True,
        )

    @route("/oauth/introspect", methods=["POST"], oauth=True)
    async def introspect(request: Request) -> Response:
        await admin(request)
        form = await read_form(request)
        token = form.get("token")
        if not token:
            raise InvalidRequest("the token parameter is required")
        return json_response(await svc().broker.introspect(token), no_store=True)

    @route("/oauth/revoke", methods=["POST"], oauth=True)
    async def revoke(request: Request) -> Response:
        form = await read_form(request)
        token = form.get("token")
        if not token:
            raise InvalidRequest("the token parameter is required")
        await svc().broker.revoke_token(token, "revoked via RFC 7009 endpoint")
        return Response(status_code=200, headers={"Cache-Control": "no-store"})

    # --- admin API ---------------------------------------------------------------------

    @route("/v1/admin/owners", methods=["GET", "POST"])
    async def owners(request: Request) -> Response:
        cause = await admin(request)
        if request.method == "POST":
            spec = await read_json(request, OwnerSpec)
            owner = await svc().registry.create_owner(spec, cause=cause)
            return json_response(owner_view(owner), 201)
        return json_response({"owners": [owner_view(o) for o in await svc().storage.list_owners()]})

    @route("/v1/admin/owners/{owner_id}", methods=["GET", "PUT"])
    async def owner(request: Request) -> Response:
        cause = await admin(request)
        owner_id = request.path_params["owner_id"]
        if request.method == "PUT":
            spec = await read_json(request, OwnerSpec)
            if spec.id != owner_id:
                raise InvalidRequest("the body's id does not match the path")
            return json_response(owner_view(await svc().registry.update_owner(spec, cause=cause)))
        found = await svc().storage.get_owner(owner_id)
        if found is None:
            raise NotFound(f"no owner {owner_id!r}")
        return json_response(owner_view(found))

    @route("/v1/admin/tools", methods=["GET", "POST"])
    async def tools(request: Request) -> Response:
        cause = await admin(request)
        reg = svc().registry
        if request.method == "POST":
            tool = await reg.create_tool(await read_json(request, ToolSpec), cause=cause)
            return json_response(tool_view(tool, has_secret=await reg.has_secret(tool.id)), 201)
        listed = [
            tool_view(t, has_secret=await reg.has_secret(t.id))
            for t in await svc().storage.list_tools()
        ]
        return json_response({"tools": listed})

    @route("/v1/admin/tools/{tool_id}", methods=["GET", "PUT"])
    async def tool(request: Request) -> Response:
        cause = await admin(request)
        reg = svc().registry
        tool_id = request.path_params["tool_id"]
        if request.method == "PUT":
            spec = await read_json(request, ToolSpec)
            if spec.id != tool_id:
                raise InvalidRequest("the body's id does not match the path")
            updated = await reg.update_tool(spec, cause=cause)
            return json_response(tool_view(updated, has_secret=await reg.has_secret(tool_id)))
        found = await svc().storage.get_tool(tool_id)
        if found is None:
            raise NotFound(f"no tool {tool_id!r}")
        return json_response(tool_view(found, has_secret=await reg.has_secret(tool_id)))

    @route("/v1/admin/agents", methods=["GET", "POST"])
    async def agents(request: Request) -> Response:
        cause = await admin(request)
        if request.method == "POST":
            spec = await read_json(request, AgentSpec)
            agent = await svc().registry.create_agent(spec, cause=cause)
            return json_response(agent_view(agent), 201)
        owner_id = request.query_params.get("owner")
        return json_response(
            {"agents": [agent_view(a) for a in await svc().storage.list_agents(owner_id)]}
        )

    @route("/v1/admin/agents/{spiffe_id:path}", methods=["GET", "PUT"])
    async def agent(request: Request) -> Response:
        cause = await admin(request)
        spiffe_id = request.path_params["spiffe_id"]
        if request.method == "PUT":
            spec = await read_json(request, AgentSpec)
            if spec.spiffe_id != spiffe_id:
                raise InvalidRequest("the body's spiffe_id does not match the path")
            return json_response(agent_view(await svc().registry.update_agent(spec, cause=cause)))
        found = await svc().storage.get_agent(spiffe_id)
        if found is None:
            raise NotFound("no such agent")
        return json_response(agent_view(found))

    @route("/v1/admin/apply", methods=["POST"])
    async def apply(request: Request) -> Response:
        cause = await admin(request)
        doc = await read_json(request, RegistryDocument)
        dry_run = flag(request.query_params.get("dry_run"), "dry_run")
        result = await svc().registry.apply(doc, dry_run=dry_run, cause=cause)
        return json_response(
            {
                "dry_run": dry_run,
                "created": list(result.created),
                "updated": list(result.updated),
                "unchanged": list(result.unchanged),
            }
        )

    @route("/v1/admin/tasks", methods=["GET"])
    async def list_tasks(request: Request) -> Response:
        await admin(request)
        q = request.query_params
        try:
            flt = TaskFilter(
                agent_id=q.get("agent"),
                owner_id=q.get("owner"),
                state=TaskState(q["state"]) if "state" in q else None,
                limit=int(q.get("limit", "100")),
            )
        except ValueError:
            raise InvalidRequest("bad filter: state must be a task state, limit a number") from None
        if not 1 <= flt.limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        now = svc().clock.now()
        return json_response(
            {"tasks": [task_view(t, now) for t in await svc().storage.list_tasks(flt)]}
        )

    @route("/v1/admin/tasks/{task_id}/credentials", methods=["GET"])
    async def task_credentials(request: Request) -> Response:
        await admin(request)
        task = await svc().broker.get_task(request.path_params["task_id"])
        creds = await svc().broker.credentials_of(task.id)
        return json_response({"credentials": [credential_record_view(c) for c in creds]})

    @route("/v1/admin/tasks/{task_id}/revoke", methods=["POST"])
    async def revoke_task(request: Request) -> Response:
        cause = await admin(request)
        reason = "revoked by an admin"
        if await request.body():
            reason = (await read_json(request, EndTaskBody)).reason or reason
        ended, changed = await svc().broker.end_task(
            request.path_params["task_id"], TaskState.REVOKED, reason, cause=cause
        )
        if changed:
            metrics.tasks_ended.labels("revoked").inc()
        out = task_view(ended, svc().clock.now())
        out["changed"] = changed
        return json_response(out)

    @route("/v1/admin/credentials/{jti}/revoke", methods=["POST"])
    async def revoke_credential(request: Request) -> Response:
        """Revoke one credential and everything derived from it. Idempotent: ``changed``
        is false for a credential that is unknown, expired or already revoked."""
        cause = await admin(request)
        reason = "revoked by an admin"
        if await request.body():
            reason = (await read_json(request, EndTaskBody)).reason or reason
        jti = request.path_params["jti"]
        changed = await svc().broker.revoke_credential(jti, reason, cause=cause)
        return json_response({"jti": jti, "changed": changed})

    @route("/v1/admin/agents/{spiffe_id:path}/{verb}", methods=["POST"])
    async def agent_state(request: Request) -> Response:
        """suspend | quarantine | resume | retire an agent (DESIGN.md §2): leaving active
        revokes all the agent's live tasks at once. Idempotent; ``changed`` says whether
        anything changed. The reason is recorded with the revocations."""
        cause = await admin(request)
        verb = request.path_params["verb"]
        state = AGENT_VERBS.get(verb)
        if state is None:
            raise NotFound(f"no agent operation {verb!r}")
        reason = None
        if await request.body():
            reason = (await read_json(request, EndTaskBody)).reason
        agent, changed = await svc().registry.set_agent_state(
            request.path_params["spiffe_id"], state, cause=cause, reason=reason
        )
        out = agent_view(agent)
        out["changed"] = changed
        return json_response(out)

    @route("/v1/admin/keys", methods=["GET"])
    async def keys(request: Request) -> Response:
        await admin(request)
        return json_response(
            {
                "keys": [
                    {
                        "kid": k.kid,
                        "purpose": k.purpose.value,
                        "alg": k.alg,
                        "state": k.state.value,
                        "created_at": k.created_at.isoformat(),
                        "retire_after": k.retire_after.isoformat() if k.retire_after else None,
                    }
                    for k in await svc().keys.list()
                ]
            }
        )

    @route("/v1/admin/keys/rotate", methods=["POST"])
    async def rotate(request: Request) -> Response:
        cause = await admin(request)
        try:
            purpose = KeyPurpose(request.query_params.get("purpose", "credentials"))
        except ValueError:
            raise InvalidRequest(
                "purpose must be one of " + ", ".join(k.value for k in KeyPurpose)
            ) from None
        new = await svc().keys.rotate(purpose, cause=cause)
        return json_response({"kid": new.kid, "alg": new.alg, "purpose": new.purpose.value}, 201)

    @route("/v1/admin/keys/{kid}/withdraw", methods=["POST"])
    async def withdraw_key(request: Request) -> Response:
        """Withdraw a compromised signing key: unpublished, untrusted, everything it
        signed revoked, an active key replaced, all at once."""
        cause = await admin(request)
        reason = "signing key withdrawn"
        if await request.body():
            reason = (await read_json(request, EndTaskBody)).reason or reason
        kid = request.path_params["kid"]
        revoked = await svc().keys.withdraw(kid, cause=cause, reason=reason)
        # This process's gateway has it at once; if that fails, its feed catches up.
        with contextlib.suppress(Exception):
            await svc().revocations.sync()
        return json_response({"kid": kid, "credentials_revoked": revoked})

    @route("/v1/admin/revocations", methods=["GET"])
    async def revocations(request: Request) -> Response:
        """The revocation log after ``after`` (at most ``limit``), and this process's feed."""
        await admin(request)
        q = request.query_params
        try:
            after, limit = int(q.get("after", "0")), int(q.get("limit", "100"))
        except ValueError:
            raise InvalidRequest("after and limit must be numbers") from None
        if after < 0 or not 1 <= limit <= 1000:
            raise InvalidRequest("after must be >= 0 and limit between 1 and 1000")
        entries = await svc().storage.list_revocations(after=after, limit=limit)
        feed = svc().revocations
        return json_response(
            {
                "revocations": [revocation_view(e) for e in entries],
                "feed": {
                    "seq": feed.state.seq,
                    "age_seconds": feed.age(),
                    "stale": feed.stale() is not None,
                    "entries": len(feed.state),
                },
            }
        )

    @route("/v1/admin/approvals", methods=["GET"])
    async def list_approvals(request: Request) -> Response:
        """Approvals, newest first; ``?state=`` (as of now) and ``?limit=``."""
        await admin(request)
        q = request.query_params
        try:
            state = ApprovalState(q["state"]) if "state" in q else None
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise InvalidRequest(
                "bad filter: state must be an approval state, limit a number"
            ) from None
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        now = svc().clock.now()
        found = await svc().approvals.list_approvals(state, limit)
        return json_response(
            {"approvals": [approval_view(a, now, full=True) for a in found]}, no_store=True
        )

    @route("/v1/admin/approvals/{approval_id}/{verb}", methods=["POST"])
    async def decide_approval(request: Request) -> Response:
        """approve | deny one approval as the approver ``as_owner`` (an owner with the
        approver role; interim until people sign in). Every refusal is audited."""
        cause = await admin(request)
        verb = request.path_params["verb"]
        if verb not in APPROVAL_VERBS:
            raise NotFound(f"no approval operation {verb!r}")
        if not settings.approvals.admin_api_votes:
            raise Forbidden(
                "votes through the admin API are turned off: sign in to /ui/ to decide",
                internal="approvals.admin_api_votes is false",
            )
        body = await read_json(request, VoteBody)
        approvals = svc().approvals
        decided = await approvals.decide(
            request.path_params["approval_id"],
            as_owner=body.as_owner,
            approve=APPROVAL_VERBS[verb],
            reason=body.reason,
            cause=cause,
        )
        votes = await approvals.votes(decided.id)
        return json_response(
            approval_view(decided, svc().clock.now(), full=True, votes=votes), no_store=True
        )

    # --- the audit trail (docs/audit-format.md) ----------------------------------------

    @route("/v1/admin/audit", methods=["GET"])
    async def audit_list(request: Request) -> Response:
        """Audit records, filtered (agent, task, owner, tool, decision, txn, exception,
        since, until), oldest first after ``after``, or newest first with ``order=desc``."""
        await admin(request)
        q = request.query_params
        try:
            after, limit = int(q.get("after", "0")), int(q.get("limit", "100"))
            since = datetime.fromisoformat(q["since"]) if "since" in q else None
            until = datetime.fromisoformat(q["until"]) if "until" in q else None
        except ValueError:
            raise InvalidRequest(
                "after and limit must be numbers, since and until RFC 3339 times"
            ) from None
        if after < 0 or not 1 <= limit <= 1000:
            raise InvalidRequest("after must be >= 0 and limit between 1 and 1000")
        if any(t is not None and t.tzinfo is None for t in (since, until)):
            raise InvalidRequest("since and until need a time zone (e.g. Z)")
        if q.get("order", "asc") not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc")
        found = await svc().storage.list_audit(
            after=after,
            limit=limit,
            **{k: q.get(k) or None for k in AUDIT_FILTERS},
            since=since,
            until=until,
            descending=q.get("order") == "desc",
        )
        return json_response({"records": [audit_view(seq, e) for seq, e in found]})

    @route("/v1/admin/audit/export", methods=["GET"])
    async def audit_export(request: Request) -> Response:
        """The chain as JSON Lines (records with their links, then the checkpoints) or as
        OCSF events, one per line, streamed (``?format=jsonl|ocsf``, ``?after=``)."""
        await admin(request)
        q = request.query_params
        fmt = q.get("format", "jsonl")
        if fmt not in ("jsonl", "ocsf"):
            raise InvalidRequest("format must be jsonl or ocsf")
        try:
            after = int(q.get("after", "0"))
        except ValueError:
            raise InvalidRequest("after must be a number") from None
        if after < 0:
            raise InvalidRequest("after must be >= 0")
        chain = svc().audit

        async def lines() -> AsyncIterator[bytes]:
            last = after
            async for record in chain.records(after):
                last = record.seq
                line = record.line() if fmt == "jsonl" else ocsf(record)
                yield (json.dumps(line, separators=(",", ":")) + "\n").encode()
            if fmt == "jsonl":
                # Only checkpoints of records in this export: one signed after the last page
                # was read would name a record the file lacks.
                for point in await svc().storage.list_checkpoints(limit=1_000_000):
                    if point.seq <= last:
                        yield (json.dumps(point.line(), separators=(",", ":")) + "\n").encode()

        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-store"},
        )

    @route("/v1/admin/audit/verify", methods=["GET"])
    async def audit_verify(request: Request) -> Response:
        """Verify the live store: every record, link and checkpoint."""
        await admin(request)
        return json_response(report_view(await svc().audit.verify()), no_store=True)

    @route("/v1/admin/audit/checkpoints", methods=["GET", "POST"])
    async def audit_checkpoints(request: Request) -> Response:
        """POST: sign the chain's head now; GET: the checkpoints kept."""
        await admin(request)
        if request.method == "POST":
            point = await svc().audit.checkpoint()
            if point is None:
                raise Conflict("the audit chain is empty: nothing to sign")
            return json_response(point.line() | {"time": point.time.isoformat()}, 201)
        points = await svc().storage.list_checkpoints(limit=1_000_000)
        return json_response(
            {"checkpoints": [c.line() | {"time": c.time.isoformat()} for c in points]}
        )

    @route("/.well-known/audit-jwks.json", methods=["GET"])
    async def audit_jwks(request: Request) -> Response:
        """The public keys that verify audit checkpoints (keep a copy with archives)."""
        return json_response(svc().audit.jwks())

    # --- reports (docs/reports.md) ----------------------------------------------------

    @route("/v1/admin/reports/{kind}", methods=["GET"])
    async def report(request: Request) -> Response:
        """posture | usage | blast-radius | alignment: the report's JSON (the contract of
        taskbound.service.reports), or with ``?format=html`` the self-contained HTML report.
        Window ``since`` / ``until`` (RFC 3339, a date, or a duration ago; the last 30 days
        by default); ``agent`` / ``owner`` (usage); one of ``agent`` / ``task`` /
        ``credential`` (blast-radius)."""
        await admin(request)
        q = request.query_params
        fmt = q.get("format", "json")
        if fmt not in ("json", "html"):
            raise InvalidRequest("format must be json or html")
        if len(q.multi_items()) != len(q):
            raise InvalidRequest("each parameter may be given once")
        asked = parse_report_request(request.path_params["kind"], q, svc().clock.now())
        found = await run_report(svc().reports, asked)
        if fmt == "html":
            return HTMLResponse(render_report(found), headers=html_headers(asked.kind))
        return json_response(found, no_store=True)

    # --- break-glass exceptions (docs/breakglass.md) -----------------------------------

    @route("/v1/admin/breakglass", methods=["GET", "POST"])
    async def breakglass(request: Request) -> Response:
        """POST: grant an exception as the admin ``as_owner``; GET: list them, newest
        first (``?state=active|review|reviewed``, ``?agent=``, ``?limit=``)."""
        cause = await admin(request)
        exceptions = svc().breakglass
        if request.method == "POST":
            body = await read_json(request, BreakGlassBody)
            expires = None
            if body.expires_in_seconds is not None:
                expires = svc().clock.now() + timedelta(seconds=body.expires_in_seconds)
            bg = await exceptions.grant(
                agent_id=body.agent,
                scopes=[Scope(s.tool, s.tier) for s in body.scopes],
                justification=body.justification,
                granted_by=body.as_owner,
                expires_at=expires,
                cause=cause,
            )
            return json_response(breakglass_view(bg, exceptions.state_of(bg)), 201)
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            raise InvalidRequest("limit must be a number") from None
        found = await exceptions.find(state=q.get("state"), agent_id=q.get("agent"), limit=limit)
        return json_response(
            {"exceptions": [breakglass_view(bg, exceptions.state_of(bg)) for bg in found]},
            no_store=True,
        )

    @route("/v1/admin/breakglass/{bg_id}", methods=["GET"])
    async def breakglass_one(request: Request) -> Response:
        """One exception with every audit record made under it (its calls included)."""
        await admin(request)
        exceptions = svc().breakglass
        bg = await exceptions.get(request.path_params["bg_id"])
        out = breakglass_view(bg, exceptions.state_of(bg))
        out["calls"] = [audit_view(seq, e) for seq, e in await exceptions.calls(bg.id)]
        return json_response(out, no_store=True)

    @route("/v1/admin/breakglass/{bg_id}/{verb}", methods=["POST"])
    async def breakglass_verb(request: Request) -> Response:
        """end (its granter or an admin; revokes what relies on it) | review (a reviewer
        who is not the granter, with a note). Every refusal is audited."""
        cause = await admin(request)
        verb = request.path_params["verb"]
        exceptions = svc().breakglass
        bg_id = request.path_params["bg_id"]
        if verb == "end":
            ending = await read_json(request, BreakGlassEndBody)
            bg, revoked = await exceptions.end(
                bg_id, by=ending.as_owner, reason=ending.reason, cause=cause
            )
            out = breakglass_view(bg, exceptions.state_of(bg))
            out["credentials_revoked"] = revoked
            return json_response(out)
        if verb == "review":
            review = await read_json(request, BreakGlassReviewBody)
            bg = await exceptions.review(
                bg_id, reviewer=review.as_owner, note=review.note, cause=cause
            )
            return json_response(breakglass_view(bg, exceptions.state_of(bg)))
        raise NotFound(f"no break-glass operation {verb!r}")

    @route("/v1/admin/policy", methods=["GET"])
    async def policy_status(request: Request) -> Response:
        await admin(request)
        return json_response(svc().policy.status())

    @route("/v1/admin/policy/reload", methods=["POST"])
    async def policy_reload(request: Request) -> Response:
        """Reload the policy files; the last good set stays in force when they fail."""
        cause = await admin(request)
        result = await svc().policy.reload(f"admin API ({cause})")
        body = {
            "ok": result.ok,
            "version": result.version,
            "changed": result.changed,
            "problems": list(result.problems),
        }
        return json_response(body, 200 if result.ok else 422)

    @route("/v1/admin/dev/identity", methods=["POST"])
    async def mint_identity(request: Request) -> Response:
        """The development issuer (dev mode only): a JWT-SVID for a SPIFFE ID of the dev
        trust domain."""
        await admin(request)
        if not settings.identity.dev_issuer:
            raise NotFound("the development identity issuer is off")
        body = await read_json(request, MintIdentityBody)
        try:
            sid = parse_spiffe_id(body.spiffe_id)
        except ValueError as exc:
            raise InvalidRequest(f"spiffe_id: {exc}") from None
        if sid.trust_domain != settings.identity.dev_trust_domain:
            raise Forbidden(
                f"the development issuer only mints IDs of {settings.identity.dev_trust_domain}"
            )
        now = svc().clock.now()
        token = mint_jwt_svid(
            svc().keys.signer(KeyPurpose.DEV_IDENTITY),
            spiffe_id=str(sid),
            audience=body.audience or settings.identity_audience,
            now=now,
            ttl=timedelta(seconds=body.ttl_seconds),
            jti=new_id("svid"),
        )
        return json_response(
            {"token": token, "expires_at": to_epoch(now) + body.ttl_seconds}, 201, no_store=True
        )

    # --- operations --------------------------------------------------------------------

    @route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    @route("/readyz", methods=["GET"])
    async def readyz(request: Request) -> Response:
        await svc().storage.check()
        return json_response({"status": "ready"})

    @route("/metrics", methods=["GET"])
    async def metrics_endpoint(request: Request) -> Response:
        if "services" in state:
            # Read at scrape time: a failure leaves the last value (and is logged).
            try:
                overdue.set(await svc().breakglass.overdue())
            except Exception:
                log.exception("counting overdue break-glass reviews failed")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        metadata, jwks, txn_jwks, start_task, fresh_credential, get_task, complete, cancel,
        introspect, revoke, owners, owner, tools, tool, agents, agent, apply, list_tasks,
        task_credentials, revoke_task, token, revoke_credential, agent_state, keys, rotate,
        withdraw_key, revocations, policy_status, policy_reload,
        mint_identity, healthz, readyz, metrics_endpoint,
        get_approval, list_approvals, decide_approval, acknowledge_approval,
        breakglass, breakglass_one, breakglass_verb,
        audit_list, audit_export, audit_verify, audit_checkpoints, audit_jwks, report,
    ]  # fmt: skip
    routes += [ssf_configuration, ssf_jwks, receive_signal]
    if settings.ui.enabled:
        # The pages people use (docs/ui.md); reserved like the broker's paths.
        routes.append(ui_mount(settings, svc))
    if not broker:
        routes = [healthz, readyz, metrics_endpoint]
    if settings.gateway.enabled or not broker:
        # After the broker's routes: a tool can never shadow them (ids are reserved too).
        routes += gateway_routes(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = services is None
        state["services"] = services or await open_services(settings)
        background = []
        # Follow the revocation log from now on (loaded already, before serving).
        state["services"].revocations.start()
        if sweep:
            background.append(asyncio.create_task(_sweep_forever(state["services"])))
            background.append(asyncio.create_task(state["services"].audit.run()))
            if settings.policy.watch:
                background.append(
                    asyncio.create_task(
                        state["services"].policy.watch(settings.policy.watch_interval_seconds)
                    )
                )
        # Push Shared Signals to the configured receivers (none configured: no sender).
        sender = state["services"].signal_sender
        if sender is not None:
            sender.start()
        log.info("taskbound ready", extra={"url": settings.public_url})
        try:
            yield
        finally:
            for job in background:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
            if sender is not None:
                await sender.aclose()
            if own:
                await state["services"].aclose()

    async def not_found(request: Request, exc: Exception) -> Response:
        return problem(NotFound())

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return problem(MethodNotAllowed())

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                LimitsMiddleware,
                # The gateway enforces its own limit, so that the refusal is audited.
                max_body=lambda path: (
                    settings.server.max_body_bytes if path.startswith(BROKER_PREFIXES) else None
                ),
                max_headers=settings.server.max_header_bytes,
            )
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )


async def _exchange_request(request: Request) -> ExchangeRequest:
    """The RFC 8693 §2.1 request, or :class:`ExchangeRefused` (RFC 6749 §5.2 codes)."""
    try:
        form = await read_form_lists(request, repeatable=frozenset({"resource", "audience"}))
    except TaskboundError as exc:
        raise ExchangeRefused("invalid_request", exc.detail, exc.internal) from None

    def one(name: str) -> str | None:
        values = form.get(name)
        return values[0] if values else None

    grant_type = one("grant_type")
    if not grant_type:
        raise ExchangeRefused("invalid_request", "the grant_type parameter is required")
    if grant_type != GRANT_TYPE:
        raise ExchangeRefused("unsupported_grant_type", UnsupportedGrantType.default_detail)
    subject_token = one("subject_token")
    if not subject_token:
        raise ExchangeRefused("invalid_request", "the subject_token parameter is required")
    return ExchangeRequest(
        subject_token=subject_token,
        subject_token_type=one("subject_token_type"),
        actor_token=one("actor_token"),
        actor_token_type=one("actor_token_type"),
        requested_token_type=one("requested_token_type"),
        narrowing=Narrowing(
            resources=tuple(form.get("resource", ())),
            audiences=tuple(form.get("audience", ())),
            scope=one("scope"),
            authorization_details=one("authorization_details"),
        ),
        dpop_headers=request.headers.getlist("dpop"),
        subject_dpop=one("subject_dpop"),
    )


def _spiffe_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(parse_spiffe_id(value))
    except ValueError as exc:
        raise InvalidRequest(f"may_act: {exc}") from None


def _scopes(bodies: list[ScopeBody]) -> tuple[ScopeRequest, ...]:
    seen: set[tuple[str, Tier]] = set()
    out = []
    for s in bodies:
        if (s.tool, s.tier) in seen:
            raise InvalidRequest(f"scope {s.tool}:{s.tier.value} is requested twice")
        seen.add((s.tool, s.tier))
        out.append(
            ScopeRequest(s.tool, s.tier, tuple(s.actions) if s.actions is not None else None)
        )
    return tuple(out)


async def _sweep_forever(services: Services) -> None:
    interval = services.settings.server.sweep_interval_seconds
    while True:
        try:
            await services.broker.sweep()
            await services.approvals.sweep()
            await services.keys.reload()
            await services.policy.refresh_registry()
        except Exception:
            log.exception("sweep failed; retrying")
        await asyncio.sleep(interval)

"""The gateway at `/{tool}/…`: verify, decide, inject, forward, audit — HTTP and MCP.

No response leaves for a call whose audit record could not be written (DESIGN.md
invariant 2), and anything unforeseen on the decision path is a refusal, never a
pass-through (invariant 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import timedelta
from fnmatch import fnmatchcase
from typing import Any, cast
from urllib.parse import parse_qs, urljoin

import aiohttp
import httpx
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from taskbound.core.actions import (
    HttpRouter,
    McpHeaderMismatch,
    McpMessage,
    McpProtocolError,
    RouteError,
    argument_digest,
    check_mcp_headers,
    mcp_tool_action,
    parse_jsonrpc,
)
from taskbound.core.approvals import MAX_FIELD_CHARS, http_binding
from taskbound.core.keys import PrivateKey
from taskbound.core.model import (
    Action,
    Approval,
    AuditEvent,
    KeyPurpose,
    Revocation,
    RevocationKind,
    Tool,
    ToolKind,
)
from taskbound.core.policy import Decision
from taskbound.core.redact import RedactionRules, redact
from taskbound.core.tokens import CredentialClaims
from taskbound.core.txn import TXN_TOKEN_HEADER, mint_txn_token
from taskbound.errors import KeyUnavailable, TaskboundError
from taskbound.gateway.checks import Admitted, Checks, Expiring, Refusal
from taskbound.gateway.proxy import (
    REFUSAL_HEADER,
    Upstream,
    downstream_headers,
    relay,
    transform_sse_event,
    upstream_headers,
)
from taskbound.gateway.upstream_tokens import CredentialUnavailable, TokenKey, UpstreamTokens
from taskbound.service.approvals import HeldCall
from taskbound.service.audit import AuditWriter
from taskbound.service.audit_records import clip
from taskbound.service.events import Change, Event
from taskbound.service.policy import PolicyEngine
from taskbound.service.registry import RESERVED_TOOL_IDS
from taskbound.service.runtime import Services

log = logging.getLogger("taskbound.gateway")

# JSON-RPC error codes for refusals the MCP client can read (-32000..-32099 are the
# implementation-defined server errors of JSON-RPC 2.0).
JSONRPC_REFUSED = -32001
JSONRPC_METHOD_NOT_ALLOWED = -32601


# Set while the gateway decides a call whose approval it has just consumed: the checks'
# decision then sees `context.approval.granted` true (see _ApprovalAwarePolicy).
_APPROVED_CALL: ContextVar[bool] = ContextVar("taskbound_approved_call", default=False)


class _ApprovalAwarePolicy:
    """The policy engine as the gateway's checks see it: exactly the engine, except that
    a call decided while :data:`_APPROVED_CALL` is set is decided with the approval
    granted. The checks build the decision's situation themselves; this keeps that one
    code path for the second decision of an approved call too."""

    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    def decide_call(self, **kwargs: Any) -> Decision:
        if _APPROVED_CALL.get():
            kwargs["situation"] = replace(kwargs["situation"], approval_granted=True)
        return self._engine.decide_call(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class Held(Refusal):
    """``approval_required``, with the approval the call now waits for."""

    def __init__(self, gate: Refusal, approval: Approval) -> None:
        super().__init__(
            gate.code,
            gate.status,
            "this call needs a human approval: poll the approval, then make the same call "
            "again once it is approved",
            internal=f"{gate.internal}; held for approval {approval.id} "
            f"({approval.state.value}, {approval.approvals} of {approval.required})",
            www_error=gate.www_error,
            decision=gate.decision,
        )
        self.approval = approval

    def problem_members(self) -> dict[str, Any]:
        """What the refusal body (or the JSON-RPC error's data) adds: where to wait."""
        return {
            "approval_id": self.approval.id,
            "poll": f"/v1/approvals/{self.approval.id}",
            "expires_at": self.approval.expires_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class _CallShape:
    """How a call looked on the wire: what an approval shows a person and binds to."""

    method: str
    path: str
    binding: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)


class AuditUnavailable(TaskboundError):
    code = "audit_unavailable"
    status = 503
    default_detail = "the call cannot be recorded, so it is refused"


@dataclass
class CallRecord:
    """What the audit record of one call says, filled in as the call proceeds."""

    tool: str
    started: float
    claims: CredentialClaims | None = None
    admitted: Admitted | None = None
    action: str | None = None
    tier: str | None = None
    digest: str | None = None
    # The arguments as recorded (redacted), for a tool in audit.arguments_tools.
    arguments: Any = None
    decision: Decision | None = None
    notes: list[str] = field(default_factory=list)

    def event(
        self, outcome: str, code: str | None, detail: str | None, upstream: int | None, now: Any
    ) -> AuditEvent:
        c = self.claims
        return AuditEvent(
            time=now,
            event="gateway.call",
            decision=outcome,
            code=code,
            # The agent acting: a delegate for a delegated credential (its chain in detail).
            agent=c.holder if c else None,
            owner=c.owner_id if c else None,
            task=c.task_id if c else None,
            intent=c.purpose if c else None,
            jti=c.jti if c else None,
            tool=self.tool,
            action=self.action,
            tier=self.tier,
            argument_digest=self.digest,
            policies=self.decision.determining if self.decision else (),
            policy_version=self.decision.policy_version if self.decision else None,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            upstream_status=upstream,
            detail=_with_chain("; ".join(n for n in (*self.notes, detail) if n) or None, c),
            txn=(c.txn or c.task_id) if c else None,
            exception_id=c.exception if c else None,
            arguments=self.arguments,
        )


def _with_chain(detail: str | None, claims: CredentialClaims | None) -> str | None:
    """A delegated call's audit detail names the chain: task agent, then each delegate."""
    if claims is None or not claims.actors:
        return detail
    chain = " -> ".join((claims.subject, *reversed(claims.actors)))
    return f"delegated: {chain}" + (f"; {detail}" if detail else "")


class Gateway:
    def __init__(self, services: Services, metrics: Any | None = None) -> None:
        self.s = services
        settings = services.settings
        gw = settings.gateway
        self.checks = Checks(
            settings,
            services.storage,
            services.keys,
            cast(PolicyEngine, _ApprovalAwarePolicy(services.policy)),
            services.replay,
            services.clock,
            services.events,
            services.revocations,
        )
        self.upstream = Upstream(
            connect_timeout=gw.connect_timeout_seconds,
            total_timeout=gw.upstream_timeout_seconds,
            max_connections=gw.max_upstream_connections,
        )
        self.metrics = metrics
        self.audit_writer = AuditWriter(services.storage)
        recording = settings.audit
        self._arguments_tools = frozenset(recording.arguments_tools)
        self._redaction = RedactionRules(
            keys=tuple(recording.redact_keys), paths=tuple(recording.redact_paths)
        )
        self._arguments_max_bytes = recording.arguments_max_bytes
        services.closers.append(self.upstream.close)
        services.closers.append(self.audit_writer.close)
        # Bounded: unknown names cost a lookup, never unbounded memory.
        self._tools = Expiring(10_000)
        self._routers: dict[str, tuple[Tool, HttpRouter]] = {}
        self._secrets: dict[str, str | None] = {}
        # Per-task tokens from the upstream authorization servers of tools that use an
        # upstream exchange (bounded; forgotten when the task loses standing).
        self.upstream_tokens = UpstreamTokens(
            services.http,
            services.clock,
            timeout=httpx.Timeout(
                min(10.0, gw.upstream_timeout_seconds), connect=gw.connect_timeout_seconds
            ),
        )
        services.events.subscribe(self._on_event)
        services.revocations.listeners.append(self._on_revocations)

    def _on_event(self, event: Event) -> None:
        if event.change is Change.TOOL_CHANGED:
            self._tools.discard(event.key)
            self._secrets.pop(event.key, None)
            self.upstream_tokens.evict(tool=event.key)
        elif event.change is Change.TASK_ENDED:
            self.upstream_tokens.evict(task=event.key)
        elif event.change is Change.AGENT_CHANGED:
            self.upstream_tokens.evict(agent=event.key)
        elif event.change is Change.OWNER_CHANGED:
            self.upstream_tokens.evict(owner=event.key)
        # CREDENTIAL_REVOKED names only a jti: its revocation log entry (below) names the task.

    def _on_revocations(self, entries: list[Revocation]) -> None:
        """The revocation log, from this process or another: a task, agent or owner that
        loses standing loses its upstream tokens too."""
        for entry in entries:
            if entry.kind is RevocationKind.TASK:
                self.upstream_tokens.evict(task=entry.subject)
            elif entry.kind is RevocationKind.CREDENTIAL and entry.task_id is not None:
                self.upstream_tokens.evict(task=entry.task_id)
            elif entry.kind is RevocationKind.AGENT:
                self.upstream_tokens.evict(agent=entry.subject)
            elif entry.kind is RevocationKind.OWNER:
                self.upstream_tokens.evict(owner=entry.subject)

    async def close(self) -> None:
        await self.upstream.close()

    # --- registry views ----------------------------------------------------------------

    async def tool(self, tool_id: str) -> Tool | None:
        now = time.monotonic()
        cached: tuple[Tool] | None = self._tools.get(tool_id, now)
        if cached is not None:
            return cached[0]
        tool = await self.s.storage.get_tool(tool_id) if len(tool_id) <= 64 else None
        if tool is None:
            return None  # unknown names are never cached: no memory for strangers to fill
        self._tools.put(tool_id, (tool,), now + 2.0)
        if tool is not None and (tool_id not in self._routers or self._routers[tool_id][0] != tool):
            self._routers[tool_id] = (tool, HttpRouter.for_tool(tool))
            self._secrets.pop(tool_id, None)
        return tool

    async def secret(self, tool: Tool) -> str | None:
        if tool.id not in self._secrets:
            self._secrets[tool.id] = await self.s.registry.upstream_secret(tool.id)
        return self._secrets[tool.id]

    # --- transaction tokens and upstream credentials -----------------------------------

    async def _txn_signer(self) -> PrivateKey:
        try:
            return self.s.keys.signer(KeyPurpose.TRANSACTION)
        except KeyUnavailable:
            # A gateway started without it (gateway.enabled off in a gateway-only process):
            # make or load the key now, once; the database settles races between replicas.
            await self.s.keys.ensure((KeyPurpose.TRANSACTION,))
            return self.s.keys.signer(KeyPurpose.TRANSACTION)

    def _transaction_context(
        self, request: Request, tool: Tool, records: list[CallRecord]
    ) -> tuple[CredentialClaims, dict[str, Any], dict[str, Any]]:
        """The claims of the call's credential and the Txn-Token's ``tctx`` (what the task
        is and what this call does) and ``rctx`` (where the request came from)."""
        claims = records[0].claims
        assert claims is not None
        tctx: dict[str, Any] = {
            "task": claims.task_id,
            "owner": claims.owner_id,
            "intent": claims.purpose,
            "tool": tool.id,
            "tier": claims.tier.value,
            "actors": list(claims.actors),
        }
        calls = [
            {
                k: v
                for k, v in (("action", r.action), ("argument_digest", r.digest))
                if v is not None
            }
            for r in records
        ]
        if len(calls) == 1:
            tctx.update(calls[0])
        else:
            tctx["calls"] = calls  # an MCP batch: one entry per forwarded message
        rctx: dict[str, Any] = {"authn": "dpop", "req_wl": self.s.settings.issuer}
        if request.client is not None and request.client.host:
            rctx["req_ip"] = request.client.host
        return claims, tctx, rctx

    def _txn_token(
        self,
        claims: CredentialClaims,
        audience: str,
        tctx: dict[str, Any],
        rctx: dict[str, Any],
        key: PrivateKey,
    ) -> str:
        settings = self.s.settings
        return mint_txn_token(
            issuer=settings.issuer,
            audience=audience,
            txn=claims.txn or claims.task_id,
            subject=claims.subject,
            scope=claims.scope,
            tctx=tctx,
            rctx=rctx,
            now=self.s.clock.now(),
            ttl=timedelta(seconds=settings.gateway.txn_token_ttl_seconds),
            key=key,
            requesting_workload=settings.issuer,
            jti=secrets.token_urlsafe(16),
        )

    async def _exchanged_token(
        self,
        tool: Tool,
        claims: CredentialClaims,
        tctx: dict[str, Any],
        rctx: dict[str, Any],
        key: PrivateKey,
    ) -> str:
        """The task's token for the tool, from the upstream's authorization server (RFC
        8693), with a Txn-Token for the exchange's audience as the subject token."""
        exchange = tool.upstream_exchange
        assert exchange is not None
        try:
            return await self.upstream_tokens.get(
                TokenKey(tool.id, exchange, claims.task_id, claims.holder, claims.tier.value),
                agent=claims.subject,
                owner=claims.owner_id,
                subject_token=lambda: self._txn_token(claims, exchange.audience, tctx, rctx, key),
                client_secret=lambda: self.s.registry.upstream_client_secret(tool),
            )
        except CredentialUnavailable as exc:
            raise Refusal(
                "upstream_credential_unavailable",
                502,
                "the tool's credential for this task could not be obtained",
                internal=f"upstream token exchange at {exchange.token_endpoint}: {exc.reason}",
            ) from None

    # --- audit -------------------------------------------------------------------------

    async def audit(
        self,
        record: CallRecord,
        outcome: str,
        code: str | None,
        detail: str | None,
        upstream: int | None = None,
    ) -> None:
        try:
            await self.audit_writer.append(
                record.event(outcome, code, detail, upstream, self.s.clock.now())
            )
        except Exception as exc:  # any failure to record refuses the call
            log.error(
                "audit append failed", extra={"event": "audit.failed", "error": type(exc).__name__}
            )
            raise AuditUnavailable(internal=f"audit append failed: {exc!r}") from None
        if self.metrics is not None:
            self.metrics.gateway_decisions.labels(outcome, code or "ok").inc()
            self.metrics.gateway_latency.observe(time.perf_counter() - record.started)

    def recorded_arguments(self, tool_id: str, arguments: Callable[[], Any]) -> Any:
        """What the call's audit record keeps of its arguments: redacted for a tool in
        ``audit.arguments_tools``, ``None`` (nothing) for any other (whose arguments are
        then never even decoded for the record)."""
        if tool_id not in self._arguments_tools and "*" not in self._arguments_tools:
            return None
        return redact(arguments(), self._redaction, self._arguments_max_bytes)

    # --- entry point -------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        tool_id = request.path_params["tool"]
        record = CallRecord(tool=tool_id, started=time.perf_counter())
        try:
            tool = await self.tool(tool_id)
            if tool is None:
                raise Refusal("unknown_tool", 404, "no such tool")
            raw_path = request.scope.get("raw_path") or request.url.path.encode()
            raw = raw_path.decode("latin-1").split("?", 1)[0]
            # The path below /{tool}, as received ("" for the tool's root itself).
            rest = raw[len("/" + tool_id) :]
            admitted = await self.checks.admit(
                authorization=request.headers.get("authorization"),
                dpop_headers=request.headers.getlist("dpop"),
                method=request.method,
                url=self.s.settings.public_url + raw,
                tool=tool,
                verified=lambda claims: setattr(record, "claims", claims),
            )
            record.admitted = admitted
            body = await self._body(request)
            if tool.kind is ToolKind.MCP:
                return await self._mcp(request, tool, rest, body, record)
            return await self._http(request, tool, rest, body, record)
        except Refusal as refusal:
            return await self._refused(record, refusal, refusal.code, refusal.status)
        except (RouteError, McpHeaderMismatch, McpProtocolError) as err:
            return await self._refused(record, err, err.code, err.status)
        except AuditUnavailable as err:
            return _problem(err.code, err.status, err.detail)
        except TaskboundError as err:
            return await self._refused(record, err, err.code, err.status)
        except Exception as exc:
            log.exception("gateway error", extra={"tool": tool_id})
            failure = TaskboundError(internal=f"unexpected {type(exc).__name__}")
            status = _upstream_status(exc) or 500
            code = "upstream_timeout" if status == 504 else "gateway_error"
            return await self._refused(record, failure, code, status)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (and so audited) past ``gateway.max_body_bytes``."""
        limit = self.s.settings.gateway.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = Refusal("payload_too_large", 413, "the request body is too large")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _refused(
        self, record: CallRecord, err: TaskboundError, code: str, status: int
    ) -> Response:
        outcome = "approval_required" if code == "approval_required" else "deny"
        if isinstance(err, Refusal) and err.decision is not None:
            record.decision = err.decision
        try:
            await self.audit(record, outcome, code, err.internal)
        except AuditUnavailable as fail:
            return _problem(fail.code, fail.status, fail.detail)
        log.warning(
            "call refused",
            extra={
                "event": "gateway.refused",
                "tool": record.tool,
                "code": code,
                "reason": err.internal,
            },
        )
        headers = {}
        www = getattr(err, "www_error", None)
        if status == 401 or www:
            headers["WWW-Authenticate"] = self._www_authenticate(record.tool, www)
        if code == "use_dpop_nonce":
            headers["DPoP-Nonce"] = self.checks.nonces.current(self.s.clock.now())
        extra = err.problem_members() if isinstance(err, Held) else None
        return _problem(code, status, err.detail, headers, extra)

    def _www_authenticate(self, tool_id: str, error: str | None) -> str:
        algs = " ".join(self.s.settings.dpop.algorithms)
        meta = f"{self.s.settings.public_url}/.well-known/oauth-protected-resource/{tool_id}"
        parts = ['DPoP realm="taskbound"', f'algs="{algs}"', f'resource_metadata="{meta}"']
        if error:
            parts.insert(1, f'error="{error}"')
        return ", ".join(parts)

    # --- HTTP tools --------------------------------------------------------------------

    async def _http(
        self, request: Request, tool: Tool, rest: str, body: bytes, record: CallRecord
    ) -> Response:
        router = self._routers[tool.id][1]
        match = router.match(request.method, rest or "/")
        record.action, record.tier = match.action.name, match.action.tier.value
        record.digest = argument_digest(dict(match.params))
        record.arguments = self.recorded_arguments(
            tool.id,
            lambda: _http_arguments(
                match.params, request.url.query, body, request.headers.get("content-type")
            ),
        )
        assert record.admitted is not None
        self.checks.within_credential(match.action, record.admitted.claims)

        def shape() -> _CallShape:
            # Only for a call an approval gate holds: the hot path never hashes the body.
            query = request.url.query
            content_type = request.headers.get("content-type")
            extra: dict[str, Any] = {}
            if query:
                extra["query"] = query[:MAX_FIELD_CHARS]
            if body:
                extra["body"] = _body_view(body, content_type)
            return _CallShape(
                method=request.method,
                path=f"/{tool.id}{rest}",
                binding=http_binding(match.params, query, body, content_type),
                extra=extra,
            )

        record.decision = await self._decide(
            record, tool, match.action, match.params, rest or "/", shape
        )
        return await self._forward(request, tool, rest, body, [record])

    # --- the decision, and approvals -----------------------------------------------------

    async def _decide(
        self,
        record: CallRecord,
        tool: Tool,
        action: Action,
        arguments: Mapping[str, Any],
        target: str | None,
        shape: Callable[[], _CallShape],
    ) -> Decision:
        """The call decision (check 5). A call that only an approval gate holds is let
        through if an approval of exactly this call (task, tool, action, target and
        canonical arguments) was granted and is consumed now, once; otherwise it is held:
        refused with the pending approval it waits for (DESIGN.md §3 flow 8)."""
        admitted = record.admitted
        assert admitted is not None
        try:
            return self.checks.decide(admitted, tool, action, arguments, target)
        except Refusal as refusal:
            if refusal.code != "approval_required" or refusal.decision is None:
                raise
            gate = refusal
        claims, live, how = admitted.claims, admitted.live, shape()
        call = HeldCall(
            task_id=claims.task_id,
            agent_id=claims.holder,
            owner_id=live.owner.id,
            agent_owner=live.holder_owner.id,
            intent=claims.purpose,
            tool=tool.id,
            action=action.name,
            tier=action.tier,
            target=target,
            arguments=arguments,
            binding=how.binding,
            method=how.method,
            path=how.path,
            policies=gate.decision.determining if gate.decision else (),
            policy_version=gate.decision.policy_version if gate.decision else None,
            jti=claims.jti,
            txn=claims.txn or claims.task_id,
            exception=claims.exception,
            extra=how.extra,
        )
        approved = await self.s.approvals.consume(call)
        if approved is None:
            raise Held(gate, await self.s.approvals.hold(call))
        record.notes.append(f"approval {approved.id} consumed")
        token = _APPROVED_CALL.set(True)
        try:
            return self.checks.decide(admitted, tool, action, arguments, target)
        finally:
            _APPROVED_CALL.reset(token)

    async def _forward(
        self,
        request: Request,
        tool: Tool,
        rest: str,
        body: bytes,
        records: list[CallRecord],
        transform: Callable[[Any], Any] | None = None,
    ) -> Response:
        """Send the call upstream and answer with its response. With ``transform`` (MCP
        filtering) the response is read and transformed before anything is recorded or
        sent, and an unexpected media type fails closed. Every record is written before
        the response leaves."""
        url = tool.upstream_url.rstrip("/") + rest
        if request.url.query:
            url += "?" + request.url.query
        claims, tctx, rctx = self._transaction_context(request, tool, records)
        key = await self._txn_signer()
        txn_token = self._txn_token(claims, tool.audience, tctx, rctx, key)
        secret: str | None
        hidden: str | None  # what no answer header may carry back to the agent
        if tool.upstream_exchange is not None:
            # Never the static secret: the task's own token, or no call at all.
            hidden = await self._exchanged_token(tool, claims, tctx, rctx, key)
            secret = f"Bearer {hidden}"
        else:
            secret = hidden = await self.secret(tool)
        headers = upstream_headers(
            request.headers.items(),
            tool.upstream_auth_header,
            secret,
            # The agent's own Txn-Token is never passed on, only the gateway's; a response
            # we must read and rewrite is asked for uncompressed.
            drop=("txn-token", "accept-encoding") if transform is not None else ("txn-token",),
        )
        headers.append((TXN_TOKEN_HEADER, txn_token))
        response = await self.upstream.send(request.method, url, headers, body)
        out_headers = [
            (k, v)
            for k, v in downstream_headers(
                response.headers,
                drop_length=transform is not None,
                secret=hidden,
                location=self._location(tool, str(response.url), response.headers),
            )
            # Nor does the agent ever get a Txn-Token the tool echoes back.
            if txn_token not in v
        ]
        content: bytes | None = None
        if transform is not None:
            try:
                raw = await response.content.read(MAX_TRANSFORMED_BYTES + 1)
            finally:
                response.release()
            media = response.headers.get("content-type", "").split(";")[0].strip().lower()
            content = _transformed(media, raw, transform)
            if content is None:
                raise Refusal(
                    "upstream_unexpected",
                    502,
                    "the tool answered in a form the gateway refuses",
                    internal=f"cannot filter an upstream answer of type {media!r} "
                    f"({len(raw)} bytes)",
                )
        try:
            for record in records:
                await self.audit(record, "allow", None, None, response.status)
        except AuditUnavailable:
            response.release()
            raise
        if content is not None:
            return _raw_response(Response(content, status_code=response.status), out_headers)
        return _raw_response(
            StreamingResponse(relay(response), status_code=response.status), out_headers
        )

    def _location(self, tool: Tool, request_url: str, headers: Any) -> str | None:
        """Where an upstream redirect may point the agent: only within the tool, written
        as a gateway URL. The upstream's own address is never revealed."""
        location = headers.get("location")
        if location is None:
            return None
        target = urljoin(request_url, location)
        root = tool.upstream_url.rstrip("/")
        if target == root or target.startswith(root + "/") or target.startswith(root + "?"):
            return f"{self.s.settings.public_url}/{tool.id}{target[len(root) :]}"
        return None

    # --- MCP tools ---------------------------------------------------------------------

    async def _mcp(
        self, request: Request, tool: Tool, rest: str, body: bytes, record: CallRecord
    ) -> Response:
        assert record.admitted is not None
        claims = record.admitted.claims
        if rest not in ("", "/"):
            # An MCP tool is one endpoint: nothing below it is reachable through us.
            raise Refusal(
                "no_matching_action",
                403,
                "an MCP tool is reached at its endpoint only",
                internal=f"MCP path {rest!r} below the tool's endpoint",
            )
        rest = ""
        if request.method in ("GET", "DELETE"):
            # The server-to-client stream and session termination of streamable HTTP.
            record.action = f"mcp:{request.method}"
            return await self._forward(request, tool, rest, body, [record])
        if request.method != "POST":
            raise Refusal("method_not_allowed", 405, "MCP endpoints take GET, POST or DELETE")
        messages, is_batch = parse_jsonrpc(body)
        for header in ("mcp-method", "mcp-name"):
            if len(request.headers.getlist(header)) > 1:
                raise McpHeaderMismatch(f"the {header} header is repeated")
        check_mcp_headers(
            messages, is_batch, request.headers.get("mcp-method"), request.headers.get("mcp-name")
        )
        refused: list[dict[str, Any]] = []
        allowed: list[tuple[McpMessage, CallRecord]] = []
        lists: set[Any] = set()
        for message in messages:
            # One record per message: the audit says exactly what each call was.
            own = CallRecord(
                tool=record.tool,
                started=record.started,
                claims=record.claims,
                admitted=record.admitted,
            )
            try:
                await self._mcp_decide(message, tool, own)
            except Refusal as refusal:
                if refusal.decision is not None:
                    own.decision = refusal.decision
                outcome = "approval_required" if refusal.code == "approval_required" else "deny"
                await self.audit(own, outcome, refusal.code, refusal.internal)
                if message.id is not None:
                    refused.append(_jsonrpc_error(message.id, refusal))
                continue
            allowed.append((message, own))
            if message.method == "tools/list" and message.id is not None:
                lists.add(message.id)
        if not allowed:
            if not refused:
                return Response(status_code=202)
            # Marked as the gateway's own: a client may trust these JSON-RPC errors' codes.
            codes = ",".join(r["error"]["data"]["code"] for r in refused)
            answer = refused if is_batch else refused[0]
            return JSONResponse(answer, headers={REFUSAL_HEADER: codes})
        if is_batch:
            original = json.loads(body)
            keep = {id(m) for m, _ in allowed}
            forward = [raw for raw, m in zip(original, messages, strict=True) if id(m) in keep]
            body = json.dumps(forward, separators=(",", ":")).encode()

        def transform(message: Any) -> Any:
            if isinstance(message, list):
                return [transform(m) for m in message] + refused
            if isinstance(message, dict) and message.get("id") in lists:
                _filter_tools(message, tool, claims.tier.value, set(claims.actions))
            return message

        records = [own for _, own in allowed]
        if refused or lists:
            return await self._forward(request, tool, rest, body, records, transform)
        return await self._forward(request, tool, rest, body, records)

    async def _mcp_decide(self, message: McpMessage, tool: Tool, record: CallRecord) -> None:
        assert record.admitted is not None
        claims = record.admitted.claims
        if message.method == "tools/call":
            name = message.tool_name or ""
            action = mcp_tool_action(tool, name)
            # An unknown name is the agent's text: recorded printable and bounded, so that
            # the refusal itself can always be audited.
            record.action = action.name if action else clip(name, 200)
            record.digest = argument_digest(dict(message.arguments))
            record.arguments = self.recorded_arguments(tool.id, lambda: dict(message.arguments))
            if action is None:
                raise Refusal(
                    "no_matching_action",
                    403,
                    f"the tool has no action {name!r}",
                    internal=f"MCP tool {name!r} not registered",
                    www_error="insufficient_scope",
                )
            record.tier = action.tier.value
            self.checks.within_credential(action, claims)

            def shape() -> _CallShape:
                return _CallShape(
                    method="POST",
                    path=f"/{tool.id}",
                    binding=message.arguments,
                    extra={"mcp_method": message.method, "mcp_tool": name},
                )

            record.decision = await self._decide(
                record, tool, action, message.arguments, name, shape
            )
            return
        record.action = f"mcp:{clip(message.method, 200)}"
        if message.method == "tools/list":
            return
        if any(
            fnmatchcase(message.method, pattern)
            for pattern in self.s.settings.gateway.mcp_pass_methods
        ):
            return
        raise Refusal(
            "method_not_allowed",
            403,
            f"MCP method {message.method!r} is not allowed here",
            internal=f"MCP method {message.method!r} not in gateway.mcp_pass_methods",
        )

    # --- metadata ----------------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        """RFC 9728 protected resource metadata for one tool."""
        tool = await self.tool(request.path_params["tool"])
        if tool is None:
            return _problem("not_found", 404, "no such tool")
        settings = self.s.settings
        return JSONResponse(
            {
                "resource": tool.audience,
                "resource_name": tool.id,
                "authorization_servers": [settings.issuer],
                "bearer_methods_supported": ["header"],
                "dpop_signing_alg_values_supported": list(settings.dpop.algorithms),
                "dpop_bound_access_tokens_required": True,
                "scopes_supported": sorted({f"{tool.id}:{t.value}" for t in tool.tiers()}),
            },
            headers={"Cache-Control": "public, max-age=60"},
        )


def _filter_tools(message: dict[str, Any], tool: Tool, tier: str, actions: set[str]) -> None:
    """tools/list answers only the tools this credential may call."""
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return
    kept = []
    for entry in result["tools"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        action = mcp_tool_action(tool, name) if isinstance(name, str) else None
        if action is not None and action.tier.value == tier and action.name in actions:
            kept.append(entry)
    result["tools"] = kept


def _jsonrpc_error(message_id: Any, refusal: Refusal) -> dict[str, Any]:
    code = JSONRPC_METHOD_NOT_ALLOWED if refusal.code == "method_not_allowed" else JSONRPC_REFUSED
    data: dict[str, Any] = {"code": refusal.code}
    if isinstance(refusal, Held):
        data.update(refusal.problem_members())
    return {
        "jsonrpc": "2.0",
        "id": message_id,
        "error": {"code": code, "message": refusal.detail, "data": data},
    }


def _http_arguments(
    params: Mapping[str, Any], query: str, body: bytes, content_type: str | None
) -> dict[str, Any]:
    """An HTTP call's arguments as its audit record keeps them (before redaction): the
    path parameters the action mapping decoded, the query (each name with its values) and
    the body as :func:`_body_view` shows it — ``/path/…``, ``/query/…``, ``/body/…`` for
    ``audit.redact_paths``."""
    out: dict[str, Any] = {"path": dict(params)}
    if query:
        out["query"] = parse_qs(query, keep_blank_values=True)
    if body:
        out["body"] = _body_view(body, content_type)
    return out


def _body_view(body: bytes, content_type: str | None) -> Any:
    """An HTTP body as a person approving the call should see it: JSON as JSON, text as
    text, anything else by size and digest (the approval's summary bounds the size)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            pass
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


MAX_TRANSFORMED_BYTES = 16 * 1024 * 1024


def _transformed(media: str, raw: bytes, transform: Callable[[Any], Any]) -> bytes | None:
    """The upstream answer with ``transform`` applied, or None when it cannot be (too
    large, not JSON or SSE, malformed): the caller then fails closed."""
    if len(raw) > MAX_TRANSFORMED_BYTES:
        return None
    try:
        if media == "application/json":
            return json.dumps(transform(json.loads(raw)), separators=(",", ":")).encode()
        if media == "text/event-stream":
            events = raw.decode("utf-8").replace("\r\n", "\n").split("\n\n")
            out = [transform_sse_event(e, transform) for e in events if e.strip()]
            return ("\n\n".join(out) + "\n\n").encode()
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return None


def _raw_response(response: Response, headers: list[tuple[str, str]]) -> Response:
    """``response`` plus the upstream's headers as a list, so repeated headers (Set-Cookie,
    Link) stay repeated."""
    response.raw_headers = [
        *response.raw_headers,
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers),
    ]
    return response


def _problem(
    code: str,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {
            "type": f"https://taskbound.dev/problems/{code}",
            "title": code.replace("_", " "),
            "status": status,
            "code": code,
            "detail": detail,
            **(extra or {}),
        },
        status_code=status,
        media_type="application/problem+json",
        headers={"Cache-Control": "no-store", REFUSAL_HEADER: code, **(headers or {})},
    )


def _upstream_status(exc: Exception) -> int | None:
    """502 when the upstream failed, 504 when it was too slow; None when it is not the
    upstream's doing."""
    if isinstance(exc, TimeoutError):
        return 504
    if isinstance(exc, aiohttp.ClientError):
        return 502
    return None


class ToolIdConvertor(Convertor[str]):
    """A tool id in a path, never one of the broker's own first segments: requests for
    those keep the broker's 404/405 answers instead of reaching the gateway."""

    regex = (
        "(?!(?:"
        + "|".join(map(re.escape, sorted(RESERVED_TOOL_IDS)))
        + ")(?:/|$))[a-z0-9][a-z0-9_.-]{0,62}"
    )

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("toolid", ToolIdConvertor())


def gateway_routes(gateway_of: Callable[[], Gateway]) -> list[Route]:
    """The gateway's routes; they go after the broker's own (tools cannot shadow them)."""
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    async def handle(request: Request) -> Response:
        return await gateway_of().handle(request)

    async def metadata(request: Request) -> Response:
        return await gateway_of().metadata(request)

    return [
        Route("/.well-known/oauth-protected-resource/{tool}", metadata, methods=["GET"]),
        Route("/{tool:toolid}", handle, methods=methods),
        Route("/{tool:toolid}/{rest:path}", handle, methods=methods),
    ]


HandlerFactory = Callable[[], Awaitable[Gateway]]

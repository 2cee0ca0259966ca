"""The registry: owners, agents and tools (DESIGN.md §3 flow 1).

Specs are validated pydantic models shared by the admin API, the CLI and declarative
``taskbound apply``. Upstream secrets are encrypted before they reach storage and are never
returned by any read.

Every change is an audit record (``admin.owner.created|updated``,
``admin.tool.created|updated``, ``admin.agent.created|updated|state_changed``,
``admin.registry.applied``) naming its cause, durable before the method returns. A record
says whether a tool's secret was set, never the secret.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from taskbound.config import check_signal_url
from taskbound.core.actions import HttpRouter
from taskbound.core.clock import Clock
from taskbound.core.identity import parse_spiffe_id
from taskbound.core.model import (
    Action,
    Agent,
    AgentState,
    Owner,
    Risk,
    Role,
    Scope,
    Tier,
    Tool,
    ToolKind,
    UpstreamExchange,
)
from taskbound.core.secretbox import SecretBox
from taskbound.errors import ConfigError, Conflict, InvalidRequest, NotFound, ReferenceError_
from taskbound.service.audit_records import change_event, clip, listing
from taskbound.service.events import Change, Events
from taskbound.storage.base import Storage
from taskbound.storage.pending import recorded

log = logging.getLogger("taskbound.registry")

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
# The gateway serves tools at /{tool}/…: a tool may not shadow the broker's own paths.
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
RESERVED_TOOL_IDS = frozenset(
    {"v1", "oauth", "healthz", "readyz", "metrics", "ui", "static", ".well-known"}
)
_PATH_TEMPLATE = re.compile(
    r"^/([A-Za-z0-9._~!$&'()*+,;=:@%-]*|\{[A-Za-z_][A-Za-z0-9_]*\})(/([A-Za-z0-9._~!$&'()*+,;=:@%-]*|\{[A-Za-z_][A-Za-z0-9_]*\}))*$"
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers the gateway sets itself on every forwarded call: never a tool's secret header.
_GATEWAY_HEADERS = frozenset({"txn-token"})
# RFC 6749 §3.3: space-separated scope tokens of NQCHAR.
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*$")
# RFC 6749 Appendix A.1/A.2: client_id and client_secret are VSCHAR.
_VSCHAR = re.compile(r"^[\x20-\x7e]+$")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _absolute_url(value: str, field: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{field} must be an absolute http(s) URL")
    if parts.fragment or parts.username or parts.password:
        raise ValueError(f"{field} must not carry a fragment or credentials")
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OwnerSpec(_Spec):
    id: Name
    contact: str = Field(min_length=1, max_length=256)
    roles: list[Role] = Field(default_factory=list, max_length=3)
    # None: enabled when created, unchanged when updated (an apply never re-enables an
    # owner disabled through the API).
    disabled: bool | None = None


class ScopeSpec(_Spec):
    tool: Name
    tier: Tier


class AgentSpec(_Spec):
    spiffe_id: str = Field(max_length=2048)
    owner: Name
    # None: active when created, unchanged when updated (an apply never resumes an agent
    # suspended or quarantined through the API or a signal).
    state: AgentState | None = None
    ceiling: list[ScopeSpec] = Field(default_factory=list, max_length=256)
    description: str = Field("", max_length=1000)

    @field_validator("spiffe_id")
    @classmethod
    def _spiffe(cls, value: str) -> str:
        return str(parse_spiffe_id(value))


class ActionSpec(_Spec):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")]
    tier: Tier
    method: str | None = None
    path: str | None = Field(None, max_length=1024)
    mcp_tool: str | None = Field(None, min_length=1, max_length=128)
    risk: Risk = Risk.LOW
    requires_approval: bool = False
    input_schema: dict[str, Any] | None = None

    @field_validator("input_schema")
    @classmethod
    def _input_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if value.get("type", "object") != "object" or not isinstance(
            value.get("properties", {}), dict
        ):
            raise ValueError("input_schema must be a JSON Schema of type object")
        if len(json.dumps(value)) > 16 * 1024:
            raise ValueError("input_schema must be at most 16 KiB")
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.upper() not in _HTTP_METHODS:
            raise ValueError(f"method must be one of {sorted(_HTTP_METHODS)}")
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not _PATH_TEMPLATE.match(value):
            raise ValueError("path must be a template like /repos/{owner}/{repo}")
        return value


class UpstreamExchangeSpec(_Spec):
    """Per-task upstream credentials by RFC 8693 token exchange with the upstream's own
    authorization server (docs/gateway.md)."""

    # https, or plain http to a loopback host only (the client secret travels to it).
    token_endpoint: str = Field(max_length=2048)
    # The trust domain the subject Txn-Token is minted for (its `aud`), also sent as the
    # exchange's `audience` parameter.
    audience: str = Field(min_length=1, max_length=1024)
    scope: str | None = Field(None, max_length=1024)
    client_id: str = Field(min_length=1, max_length=256)
    # Write-only: stored encrypted, never returned. Required when a tool starts using an
    # exchange or changes its token endpoint or client id; omitted, the stored one is kept.
    client_secret: SecretStr | None = None

    @field_validator("token_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_signal_url(value, "upstream_exchange.token_endpoint")

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and not _SCOPE.match(value):
            raise ValueError("scope must be space-separated OAuth scope tokens (RFC 6749 §3.3)")
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not _VSCHAR.match(value):
            raise ValueError("client_id must be printable ASCII (RFC 6749 Appendix A.1)")
        return value

    @field_validator("client_secret")
    @classmethod
    def _client_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not (
            1 <= len(value.get_secret_value()) <= 8192 and _VSCHAR.match(value.get_secret_value())
        ):
            raise ValueError("client_secret must be 1 to 8192 printable ASCII characters")
        return value

    def exchange(self) -> UpstreamExchange:
        return UpstreamExchange(
            token_endpoint=self.token_endpoint,
            audience=self.audience,
            client_id=self.client_id,
            scope=self.scope,
        )


class ToolSpec(_Spec):
    id: Name
    audience: str = Field(max_length=1024)
    upstream_url: str = Field(max_length=2048)
    kind: ToolKind = ToolKind.HTTP
    actions: list[ActionSpec] = Field(min_length=1, max_length=256)
    upstream_auth_header: str = "Authorization"
    # Write-only: stored encrypted, never returned.
    upstream_secret: SecretStr | None = Field(None)
    # Instead of a static secret: per-task tokens from the upstream's authorization server.
    upstream_exchange: UpstreamExchangeSpec | None = None
    description: str = Field("", max_length=1000)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_TOOL_IDS:
            raise ValueError(f"{value!r} is reserved for taskbound's own endpoints")
        return value

    @field_validator("audience")
    @classmethod
    def _audience(cls, value: str) -> str:
        return _absolute_url(value, "audience")

    @field_validator("upstream_url")
    @classmethod
    def _upstream(cls, value: str) -> str:
        return _absolute_url(value, "upstream_url")

    @field_validator("upstream_auth_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("upstream_auth_header must be an HTTP header name")
        if value.lower() in _GATEWAY_HEADERS:
            raise ValueError(f"upstream_auth_header {value!r} is set by the gateway itself")
        return value

    @field_validator("upstream_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not 1 <= len(value.get_secret_value()) <= 8192:
            raise ValueError("upstream_secret must be 1 to 8192 characters")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> ToolSpec:
        if self.upstream_secret is not None and self.upstream_exchange is not None:
            raise ValueError(
                "a tool has either an upstream_secret or an upstream_exchange, not both"
            )
        return self

    @model_validator(mode="after")
    def _matchers(self) -> ToolSpec:
        names: set[str] = set()
        matchers: set[tuple[str, ...]] = set()
        for a in self.actions:
            if a.name in names:
                raise ValueError(f"duplicate action name {a.name!r}")
            names.add(a.name)
            if self.kind is ToolKind.HTTP:
                if a.method is None or a.path is None or a.mcp_tool is not None:
                    raise ValueError(f"HTTP action {a.name!r} needs method and path only")
                key: tuple[str, ...] = (a.method, re.sub(r"\{[^}]+\}", "{}", a.path))
                if a.input_schema is not None:
                    raise ValueError(f"HTTP action {a.name!r}: input_schema is for MCP tools")
            else:
                if a.mcp_tool is None or a.method is not None or a.path is not None:
                    raise ValueError(f"MCP action {a.name!r} needs mcp_tool only")
                key = (a.mcp_tool,)
            if key in matchers:
                raise ValueError(f"action {a.name!r} has the same matcher as another action")
            matchers.add(key)
        if self.kind is ToolKind.HTTP:
            # The gateway's router must be able to honour every template exactly.
            try:
                HttpRouter.for_tool(tool_from_spec(self, _EPOCH, _EPOCH))
            except ConfigError as exc:
                raise ValueError(exc.detail) from None
        return self


class RegistryDocument(_Spec):
    """What ``taskbound apply -f`` reads: the registry declared as data, kept in git."""

    owners: list[OwnerSpec] = Field(default_factory=list, max_length=10_000)
    tools: list[ToolSpec] = Field(default_factory=list, max_length=10_000)
    agents: list[AgentSpec] = Field(default_factory=list, max_length=10_000)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    created: tuple[str, ...]
    updated: tuple[str, ...]
    unchanged: tuple[str, ...]


def _secret_aad(tool_id: str) -> bytes:
    return b"taskbound:tool-secret:" + tool_id.encode()


def _client_secret_aad(tool_id: str, exchange: UpstreamExchange) -> bytes:
    """A client secret decrypts only for the tool, token endpoint and client id it was
    given for: rows edited in the database can neither send it to another endpoint nor
    pass it off as a static secret injected towards the tool."""
    return b"\x00".join(
        [
            b"taskbound:tool-client-secret",
            tool_id.encode(),
            exchange.token_endpoint.encode(),
            exchange.client_id.encode(),
        ]
    )


def check_secret_change(spec: ToolSpec, old: Tool | None) -> None:
    """The tool's secret slot holds either its static secret or its exchange client
    secret. Refuse a spec that would leave the slot holding the wrong one."""
    new = spec.upstream_exchange
    before = None if old is None else old.upstream_exchange
    if new is not None and new.client_secret is None:
        if before is None:
            raise InvalidRequest(
                f"tool {spec.id!r}: upstream_exchange.client_secret is required when a tool "
                "starts using an upstream exchange"
            )
        if (before.token_endpoint, before.client_id) != (new.token_endpoint, new.client_id):
            raise InvalidRequest(
                f"tool {spec.id!r}: upstream_exchange.client_secret is required when the "
                "token endpoint or the client id changes"
            )
    if new is None and before is not None and spec.upstream_secret is None:
        raise InvalidRequest(
            f"tool {spec.id!r} stops using its upstream exchange: give its upstream_secret, "
            "which replaces the stored client secret"
        )


class Registry:
    def __init__(
        self,
        storage: Storage,
        box: SecretBox,
        clock: Clock,
        *,
        on_tools_changed: Callable[[], Awaitable[None]] | None = None,
        events: Events | None = None,
    ) -> None:
        self._storage = storage
        self._box = box
        self._clock = clock
        # Policy's schema follows the tools: told at once in this process; other
        # processes notice on their next sweep.
        self._on_tools_changed = on_tools_changed
        self._events = events or Events()

    async def _record(
        self,
        event: str,
        detail: str,
        *,
        cause: str,
        agent: str | None = None,
        owner: str | None = None,
        tool: str | None = None,
    ) -> None:
        """Record a change already made (one that took authority away, or a summary)."""
        await self._storage.append_audit(
            change_event(
                self._clock, event, detail, cause=cause, agent=agent, owner=owner, tool=tool
            )
        )

    def _recorded(
        self,
        event: str,
        detail: str,
        *,
        cause: str,
        agent: str | None = None,
        owner: str | None = None,
        tool: str | None = None,
    ) -> AbstractAsyncContextManager[None]:
        """The store call in this block commits with its record, or neither lands."""
        return recorded(
            self._storage,
            change_event(
                self._clock, event, detail, cause=cause, agent=agent, owner=owner, tool=tool
            ),
        )

    async def _tools_changed(self, tool_id: str) -> None:
        self._events.publish(Change.TOOL_CHANGED, tool_id)
        if self._on_tools_changed is not None:
            await self._on_tools_changed()

    # --- owners ------------------------------------------------------------------------

    async def create_owner(self, spec: OwnerSpec, *, cause: str = "system") -> Owner:
        now = self._clock.now()
        owner = Owner(spec.id, spec.contact, frozenset(spec.roles), now, now, bool(spec.disabled))
        async with self._recorded(
            "admin.owner.created",
            f"owner {owner.id} created: {_owner_facts(owner)}",
            cause=cause,
            owner=owner.id,
        ):
            await self._storage.create_owner(owner)
        log.info("owner created", extra={"event": "owner.created", "owner": owner.id})
        return owner

    async def update_owner(self, spec: OwnerSpec, *, cause: str = "system") -> Owner:
        old = await self._storage.get_owner(spec.id)
        if old is None:
            raise NotFound(f"no owner {spec.id!r}")
        owner = Owner(
            spec.id,
            spec.contact,
            frozenset(spec.roles),
            old.created_at,
            self._clock.now(),
            old.disabled if spec.disabled is None else spec.disabled,
        )
        detail = f"owner {owner.id} updated: {_owner_facts(owner)}"
        if owner.disabled and not old.disabled:
            detail += "; disabled: every live task on its behalf revoked"
        elif old.disabled and not owner.disabled:
            detail += "; enabled again (no revoked task comes back)"
        async with self._recorded("admin.owner.updated", detail, cause=cause, owner=owner.id):
            await self._storage.update_owner(owner, cause=cause)
        self._events.publish(Change.OWNER_CHANGED, owner.id)
        log.info("owner updated", extra={"event": "owner.updated", "owner": owner.id})
        return owner

    # --- tools -------------------------------------------------------------------------

    def _tool(self, spec: ToolSpec, created_at: Any = None) -> Tool:
        now = self._clock.now()
        return tool_from_spec(spec, created_at or now, now)

    def _seal_secret(self, spec: ToolSpec) -> bytes | None:
        """The ciphertext for the tool's secret slot: its static secret or its exchange
        client secret (never both, see ToolSpec); None keeps what is stored."""
        exchange = spec.upstream_exchange
        if exchange is not None:
            if exchange.client_secret is None:
                return None
            return self._box.encrypt(
                exchange.client_secret.get_secret_value().encode(),
                aad=_client_secret_aad(spec.id, exchange.exchange()),
            )
        if spec.upstream_secret is None:
            return None
        return self._box.encrypt(
            spec.upstream_secret.get_secret_value().encode(), aad=_secret_aad(spec.id)
        )

    async def _check_audience_unique(self, spec: ToolSpec) -> None:
        for other in await self._storage.list_tools():
            if other.id != spec.id and other.audience == spec.audience:
                raise InvalidRequest(
                    f"audience {spec.audience!r} is already the audience of tool {other.id!r}"
                )

    async def create_tool(self, spec: ToolSpec, *, cause: str = "system") -> Tool:
        check_secret_change(spec, None)
        await self._check_audience_unique(spec)
        tool = self._tool(spec)
        async with self._recorded(
            "admin.tool.created",
            f"tool {tool.id} created: {_tool_facts(tool, spec, created=True)}",
            cause=cause,
            tool=tool.id,
        ):
            await self._storage.create_tool(tool, self._seal_secret(spec))
        log.info("tool created", extra={"event": "tool.created", "tool": tool.id})
        await self._tools_changed(tool.id)
        return tool

    async def update_tool(self, spec: ToolSpec, *, cause: str = "system") -> Tool:
        old = await self._storage.get_tool(spec.id)
        if old is None:
            raise NotFound(f"no tool {spec.id!r}")
        if old.audience != spec.audience:
            # An audience names one destination for as long as any credential for it may
            # live; it never moves, so it can never be handed to another tool.
            raise InvalidRequest(
                f"tool {spec.id!r} keeps its audience {old.audience!r}; register a new tool "
                "for a new audience"
            )
        check_secret_change(spec, old)
        await self._check_audience_unique(spec)
        tool = self._tool(spec, old.created_at)
        async with self._recorded(
            "admin.tool.updated",
            f"tool {tool.id} updated: {_tool_facts(tool, spec, created=False)}",
            cause=cause,
            tool=tool.id,
        ):
            await self._storage.update_tool(tool, self._seal_secret(spec))
        log.info("tool updated", extra={"event": "tool.updated", "tool": tool.id})
        await self._tools_changed(tool.id)
        return tool

    async def has_secret(self, tool_id: str) -> bool:
        return await self._storage.get_tool_secret(tool_id) is not None

    async def upstream_secret(self, tool_id: str) -> str | None:
        """The decrypted upstream secret, for the gateway only (invariant 4)."""
        blob = await self._storage.get_tool_secret(tool_id)
        if blob is None:
            return None
        return self._box.decrypt(blob, aad=_secret_aad(tool_id)).decode()

    async def upstream_client_secret(self, tool: Tool) -> str | None:
        """The decrypted client secret of the tool's upstream exchange, for the gateway
        only (invariant 4); None when the tool has no exchange or no secret is stored. A
        ciphertext stored for another endpoint, client id or tool fails to decrypt."""
        if tool.upstream_exchange is None:
            return None
        blob = await self._storage.get_tool_secret(tool.id)
        if blob is None:
            return None
        aad = _client_secret_aad(tool.id, tool.upstream_exchange)
        return self._box.decrypt(blob, aad=aad).decode()

    # --- agents ------------------------------------------------------------------------

    async def _agent(
        self, spec: AgentSpec, created_at: Any = None, current: AgentState | None = None
    ) -> Agent:
        if await self._storage.get_owner(spec.owner) is None:
            raise ReferenceError_(f"no owner {spec.owner!r}")
        ceiling = frozenset(Scope(s.tool, s.tier) for s in spec.ceiling)
        for scope in sorted(ceiling):
            tool = await self._storage.get_tool(scope.tool)
            if tool is None:
                raise ReferenceError_(f"ceiling names unknown tool {scope.tool!r}")
            if scope.tier not in tool.tiers():
                raise InvalidRequest(f"tool {scope.tool!r} has no {scope.tier.value} actions")
        now = self._clock.now()
        return Agent(
            spiffe_id=spec.spiffe_id,
            owner_id=spec.owner,
            state=spec.state or current or AgentState.ACTIVE,
            ceiling=ceiling,
            created_at=created_at or now,
            updated_at=now,
            description=spec.description,
        )

    async def create_agent(self, spec: AgentSpec, *, cause: str = "system") -> Agent:
        agent = await self._agent(spec)
        async with self._recorded(
            "admin.agent.created",
            f"agent created: {_agent_facts(agent)}",
            cause=cause,
            agent=agent.spiffe_id,
            owner=agent.owner_id,
        ):
            await self._storage.create_agent(agent)
        log.info("agent created", extra={"event": "agent.created", "agent": agent.spiffe_id})
        return agent

    async def update_agent(self, spec: AgentSpec, *, cause: str = "system") -> Agent:
        old = await self._storage.get_agent(spec.spiffe_id)
        if old is None:
            raise NotFound(f"no agent {spec.spiffe_id!r}")
        agent = await self._agent(spec, old.created_at, old.state)
        detail = f"agent updated: {_agent_facts(agent)}"
        if old.owner_id != agent.owner_id:
            detail += f"; owner was {old.owner_id}"
        if old.state is not agent.state:
            detail += f"; state was {old.state.value}{_revoked_by_state(old.state, agent.state)}"
        async with self._recorded(
            "admin.agent.updated", detail, cause=cause, agent=agent.spiffe_id, owner=agent.owner_id
        ):
            await self._storage.update_agent(agent, cause=cause)
        self._events.publish(Change.AGENT_CHANGED, agent.spiffe_id)
        log.info("agent updated", extra={"event": "agent.updated", "agent": agent.spiffe_id})
        return agent

    async def set_agent_state(
        self, spiffe_id: str, state: AgentState, *, cause: str, reason: str | None
    ) -> tuple[Agent, bool]:
        """Suspend, quarantine, resume or retire an agent. Leaving ACTIVE revokes all its
        live tasks at once; a suspended or quarantined agent cannot start tasks; RETIRED
        is final. Idempotent: ``changed`` is False when the agent already was in ``state``
        (and nothing is recorded)."""
        old = await self._storage.get_agent(spiffe_id)
        if old is None:
            raise NotFound("no such agent")
        if old.state is AgentState.RETIRED and state is not AgentState.RETIRED:
            raise Conflict("a retired agent cannot change state")
        # The store decides under its row lock, so concurrent calls report one change.
        result = await self._storage.change_agent_state(
            spiffe_id, state, self._clock.now(), cause=cause, reason=reason
        )
        if result is None:
            raise NotFound("no such agent")
        agent, changed = result
        if not changed:
            return agent, False
        self._events.publish(Change.AGENT_CHANGED, spiffe_id)
        detail = f"{old.state.value} -> {agent.state.value}"
        if reason:
            detail += f": {clip(reason)}"
        await self._record(
            "admin.agent.state_changed",
            detail + _revoked_by_state(old.state, agent.state),
            cause=cause,
            agent=spiffe_id,
            owner=agent.owner_id,
        )
        log.warning(
            "agent state changed",
            extra={
                "event": "agent.state_changed",
                "agent": spiffe_id,
                "from": old.state.value,
                "to": state.value,
                "cause": cause,
                "reason": reason,
            },
        )
        return agent, True

    # --- declarative apply ---------------------------------------------------------------

    async def apply(
        self, doc: RegistryDocument, *, dry_run: bool = False, cause: str = "system"
    ) -> ApplyResult:
        """Create or update everything the document declares, owners then tools then
        agents. The whole document is validated (including references between its own
        entries) before anything is written; re-applying converges, so an interrupted
        apply is repaired by running it again. Each creation and update is recorded as
        such, and an apply that changed anything by an ``admin.registry.applied`` record."""
        via = "registry apply" if cause == "system" else f"{cause} (registry apply)"
        _check_unique(doc)
        owners = {o.id for o in doc.owners} | {o.id for o in await self._storage.list_owners()}
        tools = {t.id: t for t in doc.tools}
        for stored in await self._storage.list_tools():
            tools.setdefault(stored.id, _spec_of(stored))
        for a in doc.agents:
            if a.owner not in owners:
                raise ReferenceError_(f"agent {a.spiffe_id}: no owner {a.owner!r}")
            for s in a.ceiling:
                tool = tools.get(s.tool)
                if tool is None:
                    raise ReferenceError_(f"agent {a.spiffe_id}: unknown tool {s.tool!r}")
                if s.tier not in {x.tier for x in tool.actions}:
                    raise InvalidRequest(
                        f"agent {a.spiffe_id}: tool {s.tool!r} has no {s.tier.value} actions"
                    )
        for t in doc.tools:
            # Before anything is written: a spec that would leave a tool's secret slot
            # holding the wrong kind of secret fails the whole document.
            check_secret_change(t, await self._storage.get_tool(t.id))
        audiences: dict[str, str] = {}
        for spec in tools.values():
            if audiences.setdefault(spec.audience, spec.id) != spec.id:
                raise InvalidRequest(
                    f"tools {audiences[spec.audience]!r} and {spec.id!r} share an audience"
                )
        created: list[str] = []
        updated: list[str] = []
        unchanged: list[str] = []

        async def put(
            kind: str, key: str, exists: bool, same: bool, create: Any, update: Any
        ) -> None:
            label = f"{kind}/{key}"
            if not exists:
                created.append(label)
                if not dry_run:
                    await create()
            elif same:
                unchanged.append(label)
            else:
                updated.append(label)
                if not dry_run:
                    await update()

        for o in doc.owners:
            old_o = await self._storage.get_owner(o.id)
            same = old_o is not None and (old_o.contact, old_o.roles, old_o.disabled) == (
                o.contact,
                frozenset(o.roles),
                old_o.disabled if o.disabled is None else o.disabled,
            )
            await put(
                "owner",
                o.id,
                old_o is not None,
                same,
                lambda o=o: self.create_owner(o, cause=via),
                lambda o=o: self.update_owner(o, cause=via),
            )
        for t in doc.tools:
            old_t = await self._storage.get_tool(t.id)
            same = (
                old_t is not None
                and t.upstream_secret is None
                and (t.upstream_exchange is None or t.upstream_exchange.client_secret is None)
                and _spec_of(old_t) == t
            )
            await put(
                "tool",
                t.id,
                old_t is not None,
                same,
                lambda t=t: self.create_tool(t, cause=via),
                lambda t=t: self.update_tool(t, cause=via),
            )
        for a in doc.agents:
            old_a = await self._storage.get_agent(a.spiffe_id)
            same = old_a is not None and (
                old_a.owner_id,
                old_a.state,
                old_a.ceiling,
                old_a.description,
            ) == (
                a.owner,
                a.state or old_a.state,
                frozenset(Scope(s.tool, s.tier) for s in a.ceiling),
                a.description,
            )
            await put(
                "agent",
                a.spiffe_id,
                old_a is not None,
                same,
                lambda a=a: self.create_agent(a, cause=via),
                lambda a=a: self.update_agent(a, cause=via),
            )
        if not dry_run and (created or updated):
            await self._record(
                "admin.registry.applied",
                f"registry document applied: created {listing(created)}; updated "
                f"{listing(updated)}; {len(unchanged)} unchanged",
                cause=cause,
            )
        return ApplyResult(tuple(created), tuple(updated), tuple(unchanged))


def tool_from_spec(spec: ToolSpec, created_at: datetime, updated_at: datetime) -> Tool:
    return Tool(
        id=spec.id,
        audience=spec.audience,
        upstream_url=spec.upstream_url,
        kind=spec.kind,
        actions=tuple(Action(**a.model_dump()) for a in spec.actions),
        created_at=created_at,
        updated_at=updated_at,
        upstream_auth_header=spec.upstream_auth_header,
        description=spec.description,
        upstream_exchange=(
            None if spec.upstream_exchange is None else spec.upstream_exchange.exchange()
        ),
    )


def owner_from_spec(spec: OwnerSpec, when: datetime) -> Owner:
    return Owner(spec.id, spec.contact, frozenset(spec.roles), when, when, bool(spec.disabled))


def agent_from_spec(spec: AgentSpec, when: datetime) -> Agent:
    return Agent(
        spiffe_id=spec.spiffe_id,
        owner_id=spec.owner,
        state=spec.state or AgentState.ACTIVE,
        ceiling=frozenset(Scope(s.tool, s.tier) for s in spec.ceiling),
        created_at=when,
        updated_at=when,
        description=spec.description,
    )


def _owner_facts(owner: Owner) -> str:
    roles = listing(sorted(r.value for r in owner.roles))
    return f"roles {roles}; {'disabled' if owner.disabled else 'enabled'}"


def _agent_facts(agent: Agent) -> str:
    ceiling = listing(f"{s.tool}:{s.tier.value}" for s in sorted(agent.ceiling))
    return f"owner {agent.owner_id}; state {agent.state.value}; ceiling {ceiling}"


def _revoked_by_state(old: AgentState, new: AgentState) -> str:
    if old is AgentState.ACTIVE and new is not AgentState.ACTIVE:
        return "; every live task of the agent revoked"
    return ""


def _tool_facts(tool: Tool, spec: ToolSpec, *, created: bool) -> str:
    """What a record says about a tool: never its secret, nor anything of its upstream URL
    but where it points (a query string may carry a key)."""
    actions = listing(f"{a.name}:{a.tier.value}" for a in tool.actions)
    facts = (
        f"{tool.kind.value}; audience {clip(tool.audience)}; upstream "
        f"{_origin(tool.upstream_url)}; actions {actions}"
    )
    exchange = spec.upstream_exchange
    if exchange is not None:
        secret = "set" if exchange.client_secret is not None else "unchanged"
        facts += (
            f"; upstream exchange at {_origin(exchange.token_endpoint)} as client "
            f"{clip(exchange.client_id, 100)} (client secret {secret})"
        )
    elif spec.upstream_secret is not None:
        facts += "; upstream secret set"
    else:
        facts += "; no upstream secret" if created else "; upstream secret unchanged"
    return facts


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: never its user information, path or query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port is not None else ""
    return clip(f"{parts.scheme}://{parts.hostname or ''}{port}")


def _check_unique(doc: RegistryDocument) -> None:
    for kind, keys in (
        ("owner", [o.id for o in doc.owners]),
        ("tool", [t.id for t in doc.tools]),
        ("agent", [a.spiffe_id for a in doc.agents]),
    ):
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise InvalidRequest(f"the document declares {kind} {key!r} twice")
            seen.add(key)


def _spec_of(tool: Tool) -> ToolSpec:
    """The spec that would produce ``tool`` (without its secret), to detect changes."""
    return ToolSpec(
        id=tool.id,
        audience=tool.audience,
        upstream_url=tool.upstream_url,
        kind=tool.kind,
        actions=[ActionSpec.model_validate(dataclasses.asdict(a)) for a in tool.actions],
        upstream_auth_header=tool.upstream_auth_header,
        upstream_secret=None,
        upstream_exchange=None
        if tool.upstream_exchange is None
        else UpstreamExchangeSpec(
            token_endpoint=tool.upstream_exchange.token_endpoint,
            audience=tool.upstream_exchange.audience,
            scope=tool.upstream_exchange.scope,
            client_id=tool.upstream_exchange.client_id,
        ),
        description=tool.description,
    )


def owner_view(owner: Owner) -> dict[str, Any]:
    return {
        "id": owner.id,
        "contact": owner.contact,
        "roles": sorted(r.value for r in owner.roles),
        "disabled": owner.disabled,
        "created_at": owner.created_at.isoformat(),
        "updated_at": owner.updated_at.isoformat(),
    }


def agent_view(agent: Agent) -> dict[str, Any]:
    return {
        "spiffe_id": agent.spiffe_id,
        "owner": agent.owner_id,
        "state": agent.state.value,
        "ceiling": [{"tool": s.tool, "tier": s.tier.value} for s in sorted(agent.ceiling)],
        "description": agent.description,
        "created_at": agent.created_at.isoformat(),
        "updated_at": agent.updated_at.isoformat(),
    }


def tool_view(tool: Tool, *, has_secret: bool) -> dict[str, Any]:
    """A tool as the API shows it: never a secret, only whether one is set. ``has_secret``
    says whether the tool's secret slot is filled: its static secret, or the client secret
    of its upstream exchange."""
    exchange = tool.upstream_exchange
    return {
        "id": tool.id,
        "audience": tool.audience,
        "upstream_url": tool.upstream_url,
        "kind": tool.kind.value,
        "upstream_auth_header": tool.upstream_auth_header,
        "has_upstream_secret": has_secret and exchange is None,
        "upstream_exchange": None
        if exchange is None
        else {
            "token_endpoint": exchange.token_endpoint,
            "audience": exchange.audience,
            "scope": exchange.scope,
            "client_id": exchange.client_id,
            "has_client_secret": has_secret,
        },
        "description": tool.description,
        "actions": [
            {
                k: v
                for k, v in {
                    "name": a.name,
                    "tier": a.tier.value,
                    "method": a.method,
                    "path": a.path,
                    "mcp_tool": a.mcp_tool,
                    "risk": a.risk.value,
                    "requires_approval": a.requires_approval,
                    "input_schema": None if a.input_schema is None else dict(a.input_schema),
                }.items()
                if v is not None
            }
            for a in tool.actions
        ],
        "created_at": tool.created_at.isoformat(),
        "updated_at": tool.updated_at.isoformat(),
    }

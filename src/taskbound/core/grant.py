"""The grant decision at task start: may this agent, for this owner and intent, get these
scopes? (DESIGN.md §3 flow 3, §5 "grant".)

:class:`GrantDecider` is the interface the broker calls; :class:`CeilingDecider` is the
registry-only decision (agent state, owner, ceiling, tool tiers and actions). The Cedar
decision point plugs in behind the same interface. Pure: everything is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from taskbound.core.breakglass import BreakGlass, relied_on
from taskbound.core.model import (
    Agent,
    AgentState,
    Owner,
    Scope,
    ScopeDenial,
    ScopeGrant,
    Tier,
    Tool,
)


@dataclass(frozen=True, slots=True)
class ScopeRequest:
    """One requested scope: a tool, a tier and optionally a subset of that tier's actions."""

    tool: str
    tier: Tier
    actions: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class GrantRequest:
    agent: Agent
    owner: Owner | None
    owner_id: str
    purpose: str
    constraints: Mapping[str, Any]
    scopes: tuple[ScopeRequest, ...]
    ttl: timedelta
    tools: Mapping[str, Tool]
    now: datetime
    # Delegation (token exchange): how deep in a chain this grant would be.
    delegation_depth: int = 0
    # ... and the further agents and owners policy may look at (the task's agent, the
    # delegate's owner).
    others: tuple[Agent, ...] = ()
    other_owners: tuple[Owner, ...] = ()
    # The break-glass exceptions of ``agent`` (those not active at ``now`` count for
    # nothing): a scope beyond the ceiling is granted only when one of them adds it.
    exceptions: tuple[BreakGlass, ...] = ()
    # Delegation: the exception the parent credential relies on. The child inherits it
    # (and is flagged with it), so policy sees it as active whatever ``exceptions`` add.
    inherited_exception: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal of the whole task, with a stable code (mapped to an error by the caller)."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class GrantDecision:
    granted: tuple[ScopeGrant, ...]
    denied: tuple[ScopeDenial, ...]
    refusal: Refusal | None = None
    # Which rules or policies determined the outcome, for the audit trail.
    determined_by: tuple[str, ...] = ()


class GrantDecider(Protocol):
    def decide(self, request: GrantRequest) -> GrantDecision: ...


class CeilingDecider:
    """Registry-only grant decision.

    Whole-task refusals: the agent is not active; the owner is unknown or disabled; the task
    is on behalf of someone other than the agent's accountable owner. Per scope: the tool
    must exist, offer the tier, lie within the agent's ceiling (or a break-glass exception
    active now adds it: the grant then names the exception), and every requested action
    must be an action of that tier. Anything not positively allowed is denied.
    """

    def decide(self, request: GrantRequest) -> GrantDecision:
        agent = request.agent
        if agent.state is not AgentState.ACTIVE:
            return _refuse("agent_not_active", f"agent state is {agent.state.value}")
        owner = request.owner
        if owner is None or owner.id != request.owner_id:
            return _refuse("owner_not_allowed", f"owner {request.owner_id!r} is not registered")
        if owner.disabled:
            return _refuse("owner_not_allowed", f"owner {owner.id!r} is disabled")
        if agent.owner_id != owner.id:
            return _refuse(
                "owner_not_allowed",
                f"agent is accountable to {agent.owner_id!r}, not {owner.id!r}",
            )
        granted: list[ScopeGrant] = []
        denied: list[ScopeDenial] = []
        for req in request.scopes:
            outcome = _decide_scope(req, request, request.tools.get(req.tool))
            if isinstance(outcome, ScopeGrant):
                granted.append(outcome)
            else:
                denied.append(outcome)
        return GrantDecision(tuple(granted), tuple(denied), determined_by=("registry-ceiling",))


def _refuse(code: str, reason: str) -> GrantDecision:
    return GrantDecision((), (), Refusal(code, reason), determined_by=("registry-ceiling",))


def _decide_scope(
    req: ScopeRequest, request: GrantRequest, tool: Tool | None
) -> ScopeGrant | ScopeDenial:
    def deny(code: str, reason: str) -> ScopeDenial:
        return ScopeDenial(req.tool, req.tier.value, code, reason)

    if tool is None:
        return deny("unknown_tool", f"no tool {req.tool!r} is registered")
    tier_actions = tool.actions_of(req.tier)
    if not tier_actions:
        return deny("tier_not_offered", f"tool {tool.id!r} has no {req.tier.value} actions")
    scope = Scope(tool.id, req.tier)
    exception = None
    if scope not in request.agent.ceiling:
        bg = relied_on(request.agent, scope, request.exceptions, request.now)
        if bg is None:
            return deny(
                "beyond_ceiling", f"{tool.id}:{req.tier.value} is outside the agent's ceiling"
            )
        exception = bg.id
    names = tuple(a.name for a in tier_actions)
    if req.actions is None:
        return ScopeGrant(tool.id, req.tier, names, exception)
    unknown = sorted(set(req.actions) - set(names))
    if unknown:
        return deny(
            "unknown_action",
            f"not {req.tier.value} actions of {tool.id!r}: {', '.join(unknown)}",
        )
    # Keep the registry's order so identical requests yield identical credentials.
    wanted = set(req.actions)
    return ScopeGrant(tool.id, req.tier, tuple(n for n in names if n in wanted), exception)

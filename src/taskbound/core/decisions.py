"""The two decision points on one policy set (DESIGN.md §5): **grant** (task start) and
**call** (the gateway). This module turns taskbound's facts into Cedar requests; the
policy core decides them. Pure: the time and every fact are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from taskbound.core.cedar_schema import (
    ActionInfo,
    TaskFacts,
    action_id,
    arguments_for_policy,
    registry_entities,
    task_entity,
)
from taskbound.core.model import Agent, Owner, Tool
from taskbound.core.policy import (
    CompiledPolicies,
    Decision,
    DecisionRequest,
    EntityRef,
    EntitySet,
    Outcome,
    decide,
)

Point = Literal["grant", "call"]


@dataclass(frozen=True, slots=True)
class Situation:
    """What surrounds a decision besides the agent, task and action."""

    now: datetime
    environment: str
    delegation_depth: int = 0
    call_rate: int = 0
    approval_granted: bool = False
    exception_active: bool = False


def build_context(
    action: ActionInfo,
    task: TaskFacts,
    point: Point,
    situation: Situation,
    *,
    target: str | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Cedar context of one decision. Call arguments are converted to their typed
    Cedar view; :class:`~taskbound.core.cedar_schema.PolicyInputError` when they do not
    fit the action's declared arguments."""
    # Hours and weekdays are UTC whatever zone the caller's time carries.
    now = situation.now.astimezone(UTC)
    context: dict[str, Any] = {
        "point": point,
        "tier": action.tier.value,
        "risk": action.risk.value,
        "requires_approval": action.requires_approval,
        "task": {"__entity": {"type": "Task", "id": task.id}},
        "now": {"epoch": int(now.timestamp()), "hour": now.hour, "weekday": now.weekday()},
        "environment": situation.environment,
        "delegation_depth": situation.delegation_depth,
        "call_rate": situation.call_rate,
        "approval": {"granted": situation.approval_granted},
        "exception": {"active": situation.exception_active},
    }
    if target is not None:
        context["target"] = target
    if arguments is not None:
        context["arguments"] = arguments_for_policy(action, arguments)
    return context


def decision_entities(
    agent: Agent,
    owners: Sequence[Owner],
    task: TaskFacts,
    others: Sequence[Agent] = (),
) -> list[dict[str, Any]]:
    """The per-decision entities: the agent, its owner(s), the task and any ``others``
    (the task's own agent when a delegate acts), always fresh, so a suspended agent or a
    disabled owner is seen at once."""
    unique = {o.id: o for o in owners}
    agents = {a.spiffe_id: a for a in (agent, *others)}
    return [
        *registry_entities(list(unique.values()), list(agents.values()), []),
        task_entity(task),
    ]


def decide_action(
    policies: CompiledPolicies,
    entities: EntitySet,
    *,
    agent: Agent,
    tool: Tool,
    action: ActionInfo,
    context: Mapping[str, Any],
) -> Decision:
    """Decide one action of one tool for an agent, with ``entities`` already holding the
    per-decision entities."""
    request = DecisionRequest(
        principal=EntityRef("Agent", agent.spiffe_id),
        action=action.id,
        resource=EntityRef("Tool", tool.id),
        context=context,
    )
    return decide(policies, entities, request)


def action_info(policies: CompiledPolicies, tool_id: str, action_name: str) -> ActionInfo | None:
    """The schema's view of a tool action, or None when the schema does not know it (a
    tool registered after the policies were last compiled: the caller denies)."""
    return policies.schema.actions.get(action_id(tool_id, action_name))


def denied(policies: CompiledPolicies, reason: str) -> Decision:
    """A deny that Cedar was never asked for (e.g. an action the schema does not know)."""
    return Decision(Outcome.DENY, (), (reason,), policies.version)

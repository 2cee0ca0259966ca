"""Posture: what each agent was granted against what it used, the findings a security
team acts on, and what an agent can reach now (docs/reports.md).

Pure: the registry, the audit aggregates (:mod:`taskbound.core.usage`), the tasks of the
window, the policy set and the time are passed in; the answers are the plain dicts of the
contract in :mod:`taskbound.service.reports`.

Granted is an agent's ceiling expanded to the actions of its tools at those tiers; used is
the actions of its *allowed* ``gateway.call`` records in the window (a delegate's calls
count for the delegate, the acting agent as recorded) and of the allowed calls its delegates
made on its tasks (used via delegation: the delegation needs the parent's credential, so
the parent must keep the scope).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from taskbound.core.breakglass import BreakGlass
from taskbound.core.cedar_schema import TIERS, TaskFacts, action_id, cedar_string
from taskbound.core.decisions import (
    Situation,
    action_info,
    build_context,
    decide_action,
    decision_entities,
)
from taskbound.core.model import Agent, AgentState, Owner, Task, TaskState, Tier, Tool
from taskbound.core.policy import CompiledPolicies, Decision, EntitySet, Outcome
from taskbound.core.usage import TimelineRow, UsageRow

__all__ = [
    "DECISIONS",
    "HOURS_OF_WEEK",
    "PERMISSIVE_CONSTRAINTS",
    "ActionRef",
    "Candidate",
    "Deployment",
    "Reached",
    "Thresholds",
    "Window",
    "findings",
    "granted_actions",
    "reach",
    "recommendation",
    "reference_week",
    "rfc3339",
    "share",
    "shared_secret_reach",
    "usage_report",
]

#: The decisions of a gateway call, in the order reports show them.
DECISIONS: Final = ("allow", "deny", "approval_required", "error")
#: The intent of a reach question: every tier named, so that policies that let the intent
#: open a tier (the default pack's ``tiers`` constraint) are taken at their widest.
PERMISSIVE_CONSTRAINTS: Final[Mapping[str, Any]] = {"tiers": list(TIERS)}
_TIER_ORDER: Final = {t: i for i, t in enumerate(TIERS)}
_SEVERITY_ORDER: Final = {"high": 0, "medium": 1, "low": 2}
# A timeline longer than this lists only the days that have records.
_MAX_FILLED_DAYS: Final = 400


def rfc3339(when: datetime) -> str:
    """A UTC time as RFC 3339 with a ``Z``."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def share(part: int, whole: int) -> float:
    """``part / whole`` rounded to 4 places; 0.0 when ``whole`` is 0."""
    return round(part / whole, 4) if whole else 0.0


@dataclass(frozen=True, slots=True)
class Window:
    """``since`` inclusive, ``until`` exclusive, both timezone-aware UTC."""

    since: datetime
    until: datetime

    def as_dict(self) -> dict[str, str]:
        return {"since": rfc3339(self.since), "until": rfc3339(self.until)}


@dataclass(frozen=True, slots=True)
class ActionRef:
    """One (tool, tier, action) of the registry."""

    tool: str
    tier: str
    action: str

    @property
    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.tool, _TIER_ORDER.get(self.tier, len(TIERS)), self.tier, self.action)

    @property
    def cedar_id(self) -> str:
        return action_id(self.tool, self.action)

    def as_dict(self) -> dict[str, str]:
        return {"tool": self.tool, "tier": self.tier, "action": self.action}


def _sorted(refs: Iterable[ActionRef]) -> list[ActionRef]:
    return sorted(set(refs), key=lambda r: r.sort_key)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The finding thresholds (``[reports]`` in the configuration)."""

    many_tools: int = 5
    unused_share: float = 0.5
    task_unused_share: float = 0.5
    task_min_actions: int = 2
    max_credential_ttl_seconds: int = 900
    max_task_ttl_seconds: int = 8 * 3600
    standing_breakglass_seconds: int = 4 * 3600
    shared_secret_agents: int = 3


@dataclass(frozen=True, slots=True)
class Deployment:
    """The live settings the posture findings look at."""

    dpop_required: bool
    credential_ttl_cap_seconds: int
    task_ttl_cap_seconds: int
    dev_issuer: bool
    breakglass_review_within: timedelta
    # Tools holding a static upstream secret (not a per-task upstream exchange).
    static_secret_tools: frozenset[str] = field(default_factory=frozenset)


# --- granted and used ---------------------------------------------------------------------


def granted_actions(agent: Agent, tools: Mapping[str, Tool]) -> list[ActionRef]:
    """The agent's ceiling expanded to the actions of its tools at those tiers (a scope of
    an unregistered tool, or a tier the tool does not offer, grants nothing)."""
    refs: list[ActionRef] = []
    for scope in agent.ceiling:
        tool = tools.get(scope.tool)
        if tool is None:
            continue
        refs.extend(
            ActionRef(tool.id, scope.tier.value, a.name) for a in tool.actions_of(scope.tier)
        )
    return _sorted(refs)


def _ref_of(row: UsageRow, tools: Mapping[str, Tool]) -> ActionRef | None:
    if row.tool is None or row.action is None:
        return None
    tool = tools.get(row.tool)
    if tool is not None:
        for a in tool.actions:
            if a.name == row.action:
                return ActionRef(tool.id, a.tier.value, a.name)
    return ActionRef(row.tool, row.tier or "", row.action)


def policy_id_of(agent_id: str) -> str:
    """The id (and file name) of an agent's least-privilege policy: a readable slug of its
    SPIFFE ID and always 8 hex of its SHA-256, so that two IDs the slug cannot tell apart
    (``spiffe://a.b/x`` and ``spiffe://a-b/X``) never share a policy id or a file."""
    slug = re.sub(r"[^a-z0-9]+", "-", agent_id.removeprefix("spiffe://").lower()).strip("-")
    digest = hashlib.sha256(agent_id.encode()).hexdigest()[:8]
    return f"least-privilege-{slug[:48].rstrip('-') or 'agent'}-{digest}"


def _cedar_text(agent: Agent, forbidden: Sequence[ActionRef], window: Window) -> str:
    policy_id = policy_id_of(agent.spiffe_id)
    actions = ",\n".join(f"    Action::{cedar_string(r.cedar_id)}" for r in forbidden)
    return (
        f"// Least privilege for {agent.spiffe_id}: the actions of its kept tiers that no\n"
        f"// allowed call used between {rfc3339(window.since)} and {rfc3339(window.until)}\n"
        "// (taskbound report usage). Review, run `taskbound policy test`, then apply.\n"
        f"@id({cedar_string(policy_id)})\n"
        "forbid (\n"
        f"  principal == Agent::{cedar_string(agent.spiffe_id)},\n"
        f"  action in [\n{actions}\n  ],\n"
        "  resource\n"
        ");\n"
    )


def _q(value: str) -> str:
    # A JSON string is a valid YAML flow scalar, whatever it holds.
    return json.dumps(value, ensure_ascii=False)


def _cases_yaml(
    agent: Agent,
    used: Mapping[ActionRef, int],
    forbidden: Sequence[ActionRef],
    environment: str,
) -> str:
    tiers = ", ".join(_q(t) for t in TIERS)
    lines = [
        f"# Least privilege for {agent.spiffe_id}: `taskbound policy test` cases, run",
        "# with the registry exported beside this file as registry.yaml. What the agent",
        "# used stays allowed and the forbidden actions are denied, at the grant point, for",
        "# an intent naming every tier.",
        "registry: registry.yaml",
        "defaults:",
        f"  agent: {_q(agent.spiffe_id)}",
        "  point: grant",
        "  agent_state: active",
        "  owner_disabled: false",
        f"  task: {{purpose: {_q('least-privilege check')}, constraints: {{tiers: [{tiers}]}}}}",
        f"  situation: {{environment: {_q(environment)}}}",
        "cases:",
    ]
    for ref in _sorted(used):
        lines.append(f"  - name: {_q(f'{ref.cedar_id} stays allowed (used {used[ref]} times)')}")
        lines.append(f"    action: {_q(ref.cedar_id)}")
        lines.append("    expect: allow")
    for ref in forbidden:
        lines.append(f"  - name: {_q(f'{ref.cedar_id} is denied (granted, never used)')}")
        lines.append(f"    action: {_q(ref.cedar_id)}")
        lines.append("    expect: deny")
    return "\n".join(lines) + "\n"


def recommendation(
    agent: Agent,
    granted: Sequence[ActionRef],
    used: Mapping[ActionRef, int],
    *,
    window: Window,
    policy_files: Mapping[str, str],
    environment: str,
) -> dict[str, Any] | None:
    """The least-privilege recommendation: keep the (tool, tier) scopes some allowed call
    used, forbid the unused actions of the kept scopes in Cedar. None when nothing would
    be removed, or when the agent used nothing at all (no evidence to narrow to: the
    ``unused_authority`` finding says so instead).

    ``used`` maps each used action (within ``granted``) to its number of allowed calls,
    its own and its delegates' on its tasks (an action used only via delegation is kept:
    removing it would break the delegation); ``policy_files`` is the policy set in force
    (file name -> text), for the diff.
    """
    granted_set = set(granted)
    used_in = {r: n for r, n in used.items() if r in granted_set}
    unused = granted_set - set(used_in)
    if not used_in or not unused:
        return None
    scopes = {(r.tool, r.tier) for r in granted}
    kept = {(r.tool, r.tier) for r in used_in}
    forbidden = _sorted(r for r in unused if (r.tool, r.tier) in kept)

    def scope_list(items: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
        ordered = sorted(items, key=lambda s: (s[0], _TIER_ORDER.get(s[1], 9), s[1]))
        return [{"tool": t, "tier": tier} for t, tier in ordered]

    cedar = _cedar_text(agent, forbidden, window) if forbidden else ""
    diff = ""
    if cedar:
        name = f"{policy_id_of(agent.spiffe_id)}.cedar"
        before = policy_files.get(name)
        diff = "".join(
            difflib.unified_diff(
                (before or "").splitlines(keepends=True),
                cedar.splitlines(keepends=True),
                fromfile="/dev/null" if before is None else f"a/{name}",
                tofile=f"b/{name}",
            )
        )
    return {
        "ceiling": scope_list(kept),
        "removed": scope_list(scopes - kept),
        "forbidden_actions": [r.as_dict() for r in forbidden],
        "cedar": cedar,
        "cases_yaml": _cases_yaml(agent, used_in, forbidden, environment),
        "diff": diff,
    }


# --- the usage report -----------------------------------------------------------------------


def _timeline(rows: Sequence[TimelineRow], window: Window) -> list[dict[str, Any]]:
    days: dict[str, dict[str, Any]] = {}
    first = window.since.date()
    last = (window.until - timedelta(microseconds=1)).date()
    if (last - first).days < _MAX_FILLED_DAYS:
        day = first
        while day <= last:
            key = day.isoformat()
            days[key] = {"day": key, **dict.fromkeys(DECISIONS, 0)}
            day += timedelta(days=1)
    for row in rows:
        entry = days.setdefault(row.day, {"day": row.day, **dict.fromkeys(DECISIONS, 0)})
        if row.decision in DECISIONS:
            entry[row.decision] += row.count
    return [days[k] for k in sorted(days)]


def usage_report(
    *,
    window: Window,
    now: datetime,
    agents: Sequence[Agent],
    tools: Mapping[str, Tool],
    rows: Sequence[UsageRow],
    timeline: Sequence[TimelineRow],
    tasks: Sequence[Task],
    policy_files: Mapping[str, str],
    environment: str,
    thresholds: Thresholds = Thresholds(),
    task_agents: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``usage`` report of the contract for ``agents`` (already filtered): ``rows`` and
    ``timeline`` are the window's aggregates (``timeline`` filtered as the agents are),
    ``tasks`` the tasks created in the window.

    ``task_agents`` maps the tasks of the allowed rows to their agents: an allowed call on
    a task of another agent (a delegated credential's call, recorded with the delegate as
    its agent) also counts as used for the task's agent, as ``via_delegation``. A task not
    in it credits no one but the acting agent. ``calls`` and ``denied_calls`` stay each
    agent's own calls."""
    by_agent: dict[str, list[UsageRow]] = {}
    # Allowed calls of delegates on an agent's tasks, by that agent.
    delegated: dict[str, list[UsageRow]] = {}
    for row in rows:
        if row.agent is not None:
            by_agent.setdefault(row.agent, []).append(row)
            parent = None if row.task is None else (task_agents or {}).get(row.task)
            if row.decision == "allow" and parent is not None and parent != row.agent:
                delegated.setdefault(parent, []).append(row)
    task_counts: dict[str, int] = {}
    for task in tasks:
        task_counts[task.agent_id] = task_counts.get(task.agent_id, 0) + 1
    timeline_out = _timeline(timeline, window)
    mix = {d: sum(int(day[d]) for day in timeline_out) for d in DECISIONS}
    empty = sum(mix.values()) == 0

    entries: list[dict[str, Any]] = []
    for agent in agents:
        granted = granted_actions(agent, tools)
        mine = by_agent.get(agent.spiffe_id, [])
        calls: dict[ActionRef, int] = {}
        last: dict[ActionRef, datetime] = {}
        for row in mine:
            ref = _ref_of(row, tools)
            if row.decision != "allow" or ref is None:
                continue
            calls[ref] = calls.get(ref, 0) + row.calls
            last[ref] = max(last.get(ref, row.last_used), row.last_used)
        via: dict[ActionRef, int] = {}
        for row in delegated.get(agent.spiffe_id, []):
            ref = _ref_of(row, tools)
            if ref is None:
                continue
            via[ref] = via.get(ref, 0) + row.calls
            last[ref] = max(last.get(ref, row.last_used), row.last_used)
        used = {r: calls.get(r, 0) + via.get(r, 0) for r in calls.keys() | via.keys()}
        granted_set = set(granted)
        unused = [r for r in granted if r not in used]
        used_count = sum(1 for r in used if r in granted_set)
        entries.append(
            {
                "agent": agent.spiffe_id,
                "owner": agent.owner_id,
                "state": agent.state.value,
                "granted": [r.as_dict() for r in granted],
                "used": [
                    {
                        **r.as_dict(),
                        "calls": calls.get(r, 0),
                        "via_delegation": via.get(r, 0),
                        "last_used": rfc3339(last[r]),
                    }
                    for r in _sorted(used)
                ],
                "unused": [r.as_dict() for r in unused],
                "granted_count": len(granted),
                "used_count": used_count,
                "unused_share": share(len(unused), len(granted)),
                "tasks": task_counts.get(agent.spiffe_id, 0),
                "calls": sum(r.calls for r in mine),
                "denied_calls": sum(r.calls for r in mine if r.decision != "allow"),
                "recommendation": recommendation(
                    agent,
                    granted,
                    used,
                    window=window,
                    policy_files=policy_files,
                    environment=environment,
                ),
            }
        )
    entries.sort(key=lambda e: (-e["unused_share"], e["agent"]))

    owners: dict[str, dict[str, Any]] = {}
    for e in entries:
        o = owners.setdefault(
            e["owner"], {"owner": e["owner"], "agents": 0, "granted_count": 0, "used_count": 0}
        )
        o["agents"] += 1
        o["granted_count"] += e["granted_count"]
        o["used_count"] += e["used_count"]
    for o in owners.values():
        o["unused_share"] = share(o["granted_count"] - o["used_count"], o["granted_count"])
    granted_total = sum(e["granted_count"] for e in entries)
    used_total = sum(e["used_count"] for e in entries)
    return {
        "kind": "usage",
        "window": window.as_dict(),
        "generated_at": rfc3339(now),
        "empty": empty,
        "agents": entries,
        "owners": [owners[k] for k in sorted(owners)],
        "totals": {
            "agents": len(entries),
            "over_granted_agents": 0
            if empty
            else sum(
                1
                for e in entries
                if e["granted_count"] and e["unused_share"] >= thresholds.unused_share
            ),
            "granted_count": granted_total,
            "used_count": used_total,
            "unused_share": share(granted_total - used_total, granted_total),
            "calls": sum(e["calls"] for e in entries),
            "denied_calls": sum(e["denied_calls"] for e in entries),
            "tasks": sum(e["tasks"] for e in entries),
        },
        "timeline": timeline_out,
        "decision_mix": mix,
    }


# --- findings -------------------------------------------------------------------------------


def _finding(
    code: str,
    severity: str,
    subject_type: str,
    subject_id: str,
    message: str,
    **evidence: Any,
) -> dict[str, Any]:
    return {
        "code": code,
        "severity": severity,
        "subject": {"type": subject_type, "id": subject_id},
        "message": message,
        "evidence": evidence,
    }


def _task_refs(task: Task) -> set[ActionRef]:
    return {ActionRef(g.tool, g.tier.value, a) for g in task.granted for a in g.actions}


def findings(
    *,
    usage: Mapping[str, Any],
    now: datetime,
    agents: Sequence[Agent],
    owners: Mapping[str, Owner],
    tools: Mapping[str, Tool],
    rows: Sequence[UsageRow],
    tasks: Sequence[Task],
    breakglass: Sequence[BreakGlass],
    deployment: Deployment,
    thresholds: Thresholds = Thresholds(),
) -> list[dict[str, Any]]:
    """Every finding of the posture report, sorted by severity, code, then subject id.

    ``usage`` is the window's :func:`usage_report` over ``agents``; ``rows`` its
    aggregates; ``tasks`` the tasks created in the window; ``breakglass`` every exception
    that is active or waiting for review.
    """
    out: list[dict[str, Any]] = []
    t = thresholds
    empty = bool(usage["empty"])
    window = usage["window"]
    if empty:
        out.append(
            _finding(
                "no_activity_observed",
                "low",
                "window",
                f"{window['since']}/{window['until']}",
                "no gateway call was recorded in the window: nothing was observed, so "
                "unused authority and over-asking tasks could not be assessed",
                since=window["since"],
                until=window["until"],
            )
        )

    # -- settings
    if not deployment.dpop_required:
        out.append(
            _finding(
                "dpop_not_required",
                "high",
                "setting",
                "dpop",
                "credentials are not sender-constrained: a copied token works for anyone",
                dpop_required=False,
            )
        )
    if deployment.credential_ttl_cap_seconds > t.max_credential_ttl_seconds:
        out.append(
            _finding(
                "ttl_cap_too_long",
                "high",
                "setting",
                "credentials.max_ttl_seconds",
                f"credentials may live {deployment.credential_ttl_cap_seconds} s, above the "
                f"{t.max_credential_ttl_seconds} s threshold",
                value=deployment.credential_ttl_cap_seconds,
                threshold=t.max_credential_ttl_seconds,
            )
        )
    if deployment.task_ttl_cap_seconds > t.max_task_ttl_seconds:
        out.append(
            _finding(
                "ttl_cap_too_long",
                "medium",
                "setting",
                "credentials.task_max_ttl_seconds",
                f"tasks may live {deployment.task_ttl_cap_seconds} s, above the "
                f"{t.max_task_ttl_seconds} s threshold",
                value=deployment.task_ttl_cap_seconds,
                threshold=t.max_task_ttl_seconds,
            )
        )
    if deployment.dev_issuer:
        out.append(
            _finding(
                "dev_issuer_enabled",
                "medium",
                "setting",
                "identity.dev_issuer",
                "the development identity issuer is on: an admin token can mint any "
                "workload identity",
                dev_issuer=True,
            )
        )

    # -- agents: ceilings, owners, unused authority
    usage_by_agent = {e["agent"]: e for e in usage["agents"]}
    for agent in agents:
        aid = agent.spiffe_id
        ceiling_tools = sorted({s.tool for s in agent.ceiling})
        if len(ceiling_tools) >= t.many_tools:
            out.append(
                _finding(
                    "ceiling_spans_many_tools",
                    "medium",
                    "agent",
                    aid,
                    f"the ceiling spans {len(ceiling_tools)} tools "
                    f"(threshold {t.many_tools}): a blanket-token pattern",
                    tools=ceiling_tools,
                    threshold=t.many_tools,
                )
            )
        all_tiers = sorted(
            tool
            for tool in ceiling_tools
            if {s.tier for s in agent.ceiling if s.tool == tool} >= set(Tier)
        )
        if all_tiers:
            out.append(
                _finding(
                    "ceiling_spans_all_tiers",
                    "high",
                    "agent",
                    aid,
                    f"the ceiling holds every tier, admin included, of {', '.join(all_tiers)}",
                    tools=all_tiers,
                )
            )
        owner = owners.get(agent.owner_id)
        if owner is None:
            out.append(
                _finding(
                    "agent_owner_missing",
                    "high",
                    "agent",
                    aid,
                    f"no registered owner {agent.owner_id!r} is accountable for this agent",
                    owner=agent.owner_id,
                )
            )
        elif owner.disabled and agent.state is AgentState.ACTIVE:
            out.append(
                _finding(
                    "agent_owner_disabled",
                    "medium",
                    "agent",
                    aid,
                    f"the agent is active but its owner {owner.id!r} is disabled",
                    owner=owner.id,
                )
            )
        entry = usage_by_agent.get(aid)
        if (
            not empty
            and entry is not None
            and entry["granted_count"]
            and entry["unused_share"] >= t.unused_share
        ):
            nothing = entry["used_count"] == 0
            out.append(
                _finding(
                    "unused_authority",
                    "high" if nothing else "medium",
                    "agent",
                    aid,
                    (
                        f"none of its {entry['granted_count']} granted actions was used in "
                        "the window"
                        if nothing
                        else f"{len(entry['unused'])} of its {entry['granted_count']} granted "
                        f"actions were never used in the window "
                        f"({entry['unused_share']:.0%})"
                    ),
                    granted_count=entry["granted_count"],
                    used_count=entry["used_count"],
                    unused_share=entry["unused_share"],
                    threshold=t.unused_share,
                    removed=(entry["recommendation"] or {}).get("removed", []),
                )
            )

    # -- tasks that asked for more than they used (ended tasks of the window)
    if not empty:
        used_by_task: dict[str, set[ActionRef]] = {}
        for row in rows:
            ref = _ref_of(row, tools)
            if row.decision == "allow" and row.task is not None and ref is not None:
                used_by_task.setdefault(row.task, set()).add(ref)
        over: dict[str, list[tuple[str, int, int]]] = {}
        ended: dict[str, int] = {}
        for task in tasks:
            if task.state_at(now) is TaskState.ACTIVE:
                continue
            ended[task.agent_id] = ended.get(task.agent_id, 0) + 1
            granted = _task_refs(task)
            used = granted & used_by_task.get(task.id, set())
            if (
                len(granted) >= t.task_min_actions
                and 1 - len(used) / len(granted) >= t.task_unused_share
            ):
                over.setdefault(task.agent_id, []).append((task.id, len(granted), len(used)))
        for aid in sorted(over):
            items = sorted(over[aid])
            out.append(
                _finding(
                    "task_asks_more_than_it_uses",
                    "low",
                    "agent",
                    aid,
                    f"{len(items)} of its {ended[aid]} ended tasks used at most "
                    f"{1 - t.task_unused_share:.0%} of the actions they were granted",
                    tasks=len(items),
                    ended_tasks=ended[aid],
                    granted_actions=sum(g for _, g, _ in items),
                    used_actions=sum(u for _, _, u in items),
                    examples=[tid for tid, _, _ in items[:5]],
                    threshold=t.task_unused_share,
                )
            )

    # -- break-glass
    for bg in breakglass:
        duration = (bg.expires_at - bg.created_at).total_seconds()
        if bg.active_at(now) and duration > t.standing_breakglass_seconds:
            out.append(
                _finding(
                    "standing_breakglass",
                    "high",
                    "exception",
                    bg.id,
                    f"a break-glass exception of {bg.agent_id} runs {int(duration)} s, longer "
                    f"than {t.standing_breakglass_seconds} s: standing authority",
                    agent=bg.agent_id,
                    scopes=[{"tool": s.tool, "tier": s.tier.value} for s in sorted(bg.scopes)],
                    expires_at=rfc3339(bg.expires_at),
                    threshold=t.standing_breakglass_seconds,
                )
            )
        if bg.overdue(now, deployment.breakglass_review_within):
            out.append(
                _finding(
                    "breakglass_review_overdue",
                    "high",
                    "exception",
                    bg.id,
                    f"the break-glass exception of {bg.agent_id} ended "
                    f"{rfc3339(bg.ended_at_or_expiry())} and is still not reviewed",
                    agent=bg.agent_id,
                    ended_at=rfc3339(bg.ended_at_or_expiry()),
                    review_within_seconds=int(deployment.breakglass_review_within.total_seconds()),
                )
            )

    # -- one upstream secret behind many agents
    shared = shared_secret_reach(agents, deployment.static_secret_tools, t.shared_secret_agents)
    for tool_id, reaching in shared.items():
        if reaching:
            out.append(
                _finding(
                    "shared_upstream_secret",
                    "medium",
                    "tool",
                    tool_id,
                    f"{len(reaching)} agents reach {tool_id} through its one static upstream "
                    "secret: the upstream cannot tell them apart (use upstream_exchange)",
                    agents=reaching,
                    threshold=t.shared_secret_agents,
                )
            )

    out.sort(key=lambda f: (_SEVERITY_ORDER[f["severity"]], f["code"], f["subject"]["id"]))
    return out


def shared_secret_reach(
    agents: Sequence[Agent], static_secret_tools: Iterable[str], threshold: int
) -> dict[str, list[str]]:
    """The tools with a static upstream secret that at least ``threshold`` active agents'
    ceilings reach, each with those agents (sorted)."""
    out: dict[str, list[str]] = {}
    for tool_id in sorted(static_secret_tools):
        reaching = sorted(
            a.spiffe_id
            for a in agents
            if a.state is AgentState.ACTIVE and any(s.tool == tool_id for s in a.ceiling)
        )
        if len(reaching) >= threshold:
            out[tool_id] = reaching
    return out


# --- reach ----------------------------------------------------------------------------------

#: The reference week of a reach question: ``now`` and each following hour up to a week,
#: one instant per hour of the week (UTC weekday and hour).
HOURS_OF_WEEK: Final = 7 * 24
# A policy that can read the time names the context's ``now`` record.
_NOW_WORD: Final = re.compile(r"\bnow\b")


def reference_week(now: datetime) -> tuple[datetime, ...]:
    """``now``, ``now`` + 1 h, … ``now`` + 167 h: every hour of the week (UTC) once, ``now``
    first."""
    return tuple(now + timedelta(hours=h) for h in range(HOURS_OF_WEEK))


def _time_free(policies: CompiledPolicies) -> bool:
    """Whether no policy of the set can read the time (none names ``now``): every instant
    then decides alike, and one decision stands for all."""
    return not any(_NOW_WORD.search(p.text) for p in policies.policies.values())


@dataclass(frozen=True, slots=True)
class Candidate:
    """One action a reach question asks about: the break-glass exception a grant of it
    would rely on (policy then sees an exception active), and the instants to ask at (None:
    the situation's ``now`` and the ``instants`` of the question)."""

    ref: ActionRef
    exception: str | None = None
    instants: tuple[datetime, ...] | None = None


@dataclass(frozen=True, slots=True)
class Reached:
    """One action a principal can be granted at some instant asked, with what decided it
    (at ``now`` when allowed then, else at the first instant that allows it)."""

    ref: ActionRef
    policies: tuple[str, ...]
    requires_approval: bool
    risk: str
    exception: str | None = None
    reachable_now: bool = True  # allowed at the situation's ``now``
    always: bool = True  # allowed at every instant of the question
    allowed_at: tuple[datetime, ...] = ()  # the instants that allow it, in order


def reach(
    policies: CompiledPolicies,
    base: EntitySet,
    *,
    agent: Agent,
    owners: Sequence[Owner],
    task: TaskFacts,
    tools: Mapping[str, Tool],
    candidates: Iterable[ActionRef | Candidate],
    situation: Situation,
    others: Sequence[Agent] = (),
    instants: Sequence[datetime] = (),
) -> list[Reached]:
    """The ``candidates`` that policy allows ``agent`` at the grant point (the task facts
    and situation given) at **any** of the instants asked — the situation's ``now`` and
    ``instants`` (e.g. :func:`reference_week`), or a candidate's own — each with its
    determining policies, whether a call of it would wait for a human approval (the call
    point, asked without arguments), whether ``now`` allows it and whether every instant of
    the question does. A candidate relying on an exception is asked with
    ``exception_active``. Cost: one grant decision per candidate and distinct hour of the
    week (UTC weekday and hour) asked — one in all when no policy reads the time — and one
    call decision per reached candidate. An action the schema does not know is not reached.
    The registry's own checks (ceiling, agent state, owner) are the caller's."""
    entities = base.with_entities(decision_entities(agent, owners, task, others))

    def hours(times: Iterable[datetime]) -> dict[tuple[int, int], datetime]:
        # The first instant of each hour of the week (UTC) stands for that hour.
        out: dict[tuple[int, int], datetime] = {}
        for when in times:
            u = when.astimezone(UTC)
            out.setdefault((u.weekday(), u.hour), when)
        return out

    question = hours((situation.now, *instants))
    time_free = _time_free(policies)
    now_key = next(iter(question))
    wanted: dict[ActionRef, Candidate] = {}
    for c in candidates:
        cand = c if isinstance(c, Candidate) else Candidate(c)
        wanted.setdefault(cand.ref, cand)
    out: list[Reached] = []
    for ref in _sorted(wanted):
        cand = wanted[ref]
        tool = tools.get(ref.tool)
        info = action_info(policies, ref.tool, ref.action)
        if tool is None or info is None:
            continue
        asked = question if cand.instants is None else hours(cand.instants)
        if not asked:
            continue
        at = Situation(
            now=situation.now,
            environment=situation.environment,
            delegation_depth=situation.delegation_depth,
            exception_active=situation.exception_active or cand.exception is not None,
        )
        allowed: dict[tuple[int, int], Decision] = {}
        for key, when in asked.items():
            decision = decide_action(
                policies,
                entities,
                agent=agent,
                tool=tool,
                action=info,
                context=build_context(
                    info,
                    task,
                    "grant",
                    Situation(
                        now=when,
                        environment=at.environment,
                        delegation_depth=at.delegation_depth,
                        exception_active=at.exception_active,
                    ),
                ),
            )
            if time_free:  # every instant decides as this one
                if decision.outcome is Outcome.ALLOW:
                    allowed = dict.fromkeys(asked, decision)
                break
            if decision.outcome is Outcome.ALLOW:
                allowed[key] = decision
        if not allowed:
            continue
        first = now_key if now_key in allowed else next(iter(allowed))
        decision = allowed[first]
        at_call = decide_action(
            policies,
            entities,
            agent=agent,
            tool=tool,
            action=info,
            context=build_context(
                info,
                task,
                "call",
                Situation(
                    now=asked[first],
                    environment=at.environment,
                    delegation_depth=at.delegation_depth,
                    exception_active=at.exception_active,
                ),
            ),
        )
        out.append(
            Reached(
                ref,
                tuple(sorted(decision.determining)),
                at_call.outcome is Outcome.APPROVAL_REQUIRED,
                info.risk.value,
                exception=cand.exception,
                reachable_now=now_key in allowed and asked[now_key] == situation.now,
                always=set(allowed) == set(question),
                allowed_at=tuple(asked[k] for k in asked if k in allowed),
            )
        )
    return out

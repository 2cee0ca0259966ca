"""Posture and reports (docs/reports.md): what each agent was granted against what it used,
blanket-token patterns, blast radius, and alignment with OWASP Top 10 for Agentic
Applications, CSA MAESTRO and NIST AI RMF.

CONTRACT (shared by the computations and the renderers — CLI tables, JSON, the HTML report,
the admin API and the web UI). Every method returns a plain JSON-serialisable dict; the
renderers never compute anything themselves. Times are RFC 3339 UTC strings; shares are
floats in [0, 1] rounded to 4 places; lists are sorted as stated. A report that cannot be
decided (policy set failed to load, unknown agent…) raises a TaskboundError with a stable
code (``not_found``, ``policy_invalid``, ``invalid_request``) — never a misleading "all
good". An empty window is a report with zero counts and ``"empty": true``.

``usage(since, until, agent=None, owner=None)``::

    {"kind": "usage", "window": {"since", "until"}, "generated_at", "empty": bool,
     "agents": [  # sorted by unused_share desc, then agent
       {"agent", "owner", "state",
        "granted": [{"tool", "tier", "action"}],      # the ceiling, expanded to actions
        "used":    [{"tool", "tier", "action", "calls", "via_delegation", "last_used"}],
                   # allowed calls: its own ("calls"), and its delegates' on its tasks
                   # ("via_delegation": a delegated credential's call is recorded with
                   # the delegate as agent and the parent's task; it counts for both,
                   # since the delegation needs the parent's scope); last_used: either's
        "unused":  [{"tool", "tier", "action"}],      # granted - used (either way)
        "granted_count", "used_count", "unused_share",
        "tasks", "calls", "denied_calls",             # calls, denied_calls: its own only
        "recommendation": {                            # null when nothing to remove
            "ceiling": [{"tool", "tier"}],             # the narrower ceiling
            "removed": [{"tool", "tier"}],             # scopes no call used (own or
                                                       # via delegation)
            "forbidden_actions": [{"tool", "tier", "action"}],  # unused in kept tiers
            "cedar": str,        # a policy file (forbid unused actions for this agent)
            "cases_yaml": str,   # `taskbound policy test` cases: used stay allowed,
                                 # unused are denied, at the grant point
            "diff": str}}],      # unified diff: policy dir before -> after
     "owners": [{"owner", "agents", "granted_count", "used_count", "unused_share"}],
     "totals": {"agents", "over_granted_agents", "granted_count", "used_count",
                "unused_share", "calls", "denied_calls", "tasks"},
     "timeline": [{"day": "YYYY-MM-DD", "allow", "deny", "approval_required", "error"}],
     "decision_mix": {"allow", "deny", "approval_required", "error"},
     "tasks_truncated": bool,   # more tasks in the window than reports.max_tasks: the
     "tasks_limit": int}        # task counts cover only the first that many (then present)

``posture(since, until)``::

    {"kind": "posture", "window", "generated_at", "empty",
     "findings": [  # sorted by severity (high, medium, low), then code, then subject
       {"code", "severity": "high"|"medium"|"low", "subject": {"type", "id"},
        "message", "evidence": {...}}],
     "summary": {"high", "medium", "low", "total"}}

  Finding codes: ``ceiling_spans_many_tools``, ``ceiling_spans_all_tiers``,
  ``unused_authority``, ``task_asks_more_than_it_uses``, ``ttl_cap_too_long``,
  ``standing_breakglass``, ``breakglass_review_overdue``, ``shared_upstream_secret``,
  ``agent_owner_disabled``, ``agent_owner_missing``, ``dpop_not_required``,
  ``dev_issuer_enabled``, and ``no_activity_observed`` (low: an empty window, so that no
  report of an empty window reads as "all good") (docs/reports.md lists each with its
  threshold, configurable under ``[reports]``).

``blast_radius(agent=None, task=None, credential=None)`` (exactly one)::

    {"kind": "blast_radius", "subject": {"type", "id"}, "generated_at",
     "policy_version",
     "reach": [  # sorted by tool, tier, action, len(via)
       {"tool", "tier", "action", "via": [spiffe ids, the subject's agent first],
        "policies": [determining policy ids], "requires_approval": bool,
        "risk": "low"|"medium"|"high",
        "exception": str | None,   # the break-glass exception the grant relies on
        "reachable_now": bool,     # allowed at generated_at (false: only at other hours)
        "always": bool}],          # allowed at every hour of the reference week
     "delegates": [{"agent", "owner", "reach_count"}],
     "totals": {"actions", "tools", "direct", "through_delegation", "admin_tier",
                "via_exception"}}   # via_exception: reach entries relying on an exception

  Reached = allowed at the grant point at ``now`` or at any hour of the following week
  (:func:`taskbound.core.posture.reference_week`, cut at the subject's own expiry and at
  the end of the exception an entry relies on).

``alignment()``::

    {"kind": "alignment", "generated_at",
     "controls": [  # in catalogue order
       {"id", "title", "status": "met"|"partly_met"|"not_met", "evidence": [str],
        "frameworks": {"owasp_asi": ["ASI03", …], "maestro": ["L3 Agent frameworks", …],
                       "nist_ai_rmf": ["GOVERN", "MANAGE", …]}}],
     "summary": {"met", "partly_met", "not_met"},
     "by_framework": {"owasp_asi": {"ASI01": "met"|…}, "maestro": {...},
                      "nist_ai_rmf": {...}}}
  # by_framework: the worst status of the controls mapped to each entry, "not_covered"
  # when no control is (MAESTRO L1 and L2: taskbound does not touch models or data).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from taskbound.config import Settings
from taskbound.core.alignment import Evidence
from taskbound.core.alignment import alignment as judge_alignment
from taskbound.core.audit import Checkpoint
from taskbound.core.audit import Report as AuditReport
from taskbound.core.breakglass import BreakGlass, effective_ceiling, relied_on
from taskbound.core.cedar_schema import TaskFacts
from taskbound.core.clock import Clock
from taskbound.core.decisions import Situation
from taskbound.core.model import (
    Agent,
    AgentState,
    Owner,
    Risk,
    Scope,
    TaskFilter,
    TaskState,
    Tier,
    Tool,
)
from taskbound.core.policy import PolicyInvalid
from taskbound.core.posture import (
    PERMISSIVE_CONSTRAINTS,
    ActionRef,
    Candidate,
    Deployment,
    Thresholds,
    Window,
    findings,
    granted_actions,
    reach,
    reference_week,
    rfc3339,
    shared_secret_reach,
    usage_report,
)
from taskbound.errors import InvalidRequest, NotFound, TaskboundError
from taskbound.service.audit_chain import AuditChain
from taskbound.service.policy import PolicyEngine, PolicyState
from taskbound.storage.base import Storage

_BREAKGLASS_PAGE = 10_000
# The longest window one report may scan (a year and a bit): bounded work per request.
MAX_WINDOW = timedelta(days=400)
# Reports computed at once by one process; more wait their turn.
REPORTS_AT_ONCE = 2

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class _Subject:
    type: str
    id: str
    principal: Agent
    task_agent: Agent
    owner_id: str
    facts: TaskFacts
    candidates: tuple[Candidate, ...]
    depth: int
    may_act: str | None
    chain: tuple[str, ...]
    # The subject's reference week: now and each hour of the next 7 days, cut at its end.
    week: tuple[datetime, ...]


def _limited(method: F) -> F:
    """A public report method, run under the service's limit of reports at once."""

    @functools.wraps(method)
    async def limited(self: ReportService, *args: Any, **kwargs: Any) -> Any:
        async with self._running:
            return await method(self, *args, **kwargs)

    return cast(F, limited)


class ReportService:
    """The four reports of the contract above, computed from storage aggregates, the
    registry, the policy set in force and the live settings."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        clock: Clock,
        policy: PolicyEngine,
        audit: AuditChain | None = None,
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._clock = clock
        self._policy = policy
        self._audit = audit
        # A report is heavy (seconds at a million records) and the gateway serves on the
        # same loop: its computations run in worker threads, and at most this many at once.
        self._running = asyncio.Semaphore(REPORTS_AT_ONCE)

    # --- shared ----------------------------------------------------------------------------

    @property
    def thresholds(self) -> Thresholds:
        r = self._settings.reports
        return Thresholds(
            many_tools=r.many_tools,
            unused_share=r.unused_share,
            task_unused_share=r.task_unused_share,
            task_min_actions=r.task_min_actions,
            max_credential_ttl_seconds=r.max_credential_ttl_seconds,
            max_task_ttl_seconds=r.max_task_ttl_seconds,
            standing_breakglass_seconds=r.standing_breakglass_seconds,
            shared_secret_agents=r.shared_secret_agents,
        )

    @staticmethod
    def window(since: datetime, until: datetime) -> Window:
        """A validated window: aware times (in UTC: days are UTC days), ``until`` after
        ``since``, at most ``MAX_WINDOW`` long (one request must not scan years)."""
        for name, value in (("since", since), ("until", until)):
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidRequest(f"{name} must be a time with a time zone")
        since, until = since.astimezone(UTC), until.astimezone(UTC)
        if until <= since:
            raise InvalidRequest("until must be after since")
        if until - since > MAX_WINDOW:
            raise InvalidRequest(
                f"a report window is at most {MAX_WINDOW.days} days: narrow since/until"
            )
        return Window(since, until)

    def _policy_state(self) -> PolicyState:
        try:
            return self._policy.state
        except TaskboundError:
            problems = self._policy.last_problems
            raise PolicyInvalid(
                "the policy set is not loaded, so this report cannot be decided"
                + (": " + "; ".join(problems[:5]) if problems else "")
            ) from None

    async def _static_secret_tools(self, tools: Sequence[Tool]) -> frozenset[str]:
        out = set()
        for tool in tools:
            if tool.upstream_exchange is None and await self._storage.get_tool_secret(tool.id):
                out.add(tool.id)
        return frozenset(out)

    async def _usage(
        self, window: Window, agents: Sequence[Agent], tools: dict[str, Tool], *, everyone: bool
    ) -> tuple[dict[str, Any], list[Any], list[Any]]:
        self._policy_state()  # the recommendations diff against the set in force
        ids = [a.spiffe_id for a in agents]
        wanted = set(ids)
        every_row = await self._storage.audit_usage(since=window.since, until=window.until)
        # The agents of the allowed calls' tasks, in one read (whenever those tasks were
        # created): a delegate's call on another agent's task is that agent's use too.
        task_agents = await self._storage.task_agents(
            sorted(
                {
                    r.task
                    for r in every_row
                    if r.decision == "allow" and r.task is not None and r.agent is not None
                }
            )
        )
        rows = [
            r
            for r in every_row
            if everyone
            or r.agent in wanted
            or (r.decision == "allow" and task_agents.get(r.task or "") in wanted)
        ]
        timeline = await self._storage.audit_timeline(
            since=window.since, until=window.until, agents=None if everyone else ids
        )
        cap = self._settings.reports.max_tasks
        found = await self._storage.list_tasks(
            TaskFilter(created_since=window.since, created_until=window.until, limit=cap + 1)
        )
        # Never silently: a window with more tasks than the cap says so in the report.
        truncated = len(found) > cap
        tasks = [t for t in found[:cap] if t.agent_id in wanted]
        report = await asyncio.to_thread(
            usage_report,
            window=window,
            now=self._clock.now(),
            agents=agents,
            tools=tools,
            rows=rows,
            timeline=timeline,
            tasks=tasks,
            policy_files={f.name: f.text for f in self._policy.sources},
            environment=self._settings.policy.environment,
            thresholds=self.thresholds,
            task_agents=task_agents,
        )
        report["tasks_truncated"] = truncated
        if truncated:
            report["tasks_limit"] = cap
        return report, rows, tasks

    # --- usage -----------------------------------------------------------------------------

    @_limited
    async def usage(
        self,
        since: datetime,
        until: datetime,
        agent: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Granted against used per agent and owner over [since, until)."""
        window = self.window(since, until)
        agents = await self._storage.list_agents()
        if agent is not None:
            agents = [a for a in agents if a.spiffe_id == agent]
            if not agents:
                raise NotFound(f"no agent {agent!r} is registered")
        if owner is not None:
            if await self._storage.get_owner(owner) is None:
                raise NotFound(f"no owner {owner!r} is registered")
            agents = [a for a in agents if a.owner_id == owner]
        tools = {t.id: t for t in await self._storage.list_tools()}
        everyone = agent is None and owner is None
        report, _, _ = await self._usage(window, agents, tools, everyone=everyone)
        return report

    # --- posture ---------------------------------------------------------------------------

    def _deployment(self, static_secret_tools: frozenset[str]) -> Deployment:
        s = self._settings
        return Deployment(
            # taskbound has no setting that turns DPoP off: every credential is bound.
            dpop_required=True,
            credential_ttl_cap_seconds=s.credentials.max_ttl_seconds,
            task_ttl_cap_seconds=s.credentials.task_max_ttl_seconds,
            dev_issuer=s.identity.dev_issuer,
            breakglass_review_within=timedelta(seconds=s.breakglass.review_within_seconds),
            static_secret_tools=static_secret_tools,
        )

    @_limited
    async def posture(self, since: datetime, until: datetime) -> dict[str, Any]:
        """The findings of the window and of the live registry and settings."""
        window = self.window(since, until)
        now = self._clock.now()
        agents = await self._storage.list_agents()
        owners = {o.id: o for o in await self._storage.list_owners()}
        tool_list = await self._storage.list_tools()
        tools = {t.id: t for t in tool_list}
        usage, rows, tasks = await self._usage(window, agents, tools, everyone=True)
        exceptions = {}
        for state in ("active", "review"):
            for bg in await self._storage.list_breakglass(
                now=now, state=state, limit=_BREAKGLASS_PAGE
            ):
                exceptions[bg.id] = bg
        found = await asyncio.to_thread(
            findings,
            usage=usage,
            now=now,
            agents=agents,
            owners=owners,
            tools=tools,
            rows=rows,
            tasks=tasks,
            breakglass=[exceptions[k] for k in sorted(exceptions)],
            deployment=self._deployment(await self._static_secret_tools(tool_list)),
            thresholds=self.thresholds,
        )
        summary = {
            sev: sum(1 for f in found if f["severity"] == sev) for sev in ("high", "medium", "low")
        }
        return {
            "kind": "posture",
            "window": window.as_dict(),
            "generated_at": rfc3339(now),
            "empty": usage["empty"],
            "findings": found,
            "summary": {**summary, "total": len(found)},
            "tasks_truncated": usage["tasks_truncated"],
        }

    # --- blast radius ----------------------------------------------------------------------

    async def _agent(self, spiffe_id: str) -> Agent:
        found = await self._storage.get_agent(spiffe_id)
        if found is None:
            raise NotFound(f"no agent {spiffe_id!r} is registered")
        return found

    async def _active_exceptions(self, agent_id: str, now: datetime) -> dict[str, BreakGlass]:
        """The break-glass exceptions of ``agent_id`` active at ``now``, by id (as the
        broker loads them for a grant or an exchange)."""
        found = await self._storage.list_breakglass(
            now=now, state="active", agent_id=agent_id, limit=_BREAKGLASS_PAGE
        )
        return {bg.id: bg for bg in found}

    @staticmethod
    def _relying(ref: ActionRef, bg: BreakGlass | None, week: tuple[datetime, ...]) -> Candidate:
        # A grant relying on an exception lives no longer than the exception.
        if bg is None:
            return Candidate(ref)
        end = bg.ended_at_or_expiry()
        return Candidate(ref, bg.id, tuple(w for w in week if w < end))

    async def _subject(
        self,
        agent: str | None,
        task: str | None,
        credential: str | None,
        tools: dict[str, Tool],
        now: datetime,
    ) -> _Subject:
        given = [
            (k, v)
            for k, v in (("agent", agent), ("task", task), ("credential", credential))
            if v is not None
        ]
        if len(given) != 1:
            raise InvalidRequest("name exactly one of agent, task or credential")
        kind, ident = given[0]
        week = reference_week(now)
        if kind == "agent":
            a = await self._agent(ident)
            facts = TaskFacts(
                "blast-radius",
                a.spiffe_id,
                a.owner_id,
                "blast radius",
                PERMISSIVE_CONSTRAINTS,
                "active",
            )
            # The ceiling, and what an active break-glass exception adds beyond it.
            active = await self._active_exceptions(a.spiffe_id, now)
            _, added = effective_ceiling(a, active.values(), now)
            candidates = [Candidate(r) for r in granted_actions(a, tools)]
            for scope, bg_id in sorted(added.items()):
                tool = tools.get(scope.tool)
                for act in tool.actions_of(scope.tier) if tool is not None else ():
                    ref = ActionRef(scope.tool, scope.tier.value, act.name)
                    candidates.append(self._relying(ref, active[bg_id], week))
            return _Subject(
                kind, ident, a, a, a.owner_id, facts, tuple(candidates),
                0, None, (a.spiffe_id,), week,
            )  # fmt: skip
        if kind == "task":
            t = await self._storage.get_task(ident)
            if t is None:
                raise NotFound(f"no task {ident!r}")
            a = await self._agent(t.agent_id)
            live = t.state_at(now) is TaskState.ACTIVE
            week = tuple(w for w in week if w < t.expires_at)
            # Per scope, the exception a refresh would rely on now (as the broker's regrant
            # decides), else the one it was granted under.
            active = await self._active_exceptions(a.spiffe_id, now) if live else {}
            cands: list[Candidate] = []
            for g in t.granted if live else ():
                scope = Scope(g.tool, g.tier)
                bg = relied_on(a, scope, active.values(), now)
                for name in g.actions:
                    ref = ActionRef(g.tool, g.tier.value, name)
                    if bg is not None:
                        cands.append(self._relying(ref, bg, week))
                    elif g.exception is not None and scope not in a.ceiling:
                        cands.append(Candidate(ref, g.exception))
                    else:
                        cands.append(Candidate(ref))
            facts = TaskFacts(t.id, t.agent_id, t.owner_id, t.purpose, t.constraints, "active")
            return _Subject(
                kind, ident, a, a, t.owner_id, facts, tuple(cands), 0, t.may_act,
                (a.spiffe_id,), week,
            )  # fmt: skip
        c = await self._storage.get_credential(ident)
        if c is None:
            raise NotFound(f"no credential {ident!r}")
        t = await self._storage.get_task(c.task_id)
        if t is None:
            raise NotFound(f"no task {c.task_id!r}")
        holder = await self._agent(c.agent_id)
        task_agent = await self._agent(t.agent_id)
        chain = [holder.spiffe_id]
        depth, parent = 0, c.parent_jti
        while parent is not None:
            depth += 1
            found = await self._storage.get_credential(parent)
            if found is None:
                break
            chain.append(found.agent_id)
            parent = found.parent_jti
        live = c.live_at(now) and t.state_at(now) is TaskState.ACTIVE
        # The credential carries the exception it relies on, and dies with it.
        refs = (
            tuple(Candidate(ActionRef(c.tool, c.tier.value, n), c.exception_id) for n in c.actions)
            if live
            else ()
        )
        facts = TaskFacts(t.id, t.agent_id, t.owner_id, t.purpose, t.constraints, "active")
        end = min(c.expires_at, t.expires_at)
        return _Subject(
            kind, ident, holder, task_agent, t.owner_id, facts, refs, depth,
            t.may_act, tuple(dict.fromkeys(chain)), tuple(w for w in week if w < end),
        )  # fmt: skip

    @_limited
    async def blast_radius(
        self,
        agent: str | None = None,
        task: str | None = None,
        credential: str | None = None,
    ) -> dict[str, Any]:
        """Everything the subject can be granted now or at any hour of the coming week,
        directly and through one delegation hop, with its active break-glass exceptions,
        from the registry and the policy set in force (never from the logs)."""
        tools = {t.id: t for t in await self._storage.list_tools()}
        now = self._clock.now()
        subject = await self._subject(agent, task, credential, tools, now)
        state = self._policy_state()
        compiled = state.compiled
        env = self._settings.policy.environment
        owners = {o.id: o for o in await self._storage.list_owners()}
        owner = owners.get(subject.owner_id)

        def standing(a: Agent) -> Owner | None:
            own = owners.get(a.owner_id)
            if a.state is not AgentState.ACTIVE or own is None or own.disabled:
                return None
            return own

        reach_out: list[dict[str, Any]] = []
        delegates: list[dict[str, Any]] = []
        principal = subject.principal
        principal_owner = standing(principal)
        if owner is not None and not owner.disabled and principal_owner is not None:
            others = () if subject.task_agent is principal else (subject.task_agent,)
            direct = await asyncio.to_thread(
                reach,
                compiled,
                state.base,
                agent=principal,
                owners=[owner, principal_owner],
                task=subject.facts,
                tools=tools,
                candidates=subject.candidates,
                situation=Situation(now=now, environment=env, delegation_depth=subject.depth),
                others=others,
                instants=subject.week,
            )
            for r in direct:
                reach_out.append(self._entry(r, (principal.spiffe_id,)))
            depth = subject.depth + 1
            if direct and depth <= self._settings.delegation.max_depth:
                for d in sorted(await self._storage.list_agents(), key=lambda a: a.spiffe_id):
                    d_owner = standing(d)
                    if (
                        d_owner is None
                        or d.spiffe_id in subject.chain
                        or d.spiffe_id == subject.task_agent.spiffe_id
                        or d.owner_id != subject.owner_id
                        or (subject.may_act is not None and d.spiffe_id != subject.may_act)
                    ):
                        continue
                    # Its ceiling, or its own active exception (as the exchange decides); a
                    # child inherits the exception its parent relies on, and is asked only
                    # at the hours the parent is reached.
                    d_active = await self._active_exceptions(d.spiffe_id, now)
                    mine = []
                    for r in direct:
                        scope = Scope(r.ref.tool, Tier(r.ref.tier))
                        own = relied_on(d, scope, d_active.values(), now)
                        if own is None and scope not in d.ceiling:
                            continue
                        hours = r.allowed_at
                        if own is not None:
                            end = own.ended_at_or_expiry()
                            hours = tuple(w for w in hours if w < end)
                        exception = own.id if own is not None else r.exception
                        mine.append(Candidate(r.ref, exception, hours))
                    if not mine:
                        continue
                    through = await asyncio.to_thread(
                        reach,
                        compiled,
                        state.base,
                        agent=d,
                        owners=[owner, d_owner],
                        task=subject.facts,
                        tools=tools,
                        candidates=mine,
                        situation=Situation(now=now, environment=env, delegation_depth=depth),
                        others=tuple(
                            {a.spiffe_id: a for a in (principal, subject.task_agent)}.values()
                        ),
                        instants=subject.week,
                    )
                    for r in through:
                        reach_out.append(self._entry(r, (principal.spiffe_id, d.spiffe_id)))
                    if through:
                        delegates.append(
                            {"agent": d.spiffe_id, "owner": d.owner_id, "reach_count": len(through)}
                        )
        order = {t: i for i, t in enumerate(("read", "write", "admin"))}
        reach_out.sort(
            key=lambda e: (e["tool"], order.get(e["tier"], 9), e["action"], len(e["via"]), e["via"])
        )
        actions = {(e["tool"], e["tier"], e["action"]) for e in reach_out}
        return {
            "kind": "blast_radius",
            "subject": {"type": subject.type, "id": subject.id},
            "generated_at": rfc3339(now),
            "policy_version": compiled.version,
            "reach": reach_out,
            "delegates": delegates,
            "totals": {
                "actions": len(actions),
                "tools": len({a[0] for a in actions}),
                "direct": sum(1 for e in reach_out if len(e["via"]) == 1),
                "through_delegation": sum(1 for e in reach_out if len(e["via"]) > 1),
                "admin_tier": sum(1 for a in actions if a[1] == Tier.ADMIN.value),
                "via_exception": sum(1 for e in reach_out if e["exception"] is not None),
            },
        }

    @staticmethod
    def _entry(r: Any, via: tuple[str, ...]) -> dict[str, Any]:
        return {
            **r.ref.as_dict(),
            "via": list(via),
            "policies": list(r.policies),
            "requires_approval": r.requires_approval,
            "risk": r.risk,
            "exception": r.exception,
            "reachable_now": r.reachable_now,
            "always": r.always,
        }

    # --- alignment -------------------------------------------------------------------------

    async def _latest_checkpoint(self, head: int) -> Checkpoint | None:
        span = 1024
        while True:
            after = max(head - span, -1)
            found = await self._storage.list_checkpoints(after=after, limit=100_000)
            if found or after == -1:
                return max(found, key=lambda c: c.seq) if found else None
            span *= 16

    async def evidence(self, *, audit_report: AuditReport | None = None) -> Evidence:
        """The live settings and facts the alignment report judges.

        The audit chain is verified here only when it holds at most
        ``reports.verify_max_records`` records (verification reads and hashes every
        record); otherwise, and without an :class:`AuditChain`, it counts as not verified
        unless ``audit_report`` (a precomputed ``services.audit.verify()``) is passed.
        """
        s = self._settings
        r = s.reports
        now = self._clock.now()
        head, _ = await self._storage.audit_head()
        if audit_report is None and self._audit is not None and head <= r.verify_max_records:
            audit_report = await self._audit.verify()
        checkpoint = await self._latest_checkpoint(head)
        agents = await self._storage.list_agents()
        owners = {o.id: o for o in await self._storage.list_owners()}
        tool_list = await self._storage.list_tools()
        tools = {t.id: t for t in tool_list}
        static = await self._static_secret_tools(tool_list)
        try:
            state: PolicyState | None = self._policy.state
        except TaskboundError:
            state = None
        window = Window(now - timedelta(days=r.window_days), now)
        unused: float | None = None
        if state is not None:
            usage, _, _ = await self._usage(window, agents, tools, everyone=True)
            if not usage["empty"]:
                unused = float(usage["totals"]["unused_share"])
        overdue = await self._storage.count_overdue_breakglass(
            now, timedelta(seconds=s.breakglass.review_within_seconds)
        )
        return Evidence(
            now=now,
            dpop_required=True,  # no setting turns it off (docs/reports.md)
            dpop_algorithms=tuple(s.dpop.algorithms),
            credential_ttl_cap_seconds=s.credentials.max_ttl_seconds,
            task_ttl_cap_seconds=s.credentials.task_max_ttl_seconds,
            max_credential_ttl_seconds=r.max_credential_ttl_seconds,
            max_task_ttl_seconds=r.max_task_ttl_seconds,
            policy_loaded=state is not None,
            policy_version=None if state is None else state.compiled.version,
            policy_problems=self._policy.last_problems,
            risky_actions=sum(
                1
                for t in tool_list
                for a in t.actions
                if a.tier is Tier.ADMIN or a.risk is Risk.HIGH or a.requires_approval
            ),
            approval_gates=0 if state is None else len(state.compiled.approval_gates),
            audit_verified=None if audit_report is None else audit_report.ok,
            audit_records=head if audit_report is None else audit_report.records,
            audit_problem=None
            if audit_report is None or audit_report.problem is None
            else str(audit_report.problem),
            last_checkpoint_at=None if checkpoint is None else checkpoint.time,
            checkpoint_interval_seconds=s.audit.checkpoint_interval_seconds,
            checkpoint_max_intervals=r.checkpoint_max_intervals,
            checkpoint_published=s.audit.checkpoint_file is not None
            or s.audit.checkpoint_webhook_url is not None,
            revocation_staleness_seconds=s.revocation.staleness_bound_seconds,
            max_revocation_staleness_seconds=r.max_revocation_staleness_seconds,
            breakglass_max_duration_seconds=s.breakglass.max_duration_seconds,
            standing_breakglass_seconds=r.standing_breakglass_seconds,
            breakglass_overdue_reviews=overdue,
            dev_issuer=s.identity.dev_issuer,
            trust_domains=len(s.identity.trust_domains),
            oidc_issuers=len(s.identity.oidc),
            agents=len(agents),
            tools=len(tool_list),
            agents_without_owner=sum(1 for a in agents if a.owner_id not in owners),
            active_agents_owner_disabled=sum(
                1
                for a in agents
                if a.state is AgentState.ACTIVE
                and a.owner_id in owners
                and owners[a.owner_id].disabled
            ),
            unknown_ceiling_tools=sum(
                1 for a in agents for sc in a.ceiling if sc.tool not in tools
            ),
            unused_share=unused,
            unused_share_threshold=r.unused_share,
            static_secret_tools=len(static),
            shared_secret_tools=len(shared_secret_reach(agents, static, r.shared_secret_agents)),
            upstream_exchange_tools=sum(1 for t in tool_list if t.upstream_exchange is not None),
            delegation_max_depth=s.delegation.max_depth,
        )

    @_limited
    async def alignment(
        self, *, evidence: Evidence | None = None, audit_report: AuditReport | None = None
    ) -> dict[str, Any]:
        """Each control of the catalogue judged on this deployment's evidence (gathered by
        :meth:`evidence` unless given)."""
        ev = evidence or await self.evidence(audit_report=audit_report)
        report = judge_alignment(ev)
        return {
            "kind": "alignment",
            "generated_at": rfc3339(ev.now),
            **{k: v for k, v in report.items() if k != "kind"},
        }

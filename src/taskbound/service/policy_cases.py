"""Policy test cases as data files, like a unit test suite for policy (DESIGN.md §5).

A case file is YAML::

    registry: registry.yaml        # a registry document, relative to this file
    defaults:                      # optional, merged under every case
      agent: spiffe://example.org/agents/bot
      task: {purpose: triage, constraints: {tiers: [read]}}
    cases:
      - name: a reader can list issues
        action: issues:list_issues # tool:action
        point: call                # or grant (default: call)
        arguments: {org: acme, repo: web}
        situation: {now: "2026-03-02T10:00:00Z", environment: production,
                    call_rate: 0, delegation_depth: 0, approval: false, exception: false}
        agent_state: suspended     # override the registry for this case
        owner_disabled: true
        target: /repos/acme/web/issues
        expect: allow              # allow | deny | approval_required
        determining: [read-tier]   # optional: the exact deciding policies

The runner compiles the policies against a schema built from the registry document, so a
policy change is checked offline, in CI, before it is applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskbound.core.cedar_schema import TaskFacts, build_schema, registry_entities
from taskbound.core.decisions import (
    Situation,
    action_info,
    build_context,
    decide_action,
    decision_entities,
    denied,
)
from taskbound.core.model import AgentState
from taskbound.core.policy import (
    CompiledPolicies,
    Decision,
    EntitySet,
    Outcome,
    PolicySource,
    compile_policies,
)
from taskbound.errors import InvalidRequest, TaskboundError
from taskbound.service.registry import (
    RegistryDocument,
    agent_from_spec,
    owner_from_spec,
    tool_from_spec,
)

EPOCH = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # a Monday, 10:00 UTC


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Spec):
    purpose: str = "policy test"
    owner: str | None = None
    constraints: dict[str, Any] = Field(default_factory=dict)


class SituationSpec(_Spec):
    now: datetime = EPOCH
    environment: str = "development"
    call_rate: int = 0
    delegation_depth: int = 0
    approval: bool = False
    exception: bool = False


class CaseSpec(_Spec):
    name: str
    agent: str
    action: str
    point: str = Field("call", pattern="^(grant|call)$")
    task: TaskSpec = TaskSpec()
    arguments: dict[str, Any] | None = None
    target: str | None = None
    situation: SituationSpec = SituationSpec()
    agent_state: AgentState | None = None
    owner_disabled: bool | None = None
    expect: Outcome
    determining: list[str] | None = None


class CaseFile(_Spec):
    registry: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    cases: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Case:
    spec: CaseSpec
    file: str


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    decision: Decision

    @property
    def passed(self) -> bool:
        spec = self.case.spec
        if self.decision.outcome is not spec.expect:
            return False
        return spec.determining is None or sorted(spec.determining) == sorted(
            self.decision.determining
        )


@dataclass(frozen=True, slots=True)
class Suite:
    cases: tuple[Case, ...]
    registry: RegistryDocument


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"{path}: {exc}") from None


def load_registry(path: Path) -> RegistryDocument:
    try:
        return RegistryDocument.model_validate(_load_yaml(path))
    except ValidationError as exc:
        raise InvalidRequest(f"{path}: not a registry document: {exc.errors()[0]['msg']}") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
            else value
        )
    return out


def load_suite(target: Path, registry: Path | None = None) -> Suite:
    """Every case file (``*.yaml`` holding ``cases:``) in ``target`` (a file or a
    directory). The registry comes from ``registry`` or the files' own ``registry:`` key."""
    files = sorted(target.glob("*.yaml")) if target.is_dir() else [target]
    cases: list[Case] = []
    doc_path = registry
    for file in files:
        raw = _load_yaml(file)
        if not isinstance(raw, dict) or "cases" not in raw:
            continue  # e.g. the registry document beside the cases
        try:
            case_file = CaseFile.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRequest(f"{file}: {exc.errors()[0]['msg']}") from None
        if doc_path is None and case_file.registry:
            doc_path = (file.parent / case_file.registry).resolve()
        for i, item in enumerate(case_file.cases):
            try:
                spec = CaseSpec.model_validate(_merge(case_file.defaults, item))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise InvalidRequest(f"{file.name} case {i + 1}: {where}: {err['msg']}") from None
            cases.append(Case(spec, file.name))
    if not cases:
        raise InvalidRequest(f"no policy test cases found in {target}")
    if doc_path is None:
        raise InvalidRequest("no registry: pass --registry or set `registry:` in the case file")
    return Suite(tuple(cases), load_registry(doc_path))


def compile_for(
    registry: RegistryDocument, sources: Sequence[PolicySource]
) -> tuple[CompiledPolicies, EntitySet]:
    tools = [tool_from_spec(t, EPOCH, EPOCH) for t in registry.tools]
    schema = build_schema(tools)
    compiled = compile_policies(sources, schema)
    return compiled, EntitySet.build(registry_entities([], [], tools), schema)


def run_case(
    compiled: CompiledPolicies, base: EntitySet, registry: RegistryDocument, case: Case
) -> Decision:
    spec = case.spec
    agents = {a.spiffe_id: a for a in registry.agents}
    owners = {o.id: o for o in registry.owners}
    tools = {t.id: t for t in registry.tools}
    tool_id, _, action_name = spec.action.partition(":")
    if spec.agent not in agents:
        return denied(compiled, f"case names unknown agent {spec.agent}")
    if tool_id not in tools:
        return denied(compiled, f"case names unknown tool {tool_id}")
    agent = agent_from_spec(agents[spec.agent], EPOCH)
    if spec.agent_state is not None:
        agent = replace(agent, state=spec.agent_state)
    owner_id = spec.task.owner or agent.owner_id
    if owner_id not in owners or agent.owner_id not in owners:
        return denied(compiled, f"case names unknown owner {owner_id}")
    owner = owner_from_spec(owners[owner_id], EPOCH)
    agent_owner = owner_from_spec(owners[agent.owner_id], EPOCH)
    if spec.owner_disabled is not None:
        owner = replace(owner, disabled=spec.owner_disabled)
        agent_owner = (
            replace(agent_owner, disabled=spec.owner_disabled)
            if agent_owner.id == owner.id
            else agent_owner
        )
    info = action_info(compiled, tool_id, action_name)
    if info is None:
        return denied(compiled, f"{spec.action} is not an action of the registry")
    facts = TaskFacts(
        "case-task", agent.spiffe_id, owner.id, spec.task.purpose, spec.task.constraints, "active"
    )
    s = spec.situation
    situation = Situation(
        now=s.now if s.now.tzinfo else s.now.replace(tzinfo=UTC),
        environment=s.environment,
        delegation_depth=s.delegation_depth,
        call_rate=s.call_rate,
        approval_granted=s.approval,
        exception_active=s.exception,
    )
    try:
        context = build_context(
            info,
            facts,
            "grant" if spec.point == "grant" else "call",
            situation,
            target=spec.target,
            arguments=spec.arguments,
        )
    except TaskboundError as exc:
        return denied(compiled, exc.internal)
    entities = base.with_entities(decision_entities(agent, [agent_owner, owner], facts))
    tool = tool_from_spec(tools[tool_id], EPOCH, EPOCH)
    return decide_action(compiled, entities, agent=agent, tool=tool, action=info, context=context)


@dataclass(frozen=True, slots=True)
class SuiteReport:
    results: tuple[CaseResult, ...]
    uncovered: tuple[str, ...]
    version: str

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(r for r in self.results if not r.passed)


def run_suite(suite: Suite, sources: Sequence[PolicySource]) -> SuiteReport:
    """Run every case; report failures and the policies no case exercised (never among
    the deciding policies of any case)."""
    compiled, base = compile_for(suite.registry, sources)
    results = tuple(CaseResult(c, run_case(compiled, base, suite.registry, c)) for c in suite.cases)
    exercised = {pid for r in results for pid in r.decision.determining}
    uncovered = tuple(sorted(set(compiled.policies) - exercised))
    return SuiteReport(results, uncovered, compiled.version)

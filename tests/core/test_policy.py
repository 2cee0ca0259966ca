"""Compiling policy files and deciding requests (DESIGN.md §5).

The decision corpus lives in ``tests/vectors/decisions/*.yaml`` (STYLE.md rule 6).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cedarpy
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskbound.core.cedar_schema import (
    ActionInfo,
    CedarSchema,
    PolicyInputError,
    TaskFacts,
    arguments_for_policy,
    build_schema,
    registry_entities,
    task_entity,
)
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
)
from taskbound.core.policy import (
    CompiledPolicies,
    Decision,
    DecisionRequest,
    EntityRef,
    EntitySet,
    Outcome,
    PolicyInvalid,
    PolicyProblem,
    PolicySource,
    compile_policies,
    decide,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "decisions"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
NOON = 1_735_732_800  # 2025-01-01T12:00:00Z, a Wednesday

# --- the corpus -------------------------------------------------------------------------


def _action(a: dict[str, Any]) -> Action:
    return Action(
        name=a["name"],
        tier=Tier(a["tier"]),
        method=a.get("method"),
        path=a.get("path"),
        mcp_tool=a.get("mcp_tool"),
        risk=Risk(a.get("risk", "low")),
        requires_approval=a.get("requires_approval", False),
        input_schema=a.get("input_schema"),
    )


def load_registry(doc: dict[str, Any]) -> tuple[list[Owner], list[Agent], list[Tool]]:
    owners = [
        Owner(
            o["id"],
            o["contact"],
            frozenset(Role(r) for r in o.get("roles", [])),
            EPOCH,
            EPOCH,
            o.get("disabled", False),
        )
        for o in doc.get("owners", [])
    ]
    agents = [
        Agent(
            a["spiffe_id"],
            a["owner"],
            AgentState(a.get("state", "active")),
            frozenset(
                Scope(tool, Tier(tier))
                for tool, tier in (s.split(":") for s in a.get("ceiling", []))
            ),
            EPOCH,
            EPOCH,
        )
        for a in doc.get("agents", [])
    ]
    tools = [
        Tool(
            t["id"],
            t["audience"],
            t.get("upstream_url", "https://upstream.example"),
            ToolKind(t.get("kind", "http")),
            tuple(_action(a) for a in t["actions"]),
            EPOCH,
            EPOCH,
        )
        for t in doc.get("tools", [])
    ]
    return owners, agents, tools


@dataclass(frozen=True)
class Corpus:
    schema: CedarSchema
    policies: CompiledPolicies
    entities: dict[str, EntitySet]  # per task id


@functools.cache
def corpus(name: str) -> tuple[dict[str, Any], Corpus]:
    doc = yaml.safe_load((VECTORS / name).read_text())
    owners, agents, tools = load_registry(doc["registry"])
    schema = build_schema(tools)
    sources = [PolicySource(n, t) for n, t in doc["policies"].items()]
    policies = compile_policies(sources, schema)
    base = EntitySet.build(registry_entities(owners, agents, tools), schema)
    entities = {
        t["id"]: base.with_entities(
            [
                task_entity(
                    TaskFacts(
                        t["id"],
                        t["agent"],
                        t["owner"],
                        t["purpose"],
                        t.get("constraints", {}),
                        t.get("state", "active"),
                    )
                )
            ]
        )
        for t in doc.get("tasks", [])
    }
    return doc, Corpus(schema, policies, entities)


def default_context(info: ActionInfo | None, task_id: str) -> dict[str, Any]:
    return {
        "point": "call",
        "tier": str(info.tier) if info else "read",
        "risk": str(info.risk) if info else "low",
        "requires_approval": info.requires_approval if info else False,
        "task": {"__entity": {"type": "Task", "id": task_id}},
        "now": {"epoch": NOON, "hour": 12, "weekday": 2},
        "environment": "prod",
        "delegation_depth": 0,
        "call_rate": 1,
        "approval": {"granted": False},
        "exception": {"active": False},
    }


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def request_for(case: dict[str, Any], schema: CedarSchema) -> DecisionRequest:
    info = schema.actions.get(case["action"])
    context = default_context(info, case["task"])
    if "arguments" in case:
        assert info is not None
        context["arguments"] = arguments_for_policy(info, case["arguments"])
    context = merge(context, case.get("context", {}))
    for key in case.get("drop", []):
        del context[key]
    principal = case["principal"]
    principal_ref = (
        EntityRef(principal["type"], principal["id"])
        if isinstance(principal, dict)
        else EntityRef("Agent", principal)
    )
    tool = case.get("resource", case["action"].split(":")[0])
    return DecisionRequest(principal_ref, case["action"], EntityRef("Tool", tool), context)


def corpus_cases() -> Iterator[Any]:
    for path in sorted(VECTORS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for index, case in enumerate(doc["cases"]):
            yield pytest.param(path.name, index, id=f"{path.stem}: {case['name']}")


@pytest.mark.parametrize(("name", "index"), list(corpus_cases()))
def test_decision_corpus(name: str, index: int) -> None:
    doc, built = corpus(name)
    case = doc["cases"][index]
    request = request_for(case, built.schema)
    decision = decide(built.policies, built.entities[case["task"]], request)
    assert decision.outcome == Outcome(case["expect"]), decision
    assert sorted(decision.determining) == sorted(case["determining"]), decision
    assert bool(decision.errors) == case.get("errors", False), decision
    assert decision.policy_version == built.policies.version
    assert decision.allowed == (decision.outcome is Outcome.ALLOW)


def test_corpus_covers_the_issue() -> None:
    names = {p.stem for p in VECTORS.glob("*.yaml")}
    assert {"basics", "errors", "constraints", "approval", "time"} <= names
    outcomes = {
        case["expect"]
        for name in names
        for case in yaml.safe_load((VECTORS / f"{name}.yaml").read_text())["cases"]
    }
    assert outcomes == {"allow", "deny", "approval_required"}


def test_every_corpus_policy_is_exercised() -> None:
    for path in sorted(VECTORS.glob("*.yaml")):
        doc, built = corpus(path.name)
        hit: set[str] = set()
        for case in doc["cases"]:
            request = request_for(case, built.schema)
            hit.update(decide(built.policies, built.entities[case["task"]], request).determining)
        assert hit == set(built.policies.policies), path.name


# --- compiling --------------------------------------------------------------------------

TOOLS = [
    Tool(
        "gh",
        "https://gw.example/gh",
        "https://api.example",
        ToolKind.HTTP,
        (
            Action("get_repo", Tier.READ, "GET", "/repos/{owner}/{repo}"),
            Action("put_file", Tier.WRITE, "PUT", "/repos/{owner}/{repo}/contents/{path}"),
            Action("delete_repo", Tier.ADMIN, "DELETE", "/repos/{owner}/{repo}", risk=Risk.HIGH),
        ),
        EPOCH,
        EPOCH,
    )
]
AGENT = "spiffe://example.org/agents/coder"


@pytest.fixture(scope="module")
def schema() -> CedarSchema:
    return build_schema(TOOLS)


@pytest.fixture(scope="module")
def entities(schema: CedarSchema) -> EntitySet:
    owners = [Owner("alice", "a@example.com", frozenset(), EPOCH, EPOCH)]
    agents = [
        Agent(AGENT, "alice", AgentState.ACTIVE, frozenset({Scope("gh", Tier.READ)}), EPOCH, EPOCH)
    ]
    base = EntitySet.build(registry_entities(owners, agents, TOOLS), schema)
    task = TaskFacts("t1", AGENT, "alice", "fix", {"repo": "web"}, "active")
    return base.with_entities([task_entity(task)])


def problems_of(sources: list[PolicySource], schema: CedarSchema) -> list[PolicyProblem]:
    with pytest.raises(PolicyInvalid) as caught:
        compile_policies(sources, schema)
    assert caught.value.code == "policy_invalid"
    assert caught.value.status == 400
    return list(caught.value.problems)


GOOD = """\
// Reads are fine.
@id("read")
permit(principal, action in Action::"read", resource);

permit(principal, action in Action::"write", resource)
when { context.task.hasTag("write") };  // no @id: named by file and line

@approval
forbid(principal, action, resource) when { context.requires_approval && !context.approval.granted };
"""


def test_compile_ids_lines_effects_annotations(schema: CedarSchema) -> None:
    compiled = compile_policies([PolicySource("tiers.cedar", GOOD)], schema)
    assert list(compiled.policies) == ["read", "tiers.cedar:5", "tiers.cedar:8"]
    read = compiled.policies["read"]
    assert (read.file, read.line, read.effect) == ("tiers.cedar", 2, "permit")
    assert dict(read.annotations) == {"id": "read"}
    assert read.text.startswith('@id("read")\npermit(')
    assert read.text.endswith(";")
    gate = compiled.policies["tiers.cedar:8"]
    assert gate.effect == "forbid"
    assert dict(gate.annotations) == {"approval": ""}
    assert compiled.approval_gates == frozenset({"tiers.cedar:8"})
    assert isinstance(compiled.handle, cedarpy.PolicySet)
    assert len(compiled.handle) == 3
    assert compiled.version.startswith("sha256:")
    assert compiled.schema is schema


def test_version_depends_on_content_schema_not_order(schema: CedarSchema) -> None:
    a = PolicySource("a.cedar", 'permit(principal, action in Action::"read", resource);')
    b = PolicySource("b.cedar", "")
    v1 = compile_policies([a, b], schema).version
    assert compile_policies([b, a], schema).version == v1
    assert compile_policies([a], schema).version != v1  # the file set changed
    changed = PolicySource("a.cedar", a.text + "\n")
    assert compile_policies([changed, b], schema).version != v1
    other_schema = build_schema([])
    assert compile_policies([b], other_schema).version != compile_policies([b], schema).version


def test_empty_set_is_valid_and_denies(schema: CedarSchema, entities: EntitySet) -> None:
    compiled = compile_policies(
        [PolicySource("empty.cedar", "// nothing yet\n"), PolicySource("none.cedar", "")], schema
    )
    assert dict(compiled.policies) == {}
    decision = decide(compiled, entities, read_request())
    assert decision == Decision(Outcome.DENY, (), (), compiled.version)
    assert compile_policies([], schema).policies == {}


def test_semicolons_in_strings_and_comments_do_not_split(schema: CedarSchema) -> None:
    text = (
        '@id("semi") // a comment; with a semicolon and a "quote\n'
        "permit(principal, action, resource)\n"
        'when { context.environment == "a;b\\";c" };\n'
        '@id("after") permit(principal, action, resource)\n'
        'when { context.environment like "*//*" };\n'
    )
    compiled = compile_policies([PolicySource("s.cedar", text)], schema)
    assert list(compiled.policies) == ["semi", "after"]
    assert compiled.policies["after"].line == 4


def test_syntax_error_reports_file_and_line(schema: CedarSchema) -> None:
    bad = (
        "// line 1\n"
        '@id("ok")\n'
        'permit(principal, action in Action::"read", resource);\n'
        "\n"
        "permit(\n"
        "  principal,\n"
        "  action,\n"
        "  resource\n"
        ") when {\n"
        "  context.call_rate > \n"
        "};\n"
    )
    [problem] = problems_of(
        [PolicySource("ok.cedar", GOOD), PolicySource("bad.cedar", bad)], schema
    )
    assert (problem.file, problem.line, problem.policy_id) == ("bad.cedar", 11, None)
    assert "syntax error" in problem.message
    assert str(problem) == f"bad.cedar:11: {problem.message}"


def test_syntax_errors_of_other_kinds(schema: CedarSchema) -> None:
    text = (
        "permit(principal, action, resource) when { context.call_rate = 3 };\n"
        "allow(principal, action, resource);\n"
        'permit(principal, action, resource) when { "unterminated };\n'
    )
    problems = problems_of([PolicySource("x.cedar", text)], schema)
    assert [(p.line, p.policy_id) for p in problems] == [(1, None), (2, None), (3, None)]
    assert "'=' is not a valid operator" in problems[0].message
    assert "effect" in problems[1].message


def test_missing_final_semicolon(schema: CedarSchema) -> None:
    text = (
        'permit(principal, action in Action::"read", resource);\n'
        "\n"
        "permit(principal, action, resource)\n"
    )
    [problem] = problems_of([PolicySource("x.cedar", text)], schema)
    assert problem.line == 3
    assert "does not end with ';'" in problem.message


def test_schema_violation(schema: CedarSchema) -> None:
    text = (
        '@id("typed")\npermit(principal, action, resource)\nwhen { context.call_rate == "many" };\n'
    )
    [problem] = problems_of([PolicySource("t.cedar", text)], schema)
    assert (problem.file, problem.line, problem.policy_id) == ("t.cedar", 1, "typed")
    assert "Long" in problem.message
    assert "String" in problem.message


def test_unknown_entity_type(schema: CedarSchema) -> None:
    text = "\n\npermit(\n  principal is User,\n  action,\n  resource\n);\n"
    problems = problems_of([PolicySource("u.cedar", text)], schema)
    assert problems[0].message == "unrecognized entity type `User`"
    assert (problems[0].line, problems[0].policy_id) == (4, "u.cedar:3")


def test_unknown_action(schema: CedarSchema) -> None:
    text = 'forbid(principal, action == Action::"gh:drop_tables", resource);'
    problems = problems_of([PolicySource("a.cedar", text)], schema)
    assert 'unrecognized action `Action::"gh:drop_tables"`' in problems[0].message
    assert problems[0].line == 1


def test_missing_attribute(schema: CedarSchema) -> None:
    text = (
        "permit(principal, action, resource)\n"
        "when {\n"
        '  principal.state == "active" &&\n'
        '  principal.team == "core"\n'
        "};\n"
        "permit(principal, action, resource)\n"
        'when { context.arguments.repo == "web" };\n'  # optional record, no `has` guard
        "permit(principal, action, resource)\n"
        'when { context.task.getTag("repo").contains("web") };\n'  # a tag, no `hasTag`
    )
    problems = problems_of([PolicySource("m.cedar", text)], schema)
    team = [p for p in problems if "`team`" in p.message]
    assert team
    assert team[0].line == 4
    assert {p.line for p in problems if "arguments" in p.message} == {7}
    assert {p.line for p in problems if "tag" in p.message} == {9}


def test_validation_line_skips_comments(schema: CedarSchema) -> None:
    text = (
        "permit(principal, action, resource) // principal.team is checked below\n"
        'when { context.environment == "team" &&\n'
        '  principal.team == "core" };\n'
    )
    [problem] = problems_of([PolicySource("c.cedar", text)], schema)
    assert "`team`" in problem.message
    assert problem.line == 3


def test_policies_for_actions_the_registry_lacks_yet() -> None:
    # A fresh registry has no tool, so no tier has an action: Cedar alone would refuse every
    # policy ("unable to find an applicable action"). They load, type-checked against
    # placeholder actions, and say that they match nothing yet.
    empty = build_schema([])
    text = (
        '@id("admin") permit(principal, action in Action::"admin", resource)\n'
        'when { principal.state == "active" && context.task.hasTag("tiers") };\n'
        '@id("all") forbid(principal, action, resource) when { context.delegation_depth > 3 };\n'
    )
    compiled = compile_policies([PolicySource("p.cedar", text)], empty)
    assert list(compiled.policies) == ["admin", "all"]
    assert [(w.line, w.policy_id) for w in compiled.warnings] == [(1, "admin"), (3, "all")]
    assert all("matches no action" in w.message for w in compiled.warnings)
    # The bodies are still checked, and real scope mistakes still refused.
    bad = (
        'permit(principal, action in Action::"admin", resource) when { principal.nostate };\n'
        'permit(principal, action == Action::"read", resource);\n'
        'permit(principal is Owner, action in Action::"read", resource);\n'
    )
    problems = problems_of([PolicySource("b.cedar", bad)], empty)
    assert [p.line for p in problems] == [1, 2, 3]
    assert "`nostate`" in problems[0].message
    assert "applicable action" in problems[1].message
    assert "applicable action" in problems[2].message


def test_admin_policy_beside_a_read_only_registry(schema: CedarSchema) -> None:
    read_only = build_schema(
        [Tool("r", "a", "https://x", ToolKind.HTTP, TOOLS[0].actions[:1], EPOCH, EPOCH)]
    )
    text = (
        '@id("read") permit(principal, action in Action::"read", resource);\n'
        '@id("admin") permit(principal, action in Action::"admin", resource);\n'
    )
    compiled = compile_policies([PolicySource("p.cedar", text)], read_only)
    assert [w.policy_id for w in compiled.warnings] == ["admin"]
    assert compile_policies([PolicySource("p.cedar", text)], schema).warnings == ()


def test_duplicate_id_across_files(schema: CedarSchema) -> None:
    a = PolicySource("a.cedar", '\n@id("read")\npermit(principal, action, resource);')
    b = PolicySource("b.cedar", '@id("read") forbid(principal, action, resource);')
    [problem] = problems_of([a, b], schema)
    assert (problem.file, problem.line, problem.policy_id) == ("b.cedar", 1, "read")
    assert "duplicate" in problem.message
    assert "a.cedar:2" in problem.message


def test_duplicate_id_seen_even_if_first_is_invalid(schema: CedarSchema) -> None:
    a = PolicySource("a.cedar", '@id("x") permit(principal is User, action, resource);')
    b = PolicySource("b.cedar", '@id("x") permit(principal, action, resource);')
    problems = problems_of([a, b], schema)
    assert any(p.file == "b.cedar" and "duplicate" in p.message for p in problems)


def test_templates_empty_ids_and_twice_given_files_refused(schema: CedarSchema) -> None:
    text = (
        "permit(principal == ?principal, action, resource);\n"
        '@id("") permit(principal, action, resource);'
    )
    problems = problems_of([PolicySource("t.cedar", text), PolicySource("t.cedar", "")], schema)
    assert [(p.file, p.line) for p in problems] == [("t.cedar", 1), ("t.cedar", 2), ("t.cedar", 1)]
    assert "templates" in problems[0].message
    assert "@id" in problems[1].message
    assert "twice" in problems[2].message


def test_all_problems_reported_at_once(schema: CedarSchema) -> None:
    sources = [
        PolicySource("good.cedar", GOOD),
        PolicySource("syntax.cedar", "permit(principal, action, resource) when { ) };"),
        PolicySource(
            "schema.cedar",
            'permit(principal, action, resource);\n@id("types") forbid(principal, action, resource)'
            " when { context.hour > 1 };\npermit(principal is Robot, action, resource);",
        ),
        PolicySource("dup.cedar", '@id("read") permit(principal, action, resource);'),
    ]
    problems = problems_of(sources, schema)
    where = {(p.file, p.line) for p in problems}
    assert {
        ("syntax.cedar", 1),
        ("schema.cedar", 2),
        ("schema.cedar", 3),
        ("dup.cedar", 1),
    } <= where
    assert all(p.file != "good.cedar" for p in problems)
    with pytest.raises(PolicyInvalid) as caught:
        compile_policies(sources, schema)
    detail = caught.value.detail
    assert f"({len(problems)} problems)" in detail
    for problem in problems:
        assert str(problem) in detail


def test_policy_invalid_from_a_message() -> None:
    exc = PolicyInvalid("policy directory /nope does not exist")
    assert exc.problems == ()
    assert exc.detail == "policy directory /nope does not exist"
    assert PolicyInvalid().detail == "the policy set is not valid"


def test_problem_string() -> None:
    assert str(PolicyProblem("a.cedar", 3, "p1", "bad")) == "a.cedar:3: [p1] bad"
    assert str(PolicyProblem("a.cedar", 3, None, "bad")) == "a.cedar:3: bad"


# --- deciding ---------------------------------------------------------------------------


def read_request(**context: Any) -> DecisionRequest:
    base = default_context(None, "t1")
    base["arguments"] = {"owner": "acme", "repo": "web"}
    return DecisionRequest(
        EntityRef("Agent", AGENT), "gh:get_repo", EntityRef("Tool", "gh"), merge(base, context)
    )


@pytest.fixture(scope="module")
def compiled(schema: CedarSchema) -> CompiledPolicies:
    return compile_policies([PolicySource("tiers.cedar", GOOD)], schema)


def test_decide_accepts_any_mapping_context(
    compiled: CompiledPolicies, entities: EntitySet
) -> None:
    request = read_request()
    frozen = DecisionRequest(
        request.principal, request.action, request.resource, MappingProxyType(dict(request.context))
    )
    assert decide(compiled, entities, frozen).outcome is Outcome.ALLOW


def test_one_evaluation_and_no_parsing_per_decision(
    compiled: CompiledPolicies, entities: EntitySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = cedarpy.is_authorized

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decide must not parse")

    monkeypatch.setattr(cedarpy, "is_authorized", counting)
    for name in ("policies_to_json_str", "validate_policies", "PolicySet", "Schema"):
        monkeypatch.setattr(cedarpy, name, forbidden)
    for name in ("from_json_str", "with_added_json_str"):
        monkeypatch.setattr(cedarpy.Entities, name, forbidden)
    assert decide(compiled, entities, read_request()).outcome is Outcome.ALLOW
    assert len(calls) == 1
    _, policies, ents, schema = calls[0]
    assert policies is compiled.handle
    assert ents is entities.handle
    assert schema is compiled.schema.handle
    calls.clear()
    gated = DecisionRequest(
        EntityRef("Agent", AGENT),
        "gh:get_repo",
        EntityRef("Tool", "gh"),
        {**read_request().context, "requires_approval": True},
    )
    decision = decide(compiled, entities, gated)
    assert decision.outcome is Outcome.APPROVAL_REQUIRED
    assert decision.determining == ("tiers.cedar:8",)
    assert len(calls) == 2
    assert calls[1][0]["context"]["approval"] == {"granted": True}
    assert gated.context["approval"] == {"granted": False}  # the caller's context is untouched


def test_malformed_requests_deny(compiled: CompiledPolicies, entities: EntitySet) -> None:
    good = read_request()
    for request in (
        DecisionRequest(good.principal, good.action, good.resource, {**good.context, "x": {1, 2}}),
        DecisionRequest(good.principal, good.action, good.resource, {**good.context, "x": 2**70}),
        DecisionRequest(
            good.principal, good.action, good.resource, {**good.context, "now": float("nan")}
        ),
        DecisionRequest(good.principal, good.action, good.resource, None),  # type: ignore[arg-type]
        DecisionRequest(EntityRef("Agent", 7), good.action, good.resource, good.context),  # type: ignore[arg-type]
        DecisionRequest(good.principal, "", good.resource, good.context),
        DecisionRequest(EntityRef("", ""), good.action, good.resource, good.context),
    ):
        decision = decide(compiled, entities, request)
        assert decision.outcome is Outcome.DENY
        assert decision.errors
        assert decision.policy_version == compiled.version


def test_entity_set_is_immutable_and_validated(schema: CedarSchema) -> None:
    base = EntitySet.build(registry_entities([], [], TOOLS), schema)
    size = len(base)
    task = task_entity(TaskFacts("t9", AGENT, "alice", "p", {}, "active"))
    more = base.with_entities([task])
    assert len(more) == size + 1
    assert len(base) == size
    with pytest.raises(AttributeError):
        base.handle = None
    with pytest.raises(PolicyInputError):
        EntitySet.build([{"uid": {"type": "Tool", "id": "x"}, "attrs": {"kind": 1}}], schema)
    with pytest.raises(PolicyInputError):
        EntitySet.build([{"uid": {"type": "Robot", "id": "x"}, "attrs": {}}], schema)
    with pytest.raises(PolicyInputError):
        EntitySet.build([{"uid": object()}], schema)  # not JSON
    clash = {**task, "attrs": {**task["attrs"], "purpose": "other"}}
    with pytest.raises(PolicyInputError):
        more.with_entities([clash])


# --- property: decide never raises ------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=4)
    | st.just(Outcome.ALLOW)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        | st.frozensets(st.integers(), max_size=2)
        | st.tuples(inner)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(list(default_context(None, "t1"))) | st.text(max_size=8)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    replace=st.dictionaries(_keys, _values, max_size=4),
    drop=st.sets(st.sampled_from(list(default_context(None, "t1")))),
    keyed=st.dictionaries(st.integers() | st.tuples(st.integers()), _values, max_size=2),
    action=st.sampled_from(["gh:get_repo", "gh:put_file", "read", "nope", ""]),
)
def test_decide_never_raises(
    compiled: CompiledPolicies,
    entities: EntitySet,
    replace: dict[str, Any],
    drop: set[str],
    keyed: dict[Any, Any],
    action: str,
) -> None:
    context: dict[Any, Any] = {**read_request().context, **replace, **keyed}
    for key in drop:
        context.pop(key, None)
    request = DecisionRequest(EntityRef("Agent", AGENT), action, EntityRef("Tool", "gh"), context)
    before = repr(context)
    decision = decide(compiled, entities, request)
    assert repr(context) == before  # the caller's context is never changed
    assert decision.outcome in set(Outcome)
    assert decision.policy_version == compiled.version
    if decision.errors:
        assert decision.outcome is Outcome.DENY

"""Benchmark: policy decisions against a bare Cedar call on the same handles.

For policy sets of 20, 200 and 2,000 generated policies (tier permits, forbids on agent
attributes, constraint checks binding arguments to task tags, time gates, approval gates)
over a generated registry, prints decisions/s and p50/p99 for ``taskbound.core.policy.decide``
and for a bare ``cedarpy.is_authorized(request, policy_set, entities, schema)`` on the very
same pre-parsed handles, measured interleaved in the same run, and their ratio. Ratios
travel between machines; absolute rates do not. The goal is decide / bare <= 1.30.

    .venv/bin/python bench/policy.py [--decisions 2000] [--sizes 20,200,2000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import cedarpy

from taskbound.core.cedar_schema import (
    TaskFacts,
    build_schema,
    registry_entities,
    task_entity,
)
from taskbound.core.model import Action, Agent, AgentState, Owner, Risk, Role, Scope, Tier, Tool
from taskbound.core.model import ToolKind as Kind
from taskbound.core.policy import (
    DecisionRequest,
    EntityRef,
    EntitySet,
    Outcome,
    PolicySource,
    compile_policies,
    decide,
)

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
TOOLS = 12
AGENTS = 50


def registry() -> tuple[list[Owner], list[Agent], list[Tool]]:
    owners = [
        Owner(f"owner{i}", f"owner{i}@example.com", frozenset({Role.APPROVER}), EPOCH, EPOCH)
        for i in range(5)
    ]
    tools: list[Tool] = []
    for i in range(TOOLS):
        if i % 2:
            actions = (
                Action("get", Tier.READ, "GET", "/repos/{owner}/{repo}"),
                Action("put", Tier.WRITE, "PUT", "/repos/{owner}/{repo}/contents/{path}"),
                Action("delete", Tier.ADMIN, "DELETE", "/repos/{owner}/{repo}", risk=Risk.HIGH),
            )
            kind = Kind.HTTP
        else:
            props = {
                "repo": {"type": "string"},
                "limit": {"type": "integer"},
                "labels": {"type": "array", "items": {"type": "string"}},
            }
            schema = {"type": "object", "properties": props, "required": ["repo"]}
            actions = (
                Action("get", Tier.READ, mcp_tool="get", input_schema=schema),
                Action("put", Tier.WRITE, mcp_tool="put", input_schema=schema),
                Action(
                    "delete",
                    Tier.ADMIN,
                    mcp_tool="delete",
                    input_schema=schema,
                    risk=Risk.HIGH,
                    requires_approval=True,
                ),
            )
            kind = Kind.MCP
        tools.append(
            Tool(
                f"tool{i}", f"https://gw.example/tool{i}", "https://up", kind, actions, EPOCH, EPOCH
            )
        )
    agents = [
        Agent(
            f"spiffe://example.org/agents/a{i}",
            f"owner{i % 5}",
            AgentState.ACTIVE,
            frozenset(Scope(f"tool{t}", tier) for t in range(TOOLS) for tier in Tier),
            EPOCH,
            EPOCH,
        )
        for i in range(AGENTS)
    ]
    return owners, agents, tools


def policies(n: int) -> tuple[list[PolicySource], list[tuple[int, str]]]:
    """``n`` policies, a realistic mix spread over four files, and the (tool, tier) pairs
    that the tier permits allow."""
    kinds = ("tiers", "forbids", "constraints", "gates")
    texts: dict[str, list[str]] = {k: [] for k in kinds}
    permitted: list[tuple[int, str]] = []
    for i in range(n):
        tool = f"tool{i % TOOLS}"
        kind = kinds[i % 4]
        if kind == "tiers":
            j = i // 4
            tier = ("read", "write", "admin")[(j // TOOLS) % 3]
            tool = f"tool{j % TOOLS}"
            permitted.append((j % TOOLS, tier))
            texts[kind].append(
                f'permit(principal, action in Action::"{tier}", resource == Tool::"{tool}")\n'
                f'when {{ principal.state == "active" && context.tier == "{tier}" &&\n'
                f'  principal.ceiling.contains("{tool}:{tier}") &&\n'
                f'  context.task.state == "active" }};'
            )
        elif kind == "forbids":
            texts[kind].append(
                f"forbid(principal, action, resource)\n"
                f'when {{ principal.path like "/agents/blocked{i}*" ||\n'
                f"  (context.delegation_depth > {3 + i % 4} &&\n"
                f'   context.environment == "prod{i}") }};'
            )
        elif kind == "constraints":
            tool = f"tool{(i // 4) % TOOLS}"
            texts[kind].append(
                f'forbid(principal, action, resource == Tool::"{tool}")\n'
                f"when {{ context has arguments && context.arguments has repo &&\n"
                f'  context.task.hasTag("repo{i}") &&\n'
                f'  !context.task.getTag("repo{i}").contains(context.arguments.repo) }};'
            )
        elif i % 8 == 3:
            texts[kind].append(
                f'forbid(principal, action, resource == Tool::"{tool}")\n'
                f'when {{ context.environment == "prod" && context.tier == "admin" &&\n'
                f"  (context.now.hour < {i % 6} || context.now.weekday > 5) }};"
            )
        else:
            texts[kind].append(
                f'@approval("high risk")\n'
                'forbid(principal, action in Action::"admin", resource)\n'
                f'when {{ context.risk == "high" && context.call_rate > {50 + i} &&\n'
                f"  !context.approval.granted }};"
            )
    sources = [PolicySource(f"{k}.cedar", "\n\n".join(v) + "\n") for k, v in texts.items()]
    return sources, permitted


def context(tier: str, risk: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "point": "call",
        "tier": tier,
        "risk": risk,
        "requires_approval": False,
        "task": {"__entity": {"type": "Task", "id": "task-1"}},
        "now": {"epoch": 1_735_732_800, "hour": 12, "weekday": 2},
        "environment": "prod",
        "delegation_depth": 0,
        "call_rate": 3,
        "approval": {"granted": False},
        "exception": {"active": False},
        "arguments": arguments,
    }


def requests(permitted: list[tuple[int, str]]) -> list[DecisionRequest]:
    """A mix that mostly allows and sometimes denies, each decided in one evaluation."""
    out = []
    rng = random.Random(7)
    for k in range(64):
        if k % 4 == 3:  # anything: mostly a default deny
            tool, tier = rng.randrange(TOOLS), rng.choice(("read", "write", "admin"))
        else:
            tool, tier = rng.choice(permitted)
        action = {"read": "get", "write": "put", "admin": "delete"}[tier]
        repo = "evil/repo" if k % 5 == 0 else "acme/web"
        args: dict[str, Any] = (
            {"repo": repo, "limit": 5}
            if tool % 2 == 0
            else {"owner": "acme", "repo": repo}
            | ({"path": "README.md"} if action == "put" else {})
        )
        out.append(
            DecisionRequest(
                principal=EntityRef("Agent", f"spiffe://example.org/agents/a{k % AGENTS}"),
                action=f"tool{tool}:{action}",
                resource=EntityRef("Tool", f"tool{tool}"),
                context=context(tier, "high" if tier == "admin" else "low", args),
            )
        )
    return out


def bare_request(r: DecisionRequest) -> dict[str, Any]:
    return {
        "principal": {"type": r.principal.type, "id": r.principal.id},
        "action": {"type": "Action", "id": r.action},
        "resource": {"type": r.resource.type, "id": r.resource.id},
        "context": dict(r.context),
    }


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] * 1e6


def bench(size: int, decisions: int) -> None:
    owners, agents, tools = registry()
    schema = build_schema(tools)
    t0 = time.perf_counter()
    sources, permitted = policies(size)
    compiled = compile_policies(sources, schema)
    compile_ms = (time.perf_counter() - t0) * 1000
    base = EntitySet.build(registry_entities(owners, agents, tools), schema)
    constraints = {f"repo{i}": ["acme/web"] for i in range(2, size, 4)}
    task = TaskFacts("task-1", agents[0].spiffe_id, "owner0", "bench", constraints, "active")
    entities = base.with_entities([task_entity(task)])

    reqs = requests(permitted)
    bares = [bare_request(r) for r in reqs]
    outcomes = {o: 0 for o in Outcome}
    for r, b in zip(reqs, bares, strict=True):  # both agree, and warm up
        d = decide(compiled, entities, r)
        raw = cedarpy.is_authorized(b, compiled.handle, entities.handle, schema.handle)
        assert d.allowed == raw.allowed, (d, raw.decision)
        assert not d.errors, d.errors
        outcomes[d.outcome] += 1

    ours: list[float] = []
    theirs: list[float] = []
    clock = time.perf_counter
    ps, es, sh = compiled.handle, entities.handle, schema.handle
    for i in range(decisions):
        r, b = reqs[i % len(reqs)], bares[i % len(reqs)]
        # Alternate which goes first so neither always runs on a warmer cache.
        if i % 2:
            t = clock()
            decide(compiled, entities, r)
            ours.append(clock() - t)
            t = clock()
            cedarpy.is_authorized(b, ps, es, sh)
            theirs.append(clock() - t)
        else:
            t = clock()
            cedarpy.is_authorized(b, ps, es, sh)
            theirs.append(clock() - t)
            t = clock()
            decide(compiled, entities, r)
            ours.append(clock() - t)

    ours_rate, theirs_rate = len(ours) / sum(ours), len(theirs) / sum(theirs)
    mix = ", ".join(f"{v} {k}" for k, v in outcomes.items() if v)
    print(f"{size} policies (compiled in {compile_ms:.0f} ms), {decisions} decisions ({mix})")
    for label, rate, values in (
        ("decide", ours_rate, ours),
        ("bare cedarpy.is_authorized", theirs_rate, theirs),
    ):
        print(
            f"  {label:28s} {rate:9.0f} decisions/s"
            f"   p50 {pct(values, 50):6.1f} us  p99 {pct(values, 99):6.1f} us"
        )
    print(
        f"  ratio decide / bare: mean {theirs_rate / ours_rate:.2f}x"
        f"  p50 {pct(ours, 50) / pct(theirs, 50):.2f}x"
    )

    # The approval path evaluates twice by design; shown apart from the ratio above.
    admin_tools = sorted({tool for tool, tier in permitted if tier == "admin"})
    if not admin_tools:
        print("  approval_required path: no admin permit at this size")
        return
    tool = admin_tools[0]
    args = {"repo": "acme/web"} if tool % 2 == 0 else {"owner": "acme", "repo": "acme/web"}
    gated = DecisionRequest(
        principal=EntityRef("Agent", agents[0].spiffe_id),
        action=f"tool{tool}:delete",
        resource=EntityRef("Tool", f"tool{tool}"),
        context=context("admin", "high", args) | {"call_rate": 10_000},
    )
    outcome = decide(compiled, entities, gated).outcome
    assert outcome is Outcome.APPROVAL_REQUIRED, outcome
    lat = []
    for _ in range(min(decisions, 500)):
        t = clock()
        decide(compiled, entities, gated)
        lat.append(clock() - t)
    print(f"  approval_required path (2 evaluations): p50 {pct(lat, 50):6.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000, help="per size (bounded)")
    parser.add_argument("--sizes", default="20,200,2000")
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        bench(min(size, 20_000), min(args.decisions, 50_000))


if __name__ == "__main__":
    main()

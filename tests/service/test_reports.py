"""The posture reports (docs/reports.md) on a deployment with known over-granted agents
and known usage: every number, finding, recommendation and reach checked exactly."""

from __future__ import annotations

import copy
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskbound.core.breakglass import BreakGlass
from taskbound.core.cedar_schema import build_schema
from taskbound.core.clock import FakeClock
from taskbound.core.model import (
    AuditEvent,
    CredentialRecord,
    Scope,
    ScopeGrant,
    Task,
    TaskState,
    Tier,
)
from taskbound.core.policy import PolicyInvalid, PolicySource, compile_policies
from taskbound.core.posture import policy_id_of
from taskbound.errors import InvalidRequest, NotFound
from taskbound.service.policy import PolicyEngine, default_policy_dir, read_policy_dir
from taskbound.service.policy_cases import load_suite, run_suite
from taskbound.service.registry import AgentSpec, OwnerSpec, RegistryDocument
from taskbound.service.reports import ReportService
from taskbound.service.runtime import Services, open_services
from taskbound.storage.memory import MemoryStorage
from tests.api.conftest import make_settings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday
SINCE = datetime(2026, 3, 1, tzinfo=UTC)
UNTIL = datetime(2026, 3, 3, tzinfo=UTC)
D1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
D2 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

TRIAGE = "spiffe://example.org/agents/triage"
HELPER = "spiffe://example.org/agents/helper"
IDLE = "spiffe://example.org/agents/idle"
EXACT = "spiffe://example.org/agents/exact"
SCRIBE = "spiffe://example.org/agents/scribe"
# Added by test_usage_through_delegation only.
ORCH = "spiffe://example.org/agents/orchestrator"
SUB = "spiffe://example.org/agents/sub"
TRIAGE_POLICY = policy_id_of(TRIAGE)


def _http(name: str, tier: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "tier": tier, "method": method, "path": path, **kw}


REGISTRY: dict[str, Any] = {
    "owners": [
        {"id": "alice", "contact": "alice@example.com", "roles": ["approver", "reviewer"]},
        {"id": "bob", "contact": "bob@example.com"},
        {"id": "carol", "contact": "carol@example.com"},
    ],
    "tools": [
        {
            "id": "issues",
            "audience": "https://gw.example/issues",
            "upstream_url": "https://issues.example/api",
            "upstream_secret": "one-secret-for-everyone",
            "actions": [
                _http("list", "read", "GET", "/issues"),
                _http("get", "read", "GET", "/issues/{n}"),
                _http("comment", "write", "POST", "/issues/{n}/comments"),
                _http("label", "write", "POST", "/issues/{n}/labels"),
                _http("wipe", "admin", "DELETE", "/issues", risk="high"),
            ],
        },
        {
            "id": "deploy",
            "audience": "https://gw.example/deploy",
            "upstream_url": "https://deploy.example/api",
            "actions": [_http("release", "admin", "POST", "/releases")],
        },
        {
            "id": "wiki",
            "audience": "https://gw.example/wiki",
            "upstream_url": "https://wiki.example/api",
            "actions": [
                _http("read_page", "read", "GET", "/pages/{p}"),
                _http("edit_page", "write", "PUT", "/pages/{p}"),
            ],
        },
    ],
    "agents": [
        {
            "spiffe_id": TRIAGE,
            "owner": "alice",
            "ceiling": [
                {"tool": "issues", "tier": "read"},
                {"tool": "issues", "tier": "write"},
                {"tool": "issues", "tier": "admin"},
                {"tool": "wiki", "tier": "read"},
            ],
        },
        {
            "spiffe_id": HELPER,
            "owner": "alice",
            "ceiling": [
                {"tool": "issues", "tier": "read"},
                {"tool": "wiki", "tier": "read"},
                {"tool": "wiki", "tier": "write"},
            ],
        },
        {
            "spiffe_id": IDLE,
            "owner": "bob",
            "ceiling": [
                {"tool": "issues", "tier": "read"},
                {"tool": "deploy", "tier": "admin"},
                {"tool": "wiki", "tier": "read"},
                {"tool": "wiki", "tier": "write"},
            ],
        },
        {"spiffe_id": EXACT, "owner": "carol", "ceiling": [{"tool": "wiki", "tier": "read"}]},
        {"spiffe_id": SCRIBE, "owner": "alice", "ceiling": [{"tool": "wiki", "tier": "read"}]},
    ],
}


def call(
    when: datetime, agent: str, task: str, tool: str, action: str, tier: str, **kw: Any
) -> AuditEvent:
    owner = {TRIAGE: "alice", HELPER: "alice", EXACT: "carol", ORCH: "carol", SUB: "carol"}[agent]
    return AuditEvent(
        time=when,
        event="gateway.call",
        decision=kw.pop("decision", "allow"),
        agent=agent,
        owner=owner,
        task=task,
        tool=tool,
        action=action,
        tier=tier,
        **kw,
    )


def task(
    task_id: str,
    agent: str,
    owner: str,
    granted: dict[tuple[str, Tier], tuple[str, ...]],
    **kw: Any,
) -> Task:
    return Task(
        id=task_id,
        agent_id=agent,
        owner_id=owner,
        purpose="work",
        constraints=kw.pop("constraints", {}),
        granted=tuple(ScopeGrant(t, tier, acts) for (t, tier), acts in granted.items()),
        denied=(),
        jkt="jkt",
        created_at=kw.pop("created_at", D1),
        expires_at=kw.pop("expires_at", D1 + timedelta(hours=1)),
        **kw,
    )


def ended(**kw: Any) -> dict[str, Any]:
    return {"state": TaskState.COMPLETED, "ended_at": D1 + timedelta(minutes=30), **kw}


async def seed(services: Services, clock: FakeClock) -> None:
    storage = services.storage
    clock.set(D1 - timedelta(days=10))
    await services.registry.apply(RegistryDocument.model_validate(REGISTRY))
    await services.policy.refresh_registry()
    await services.registry.update_owner(
        OwnerSpec(id="bob", contact="bob@example.com", disabled=True)
    )
    clock.set(NOW)
    R, W = Tier.READ, Tier.WRITE
    for t in (
        task("t-a1", TRIAGE, "alice", {("issues", R): ("list", "get"), ("issues", W): ("comment", "label")}, **ended()),  # noqa: E501
        task("t-a2", TRIAGE, "alice", {("issues", R): ("list",)}, **ended()),
        task("t-b1", HELPER, "alice", {("wiki", R): ("read_page",), ("wiki", W): ("edit_page",)}, **ended()),  # noqa: E501
        task("t-d1", EXACT, "carol", {("wiki", R): ("read_page",)}, **ended()),
        # created before the window: not one of its tasks
        task("t-old", TRIAGE, "alice", {("issues", R): ("list", "get")}, **ended(created_at=SINCE - timedelta(days=1))),  # noqa: E501
        # live now, delegable to HELPER only
        task(
            "t-live",
            TRIAGE,
            "alice",
            {("issues", R): ("list",), ("issues", W): ("comment",), ("wiki", R): ("read_page",)},
            constraints={"tiers": ["read", "write"]},
            created_at=NOW - timedelta(minutes=5),
            expires_at=NOW + timedelta(hours=1),
            may_act=HELPER,
        ),
    ):  # fmt: skip
        await storage.create_task(t, [])
    await storage.add_credential(
        CredentialRecord("cred-a", "t-live", TRIAGE, "issues", R, ("list",), "jkt", "kid",
                         NOW, NOW + timedelta(minutes=10)),
        NOW,
    )  # fmt: skip
    await storage.add_derived_credential(
        CredentialRecord("cred-b", "t-live", HELPER, "issues", R, ("list",), "jkt2", "kid",
                         NOW, NOW + timedelta(minutes=10), parent_jti="cred-a"),
        NOW,
        single_use=False,
    )  # fmt: skip
    await storage.append_audits(
        [
            call(SINCE - timedelta(seconds=1), TRIAGE, "t-old", "issues", "get", "read"),
            call(D1, TRIAGE, "t-a1", "issues", "list", "read"),
            call(D1 + timedelta(minutes=1), TRIAGE, "t-a1", "issues", "list", "read"),
            call(D1 + timedelta(minutes=2), TRIAGE, "t-a1", "issues", "comment", "write"),
            call(D1 + timedelta(minutes=3), TRIAGE, "t-a1", "issues", "label", "write", decision="deny"),  # noqa: E501
            call(D1 + timedelta(minutes=4), HELPER, "t-b1", "wiki", "read_page", "read"),
            AuditEvent(time=D1, event="task.started", decision="info", agent=TRIAGE),
            call(D2, TRIAGE, "t-a2", "issues", "list", "read"),
            # a delegated call: HELPER acting on TRIAGE's task
            call(D2 + timedelta(minutes=1), HELPER, "t-a1", "issues", "list", "read"),
            call(D2 + timedelta(minutes=2), HELPER, "t-b1", "wiki", "read_page", "read"),
            call(D2 + timedelta(minutes=3), EXACT, "t-d1", "wiki", "read_page", "read"),
            call(D2 + timedelta(minutes=4), TRIAGE, "t-a1", "issues", "wipe", "admin", decision="approval_required"),  # noqa: E501
            AuditEvent(time=D2 + timedelta(minutes=5), event="gateway.call", decision="error"),
        ]
    )  # fmt: skip
    await storage.create_breakglass(
        BreakGlass("bg-standing", IDLE, frozenset({Scope("issues", W)}), "incident 42 needs writes",
                   "alice", NOW - timedelta(hours=1), NOW + timedelta(hours=5))
    )  # fmt: skip
    await storage.create_breakglass(
        BreakGlass("bg-old", EXACT, frozenset({Scope("wiki", W)}), "fix the broken page quickly",
                   "alice", NOW - timedelta(days=5), NOW - timedelta(days=5) + timedelta(hours=1))
    )  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
async def deployment(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Services, FakeClock]]:
    pack = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), pack)
    settings = make_settings(
        tmp_path,
        credentials={"max_ttl_seconds": 1800},
        reports={"many_tools": 3},
        policy={"dir": str(pack), "watch": False},
    )
    clock = FakeClock(NOW)
    storage = MemoryStorage() if request.param == "memory" else None
    services = await open_services(settings, clock=clock, storage=storage)
    try:
        await seed(services, clock)
        yield services, clock
    finally:
        await services.aclose()


def refs(items: list[dict[str, Any]]) -> list[str]:
    return [f"{i['tool']}:{i['tier']}:{i['action']}" for i in items]


# --- usage ----------------------------------------------------------------------------------


async def test_usage_numbers(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    report = await services.reports.usage(SINCE, UNTIL)
    assert report["kind"] == "usage"
    assert report["window"] == {"since": "2026-03-01T00:00:00Z", "until": "2026-03-03T00:00:00Z"}
    assert report["generated_at"] == "2026-03-02T12:00:00Z"
    assert report["empty"] is False
    by = {a["agent"]: a for a in report["agents"]}
    assert [a["agent"] for a in report["agents"]] == [IDLE, SCRIBE, TRIAGE, HELPER, EXACT]
    summary = {
        a: (e["granted_count"], e["used_count"], e["unused_share"], e["tasks"], e["calls"], e["denied_calls"])  # noqa: E501
        for a, e in by.items()
    }  # fmt: skip
    assert summary == {
        IDLE: (5, 0, 1.0, 0, 0, 0),
        SCRIBE: (1, 0, 1.0, 0, 0, 0),
        TRIAGE: (6, 2, 0.6667, 3, 6, 2),  # t-a1, t-a2, t-live
        HELPER: (4, 2, 0.5, 1, 3, 0),
        EXACT: (1, 1, 0.0, 1, 1, 0),
    }
    triage = by[TRIAGE]
    assert (triage["owner"], triage["state"]) == ("alice", "active")
    assert refs(triage["granted"]) == [
        "issues:read:get", "issues:read:list", "issues:write:comment", "issues:write:label",
        "issues:admin:wipe", "wiki:read:read_page",
    ]  # fmt: skip
    # HELPER's allowed call on TRIAGE's t-a1 (09:01) counts for TRIAGE too, via delegation:
    # not in its own calls, but in the latest use
    assert triage["used"] == [
        {"tool": "issues", "tier": "read", "action": "list", "calls": 3, "via_delegation": 1,
         "last_used": "2026-03-02T09:01:00Z"},
        {"tool": "issues", "tier": "write", "action": "comment", "calls": 1,
         "via_delegation": 0, "last_used": "2026-03-01T10:02:00Z"},
    ]  # fmt: skip
    assert refs(triage["unused"]) == [
        "issues:read:get",
        "issues:write:label",
        "issues:admin:wipe",
        "wiki:read:read_page",
    ]
    # the delegated call counts for the delegate, as recorded (and for TRIAGE, above)
    assert refs(by[HELPER]["used"]) == ["issues:read:list", "wiki:read:read_page"]
    assert [(u["calls"], u["via_delegation"]) for u in by[HELPER]["used"]] == [(1, 0), (2, 0)]
    assert report["owners"] == [
        {"owner": "alice", "agents": 3, "granted_count": 11, "used_count": 4, "unused_share": 0.6364},  # noqa: E501
        {"owner": "bob", "agents": 1, "granted_count": 5, "used_count": 0, "unused_share": 1.0},
        {"owner": "carol", "agents": 1, "granted_count": 1, "used_count": 1, "unused_share": 0.0},
    ]  # fmt: skip
    assert report["totals"] == {
        "agents": 5, "over_granted_agents": 4, "granted_count": 17, "used_count": 5,
        "unused_share": 0.7059, "calls": 10, "denied_calls": 2, "tasks": 5,
    }  # fmt: skip
    assert report["timeline"] == [
        {"day": "2026-03-01", "allow": 4, "deny": 1, "approval_required": 0, "error": 0},
        {"day": "2026-03-02", "allow": 4, "deny": 0, "approval_required": 1, "error": 1},
    ]
    assert report["decision_mix"] == {"allow": 8, "deny": 1, "approval_required": 1, "error": 1}


async def test_more_tasks_than_the_cap_is_said_not_hidden(
    deployment: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    services, _ = deployment
    full = await services.reports.usage(SINCE, UNTIL)
    assert full["tasks_truncated"] is False
    assert "tasks_limit" not in full
    capped_settings = services.settings.model_copy(
        update={"reports": services.settings.reports.model_copy(update={"max_tasks": 2})}
    )
    monkeypatch.setattr(services.reports, "_settings", capped_settings)
    capped = await services.reports.usage(SINCE, UNTIL)
    assert capped["tasks_truncated"] is True
    assert capped["tasks_limit"] == 2
    assert capped["totals"]["tasks"] <= 2 < full["totals"]["tasks"]
    assert (await services.reports.posture(SINCE, UNTIL))["tasks_truncated"] is True


async def test_recommendations(deployment: tuple[Services, FakeClock], tmp_path: Path) -> None:
    services, _ = deployment
    report = await services.reports.usage(SINCE, UNTIL)
    by = {a["agent"]: a for a in report["agents"]}
    # nothing used (no evidence to narrow to) or nothing unused: no recommendation
    assert by[IDLE]["recommendation"] is None
    assert by[SCRIBE]["recommendation"] is None
    assert by[EXACT]["recommendation"] is None
    rec = by[TRIAGE]["recommendation"]
    assert rec["ceiling"] == [
        {"tool": "issues", "tier": "read"},
        {"tool": "issues", "tier": "write"},
    ]
    assert rec["removed"] == [{"tool": "issues", "tier": "admin"}, {"tool": "wiki", "tier": "read"}]
    assert refs(rec["forbidden_actions"]) == ["issues:read:get", "issues:write:label"]
    assert f'@id("{TRIAGE_POLICY}")' in rec["cedar"]
    assert f'principal == Agent::"{TRIAGE}"' in rec["cedar"]
    assert 'Action::"issues:get",\n    Action::"issues:label"' in rec["cedar"]
    assert rec["diff"].startswith(f"--- /dev/null\n+++ b/{TRIAGE_POLICY}.cedar\n")
    helper = by[HELPER]["recommendation"]
    assert helper["removed"] == [{"tool": "wiki", "tier": "write"}]
    assert refs(helper["forbidden_actions"]) == ["issues:read:get"]

    # The Cedar file compiles with the real compiler against the registry's schema...
    tools = await services.storage.list_tools()
    sources = read_policy_dir(services.policy.directory)
    new = [
        PolicySource(f"{TRIAGE_POLICY}.cedar", rec["cedar"]),
        PolicySource(f"{policy_id_of(HELPER)}.cedar", helper["cedar"]),
    ]
    compiled = compile_policies([*sources, *new], build_schema(tools))
    assert TRIAGE_POLICY in compiled.policies
    # ... and the `policy test` cases pass with it, and fail without it (the unused
    # actions are allowed by the current set: the new file is what denies them).
    registry = copy.deepcopy(REGISTRY)
    for tool in registry["tools"]:
        tool.pop("upstream_secret", None)
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "registry.yaml").write_text(yaml.safe_dump(registry))
    for name, r in (("triage", rec), ("helper", helper)):
        (tmp_path / "cases" / f"{name}.yaml").write_text(r["cases_yaml"])
    suite = load_suite(tmp_path / "cases")
    assert [c.spec.expect.value for c in suite.cases] == [
        "allow", "allow", "deny", "allow", "allow", "deny", "deny",
    ]  # fmt: skip
    after = run_suite(suite, [*sources, *new])
    assert after.failed == ()
    before = run_suite(suite, sources)
    assert sorted(r.case.spec.action for r in before.failed) == [
        "issues:get",
        "issues:get",
        "issues:label",
    ]


async def test_usage_through_delegation(deployment: tuple[Services, FakeClock]) -> None:
    """An orchestrator hands its task's issues credential to a sub-agent, which makes the
    write calls: the orchestrator used that authority (the exchange needed its credential),
    so it is neither unused nor removed nor forbidden, though the calls are the sub-agent's."""
    services, _ = deployment
    storage = services.storage
    R, W = Tier.READ, Tier.WRITE
    issues = [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}]
    for spiffe, ceiling in ((ORCH, issues), (SUB, issues[1:])):
        spec = {"spiffe_id": spiffe, "owner": "carol", "ceiling": ceiling}
        await services.registry.create_agent(AgentSpec.model_validate(spec))
    # created before the window (so not among its tasks), live through it
    await storage.create_task(
        task("t-o1", ORCH, "carol",
             {("issues", R): ("list", "get"), ("issues", W): ("comment", "label")},
             created_at=SINCE - timedelta(days=1), expires_at=NOW + timedelta(hours=1)),
        [],
    )  # fmt: skip
    assert await storage.add_credential(
        CredentialRecord("cred-o", "t-o1", ORCH, "issues", W, ("comment", "label"), "jkt",
                         "kid", NOW, NOW + timedelta(minutes=10)),
        NOW,
    )  # fmt: skip
    assert await storage.add_derived_credential(
        CredentialRecord("cred-s", "t-o1", SUB, "issues", W, ("comment", "label"), "jkt3",
                         "kid", NOW, NOW + timedelta(minutes=10), parent_jti="cred-o"),
        NOW,
        single_use=False,
    )  # fmt: skip
    await storage.append_audits(
        [
            call(D1 + timedelta(hours=1), ORCH, "t-o1", "issues", "list", "read"),
            # the delegated credential's calls: the sub-agent acting, the parent's task
            call(D2 + timedelta(minutes=10), SUB, "t-o1", "issues", "comment", "write"),
            call(D2 + timedelta(minutes=20), SUB, "t-o1", "issues", "comment", "write"),
            call(D2 + timedelta(minutes=30), SUB, "t-o1", "issues", "label", "write"),
            # refused: used by no one
            call(D2 + timedelta(minutes=40), SUB, "t-o1", "issues", "get", "read", decision="deny"),
        ]
    )  # fmt: skip

    report = await services.reports.usage(SINCE, UNTIL)
    by = {a["agent"]: a for a in report["agents"]}
    orch = by[ORCH]
    assert orch["used"] == [
        {"tool": "issues", "tier": "read", "action": "list", "calls": 1, "via_delegation": 0,
         "last_used": "2026-03-01T11:00:00Z"},
        {"tool": "issues", "tier": "write", "action": "comment", "calls": 0,
         "via_delegation": 2, "last_used": "2026-03-02T09:20:00Z"},
        {"tool": "issues", "tier": "write", "action": "label", "calls": 0,
         "via_delegation": 1, "last_used": "2026-03-02T09:30:00Z"},
    ]  # fmt: skip
    assert orch["unused"] == [{"tool": "issues", "tier": "read", "action": "get"}]
    summary = (orch["granted_count"], orch["used_count"], orch["unused_share"])
    assert summary == (4, 3, 0.25)
    # its own calls only; t-o1 was created before the window
    assert (orch["calls"], orch["denied_calls"], orch["tasks"]) == (1, 0, 0)
    rec = orch["recommendation"]
    assert rec["ceiling"] == issues
    assert rec["removed"] == []
    assert rec["forbidden_actions"] == [{"tool": "issues", "tier": "read", "action": "get"}]
    assert 'action in [\n    Action::"issues:get"\n  ]' in rec["cedar"]
    assert [line for line in rec["cases_yaml"].splitlines() if "- name:" in line] == [
        '  - name: "issues:list stays allowed (used 1 times)"',
        '  - name: "issues:comment stays allowed (used 2 times)"',
        '  - name: "issues:label stays allowed (used 1 times)"',
        '  - name: "issues:get is denied (granted, never used)"',
    ]
    # the sub-agent's own numbers are its calls, as recorded
    sub = by[SUB]
    assert [(u["action"], u["calls"], u["via_delegation"]) for u in sub["used"]] == [
        ("comment", 2, 0),
        ("label", 1, 0),
    ]
    assert (sub["unused"], sub["calls"], sub["denied_calls"]) == ([], 4, 1)
    # one agent's report reads the delegates' calls on its tasks too
    alone = await services.reports.usage(SINCE, UNTIL, agent=ORCH)
    assert alone["agents"] == [orch]
    assert alone["totals"]["calls"] == 1
    # and the posture finding follows: 25 % unused is under the 0.5 threshold
    posture = await services.reports.posture(SINCE, UNTIL)
    assert ("unused_authority", ORCH) not in {
        (f["code"], f["subject"]["id"]) for f in posture["findings"]
    }


async def test_usage_of_one_agent_and_one_owner(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    one = await services.reports.usage(SINCE, UNTIL, agent=HELPER)
    assert [a["agent"] for a in one["agents"]] == [HELPER]
    assert one["timeline"] == [
        {"day": "2026-03-01", "allow": 1, "deny": 0, "approval_required": 0, "error": 0},
        {"day": "2026-03-02", "allow": 2, "deny": 0, "approval_required": 0, "error": 0},
    ]
    assert one["totals"]["calls"] == 3
    carol = await services.reports.usage(SINCE, UNTIL, owner="carol")
    assert [a["agent"] for a in carol["agents"]] == [EXACT]
    assert carol["decision_mix"] == {"allow": 1, "deny": 0, "approval_required": 0, "error": 0}


async def test_bad_input(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    reports = services.reports
    with pytest.raises(NotFound, match="no agent"):
        await reports.usage(SINCE, UNTIL, agent="spiffe://example.org/agents/nobody")
    with pytest.raises(NotFound, match="no owner"):
        await reports.usage(SINCE, UNTIL, owner="mallory")
    with pytest.raises(InvalidRequest, match="until must be after since"):
        await reports.usage(UNTIL, SINCE)
    with pytest.raises(InvalidRequest, match="until must be after since"):
        await reports.posture(SINCE, SINCE)
    with pytest.raises(InvalidRequest, match="time zone"):
        await reports.usage(SINCE.replace(tzinfo=None), UNTIL)
    with pytest.raises(NotFound, match="no agent"):
        await reports.blast_radius(agent="spiffe://example.org/agents/nobody")
    with pytest.raises(NotFound, match="no task"):
        await reports.blast_radius(task="t-nope")
    with pytest.raises(NotFound, match="no credential"):
        await reports.blast_radius(credential="cred-nope")
    with pytest.raises(InvalidRequest, match="exactly one"):
        await reports.blast_radius()
    with pytest.raises(InvalidRequest, match="exactly one"):
        await reports.blast_radius(agent=TRIAGE, task="t-live")
    with pytest.raises(NotFound) as unknown:
        await reports.usage(SINCE, UNTIL, agent="spiffe://example.org/agents/nobody")
    assert unknown.value.code == "not_found"
    with pytest.raises(InvalidRequest) as backwards:
        await reports.usage(UNTIL, SINCE)
    assert backwards.value.code == "invalid_request"


async def test_a_window_with_no_data(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    since = datetime(2025, 1, 1, tzinfo=UTC)
    report = await services.reports.usage(since, since + timedelta(days=1))
    assert report["empty"] is True
    assert report["decision_mix"] == {"allow": 0, "deny": 0, "approval_required": 0, "error": 0}
    assert report["timeline"] == [
        {"day": "2025-01-01", "allow": 0, "deny": 0, "approval_required": 0, "error": 0}
    ]
    assert report["totals"]["calls"] == report["totals"]["used_count"] == 0
    assert report["totals"]["over_granted_agents"] == 0
    posture = await services.reports.posture(since, since + timedelta(days=1))
    assert posture["empty"] is True
    codes = [f["code"] for f in posture["findings"]]
    # no usage-based finding, and an explicit "nothing was observed"
    assert "unused_authority" not in codes
    assert "task_asks_more_than_it_uses" not in codes
    assert codes[-1] == "no_activity_observed"
    assert "nothing was observed" in posture["findings"][-1]["message"]


async def test_empty_audit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    services = await open_services(settings, clock=FakeClock(NOW), storage=MemoryStorage())
    try:
        report = await services.reports.usage(SINCE, UNTIL)
        assert report["empty"] is True
        assert (report["agents"], report["owners"]) == ([], [])
        assert report["totals"] == {
            "agents": 0, "over_granted_agents": 0, "granted_count": 0, "used_count": 0,
            "unused_share": 0.0, "calls": 0, "denied_calls": 0, "tasks": 0,
        }  # fmt: skip
        posture = await services.reports.posture(SINCE, UNTIL)
        assert "no_activity_observed" in [f["code"] for f in posture["findings"]]
        aligned = await services.reports.alignment()
        least = next(c for c in aligned["controls"] if c["id"] == "least_privilege_ceilings")
        assert least["status"] == "partly_met"
        assert "no gateway call was observed" in " ".join(least["evidence"])
    finally:
        await services.aclose()


# --- posture --------------------------------------------------------------------------------


async def test_posture_findings(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    report = await services.reports.posture(SINCE, UNTIL)
    got = [
        (f["severity"], f["code"], f["subject"]["type"], f["subject"]["id"])
        for f in report["findings"]
    ]
    assert got == [
        ("high", "breakglass_review_overdue", "exception", "bg-old"),
        ("high", "ceiling_spans_all_tiers", "agent", TRIAGE),
        ("high", "standing_breakglass", "exception", "bg-standing"),
        ("high", "ttl_cap_too_long", "setting", "credentials.max_ttl_seconds"),
        ("high", "unused_authority", "agent", IDLE),
        ("high", "unused_authority", "agent", SCRIBE),
        ("medium", "agent_owner_disabled", "agent", IDLE),
        ("medium", "ceiling_spans_many_tools", "agent", IDLE),
        ("medium", "dev_issuer_enabled", "setting", "identity.dev_issuer"),
        ("medium", "shared_upstream_secret", "tool", "issues"),
        ("medium", "unused_authority", "agent", HELPER),
        ("medium", "unused_authority", "agent", TRIAGE),
        ("low", "task_asks_more_than_it_uses", "agent", HELPER),
        ("low", "task_asks_more_than_it_uses", "agent", TRIAGE),
    ]
    assert report["summary"] == {"high": 6, "medium": 6, "low": 2, "total": 14}
    assert report["empty"] is False
    ev = {(f["code"], f["subject"]["id"]): f["evidence"] for f in report["findings"]}
    assert ev[("shared_upstream_secret", "issues")] == {
        "agents": [HELPER, IDLE, TRIAGE],
        "threshold": 3,
    }
    assert ev[("ceiling_spans_many_tools", IDLE)] == {
        "tools": ["deploy", "issues", "wiki"],
        "threshold": 3,
    }
    assert ev[("ceiling_spans_all_tiers", TRIAGE)] == {"tools": ["issues"]}
    assert ev[("ttl_cap_too_long", "credentials.max_ttl_seconds")] == {
        "value": 1800,
        "threshold": 900,
    }
    assert ev[("task_asks_more_than_it_uses", TRIAGE)] == {
        "tasks": 1, "ended_tasks": 2, "granted_actions": 4, "used_actions": 2,
        "examples": ["t-a1"], "threshold": 0.5,
    }  # fmt: skip
    assert ev[("task_asks_more_than_it_uses", HELPER)]["examples"] == ["t-b1"]
    triage = ev[("unused_authority", TRIAGE)]
    assert (triage["granted_count"], triage["used_count"], triage["unused_share"]) == (6, 2, 0.6667)
    assert triage["removed"] == [
        {"tool": "issues", "tier": "admin"},
        {"tool": "wiki", "tier": "read"},
    ]
    assert ev[("standing_breakglass", "bg-standing")]["agent"] == IDLE
    assert ev[("breakglass_review_overdue", "bg-old")]["ended_at"] == "2026-02-25T13:00:00Z"


# --- blast radius ---------------------------------------------------------------------------


def reach_rows(report: dict[str, Any]) -> list[tuple[str, tuple[str, ...], bool]]:
    return [
        (f"{e['tool']}:{e['tier']}:{e['action']}", tuple(e["via"]), e["requires_approval"])
        for e in report["reach"]
    ]


async def test_blast_radius_of_an_agent(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    report = await services.reports.blast_radius(agent=TRIAGE)
    assert report["subject"] == {"type": "agent", "id": TRIAGE}
    assert report["policy_version"] == services.policy.state.compiled.version
    assert reach_rows(report) == [
        ("issues:read:get", (TRIAGE,), False),
        ("issues:read:get", (TRIAGE, HELPER), False),
        ("issues:read:list", (TRIAGE,), False),
        ("issues:read:list", (TRIAGE, HELPER), False),
        ("issues:write:comment", (TRIAGE,), False),
        ("issues:write:label", (TRIAGE,), False),
        ("issues:admin:wipe", (TRIAGE,), True),
        ("wiki:read:read_page", (TRIAGE,), False),
        ("wiki:read:read_page", (TRIAGE, HELPER), False),
        ("wiki:read:read_page", (TRIAGE, SCRIBE), False),
    ]
    by = {(e["action"], len(e["via"])): e for e in report["reach"]}
    assert by[("list", 1)]["policies"] == ["read-tier"]
    assert by[("comment", 1)]["policies"] == ["write-tier-when-intent-allows"]
    assert by[("wipe", 1)]["policies"] == ["admin-tier-when-intent-allows"]
    assert by[("wipe", 1)]["risk"] == "high"
    assert report["delegates"] == [
        {"agent": HELPER, "owner": "alice", "reach_count": 3},
        {"agent": SCRIBE, "owner": "alice", "reach_count": 1},
    ]
    assert report["totals"] == {
        "actions": 6, "tools": 2, "direct": 6, "through_delegation": 4, "admin_tier": 1,
        "via_exception": 0,
    }  # fmt: skip


async def test_blast_radius_of_a_task_and_its_credentials(
    deployment: tuple[Services, FakeClock],
) -> None:
    services, clock = deployment
    reports = services.reports
    live = await reports.blast_radius(task="t-live")
    # may_act names HELPER: SCRIBE is no delegate of this task
    assert reach_rows(live) == [
        ("issues:read:list", (TRIAGE,), False),
        ("issues:read:list", (TRIAGE, HELPER), False),
        ("issues:write:comment", (TRIAGE,), False),
        ("wiki:read:read_page", (TRIAGE,), False),
        ("wiki:read:read_page", (TRIAGE, HELPER), False),
    ]
    assert live["delegates"] == [{"agent": HELPER, "owner": "alice", "reach_count": 2}]
    cred = await reports.blast_radius(credential="cred-a")
    assert reach_rows(cred) == [
        ("issues:read:list", (TRIAGE,), False),
        ("issues:read:list", (TRIAGE, HELPER), False),
    ]
    derived = await reports.blast_radius(credential="cred-b")
    assert derived["subject"] == {"type": "credential", "id": "cred-b"}
    assert reach_rows(derived) == [("issues:read:list", (HELPER,), False)]
    assert derived["delegates"] == []
    # an ended task reaches nothing
    ended = await reports.blast_radius(task="t-a1")
    assert (ended["reach"], ended["totals"]["actions"]) == ([], 0)
    clock.advance(3600)
    assert (await reports.blast_radius(credential="cred-a"))["reach"] == []


async def test_blast_radius_follows_the_current_policy_set(
    deployment: tuple[Services, FakeClock],
) -> None:
    services, _ = deployment
    directory = services.policy.directory
    (directory / "no-wiki.cedar").write_text(
        '@id("no-wiki")\nforbid (principal, action, resource == Tool::"wiki");\n'
    )
    assert (await services.policy.reload("test")).ok
    report = await services.reports.blast_radius(agent=TRIAGE)
    assert [e["tool"] for e in report["reach"]].count("wiki") == 0
    assert report["totals"]["actions"] == 5


async def test_a_policy_set_that_fails_to_load(
    deployment: tuple[Services, FakeClock], tmp_path: Path
) -> None:
    services, clock = deployment
    # Never loaded: no report can be decided.
    engine = PolicyEngine(services.settings, services.storage, clock)
    reports = ReportService(services.settings, services.storage, clock, engine)
    with pytest.raises(PolicyInvalid, match="not loaded"):
        await reports.blast_radius(agent=TRIAGE)
    with pytest.raises(PolicyInvalid, match="not loaded"):
        await reports.usage(SINCE, UNTIL)
    aligned = await reports.alignment()
    status = {c["id"]: c["status"] for c in aligned["controls"]}
    assert status["per_call_policy"] == "not_met"
    # A refused reload: the set in force still decides, and alignment says so.
    (services.policy.directory / "broken.cedar").write_text("permit (principal, action;\n")
    assert not (await services.policy.reload("test")).ok
    assert (await services.reports.blast_radius(agent=TRIAGE))["totals"]["actions"] == 6
    aligned = await services.reports.alignment()
    control = next(c for c in aligned["controls"] if c["id"] == "per_call_policy")
    assert control["status"] == "partly_met"
    assert "broken.cedar" in " ".join(control["evidence"])


Row = tuple[str, tuple[str, ...], str | None, bool, bool]


def time_rows(report: dict[str, Any]) -> list[Row]:
    """(action, via, exception, reachable_now, always) of each reach entry."""
    return [
        (
            f"{e['tool']}:{e['tier']}:{e['action']}",
            tuple(e["via"]),
            e["exception"],
            e["reachable_now"],
            e["always"],
        )
        for e in report["reach"]
    ]


def breakglass(bg_id: str, agent: str, scope: Scope, start: datetime, end: datetime) -> BreakGlass:
    return BreakGlass(bg_id, agent, frozenset({scope}), "incident 43 needs more for a while",
                      "alice", start, end)  # fmt: skip


async def test_blast_radius_counts_active_breakglass_exceptions(
    deployment: tuple[Services, FakeClock],
) -> None:
    services, _ = deployment
    storage, reports = services.storage, services.reports
    W = Tier.WRITE
    # HELPER: issues:write beyond its ceiling for two hours; an expired admin one adds nothing.
    await storage.create_breakglass(
        breakglass("bg-helper", HELPER, Scope("issues", W), NOW - timedelta(minutes=30),
                   NOW + timedelta(hours=2))
    )  # fmt: skip
    await storage.create_breakglass(
        breakglass("bg-gone", HELPER, Scope("issues", Tier.ADMIN), NOW - timedelta(days=2),
                   NOW - timedelta(days=1))
    )  # fmt: skip
    helper = await reports.blast_radius(agent=HELPER)
    bg = "bg-helper"
    # The exception's scopes are reached, marked, and not "always" (it ends in two hours);
    # TRIAGE, a delegate whose own ceiling holds issues:write, inherits the exception.
    assert time_rows(helper) == [
        ("issues:read:get", (HELPER,), None, True, True),
        ("issues:read:get", (HELPER, TRIAGE), None, True, True),
        ("issues:read:list", (HELPER,), None, True, True),
        ("issues:read:list", (HELPER, TRIAGE), None, True, True),
        ("issues:write:comment", (HELPER,), bg, True, False),
        ("issues:write:comment", (HELPER, TRIAGE), bg, True, False),
        ("issues:write:label", (HELPER,), bg, True, False),
        ("issues:write:label", (HELPER, TRIAGE), bg, True, False),
        ("wiki:read:read_page", (HELPER,), None, True, True),
        ("wiki:read:read_page", (HELPER, SCRIBE), None, True, True),
        ("wiki:read:read_page", (HELPER, TRIAGE), None, True, True),
        ("wiki:write:edit_page", (HELPER,), None, True, True),
    ]
    assert helper["delegates"] == [
        {"agent": SCRIBE, "owner": "alice", "reach_count": 1},
        {"agent": TRIAGE, "owner": "alice", "reach_count": 5},
    ]
    assert helper["totals"] == {
        "actions": 6, "tools": 2, "direct": 6, "through_delegation": 6, "admin_tier": 0,
        "via_exception": 4,
    }  # fmt: skip
    # As a delegate, HELPER's own exception opens TRIAGE's issues:write to it.
    triage = await reports.blast_radius(agent=TRIAGE)
    through = [r for r in time_rows(triage) if r[1] == (TRIAGE, HELPER)]
    assert through == [
        ("issues:read:get", (TRIAGE, HELPER), None, True, True),
        ("issues:read:list", (TRIAGE, HELPER), None, True, True),
        ("issues:write:comment", (TRIAGE, HELPER), bg, True, False),
        ("issues:write:label", (TRIAGE, HELPER), bg, True, False),
        ("wiki:read:read_page", (TRIAGE, HELPER), None, True, True),
    ]
    assert triage["totals"]["via_exception"] == 2
    # Policy is asked with the exception active: a forbid under break-glass takes `label`
    # from every entry relying on one, and only from those.
    (services.policy.directory / "breakglass.cedar").write_text(
        '@id("no-labels-under-breakglass")\n'
        'forbid (principal, action == Action::"issues:label", resource)\n'
        "when { context.exception.active };\n"
    )
    assert (await services.policy.reload("test")).ok
    labels = [r[:3] for r in time_rows(await reports.blast_radius(agent=TRIAGE)) if "label" in r[0]]
    assert labels == [("issues:write:label", (TRIAGE,), None)]
    helper = await reports.blast_radius(agent=HELPER)
    assert [r for r in time_rows(helper) if "label" in r[0]] == []


async def test_blast_radius_of_a_task_and_credential_relying_on_an_exception(
    deployment: tuple[Services, FakeClock],
) -> None:
    services, _ = deployment
    storage, reports = services.storage, services.reports
    W = Tier.WRITE
    await storage.create_breakglass(
        breakglass("bg-helper", HELPER, Scope("issues", W), NOW - timedelta(minutes=30),
                   NOW + timedelta(hours=2))
    )  # fmt: skip
    t = task(
        "t-bg", HELPER, "alice", {}, constraints={"tiers": ["read", "write"]},
        created_at=NOW - timedelta(minutes=5), expires_at=NOW + timedelta(hours=1),
    )  # fmt: skip
    t = replace(t, granted=(ScopeGrant("issues", W, ("comment",), "bg-helper"),))
    await storage.create_task(t, [])
    await storage.add_credential(
        CredentialRecord("cred-bg", "t-bg", HELPER, "issues", W, ("comment",), "jkt", "kid",
                         NOW, NOW + timedelta(minutes=10), exception_id="bg-helper"),
        NOW,
    )  # fmt: skip
    # The task lives one more hour: its week is `now` alone, so what `now` allows, always.
    expected = [
        ("issues:write:comment", (HELPER,), "bg-helper", True, True),
        ("issues:write:comment", (HELPER, TRIAGE), "bg-helper", True, True),
    ]
    assert time_rows(await reports.blast_radius(task="t-bg")) == expected
    cred = await reports.blast_radius(credential="cred-bg")
    assert time_rows(cred) == expected
    assert cred["totals"]["via_exception"] == 2


def production(services: Services, clock: FakeClock) -> ReportService:
    policy = services.settings.policy.model_copy(update={"environment": "production"})
    settings = services.settings.model_copy(update={"policy": policy})
    return ReportService(settings, services.storage, clock, services.policy)


async def test_blast_radius_over_the_week_in_production(
    deployment: tuple[Services, FakeClock],
) -> None:
    services, clock = deployment
    reports = production(services, clock)
    # The default pack's gates.cedar: no admin outside weekdays 07:00-19:00 UTC in production.
    monday_noon = time_rows(await reports.blast_radius(agent=TRIAGE))
    assert ("issues:admin:wipe", (TRIAGE,), None, True, False) in monday_noon
    night = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)  # a Monday, 23:00
    clock.set(night)
    report = await reports.blast_radius(agent=TRIAGE)
    # Denied now, allowed from 07:00: still in reach, marked not reachable now.
    assert time_rows(report) == [
        ("issues:read:get", (TRIAGE,), None, True, True),
        ("issues:read:get", (TRIAGE, HELPER), None, True, True),
        ("issues:read:list", (TRIAGE,), None, True, True),
        ("issues:read:list", (TRIAGE, HELPER), None, True, True),
        ("issues:write:comment", (TRIAGE,), None, True, True),
        ("issues:write:label", (TRIAGE,), None, True, True),
        ("issues:admin:wipe", (TRIAGE,), None, False, False),
        ("wiki:read:read_page", (TRIAGE,), None, True, True),
        ("wiki:read:read_page", (TRIAGE, HELPER), None, True, True),
        ("wiki:read:read_page", (TRIAGE, SCRIBE), None, True, True),
    ]
    wipe = next(e for e in report["reach"] if e["action"] == "wipe")
    assert (wipe["policies"], wipe["requires_approval"]) == (
        ["admin-tier-when-intent-allows"], True,
    )  # fmt: skip
    assert report["totals"]["admin_tier"] == 1
    # Outside production, no gate: reachable now and always.
    dev = time_rows(await services.reports.blast_radius(agent=TRIAGE))
    assert ("issues:admin:wipe", (TRIAGE,), None, True, True) in dev
    # A task's week ends with the task: one ending before 07:00 never reaches admin.
    R, A = Tier.READ, Tier.ADMIN
    for task_id, end in (("t-short", night + timedelta(hours=8, minutes=30)),  # 07:30
                         ("t-shorter", night + timedelta(hours=7, minutes=30))):  # fmt: skip
        await services.storage.create_task(
            task(task_id, TRIAGE, "alice", {("issues", R): ("list",), ("issues", A): ("wipe",)},
                 constraints={"tiers": ["read", "admin"]}, created_at=night, expires_at=end),
            [],
        )  # fmt: skip
    short = time_rows(await reports.blast_radius(task="t-short"))
    assert ("issues:admin:wipe", (TRIAGE,), None, False, False) in short
    shorter = time_rows(await reports.blast_radius(task="t-shorter"))
    assert shorter == [
        ("issues:read:list", (TRIAGE,), None, True, True),
        ("issues:read:list", (TRIAGE, HELPER), None, True, True),
    ]


# --- alignment ------------------------------------------------------------------------------


async def test_alignment_of_the_deployment(deployment: tuple[Services, FakeClock]) -> None:
    services, _ = deployment
    report = await services.reports.alignment()
    assert report["kind"] == "alignment"
    assert report["generated_at"] == "2026-03-02T12:00:00Z"
    status = {c["id"]: c["status"] for c in report["controls"]}
    assert status == {
        "short_lived_task_credentials": "partly_met",  # 1800 s > 900 s
        "dpop_binding": "met",
        "per_call_policy": "met",
        "human_approval": "met",
        "breakglass_expiry_and_review": "not_met",  # bg-old is overdue
        "revocation_fail_closed": "met",
        "delegation_narrows": "met",
        "tamper_evident_audit": "partly_met",  # verified, but no checkpoint yet
        "workload_identity": "not_met",  # the dev issuer only
        "least_privilege_ceilings": "partly_met",  # 70.6 % unused
        "secrets_never_to_agents": "partly_met",  # issues' secret behind 3 agents
        "accountable_owners": "partly_met",  # IDLE's owner is disabled
        "declared_tools": "met",
    }
    assert report["summary"] == {"met": 6, "partly_met": 5, "not_met": 2}
    audit = next(c for c in report["controls"] if c["id"] == "tamper_evident_audit")
    assert audit["evidence"][0].startswith("the hash chain verified")
    assert report["by_framework"]["maestro"]["L1 Foundation models"] == "not_covered"
    assert report["by_framework"]["owasp_asi"]["ASI07"] == "not_met"  # workload identity
    assert set(report["by_framework"]["nist_ai_rmf"]) == {"GOVERN", "MAP", "MEASURE", "MANAGE"}


async def test_alignment_flips_with_the_settings(
    deployment: tuple[Services, FakeClock], tmp_path: Path
) -> None:
    services, clock = deployment
    evidence = await services.reports.evidence()
    off = await services.reports.alignment(evidence=replace(evidence, dpop_required=False))
    assert {c["id"]: c["status"] for c in off["controls"]}["dpop_binding"] == "not_met"
    day = services.settings.model_copy(
        update={
            "credentials": services.settings.credentials.model_copy(
                update={"max_ttl_seconds": 86400, "task_max_ttl_seconds": 86400}
            )
        }
    )
    reports = ReportService(day, services.storage, clock, services.policy, services.audit)
    status = {c["id"]: c["status"] for c in (await reports.alignment())["controls"]}
    assert status["short_lived_task_credentials"] == "not_met"
    findings = (await reports.posture(SINCE, UNTIL))["findings"]
    ttl = [f["subject"]["id"] for f in findings if f["code"] == "ttl_cap_too_long"]
    assert ttl == ["credentials.max_ttl_seconds", "credentials.task_max_ttl_seconds"]
    # a checkpoint, published: the audit control is met
    await services.audit.checkpoint()
    published = services.settings.model_copy(
        update={
            "audit": services.settings.audit.model_copy(
                update={"checkpoint_file": tmp_path / "checkpoints.jsonl"}
            )
        }
    )
    reports = ReportService(published, services.storage, clock, services.policy, services.audit)
    status = {c["id"]: c["status"] for c in (await reports.alignment())["controls"]}
    assert status["tamper_evident_audit"] == "met"


async def test_reports_compute_off_the_loop_and_a_few_at_a_time(
    deployment: tuple[Services, FakeClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway serves on the same loop: a report's computation runs in a worker
    thread (the loop keeps ticking meanwhile), and at most REPORTS_AT_ONCE run together."""
    import asyncio
    import threading
    import time

    from taskbound.service import reports as reports_module

    services, _ = deployment
    real = reports_module.usage_report
    lock = threading.Lock()
    running, most = 0, 0

    def slow(**kwargs: Any) -> dict[str, Any]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)  # a heavy computation, in its thread
        with lock:
            running -= 1
        return real(**kwargs)

    monkeypatch.setattr(reports_module, "usage_report", slow)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        done = await asyncio.gather(*(services.reports.usage(SINCE, UNTIL) for _ in range(4)))
    finally:
        beat.cancel()
    assert all(r["kind"] == "usage" for r in done)
    assert most == reports_module.REPORTS_AT_ONCE
    assert ticks >= 20  # ~0.4 s of computing, the loop free all along

"""The policy store: load, reload keeping the last good set, file watching, registry
changes, hot reload under concurrent decisions, and the call decision point."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from taskbound.config import load_settings
from taskbound.core.clock import FakeClock
from taskbound.core.decisions import Situation
from taskbound.core.model import (
    Action,
    Agent,
    AgentState,
    Owner,
    Scope,
    Task,
    Tier,
    Tool,
    ToolKind,
)
from taskbound.core.policy import Outcome, PolicyInvalid
from taskbound.service.policy import PolicyEngine, default_policy_dir
from taskbound.storage.memory import MemoryStorage

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
ALICE = Owner("alice", "a@example.com", frozenset(), T0, T0)
AGENT = Agent(
    "spiffe://example.org/bot",
    "alice",
    AgentState.ACTIVE,
    frozenset({Scope("issues", Tier.READ), Scope("issues", Tier.WRITE)}),
    T0,
    T0,
)
ISSUES = Tool(
    "issues",
    "https://gw.example/issues",
    "https://up.example",
    ToolKind.HTTP,
    (
        Action("list_issues", Tier.READ, "GET", "/repos/{org}/{repo}/issues"),
        Action("comment", Tier.WRITE, "POST", "/repos/{org}/{repo}/issues/{n}/comments"),
    ),
    T0,
    T0,
)
TASK = Task(
    "tsk_1",
    AGENT.spiffe_id,
    "alice",
    "triage",
    {"org": "acme", "repo": "web"},
    (),
    (),
    "jkt",
    T0,
    datetime(2026, 3, 2, 11, 0, tzinfo=UTC),
)

BAD = '@id("broken")\npermit (principal, action, resource) when { principal.nope == 1 };\n'


@pytest.fixture
async def engine(tmp_path: Path) -> PolicyEngine:
    pack = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), pack)
    storage = MemoryStorage()
    await storage.create_owner(ALICE)
    await storage.create_agent(AGENT)
    await storage.create_tool(ISSUES, None)
    settings = load_settings(environ={}, overrides={"policy": {"dir": str(pack)}})
    eng = PolicyEngine(settings, storage, FakeClock(T0))
    await eng.load()
    return eng


def call(engine: PolicyEngine, repo: str = "web", action: str = "list_issues") -> Outcome:
    return engine.decide_call(
        agent=AGENT,
        owner=ALICE,
        task=TASK,
        tool=ISSUES,
        action_name=action,
        arguments={"org": "acme", "repo": repo, **({"n": "1"} if action == "comment" else {})},
        target=None,
        situation=Situation(now=T0, environment="development"),
    ).outcome


async def test_the_default_pack_decides_calls(engine: PolicyEngine) -> None:
    assert call(engine) is Outcome.ALLOW
    assert call(engine, repo="payroll") is Outcome.DENY
    assert call(engine, action="comment") is Outcome.DENY  # writes need the intent's tiers
    decision = engine.decide_call(
        agent=AGENT,
        owner=ALICE,
        task=TASK,
        tool=ISSUES,
        action_name="list_issues",
        arguments={"org": "acme", "repo": "web"},
        target=None,
        situation=Situation(now=T0, environment="development"),
    )
    assert decision.determining == ("read-tier",)
    assert decision.policy_version == engine.state.compiled.version


async def test_unknown_action_and_bad_arguments_are_denied_with_a_reason(
    engine: PolicyEngine,
) -> None:
    d = engine.decide_call(
        agent=AGENT,
        owner=ALICE,
        task=TASK,
        tool=ISSUES,
        action_name="nope",
        arguments={},
        target=None,
        situation=Situation(now=T0, environment="development"),
    )
    assert d.outcome is Outcome.DENY
    assert "not in the policy schema" in d.errors[0]
    d = engine.decide_call(
        agent=AGENT,
        owner=ALICE,
        task=TASK,
        tool=ISSUES,
        action_name="list_issues",
        arguments={"org": "acme", "repo": "web", "extra": "x"},
        target=None,
        situation=Situation(now=T0, environment="development"),
    )
    assert d.outcome is Outcome.DENY
    assert d.errors


async def test_a_bad_reload_keeps_the_last_good_set(engine: PolicyEngine) -> None:
    good = engine.state.compiled.version
    (engine.directory / "zz-broken.cedar").write_text(BAD)
    result = await engine.reload("test")
    assert result.ok is False
    assert any("zz-broken.cedar:2" in p for p in result.problems)
    assert engine.state.compiled.version == good
    assert call(engine) is Outcome.ALLOW  # still deciding with the last good set
    assert engine.status()["last_problems"]
    (engine.directory / "zz-broken.cedar").unlink()
    result = await engine.reload("test")
    assert result.ok is True
    assert result.changed is False
    assert engine.status()["last_problems"] == []


async def test_a_good_reload_changes_decisions(engine: PolicyEngine) -> None:
    (engine.directory / "zz-no-reads.cedar").write_text(
        '@id("no-reads-today")\nforbid (principal, action in Action::"read", resource);\n'
    )
    result = await engine.reload("test")
    assert result.ok
    assert result.changed
    assert call(engine) is Outcome.DENY


async def test_file_changes_are_picked_up_by_the_watcher(engine: PolicyEngine) -> None:
    watcher = asyncio.create_task(engine.watch(0.01))
    try:
        (engine.directory / "zz-no-reads.cedar").write_text(
            '@id("no-reads-today")\nforbid (principal, action in Action::"read", resource);\n'
        )
        for _ in range(200):
            if call(engine) is Outcome.DENY:
                break
            await asyncio.sleep(0.01)
        assert call(engine) is Outcome.DENY
    finally:
        watcher.cancel()


async def test_hot_reload_under_concurrent_decisions(engine: PolicyEngine) -> None:
    """Decisions keep coming while good and bad sets alternate: every decision is made by
    one complete, valid set, never a half-loaded or broken one."""
    good = engine.state.compiled.version
    extra = engine.directory / "zz-extra.cedar"
    versions: set[str] = set()
    stop = asyncio.Event()

    async def decide_forever() -> int:
        n = 0
        while not stop.is_set():
            d = engine.decide_call(
                agent=AGENT,
                owner=ALICE,
                task=TASK,
                tool=ISSUES,
                action_name="list_issues",
                arguments={"org": "acme", "repo": "web"},
                target=None,
                situation=Situation(now=T0, environment="development"),
            )
            assert d.errors == ()
            versions.add(d.policy_version)
            n += 1
            await asyncio.sleep(0)
        return n

    deciders = [asyncio.create_task(decide_forever()) for _ in range(4)]
    valid = {good}
    for i in range(10):
        extra.write_text(
            f'@id("extra-{i}")\npermit (principal, action in Action::"read", resource);\n'
        )
        result = await engine.reload("test")
        assert result.ok
        valid.add(result.version)
        extra.write_text(BAD)
        assert (await engine.reload("test")).ok is False
        await asyncio.sleep(0)
    stop.set()
    counts = await asyncio.gather(*deciders)
    assert sum(counts) > 0
    assert versions <= valid


async def test_registry_changes_recompile_the_schema(engine: PolicyEngine) -> None:
    before = engine.state.compiled.schema.version
    storage = engine._storage
    tracker = Tool(
        "tracker",
        "https://gw.example/tracker",
        "https://up.example",
        ToolKind.MCP,
        (
            Action(
                "search",
                Tier.READ,
                mcp_tool="search",
                input_schema={"type": "object", "properties": {"project": {"type": "string"}}},
            ),
        ),
        T0,
        T0,
    )
    await storage.create_tool(tracker, None)
    await engine.refresh_registry()
    assert engine.state.compiled.schema.version != before
    assert "tracker:search" in engine.state.compiled.schema.actions
    await engine.refresh_registry()  # unchanged tools: nothing recompiled
    assert engine.state.compiled.schema.version != before


async def test_an_invalid_set_at_start_up_is_an_error(tmp_path: Path) -> None:
    pack = tmp_path / "bad"
    pack.mkdir()
    (pack / "a.cedar").write_text(BAD)
    settings = load_settings(environ={}, overrides={"policy": {"dir": str(pack)}})
    storage = MemoryStorage()
    with pytest.raises(PolicyInvalid, match=r"a\.cedar:2"):
        await PolicyEngine(settings, storage, FakeClock(T0)).load()

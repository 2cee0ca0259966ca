"""The Cedar schema, entities and argument typing generated from the registry."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import cedarpy
import pytest

from taskbound.core.cedar_schema import (
    TIERS,
    ActionInfo,
    ArgumentType,
    PolicyInputError,
    TaskFacts,
    action_id,
    arguments_for_policy,
    build_schema,
    cedar_string,
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

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

MCP_INPUT = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "size": {"type": "integer"},
        "force": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "lines": {"type": "array", "items": {"type": "integer"}},
        "ratio": {"type": "number"},
        "meta": {"type": "object"},
        "nothing": {"type": "null"},
        "maybe": {"type": ["string", "null"]},
        "floats": {"type": "array", "items": {"type": "number"}},
        "anything": {"type": "array"},
        "bad-name": {"type": "string"},
        "1st": {"type": "string"},
        "if": {"type": "string"},
    },
    "required": ["path", "size"],
}


def http_tool(tool_id: str = "gh") -> Tool:
    return Tool(
        tool_id,
        f"https://gw.example/{tool_id}",
        "https://api.example",
        ToolKind.HTTP,
        (
            Action("get_repo", Tier.READ, "GET", "/repos/{owner}/{repo}"),
            Action("rate_limit", Tier.READ, "GET", "/rate_limit"),
            Action("compare", Tier.READ, "GET", "/repos/{owner}/{repo}/compare/{repo}"),
            Action(
                "delete_repo",
                Tier.ADMIN,
                "DELETE",
                "/repos/{owner}/{repo}",
                risk=Risk.HIGH,
                requires_approval=True,
            ),
        ),
        EPOCH,
        EPOCH,
    )


def mcp_tool() -> Tool:
    return Tool(
        "fs",
        "https://gw.example/fs",
        "https://fs.example/mcp",
        ToolKind.MCP,
        (
            Action("write_file", Tier.WRITE, mcp_tool="write_file", input_schema=MCP_INPUT),
            Action("list", Tier.READ, mcp_tool="list"),
        ),
        EPOCH,
        EPOCH,
    )


@pytest.fixture(scope="module")
def schema() -> Any:
    return build_schema([mcp_tool(), http_tool()])


# --- schema text ------------------------------------------------------------------------


def test_tiers_and_action_ids() -> None:
    assert TIERS == ("read", "write", "admin")
    assert action_id("gh", "get_repo") == "gh:get_repo"


def test_schema_declares_entities_tiers_and_actions(schema: Any) -> None:
    text = schema.text
    assert "entity Owner { contact: String, roles: Set<String>, disabled: Bool };" in text
    assert "entity Tool { kind: String, audience: String };" in text
    assert (
        "entity Task { purpose: String, owner: Owner, agent: Agent, state: String } "
        "tags Set<String>;" in text
    )
    for tier in TIERS:
        assert f'action "{tier}";' in text
    assert 'action "gh:get_repo" in [Action::"read"] appliesTo {' in text
    assert 'action "gh:delete_repo" in [Action::"admin"] appliesTo {' in text
    assert 'action "fs:write_file" in [Action::"write"] appliesTo {' in text
    # No namespace: entity types are referred to bare.
    assert "namespace" not in text


def test_schema_common_context(schema: Any) -> None:
    block = schema.text.split('action "gh:rate_limit"')[1].split("};")[0]
    for line in (
        "point: String,",
        "tier: String,",
        "risk: String,",
        "requires_approval: Bool,",
        "task: Task,",
        "now: { epoch: Long, hour: Long, weekday: Long },",
        "environment: String,",
        "delegation_depth: Long,",
        "call_rate: Long,",
        "approval: { granted: Bool },",
        "exception: { active: Bool },",
        "target?: String,",
        "arguments?: {}",
    ):
        assert line in block
    assert "principal: [Agent]," in block
    assert "resource: [Tool]," in block


def test_http_path_parameters_are_required_strings(schema: Any) -> None:
    info = schema.actions["gh:get_repo"]
    assert info.arguments == (
        ArgumentType("owner", "String", True),
        ArgumentType("repo", "String", True),
    )
    assert info.untyped == frozenset()
    # A parameter repeated in the template is declared once.
    assert [a.name for a in schema.actions["gh:compare"].arguments] == ["owner", "repo"]
    block = schema.text.split('action "gh:get_repo"')[1].split("};")[0]
    assert '"owner": String' in block
    assert '"repo": String' in block


def test_mcp_arguments_typed_from_input_schema(schema: Any) -> None:
    info = schema.actions["fs:write_file"]
    assert {a.name: (a.cedar, a.required) for a in info.arguments} == {
        "path": ("String", True),
        "size": ("Long", True),
        "force": ("Bool", False),
        "tags": ("Set<String>", False),
        "lines": ("Set<Long>", False),
        "if": ("String", False),  # a Cedar keyword is still an identifier: quoted in the schema
    }
    assert info.untyped == frozenset(
        {"ratio", "meta", "nothing", "maybe", "floats", "anything", "bad-name", "1st"}
    )
    block = schema.text.split('action "fs:write_file"')[1].split("};")[0]
    assert '"path": String' in block
    assert '"size": Long' in block
    assert '"force"?: Bool' in block
    assert '"tags"?: Set<String>' in block
    assert '"lines"?: Set<Long>' in block
    assert '"if"?: String' in block
    assert "ratio" not in block
    assert "bad-name" not in block


def test_mcp_action_without_input_schema_has_no_arguments(schema: Any) -> None:
    assert schema.actions["fs:list"].arguments == ()
    block = schema.text.split('action "fs:list"')[1].split("};")[0]
    assert "arguments?: {}" in block


def test_action_info_carries_tier_risk_approval(schema: Any) -> None:
    info = schema.actions["gh:delete_repo"]
    assert info == ActionInfo(
        id="gh:delete_repo",
        tool="gh",
        name="delete_repo",
        tier=Tier.ADMIN,
        risk=Risk.HIGH,
        requires_approval=True,
        arguments=(ArgumentType("owner", "String", True), ArgumentType("repo", "String", True)),
        untyped=frozenset(),
    )


def test_schema_parses_and_version_is_hash_of_text(schema: Any) -> None:
    assert isinstance(schema.handle, cedarpy.Schema)
    cedarpy.Schema.from_str(schema.text)
    digest = hashlib.sha256(schema.text.encode()).hexdigest()
    assert schema.version == f"sha256:{digest}"


def test_schema_is_deterministic() -> None:
    a = build_schema([mcp_tool(), http_tool()])
    b = build_schema([http_tool(), mcp_tool()])
    assert a.text == b.text
    assert a.version == b.version
    assert a == b
    assert build_schema([http_tool()]).version != a.version


def test_schema_of_no_tools() -> None:
    empty = build_schema([])
    assert dict(empty.actions) == {}
    assert 'action "read";' in empty.text


def test_strings_are_escaped() -> None:
    assert cedar_string('a"b\\c') == '"a\\"b\\\\c"'
    assert cedar_string("line\nbreak\x00") == '"line\\u{a}break\\u{0}"'
    assert cedar_string("é😀") == '"é😀"'
    odd = Tool(
        'we"ird\\',
        "https://gw.example/odd",
        "https://odd.example",
        ToolKind.HTTP,
        (Action('get"\n', Tier.READ, "GET", "/x"),),
        EPOCH,
        EPOCH,
    )
    schema = build_schema([odd])
    # The action entity Cedar derives from the schema has exactly our id.
    entities = json.loads(str(cedarpy.Entities.from_json_str("[]", schema.handle)))
    ids = {e["uid"]["id"] for e in entities}
    assert action_id(odd.id, 'get"\n') in ids


def test_duplicate_tools_and_actions_are_refused() -> None:
    with pytest.raises(PolicyInputError, match="declared twice"):
        build_schema([http_tool(), http_tool()])
    tool = http_tool()
    twice = Tool(
        "gh2", "a", "https://x", ToolKind.HTTP, tool.actions + tool.actions[:1], EPOCH, EPOCH
    )
    with pytest.raises(PolicyInputError, match="twice"):
        build_schema([twice])


def test_policy_input_error_code() -> None:
    assert PolicyInputError.code == "policy_input_invalid"
    assert PolicyInputError.status == 400


# --- entities ---------------------------------------------------------------------------


def registry() -> tuple[list[Owner], list[Agent], list[Tool]]:
    owners = [
        Owner("alice", "alice@example.com", frozenset({Role.APPROVER, Role.ADMIN}), EPOCH, EPOCH),
        Owner("bob", "bob@example.com", frozenset(), EPOCH, EPOCH, disabled=True),
    ]
    agents = [
        Agent(
            "spiffe://example.org/agents/coder",
            "alice",
            AgentState.ACTIVE,
            frozenset({Scope("gh", Tier.READ), Scope("fs", Tier.WRITE)}),
            EPOCH,
            EPOCH,
        ),
        Agent("spiffe://example.org", "bob", AgentState.SUSPENDED, frozenset(), EPOCH, EPOCH),
    ]
    return owners, agents, [http_tool(), mcp_tool()]


def test_registry_entities() -> None:
    entities = registry_entities(*registry())
    by_uid = {(e["uid"]["type"], e["uid"]["id"]): e for e in entities}
    assert by_uid["Owner", "alice"]["attrs"] == {
        "contact": "alice@example.com",
        "roles": ["admin", "approver"],
        "disabled": False,
    }
    assert by_uid["Owner", "bob"]["attrs"]["disabled"] is True
    assert by_uid["Agent", "spiffe://example.org/agents/coder"]["attrs"] == {
        "owner": {"__entity": {"type": "Owner", "id": "alice"}},
        "state": "active",
        "trust_domain": "example.org",
        "path": "/agents/coder",
        "ceiling": ["fs:write", "gh:read"],
    }
    bare = by_uid["Agent", "spiffe://example.org"]["attrs"]
    assert (bare["trust_domain"], bare["path"], bare["state"]) == ("example.org", "", "suspended")
    assert by_uid["Tool", "gh"]["attrs"] == {"kind": "http", "audience": "https://gw.example/gh"}
    assert by_uid["Tool", "fs"]["attrs"]["kind"] == "mcp"


def test_registry_entities_conform_to_the_schema(schema: Any) -> None:
    entities = registry_entities(*registry())
    task = task_entity(
        TaskFacts(
            "t1",
            "spiffe://example.org/agents/coder",
            "alice",
            "fix",
            {"repo": "acme/web"},
            "active",
        )
    )
    handle = cedarpy.Entities.from_json_str(json.dumps([*entities, task]), schema.handle)
    assert len(handle) == len(entities) + 1 + len(schema.actions) + len(TIERS)


def test_bad_spiffe_id_is_refused() -> None:
    agent = Agent("https://not-spiffe", "alice", AgentState.ACTIVE, frozenset(), EPOCH, EPOCH)
    with pytest.raises(PolicyInputError, match="spiffe"):
        registry_entities([], [agent], [])


def test_task_entity_tags() -> None:
    facts = TaskFacts(
        "t1",
        "spiffe://example.org/agents/coder",
        "alice",
        "fix the build",
        {
            "repo": "acme/web",
            "repos": ["acme/web", "acme/api", "acme/web"],
            "max_files": 10,
            "dry_run": True,
            "ci": False,
            "mixed": ["a", 1, True],
        },
        "active",
    )
    assert task_entity(facts) == {
        "uid": {"type": "Task", "id": "t1"},
        "attrs": {
            "purpose": "fix the build",
            "owner": {"__entity": {"type": "Owner", "id": "alice"}},
            "agent": {"__entity": {"type": "Agent", "id": "spiffe://example.org/agents/coder"}},
            "state": "active",
        },
        "parents": [],
        "tags": {
            "repo": ["acme/web"],
            "repos": ["acme/api", "acme/web"],
            "max_files": ["10"],
            "dry_run": ["true"],
            "ci": ["false"],
            "mixed": ["1", "a", "true"],
        },
    }


@pytest.mark.parametrize("value", [1.5, None, {"a": 1}, [["nested"]], [1.0], b"bytes"])
def test_task_constraint_policy_cannot_see_is_refused(value: Any) -> None:
    facts = TaskFacts("t1", "a", "o", "p", {"weird": value}, "active")
    with pytest.raises(PolicyInputError, match="weird"):
        task_entity(facts)


# --- arguments --------------------------------------------------------------------------


def test_arguments_converted(schema: Any) -> None:
    action = schema.actions["fs:write_file"]
    got = arguments_for_policy(
        action,
        {
            "path": "/tmp/x",
            "size": 2**63 - 1,
            "force": False,
            "tags": ["a", "b"],
            "lines": (1, -(2**63)),
            "ratio": 0.5,  # declared, untyped: left out
            "meta": {"k": "v"},
            "bad-name": "x",
        },
    )
    assert got == {
        "path": "/tmp/x",
        "size": 2**63 - 1,
        "force": False,
        "tags": ["a", "b"],
        "lines": [1, -(2**63)],
    }


def test_http_arguments(schema: Any) -> None:
    action = schema.actions["gh:get_repo"]
    assert arguments_for_policy(action, {"owner": "acme", "repo": "web"}) == {
        "owner": "acme",
        "repo": "web",
    }
    assert arguments_for_policy(schema.actions["gh:rate_limit"], {}) == {}


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"path": "p", "size": 1, "colour": "red"}, "colour"),  # undeclared
        ({"path": 1, "size": 1}, "path"),  # int for String
        ({"path": "p", "size": "1"}, "size"),  # str for Long
        ({"path": "p", "size": True}, "size"),  # bool is not an integer
        ({"path": "p", "size": 1.0}, "size"),  # float is not an integer
        ({"path": "p", "size": 2**63}, "size"),  # beyond Cedar's Long
        ({"path": "p", "size": -(2**63) - 1}, "size"),
        ({"path": "p", "size": 1, "force": 1}, "force"),  # int for Bool
        ({"path": "p", "size": 1, "force": "true"}, "force"),
        ({"path": "p", "size": 1, "tags": "a"}, "tags"),  # a string is not a set
        ({"path": "p", "size": 1, "tags": ["a", 1]}, "tags"),
        ({"path": "p", "size": 1, "lines": [1, "2"]}, "lines"),
        ({"path": "p", "size": 1, "lines": [True]}, "lines"),
        ({"path": "p", "size": 1, "tags": None}, "tags"),  # null is not a value
        ({"size": 1}, "path"),  # required, missing
        ({"path": "p"}, "size"),
    ],
)
def test_bad_arguments_are_refused(schema: Any, arguments: dict[str, Any], named: str) -> None:
    with pytest.raises(PolicyInputError) as caught:
        arguments_for_policy(schema.actions["fs:write_file"], arguments)
    assert repr(named) in caught.value.detail


def test_http_undeclared_and_missing(schema: Any) -> None:
    action = schema.actions["gh:get_repo"]
    with pytest.raises(PolicyInputError, match="'branch'"):
        arguments_for_policy(action, {"owner": "a", "repo": "b", "branch": "main"})
    with pytest.raises(PolicyInputError, match="'repo'"):
        arguments_for_policy(action, {"owner": "a"})


def test_arguments_must_be_an_object(schema: Any) -> None:
    with pytest.raises(PolicyInputError):
        arguments_for_policy(schema.actions["gh:rate_limit"], ["a"])  # type: ignore[arg-type]
    with pytest.raises(PolicyInputError):
        arguments_for_policy(schema.actions["gh:rate_limit"], {1: "a"})  # type: ignore[dict-item]

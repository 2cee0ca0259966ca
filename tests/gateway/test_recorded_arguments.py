"""Calls' arguments in the audit trail, where configured (audit.arguments_tools): the record
of a configured tool's call carries its arguments with secrets redacted (by name and by
path) and bounded; any other tool's record carries none, exactly as before. The records
verify, and the exports carry what was recorded."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import rfc8785

from taskbound.core.actions import argument_digest
from taskbound.core.clock import FakeClock
from taskbound.core.model import AuditEvent
from taskbound.core.redact import REDACTED
from taskbound.service.audit_chain import ocsf
from tests.api.conftest import Agent

from .conftest import World, call_headers, open_world

MCP = "/tracker"
ISSUES = "/issues/repos/acme/web/issues"


@contextlib.asynccontextmanager
async def recording_world(
    tmp_path: Path, clock: FakeClock, **recording: Any
) -> AsyncIterator[World]:
    """The gateway world of conftest.py, with ``[audit]`` set to ``recording``."""

    def declare(doc: dict[str, Any]) -> None:
        # search declares the arguments these tests send (undeclared ones are refused).
        (tracker,) = [tool for tool in doc["tools"] if tool["id"] == "tracker"]
        (search,) = [a for a in tracker["actions"] if a["name"] == "search"]
        search["input_schema"]["properties"].update(SEARCH_SCHEMA)

    worlds = open_world(tmp_path, clock, declare, audit=recording)
    try:
        yield await worlds.__anext__()
    finally:
        await worlds.aclose()


async def call_tool(world: World, agent: Agent, token: str, name: str, arguments: Any) -> Any:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    headers = call_headers(agent, token, "POST", MCP)
    headers.update(
        {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    )
    return await world.live.http.post(MCP, content=json.dumps(body), headers=headers)


async def calls_of(world: World, task: dict[str, Any]) -> list[AuditEvent]:
    found = await world.live.services.storage.list_audit(task=task["task"]["id"], limit=1000)
    return [e for _, e in found if e.event == "gateway.call"]


SEARCH_SCHEMA: dict[str, Any] = {
    "password": {"type": "string"},
    "options": {
        "type": "object",
        "properties": {"Api_Key": {"type": "string"}, "limit": {"type": "integer"}},
    },
    "meta": {
        "type": "object",
        "properties": {"card_number": {"type": "string"}, "owner": {"type": "string"}},
    },
    "items": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"note": {"type": "string"}, "n": {"type": "integer"}},
        },
    },
}
SEARCH = {
    "project": "WEB",
    "query": "crash",
    "password": "hunter2",
    "options": {"Api_Key": "sk-live-123", "limit": 5},
    "meta": {"card_number": "4111 1111 1111 1111", "owner": "ann"},
    "items": [{"note": "private note", "n": 1}, {"note": "another", "n": 2}],
}


async def test_a_configured_tool_records_its_arguments_redacted(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with recording_world(
        tmp_path,
        clock,
        arguments_tools=["tracker"],
        redact_paths=["/meta/card_number", "/items/*/note"],
    ) as world:
        agent, t = await world.task(("tracker", "read"), ("issues", "read"))
        r = await call_tool(world, agent, t["creds"]["tracker:read"], "search", SEARCH)
        assert r.status_code == 200, r.text
        # Another tool, not configured: its record is as it always was.
        token = t["creds"]["issues:read"]
        r = await world.live.http.get(ISSUES, headers=call_headers(agent, token, "GET", ISSUES))
        assert r.status_code == 200, r.text

        search, listing = await calls_of(world, t)
        assert (search.tool, search.action, search.decision) == ("tracker", "search", "allow"), (
            search
        )
        assert search.arguments == {
            "project": "WEB",
            "query": "crash",
            "password": REDACTED,  # a default name
            "options": {"Api_Key": REDACTED, "limit": 5},  # at any depth, any case
            "meta": {"card_number": REDACTED, "owner": "ann"},  # a configured path
            "items": [{"note": REDACTED, "n": 1}, {"note": REDACTED, "n": 2}],
        }
        # The digest still names the arguments as they were; the call reached the tool.
        assert search.argument_digest == argument_digest(SEARCH)
        assert world.mcp_calls == [{"tool": "search", "project": "WEB", "query": "crash"}]
        assert (listing.tool, listing.decision) == ("issues", "allow")
        assert listing.arguments is None
        assert listing.argument_digest is not None

        # The trail verifies; the body carries the arguments only where they were recorded.
        report = await world.live.services.audit.verify()
        assert report.ok, report.problem
        chain = await world.live.services.storage.list_chain()
        by_tool = {r.body["tool"]: r for r in chain if r.body["event"] == "gateway.call"}
        assert by_tool["tracker"].body["arguments"] == search.arguments
        assert "arguments" not in by_tool["issues"].body
        # No secret reached the store.
        stored = json.dumps([r.body for r in chain])
        for secret in ("hunter2", "sk-live-123", "4111", "private note", "another"):
            assert secret not in stored

        # The exports carry them: JSON Lines as the body, OCSF as the API request's data.
        r = await world.live.http.get(
            "/v1/admin/audit/export", params={"format": "jsonl"}, headers=world.live.admin
        )
        assert r.status_code == 200, r.text
        lines = [json.loads(line) for line in r.text.splitlines()]
        records = {line["seq"]: line["record"] for line in lines if line["type"] == "record"}
        assert records[by_tool["tracker"].seq]["arguments"] == search.arguments
        assert "arguments" not in records[by_tool["issues"].seq]
        assert ocsf(by_tool["tracker"])["api"]["request"] == {"data": search.arguments}
        assert "request" not in ocsf(by_tool["issues"])["api"]
        r = await world.live.http.get(
            "/v1/admin/audit/export", params={"format": "ocsf"}, headers=world.live.admin
        )
        events = {int(e["metadata"]["uid"]): e for e in map(json.loads, r.text.splitlines())}
        assert events[by_tool["tracker"].seq]["api"]["request"]["data"] == search.arguments


async def test_a_refused_call_records_its_arguments_too(tmp_path: Path, clock: FakeClock) -> None:
    async with recording_world(tmp_path, clock, arguments_tools=["tracker"]) as world:
        agent, t = await world.task(("tracker", "read"))
        token = t["creds"]["tracker:read"]
        # Outside the task's constraints (project WEB): denied by policy.
        r = await call_tool(world, agent, token, "search", {"project": "PAYROLL", "token": "t"})
        assert "policy_denied" in r.text
        # Not a tool of this server: refused before any decision.
        r = await call_tool(world, agent, token, "nope", {"session_id": "s", "x": 1})
        assert "no_matching_action" in r.text
        denied, unknown = await calls_of(world, t)
        assert (denied.decision, denied.code) == ("deny", "policy_denied")
        assert denied.arguments == {"project": "PAYROLL", "token": REDACTED}
        assert (unknown.decision, unknown.code) == ("deny", "no_matching_action")
        assert unknown.arguments == {"session_id": REDACTED, "x": 1}
        assert world.mcp_calls == []
        assert (await world.live.services.audit.verify()).ok


async def test_every_tool_and_the_size_bound(tmp_path: Path, clock: FakeClock) -> None:
    async with recording_world(
        tmp_path, clock, arguments_tools=["*"], arguments_max_bytes=256
    ) as world:
        agent, t = await world.task(("tracker", "read"), ("issues", "read"))
        # An HTTP call without query or body: the parameters of its action's path.
        token = t["creds"]["issues:read"]
        r = await world.live.http.get(ISSUES, headers=call_headers(agent, token, "GET", ISSUES))
        assert r.status_code == 200, r.text
        big = {"project": "WEB", "query": "q" * 300}
        r = await call_tool(world, agent, t["creds"]["tracker:read"], "search", big)
        assert r.status_code == 200, r.text
        listing, search = await calls_of(world, t)
        assert listing.arguments == {"path": {"org": "acme", "repo": "web"}}
        size = len(rfc8785.dumps(big))
        assert search.arguments == {"truncated": True, "bytes": size}
        assert (await world.live.services.audit.verify()).ok


async def test_nothing_is_recorded_by_default(world: World) -> None:
    agent, t = await world.task(("tracker", "read"))
    r = await call_tool(world, agent, t["creds"]["tracker:read"], "search", SEARCH)
    assert r.status_code == 200, r.text
    (search,) = await calls_of(world, t)
    assert search.arguments is None
    chain = await world.live.services.storage.list_chain()
    assert all("arguments" not in r.body for r in chain)


async def test_an_http_call_records_its_path_query_and_body(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with recording_world(
        tmp_path, clock, arguments_tools=["issues"], redact_paths=["/body/card_number"]
    ) as world:
        agent, t = await world.task(("issues", "write"))
        token = t["creds"]["issues:write"]
        url = ISSUES + "?labels=bug&labels=flaky"
        body = {"title": "crash on save", "password": "hunter2", "card_number": "4111"}
        r = await world.live.http.post(
            url, json=body, headers=call_headers(agent, token, "POST", ISSUES)
        )
        assert r.status_code == 200, r.text
        (create,) = await calls_of(world, t)
        assert create.arguments == {
            "path": {"org": "acme", "repo": "web"},
            "query": {"labels": ["bug", "flaky"]},
            "body": {"title": "crash on save", "password": REDACTED, "card_number": REDACTED},
        }
        chain = await world.live.services.storage.list_chain()
        assert "hunter2" not in json.dumps([r.body for r in chain])
        assert "4111" not in json.dumps([r.body for r in chain])

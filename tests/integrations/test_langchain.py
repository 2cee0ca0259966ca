"""The LangChain adapter against a live server: a ``StructuredTool`` whose every invocation
is a call through the task's credential and the gateway, refusals surfaced as tool
errors, held calls as ``approval_required`` the application can wait on."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import ToolException
from pydantic import BaseModel

from taskbound.integrations.langchain import TaskboundToolError, http_tool
from taskbound.sdk import ApprovalRequired, Client, Refused, SyncClient
from tests.gateway.conftest import UPSTREAM_SECRET, World
from tests.sdk.conftest import INTENT, identity, vote

LIST = {"tier": "read", "method": "GET", "path": "/repos/{org}/{repo}/issues"}
WEB = {"org": "acme", "repo": "web"}


def tool_call(name: str, args: dict[str, str], call_id: str = "call_1") -> dict[str, object]:
    return {"type": "tool_call", "name": name, "args": args, "id": call_id}


async def test_an_invocation_is_a_call_through_the_gateway(world: World, client: Client) -> None:
    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        tool = http_tool(task, "issues", "list_issues", description="List issues.", **LIST)
        assert tool.name == "issues_list_issues"
        assert tool.description == "List issues."
        assert sorted(tool.args) == ["org", "repo"]

        text = await tool.ainvoke(WEB)
        message = await tool.ainvoke(tool_call(tool.name, WEB))

    assert text == '{"ok":true,"path":"/api/repos/acme/web/issues"}'
    assert isinstance(message, ToolMessage)
    assert (message.status, message.tool_call_id, message.content) == ("success", "call_1", text)
    # The tool got its own secret, never the task's credential.
    assert [s["headers"]["authorization"] for s in world.echo.seen] == [UPSTREAM_SECRET] * 2


async def test_further_arguments_are_the_query_or_the_json_body(
    world: World, client: Client
) -> None:
    class Search(BaseModel):
        org: str
        repo: str
        state: str | None = None

    class NewIssue(BaseModel):
        org: str
        repo: str
        title: str

    scopes = [("issues", "read"), ("issues", "write")]
    async with client.task("triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT) as t:
        search = http_tool(t, "issues", "list_issues", args_schema=Search, **LIST)
        create = http_tool(
            t, "issues", "create_issue", tier="write", method="POST",
            path="/repos/{org}/{repo}/issues", args_schema=NewIssue,
        )  # fmt: skip
        await search.ainvoke({**WEB, "state": "open"})
        await search.ainvoke(WEB)  # an argument left out is not sent
        await create.ainvoke({**WEB, "title": "flaky test"})

    seen = [(s["method"], s["query"], s["body"]) for s in world.echo.seen]
    assert seen == [
        ("GET", "state=open", ""),
        ("GET", "", ""),
        ("POST", "", '{"title":"flaky test"}'),
    ]


async def test_a_refusal_is_a_tool_error_naming_the_code(world: World, client: Client) -> None:
    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        raising = http_tool(task, "issues", "list_issues", **LIST)
        with pytest.raises(TaskboundToolError) as refused:
            await raising.ainvoke({"org": "acme", "repo": "cli"})
        # What the model reads when the framework hands errors back to it.
        told = http_tool(task, "issues", "list_issues", handle_errors=True, **LIST)
        message = await told.ainvoke(tool_call(told.name, {"org": "acme", "repo": "cli"}))

    assert refused.value.code == "policy_denied"
    assert isinstance(refused.value.error, Refused)
    assert isinstance(refused.value, ToolException)
    assert str(refused.value).startswith("taskbound refused the call: policy_denied")
    assert isinstance(message, ToolMessage)
    assert message.status == "error"
    assert "policy_denied" in str(message.content)
    assert world.echo.seen == []


async def test_a_tool_without_a_credential_for_it_is_refused(client: Client) -> None:
    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        tool = http_tool(
            task, "issues", "delete_repo", tier="admin", method="DELETE", path="/repos/{org}/{repo}"
        )
        with pytest.raises(TaskboundToolError) as refused:
            await tool.ainvoke(WEB)
    assert refused.value.code == "not_granted"


async def test_approval_required_surfaces_and_the_same_call_goes_through_once_approved(
    world: World, client: Client
) -> None:
    scopes = [("issues", "admin")]
    async with client.task(
        "clean up", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as t:
        delete = http_tool(
            t, "issues", "delete_repo", tier="admin", method="DELETE", path="/repos/{org}/{repo}"
        )
        with pytest.raises(TaskboundToolError) as held:
            await delete.ainvoke(WEB)
        error = held.value.error
        assert held.value.code == "approval_required"
        assert isinstance(error, ApprovalRequired)
        assert error.approval_id in str(held.value)
        assert "was not made" in str(held.value)
        assert world.echo.seen == []

        await vote(world, error.approval_id, "bob")
        await vote(world, error.approval_id, "carol")
        answer = await t.retry_when_approved(error, within=10)

        # Used once: the same call again is held again.
        with pytest.raises(TaskboundToolError) as again:
            await delete.ainvoke(WEB)

    assert answer == '{"ok":true,"path":"/api/repos/acme/web"}'
    assert again.value.code == "approval_required"
    assert [(s["method"], s["path"]) for s in world.echo.seen] == [
        ("DELETE", "/api/repos/acme/web")
    ]


async def test_a_path_argument_stays_in_its_segment(world: World, client: Client) -> None:
    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        tool = http_tool(task, "issues", "list_issues", **LIST)
        for bad in ("..", ".", ""):
            with pytest.raises(ToolException, match="not a valid path segment"):
                await tool.ainvoke({"org": "acme", "repo": bad})
        # A slash is escaped: never another path of the tool (refused by the gateway, or a
        # single odd segment the tool sees as such).
        with pytest.raises(ToolException):
            await tool.ainvoke({"org": "acme", "repo": "web/../../../admin"})
    assert all(s["path"].startswith("/api/repos/acme/") for s in world.echo.seen)


async def test_the_tools_own_error_answer_is_a_tool_error(world: World, client: Client) -> None:
    class WithStatus(BaseModel):
        org: str
        repo: str
        status: int

    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        tool = http_tool(task, "issues", "list_issues", args_schema=WithStatus, **LIST)
        with pytest.raises(ToolException) as failed:
            await tool.ainvoke({**WEB, "status": 404})

    assert not isinstance(failed.value, TaskboundToolError)
    assert str(failed.value).startswith("the tool answered HTTP 404")
    assert len(world.echo.seen) == 1


def test_an_args_schema_must_carry_the_path_parameters() -> None:
    class OnlyOrg(BaseModel):
        org: str

    with pytest.raises(ValueError, match=r"\['repo'\]"):
        # No task needed: the schema is checked when the tool is made.
        http_tool(None, "issues", "list_issues", args_schema=OnlyOrg, **LIST)  # type: ignore[arg-type]


async def test_a_sync_task_gives_a_sync_tool(world: World) -> None:
    def agent() -> tuple[str, str]:
        with (
            SyncClient(world.live.base, identity=identity(world)) as tb,
            tb.task(
                "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
            ) as task,
        ):
            tool = http_tool(task, "issues", "list_issues", **LIST)
            ok = tool.invoke(WEB)
            with pytest.raises(TaskboundToolError) as refused:
                tool.invoke({"org": "acme", "repo": "cli"})
            return ok, refused.value.code

    # In a thread: the server answering it runs on this event loop.
    ok, code = await asyncio.to_thread(agent)
    assert ok == '{"ok":true,"path":"/api/repos/acme/web/issues"}'
    assert code == "policy_denied"

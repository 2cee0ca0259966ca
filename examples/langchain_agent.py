"""LangChain tools behind taskbound, invoked as an agent framework would — no LLM needed.

What it shows: ``taskbound.integrations.langchain.http_tool`` turns a taskbound tool action
into a LangChain ``StructuredTool``; invoking it with a model's tool call (``ainvoke`` of a
``{"type": "tool_call", ...}``) makes a real call with the task's credential through the
gateway. A call within the task's intent answers a ``ToolMessage`` with the tool's answer;
one outside it answers an error ``ToolMessage`` naming the stable code (``policy_denied``)
for the model to read (``handle_errors=True``); a call held for approval raises
``TaskboundToolError`` with ``code == "approval_required"`` for the application to handle
(``handle_errors=False``): the call was not made.

Needs ``pip install 'taskbound[langchain]'``. Run it against a server whose registry has
an HTTP tool (default ``issues``) with ``GET /repos/{org}/{repo}/issues`` (read) and an
admin-tier ``DELETE /repos/{org}/{repo}``, and the agent with ``issues:read`` and
``issues:admin`` in its ceiling (``examples/quickstart.yaml``)::

    python examples/langchain_agent.py --base-url http://127.0.0.1:8080 \\
        --admin-token "$TASKBOUND_ADMIN_TOKEN" \\
        --spiffe-id spiffe://taskbound.local/agents/triage-bot

``--admin-token`` is only used to mint a development identity (``DevIssuer``); without it
the agent uses its real workload identity. Exit code 0 when everything went as described.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import agent_args
from langchain_core.messages import ToolMessage

from taskbound.integrations.langchain import TaskboundToolError, http_tool
from taskbound.sdk import Client, TaskboundClientError


def parse_args() -> argparse.Namespace:
    p = agent_args.parser(__doc__, "spiffe://taskbound.local/agents/triage-bot")
    p.add_argument("--tool", default="issues")
    p.add_argument("--org", default="acme")
    p.add_argument("--repo", default="web")
    return p.parse_args()


def tool_call(name: str, args: dict[str, str], call_id: str) -> dict[str, object]:
    """What a chat model emits to call a tool (LangChain's ``ToolCall``)."""
    return {"type": "tool_call", "name": name, "args": args, "id": call_id}


async def main(args: argparse.Namespace) -> int:
    async with (
        Client(args.base_url, identity=agent_args.identity(args)) as tb,
        tb.task(
            f"triage {args.org}/{args.repo} with an LLM agent",
            on_behalf_of=args.owner,
            scopes=[(args.tool, "read"), (args.tool, "admin")],
            constraints={"org": args.org, "repo": args.repo, "tiers": ["read", "admin"]},
            ttl_seconds=300,
        ) as task,
    ):
        print(f"task {task.id} started")
        list_issues = http_tool(
            task,
            args.tool,
            "list_issues",
            tier="read",
            method="GET",
            path="/repos/{org}/{repo}/issues",
            description="List the open issues of a repository.",
            handle_errors=True,  # refusals become the model's tool answer
        )
        delete_repo = http_tool(
            task,
            args.tool,
            "delete_repo",
            tier="admin",
            method="DELETE",
            path="/repos/{org}/{repo}",
            description="Delete a repository.",
        )
        # What an agent framework hands the model: each tool's name and JSON schema.
        for t in (list_issues, delete_repo):
            print(f"tool {t.name}: arguments {sorted(t.args)}")

        answer = await list_issues.ainvoke(
            tool_call(list_issues.name, {"org": args.org, "repo": args.repo}, "call_1")
        )
        assert isinstance(answer, ToolMessage)
        print(f"{list_issues.name}({args.repo}) -> {answer.status}: {answer.content}")
        if answer.status != "success":
            return 1

        answer = await list_issues.ainvoke(
            tool_call(list_issues.name, {"org": args.org, "repo": "elsewhere"}, "call_2")
        )
        assert isinstance(answer, ToolMessage)
        print(f"{list_issues.name}(elsewhere) -> {answer.status}: {answer.content}")
        if answer.status != "error" or "policy_denied" not in str(answer.content):
            return 1

        try:
            await delete_repo.ainvoke(
                tool_call(delete_repo.name, {"org": args.org, "repo": args.repo}, "call_3")
            )
        except TaskboundToolError as exc:
            # exc.error is the SDK's ApprovalRequired. The application decides: tell
            # the user, or wait for people with `await task.retry_when_approved(exc.error)`.
            kind = type(exc.error).__name__
            print(f"{delete_repo.name}({args.repo}) -> raised TaskboundToolError ({kind}): {exc}")
        else:
            print("a call that needs approval was let through", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except TaskboundClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

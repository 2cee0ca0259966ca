"""An MCP agent: the official MCP client through taskbound's gateway.

What it shows: ``task.mcp(tool)`` is a connected, initialised ``mcp.ClientSession`` whose
every request carries the task's credential and a fresh DPoP proof; ``list_tools`` answers
only the tools this credential may call; a ``call_tool`` within the task's intent goes
through, one outside it is refused with a stable code (a typed ``Refused`` error, not an
MCP error to parse).

Needs the MCP client: ``pip install 'taskbound[mcp]'``. Run it against a server whose
registry has an MCP tool (default ``tracker``) exposing ``search(project, query)`` and the
agent in it (``examples/quickstart.yaml``)::

    python examples/mcp_agent.py --base-url http://127.0.0.1:8080 \\
        --admin-token "$TASKBOUND_ADMIN_TOKEN" \\
        --spiffe-id spiffe://taskbound.local/agents/triage-bot

``--admin-token`` is only used to mint a development identity (``DevIssuer``); without it
the agent uses its real workload identity (``SPIFFE_ENDPOINT_SOCKET`` or
``TASKBOUND_IDENTITY_TOKEN_FILE``). Exit code 0 when everything went as described.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import agent_args

from taskbound.sdk import Client, Refused, TaskboundClientError


def parse_args() -> argparse.Namespace:
    p = agent_args.parser(__doc__, "spiffe://taskbound.local/agents/triage-bot")
    p.add_argument("--tool", default="tracker")
    p.add_argument("--project", default="WEB")
    return p.parse_args()


async def main(args: argparse.Namespace) -> int:
    async with (
        Client(args.base_url, identity=agent_args.identity(args)) as tb,
        tb.task(
            f"find the flaky-test reports in {args.project}",
            on_behalf_of=args.owner,
            scopes=[(args.tool, "read")],
            # The default policy pack binds a call's `project` argument to this.
            constraints={"project": args.project, "tiers": ["read"]},
            ttl_seconds=300,
        ) as task,
        task.mcp(args.tool) as session,
    ):
        print(f"task {task.id} started")
        listed = await session.list_tools()
        print(f"tools/list -> {', '.join(sorted(t.name for t in listed.tools))}")

        result = await session.call_tool("search", {"project": args.project, "query": "flaky"})
        text = " ".join(getattr(c, "text", "") for c in result.content)
        print(f"search({args.project!r}) -> {text}")
        if result.is_error:
            return 1

        try:
            await session.call_tool("search", {"project": "OTHER", "query": "flaky"})
        except Refused as refused:
            print(f"search('OTHER') -> refused: {refused.code}")
        else:
            print("a call outside the task's intent was let through", file=sys.stderr)
            return 1
    print(f"task {task.id} ended")
    return 0


if __name__ == "__main__":
    try:
        code = asyncio.run(main(parse_args()))
    except TaskboundClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)

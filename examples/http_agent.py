"""A plain Python agent calling an HTTP tool with task-bound credentials.

What it shows: ``async with Client(...).task(...)`` starts a task asking for one tool at
one tier, ``task.http(tool)`` is an ``httpx.AsyncClient`` whose every request carries the
task's credential and a fresh DPoP proof through the gateway, a call outside the task's
intent is refused with a stable code, and leaving the block ends the task (its credentials
die everywhere).

Run it against a server whose registry has an HTTP tool (default ``issues``) with the
action ``GET /repos/{org}/{repo}/issues`` and the agent in it — as
``examples/quickstart.yaml`` has, with ``examples/toy_tool.py`` serving the tool
(``docs/sdk-quickstart.md`` sets it up in a few commands)::

    python examples/http_agent.py --base-url http://127.0.0.1:8080 \\
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
    p.add_argument("--tool", default="issues")
    p.add_argument("--org", default="acme")
    p.add_argument("--repo", default="web")
    return p.parse_args()


async def main(args: argparse.Namespace) -> int:
    async with Client(args.base_url, identity=agent_args.identity(args)) as tb:
        async with tb.task(
            f"triage the open issues of {args.org}/{args.repo}",
            on_behalf_of=args.owner,
            scopes=[(args.tool, "read")],
            # The default policy pack binds calls to these: other repos are refused.
            constraints={"org": args.org, "repo": args.repo, "tiers": ["read"]},
            ttl_seconds=300,
        ) as task:
            print(f"task {task.id} started")
            for grant in task.granted:
                print(f"  granted {grant['tool']}:{grant['tier']} actions={grant.get('actions')}")

            async with task.http(args.tool) as tool:
                path = f"/repos/{args.org}/{args.repo}/issues"
                r = await tool.get(path)
                print(f"GET {path} -> {r.status_code}: {r.text[:200]}")
                if not r.is_success:
                    return 1

                path = f"/repos/{args.org}/elsewhere/issues"
                try:
                    await tool.get(path)
                except Refused as refused:
                    print(f"GET {path} -> refused: {refused.code}")
                else:
                    print(f"GET {path} was let through", file=sys.stderr)
                    return 1

        # Leaving the block completed the task: every credential it held is revoked.
        print(f"task {task.id} is {(await task.state())['state']}")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except TaskboundClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

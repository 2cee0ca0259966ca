"""An orchestrator that hands a narrower credential to a sub-agent in another process.

What it shows: the orchestrator starts a task over two repositories, naming the sub-agent
that may act for it (``may_act``); it delegates its read credential narrowed to one
repository (``task.delegate(...)``), hands the delegation to ``examples/subagent.py`` as
JSON on its standard input — the credential and a one-time consent proof, never the
orchestrator's key — and the sub-agent, with its own identity and its own key, exchanges
it (RFC 8693), calls the tool within the narrower scope and is refused outside it, where
the orchestrator itself is not. Ending the task then kills the delegated credential too.

Run it against a server whose registry has an HTTP tool (default ``issues``) with the
action ``GET /repos/{org}/{repo}/issues``, the orchestrating agent, and the sub-agent
(same owner, ``issues:read`` in its ceiling), as ``examples/quickstart.yaml`` has::

    python examples/orchestrator.py --base-url http://127.0.0.1:8080 \\
        --admin-token "$TASKBOUND_ADMIN_TOKEN" \\
        --spiffe-id spiffe://taskbound.local/agents/triage-bot \\
        --subagent-spiffe-id spiffe://taskbound.local/agents/helper

``--admin-token`` is only used to mint development identities (``DevIssuer``), the
orchestrator's here and the sub-agent's in its own process (passed in its environment);
without it each uses its real workload identity. Exit code 0 when everything went as
described.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import agent_args

from taskbound.sdk import Client, TaskboundClientError

SUBAGENT = Path(__file__).with_name("subagent.py")


def parse_args() -> argparse.Namespace:
    p = agent_args.parser(__doc__, "spiffe://taskbound.local/agents/triage-bot")
    p.add_argument("--subagent-spiffe-id", default="spiffe://taskbound.local/agents/helper")
    p.add_argument("--tool", default="issues")
    p.add_argument("--org", default="acme")
    p.add_argument(
        "--repos", default="web,api", help="the task's repositories; the first is delegated"
    )
    return p.parse_args()


async def run_subagent(args: argparse.Namespace, delegation: str, repo: str, other: str) -> int:
    """Start the sub-agent as its own process and hand it the delegation on stdin."""
    env = dict(os.environ)
    if args.admin_token:
        env["TASKBOUND_ADMIN_TOKEN"] = args.admin_token  # for its development identity only
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SUBAGENT),
        "--base-url", args.base_url,
        "--spiffe-id", args.subagent_spiffe_id,
        "--org", args.org,
        "--repo", repo,
        "--other-repo", other,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    out, _ = await proc.communicate(delegation.encode())
    for line in out.decode().splitlines():
        print(f"  [sub-agent] {line}")
    return proc.returncode or 0


async def main(args: argparse.Namespace) -> int:
    repos = [r.strip() for r in args.repos.split(",") if r.strip()]
    if len(repos) < 2:
        print("--repos needs two repositories", file=sys.stderr)
        return 2
    mine, other = repos[0], repos[1]
    async with Client(args.base_url, identity=agent_args.identity(args)) as tb:
        async with tb.task(
            f"triage {args.org}/{{{','.join(repos)}}}, {mine} by a helper",
            on_behalf_of=args.owner,
            scopes=[(args.tool, "read")],
            constraints={"org": args.org, "repo": repos, "tiers": ["read"]},
            # Only this sub-agent may exchange the task's credentials.
            may_act=args.subagent_spiffe_id,
            ttl_seconds=300,
        ) as task:
            print(f"task {task.id} started for {args.org}/{{{','.join(repos)}}}")
            async with task.http(args.tool) as tool:
                for repo in repos:
                    r = await tool.get(f"/repos/{args.org}/{repo}/issues")
                    print(f"orchestrator: GET /repos/{args.org}/{repo}/issues -> {r.status_code}")
                    if not r.is_success:
                        return 1

            delegation = await task.delegate(args.tool, "read", constraints={"repo": mine})
            print(
                f"delegating {args.tool}:read narrowed to repo={mine} to {args.subagent_spiffe_id}"
            )
            code = await run_subagent(args, delegation.to_json(), mine, other)
            print(f"sub-agent exited with {code}")
            if code != 0:
                return 1
        state = (await task.state())["state"]
        print(f"task {task.id} is {state}: its credentials, the delegated one too, are revoked")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except TaskboundClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

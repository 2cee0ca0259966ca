"""The sub-agent of ``examples/orchestrator.py``: a separate process, its own identity, its
own key.

What it shows: ``Client.accept(delegation)`` exchanges the orchestrator's credential for
one of its own (RFC 8693), bound to a DPoP key made here — the orchestrator's key never
leaves the orchestrator — and narrower than the parent's; the sub-agent calls the tool
within that scope and is refused outside it (``policy_denied``), though its parent may go
there.

It reads the delegation (``Delegation.to_json()``) on its standard input; the orchestrator
starts it. By hand::

    python examples/subagent.py --base-url http://127.0.0.1:8080 \\
        --spiffe-id spiffe://taskbound.local/agents/helper \\
        --org acme --repo web --other-repo api < delegation.json

The development identity is minted with ``--admin-token`` or ``TASKBOUND_ADMIN_TOKEN``
(``DevIssuer``); without either the sub-agent uses its real workload identity. Exit code 0
when everything went as described.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import agent_args

from taskbound.sdk import Client, Refused, TaskboundClientError


def parse_args() -> argparse.Namespace:
    p = agent_args.parser(__doc__, "spiffe://taskbound.local/agents/helper", owner=False)
    p.add_argument("--org", default="acme")
    p.add_argument("--repo", default="web", help="the repository delegated to this agent")
    p.add_argument("--other-repo", default="api", help="one it was not given")
    return p.parse_args()


async def main(args: argparse.Namespace) -> int:
    delegation = sys.stdin.read()
    async with Client(args.base_url, identity=agent_args.identity(args)) as tb:
        held = await tb.accept(delegation)
        details = held.details
        print(
            f"accepted {details.get('tool')}:{details.get('tier')} "
            f"repo={details.get('constraints', {}).get('repo')} bound to my own key"
        )
        async with held.http(details["tool"]) as tool:
            path = f"/repos/{args.org}/{args.repo}/issues"
            r = await tool.get(path)
            print(f"GET {path} -> {r.status_code}")
            if not r.is_success:
                return 1
            path = f"/repos/{args.org}/{args.other_repo}/issues"
            try:
                await tool.get(path)
            except Refused as refused:
                print(f"GET {path} -> refused: {refused.code} (outside the delegated scope)")
            else:
                print(f"GET {path} was let through", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except TaskboundClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

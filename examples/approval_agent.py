"""An agent whose call is held for a human approval, then let through once.

What it shows: a call policy holds (the default pack holds every admin-tier call) raises
``ApprovalRequired`` naming the approval; ``task.retry_when_approved(held)`` waits for the
people's decision and sends exactly the same call again, which goes through; the same call
once more is held again — an approval is good for one call, never a standing permission.

The people: with ``--approver`` (once per person; the default pack wants two distinct
approvers for an admin-tier call, neither of them the task's owner) this script plays
them, voting through the admin API with ``--admin-token`` — the agent's code never uses it.
Without ``--approver`` it waits (``--wait`` seconds) for real people to decide in the web
UI or with ``taskbound approvals approve <id> --as-owner <them>``.

Run it against a server whose registry has an HTTP tool (default ``issues``) with an
admin-tier action ``DELETE /repos/{org}/{repo}``, the agent with ``issues:admin`` in its
ceiling, and two owners with the ``approver`` role (``examples/quickstart.yaml``)::

    python examples/approval_agent.py --base-url http://127.0.0.1:8080 \\
        --admin-token "$TASKBOUND_ADMIN_TOKEN" \\
        --spiffe-id spiffe://taskbound.local/agents/triage-bot --approver bob --approver carol

``--admin-token`` also mints the agent's development identity (``DevIssuer``); without it
the agent uses its real workload identity. Exit code 0 when everything went as described.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import agent_args
import httpx

from taskbound.sdk import (
    ApprovalRequired,
    Client,
    TaskboundClientError,
)


def parse_args() -> argparse.Namespace:
    p = agent_args.parser(__doc__, "spiffe://taskbound.local/agents/triage-bot")
    p.add_argument("--approver", action="append", default=[], help="an owner who approves")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for a decision")
    p.add_argument("--tool", default="issues")
    p.add_argument("--org", default="acme")
    p.add_argument("--repo", default="web")
    return p.parse_args()


async def people_approve(args: argparse.Namespace, approval_id: str) -> None:
    """Stands in for the people deciding in the web UI: one vote each, as themselves."""
    headers = {"Authorization": f"Bearer {args.admin_token}"}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers) as admin:
        for person in args.approver:
            r = await admin.post(
                f"/v1/admin/approvals/{approval_id}/approve",
                json={"as_owner": person, "reason": "checked: the repository is abandoned"},
            )
            r.raise_for_status()
            view = r.json()
            print(f"{person} approves ({view['approvals']}/{view['required']}): {view['state']}")


async def main(args: argparse.Namespace) -> int:
    if args.approver and not args.admin_token:
        print("--approver needs --admin-token (the people's votes go through the admin API)")
        return 2
    path = f"/repos/{args.org}/{args.repo}"
    async with (
        Client(args.base_url, identity=agent_args.identity(args)) as tb,
        tb.task(
            f"delete the abandoned repository {args.org}/{args.repo}",
            on_behalf_of=args.owner,
            scopes=[(args.tool, "admin")],
            # The default pack grants the admin tier only when the intent names it.
            constraints={"org": args.org, "repo": args.repo, "tiers": ["admin"]},
            ttl_seconds=600,
        ) as task,
    ):
        print(f"task {task.id} started")
        async with task.http(args.tool) as tool:
            try:
                await tool.delete(path)
            except ApprovalRequired as refusal:
                held = refusal
                print(f"DELETE {path} -> held: {held.code}, approval {held.approval_id}")
            else:
                print(f"DELETE {path} was not held for approval", file=sys.stderr)
                return 1

            if args.approver:
                voting = asyncio.create_task(people_approve(args, held.approval_id))
            else:
                print(
                    f"waiting for people: taskbound approvals approve {held.approval_id} "
                    "--as-owner <approver>"
                )
            r = await task.retry_when_approved(held, within=args.wait)
            if args.approver:
                await voting
            print(f"DELETE {path} again, approved -> {r.status_code}")
            if not r.is_success:
                return 1

            try:
                await tool.delete(path)
            except ApprovalRequired as again:
                print(f"DELETE {path} once more -> held again: approval {again.approval_id}")
            else:
                print("an approval was used twice", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (TaskboundClientError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

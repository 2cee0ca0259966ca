"""`taskbound approvals list|show|approve|deny`: people deciding held calls.

Until people sign in (the web UI), a vote is made with an admin token and the approver's
owner id (``--as-owner``); the server checks that owner's approver role and separation of
duties, and records both.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    print_json,
)

approvals_app = typer.Typer(
    help="Human approvals of held calls: list, show, approve, deny.", no_args_is_help=True
)

AsOwnerOption = typer.Option(
    ...,
    "--as-owner",
    help="The owner id of the person deciding (an owner with the approver role).",
    show_default=False,
)


def _path(approval_id: str) -> str:
    return quote(approval_id, safe="")


def _call(a: dict[str, Any]) -> str:
    return f"{a['tool']}.{a['action']} ({a['tier']})"


def _describe(a: dict[str, Any]) -> None:
    """One approval, as a person deciding it needs to see it."""
    summary = a.get("summary") or {}
    colour = {"pending": "yellow", "approved": "green", "consumed": "green"}.get(a["state"], "red")
    console.print(f"[bold]{escape(a['id'])}[/]  [{colour}]{a['state']}[/]")
    rows = [
        ("call", _call(a)),
        ("request", f"{summary.get('method', '')} {summary.get('path', '')}".strip()),
        ("target", a.get("target")),
        ("agent", a["agent"]),
        ("owner", a.get("owner")),
        ("task", a["task"]),
        ("intent", a.get("intent")),
        ("asked by", ", ".join(summary.get("policies", ()))),
        ("approvals", f"{a['approvals']} of {a['required']}"),
        ("expires", a["expires_at"]),
        ("use by", a.get("use_by")),
        ("decided", a.get("decided_at")),
        ("decided by", a.get("decided_by")),
        ("reason", a.get("reason")),
        ("action digest", a["action_digest"]),
    ]
    for label, value in rows:
        if value:
            console.print(f"  [cyan]{label:<14}[/]{escape(str(value))}")
    for key in ("query", "body", "mcp_tool"):
        if key in summary:
            console.print(f"  [cyan]{key:<14}[/]{escape(json.dumps(summary[key]))}")
    console.print("  [cyan]arguments[/]")
    text = json.dumps(summary.get("arguments", {}), indent=2, sort_keys=True, ensure_ascii=False)
    console.print(escape(text), highlight=False)
    if summary.get("truncated"):
        console.print("  [yellow]the request was too large to show in full[/]")
    for vote in a.get("votes") or ():
        verdict = "approved" if vote["approve"] else "denied"
        why = f": {vote['reason']}" if vote.get("reason") else ""
        console.print(f"  {escape(vote['approver'])} {verdict} at {vote['voted_at']}{escape(why)}")


@approvals_app.command("list")
def approvals_list(
    state: str | None = typer.Option(
        None, help="pending, approved, denied, expired or consumed (as of now)."
    ),
    limit: int = typer.Option(100, min=1, max=1000),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List approvals, newest first."""
    params = {"limit": str(limit)}
    if state:
        params["state"] = state
    data = AdminClient(url, token).get("/v1/admin/approvals", params=params)
    if as_json:
        return print_json(data)
    # Ids fold rather than shorten: a person copies them into `approve`.
    table = Table(title="Approvals", title_justify="left", header_style="bold cyan")
    for name in ("id", "state", "call", "agent", "task", "approvals", "expires"):
        table.add_column(name, overflow="fold")
    for a in data["approvals"]:
        table.add_row(
            a["id"],
            a["state"],
            _call(a),
            a["agent"],
            a["task"],
            f"{a['approvals']}/{a['required']}",
            a["expires_at"],
        )
    console.print(table)


@approvals_app.command("show")
def approvals_show(
    approval_id: str,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one approval: the exact call, its arguments, who asked, and the votes."""
    data = AdminClient(url, token).get(f"/v1/approvals/{_path(approval_id)}")
    if as_json:
        return print_json(data)
    _describe(data)


def _vote(
    verb: str, approval_id: str, as_owner: str, reason: str, url: str, token: str, as_json: bool
) -> None:
    data = AdminClient(url, token).post(
        f"/v1/admin/approvals/{_path(approval_id)}/{verb}",
        json={"as_owner": as_owner, "reason": reason},
    )
    if as_json:
        return print_json(data)
    state = data["state"]
    if state == "approved":
        console.print(
            f"[green]approved[/] {escape(approval_id)}: the same call may be made once, "
            f"until {data['use_by']}"
        )
    elif state == "denied":
        console.print(f"[red]denied[/] {escape(approval_id)}")
    else:
        console.print(
            f"[yellow]recorded[/] {escape(approval_id)}: {data['approvals']} of "
            f"{data['required']} approvals; it stays {state}"
        )


@approvals_app.command("approve")
def approvals_approve(
    approval_id: str,
    as_owner: str = AsOwnerOption,
    reason: str = typer.Option("", "--reason", help="Why (recorded and audited)."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve one held call (admin-tier calls need more than one approver)."""
    _vote("approve", approval_id, as_owner, reason, url, token, as_json)


@approvals_app.command("deny")
def approvals_deny(
    approval_id: str,
    as_owner: str = AsOwnerOption,
    reason: str = typer.Option(
        ..., "--reason", help="Why (required; the agent sees it).", show_default=False
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Deny one held call; the agent waiting for it learns at once."""
    _vote("deny", approval_id, as_owner, reason, url, token, as_json)

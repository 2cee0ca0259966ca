"""`taskbound owners|agents|tools|apply`: the registry through the admin API, and an
agent's standing (suspend, quarantine, resume, retire)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

import typer

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    fail,
    load_document,
    print_json,
    print_table,
)

owners_app = typer.Typer(
    help="Owners: the humans or teams accountable for agents.", no_args_is_help=True
)
agents_app = typer.Typer(
    help="Agents: registered workloads, by SPIFFE ID; suspend, quarantine, resume or retire them.",
    no_args_is_help=True,
)
tools_app = typer.Typer(
    help="Tools: destinations agents call through the gateway.", no_args_is_help=True
)


def _agent_path(spiffe_id: str) -> str:
    # One path segment: the server's `{spiffe_id:path}` receives it decoded, slashes and all.
    return f"/v1/admin/agents/{quote(spiffe_id, safe='')}"


@owners_app.command("list")
def owners_list(url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption) -> None:
    """List owners."""
    data = AdminClient(url, token).get("/v1/admin/owners")
    if as_json:
        return print_json(data)
    print_table(
        "Owners",
        ["id", "contact", "roles", "disabled"],
        [(o["id"], o["contact"], ",".join(o["roles"]), o["disabled"]) for o in data["owners"]],
    )


@owners_app.command("create")
def owners_create(
    owner_id: str = typer.Option(..., "--id", help="Owner id (lowercase, e.g. team-payments)."),
    contact: str = typer.Option(..., help="How to reach the owner (e-mail, channel)."),
    role: list[str] = typer.Option([], "--role", help="approver, reviewer or admin; repeatable."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Register an owner."""
    data = AdminClient(url, token).post(
        "/v1/admin/owners", json={"id": owner_id, "contact": contact, "roles": role}
    )
    print_json(data) if as_json else console.print(f"[green]created[/] owner {data['id']}")


@agents_app.command("list")
def agents_list(
    owner: str | None = typer.Option(None, help="Only agents of this owner."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List agents."""
    params = {"owner": owner} if owner else None
    data = AdminClient(url, token).get("/v1/admin/agents", params=params)
    if as_json:
        return print_json(data)
    print_table(
        "Agents",
        ["spiffe id", "owner", "state", "ceiling"],
        [
            (
                a["spiffe_id"],
                a["owner"],
                a["state"],
                " ".join(f"{s['tool']}:{s['tier']}" for s in a["ceiling"]),
            )
            for a in data["agents"]
        ],
    )


@agents_app.command("create")
def agents_create(
    spiffe_id: str = typer.Option(..., "--spiffe-id", help="spiffe://<trust-domain>/<path>"),
    owner: str = typer.Option(..., help="The accountable owner's id."),
    ceiling: list[str] = typer.Option(
        [], "--ceiling", help="tool:tier the agent may ever request; repeatable."
    ),
    description: str = typer.Option("", help="What the agent is for."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Register an agent."""
    scopes = []
    for item in ceiling:
        tool, sep, tier = item.partition(":")
        if not sep:
            fail(f"--ceiling {item!r} must be tool:tier", code="invalid_request", exit_code=2)
        scopes.append({"tool": tool, "tier": tier})
    data = AdminClient(url, token).post(
        "/v1/admin/agents",
        json={
            "spiffe_id": spiffe_id,
            "owner": owner,
            "ceiling": scopes,
            "description": description,
        },
    )
    print_json(data) if as_json else console.print(f"[green]created[/] agent {data['spiffe_id']}")


@agents_app.command("show")
def agents_show(
    spiffe_id: str = typer.Argument(..., help="The agent's SPIFFE ID."),
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Show one agent (JSON)."""
    print_json(AdminClient(url, token).get(_agent_path(spiffe_id)))


# --- standing: suspend | quarantine | resume | retire -------------------------------------

ReasonOption = typer.Option(
    None, "--reason", help="Why; recorded with the change and its revocations.", show_default=False
)
_DONE = {"suspend": "suspended", "quarantine": "quarantined", "retire": "retired"}


def _change_state(
    verb: str, spiffe_id: str, reason: str | None, url: str, token: str | None, as_json: bool
) -> None:
    client = AdminClient(url, token)
    body = {"json": {"reason": reason}} if reason is not None else {}
    data = client.post(f"{_agent_path(spiffe_id)}/{verb}", **body)
    if as_json:
        print_json(data)
    elif not data["changed"]:
        console.print(f"[yellow]already {data['state']}[/] {data['spiffe_id']}")
    elif verb == "resume":
        console.print(
            f"[green]resumed[/] {data['spiffe_id']} (it may start tasks again; "
            "tasks revoked before stay revoked)"
        )
    else:
        count = _tasks_ended_with(client, data)
        tasks = "1 live task" if count == 1 else f"{count} live tasks"
        final = "; this is final" if verb == "retire" else ""
        console.print(f"[green]{_DONE[verb]}[/] {data['spiffe_id']} ({tasks} revoked{final})")


def _tasks_ended_with(client: AdminClient, agent: dict[str, Any]) -> int:
    """How many of the agent's tasks its last change of state revoked: they ended in the
    same transaction, at the agent's new ``updated_at`` (the API does not count them)."""
    revoked = client.get(
        "/v1/admin/tasks", params={"agent": agent["spiffe_id"], "state": "revoked", "limit": "1000"}
    )["tasks"]
    at = datetime.fromisoformat(agent["updated_at"])
    return sum(1 for t in revoked if t["ended_at"] and datetime.fromisoformat(t["ended_at"]) == at)


@agents_app.command("suspend")
def agents_suspend(
    spiffe_id: str = typer.Argument(..., help="The agent's SPIFFE ID."),
    reason: str | None = ReasonOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Suspend an agent: revoke its live tasks; no new tasks until resumed.

    Every credential of those tasks is refused at the gateways at once."""
    _change_state("suspend", spiffe_id, reason, url, token, as_json)


@agents_app.command("quarantine")
def agents_quarantine(
    spiffe_id: str = typer.Argument(..., help="The agent's SPIFFE ID."),
    reason: str | None = ReasonOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Quarantine a suspect agent: as suspend, marked for investigation.

    Its live tasks are revoked at once; it starts no new task until resumed."""
    _change_state("quarantine", spiffe_id, reason, url, token, as_json)


@agents_app.command("resume")
def agents_resume(
    spiffe_id: str = typer.Argument(..., help="The agent's SPIFFE ID."),
    reason: str | None = ReasonOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Make a suspended or quarantined agent active again.

    Tasks revoked meanwhile stay revoked; the agent may start new ones."""
    _change_state("resume", spiffe_id, reason, url, token, as_json)


@agents_app.command("retire")
def agents_retire(
    spiffe_id: str = typer.Argument(..., help="The agent's SPIFFE ID."),
    reason: str | None = ReasonOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Retire an agent for good (final): revoke its live tasks; never resumable.

    Asks for confirmation unless --yes."""
    if not yes:
        typer.confirm(
            f"Retire {spiffe_id}? This is final: its live tasks are revoked and it can "
            "never be resumed.",
            abort=True,
            err=True,
        )
    _change_state("retire", spiffe_id, reason, url, token, as_json)


@tools_app.command("list")
def tools_list(url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption) -> None:
    """List tools (secrets are never shown, only whether one is set)."""
    data = AdminClient(url, token).get("/v1/admin/tools")
    if as_json:
        return print_json(data)
    print_table(
        "Tools",
        ["id", "kind", "audience", "tiers", "actions", "secret"],
        [
            (
                t["id"],
                t["kind"],
                t["audience"],
                ",".join(sorted({a["tier"] for a in t["actions"]})),
                len(t["actions"]),
                "set" if t["has_upstream_secret"] else "-",
            )
            for t in data["tools"]
        ],
    )


@tools_app.command("show")
def tools_show(tool_id: str, url: str = UrlOption, token: str = TokenOption) -> None:
    """Show one tool (JSON)."""
    print_json(AdminClient(url, token).get(f"/v1/admin/tools/{quote(tool_id, safe='')}"))


def apply(
    file: str = typer.Option(
        ..., "-f", "--file", help="Registry document (YAML or JSON; - for stdin)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate and show changes; write nothing."
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Declare owners, tools and agents from a file kept in git (create or update)."""
    doc = load_document(file)
    if not isinstance(doc, dict):
        fail(
            f"{file} must hold a mapping with owners, tools and agents",
            code="invalid_request",
            exit_code=2,
        )
    data = AdminClient(url, token).post(
        "/v1/admin/apply", json=doc, params={"dry_run": "1"} if dry_run else None
    )
    if as_json:
        return print_json(data)
    verb = "would be " if dry_run else ""
    for key, colour in (("created", "green"), ("updated", "yellow"), ("unchanged", "dim")):
        for item in data[key]:
            console.print(f"[{colour}]{verb}{key:9}[/] {item}")

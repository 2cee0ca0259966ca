"""`taskbound breakglass grant|list|show|end|review`: break-glass exceptions
(docs/breakglass.md).

An exception widens one agent's ceiling for a while: an admin grants it with a
justification and an expiry no later than ``breakglass.max_duration_seconds``; every call
made under it is flagged in the audit; it ends by itself at its expiry (or earlier, with
``end``), then waits until a reviewer other than its granter signs it off.

Until people sign in (the web UI), the person acting is named with ``--as-owner`` beside
the admin token; the server checks that owner's role and records both.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
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
    fail,
    print_json,
)
from taskbound.core.model import Tier

breakglass_app = typer.Typer(
    help=(
        "Break-glass exceptions: temporary authority beyond an agent's ceiling, flagged on "
        "every use and reviewed afterwards. grant, list, show, end, review."
    ),
    no_args_is_help=True,
)

#: The states the server filters by; an exception's view may also say ``overdue`` (waiting
#: for review too long), which ``--state review`` lists too.
STATES = ("active", "review", "overdue", "reviewed")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+[smhd])+|\d+")
_PART = re.compile(r"(\d+)([smhd])")
_COLOUR = {"active": "bold red", "overdue": "red", "review": "yellow", "reviewed": "green"}
_DECISION_COLOUR = {"allow": "green", "deny": "red", "error": "red", "approval_required": "yellow"}


def _path(bg_id: str) -> str:
    return quote(bg_id, safe="")


def parse_scope(item: str) -> dict[str, str]:
    """``tool:tier`` as the API's scope object; exits 2 naming the bad value."""
    tool, sep, tier = item.strip().partition(":")
    tiers = ", ".join(t.value for t in Tier)
    if not sep or not tool or not tier:
        fail(
            f"--scope {item!r} must be tool:tier (tier one of {tiers})",
            code="invalid_request",
            exit_code=2,
        )
    if tier not in {t.value for t in Tier}:
        fail(
            f"--scope {item!r}: {tier!r} is not a tier (one of {tiers})",
            code="invalid_request",
            exit_code=2,
        )
    return {"tool": tool, "tier": tier}


def parse_duration(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h``, ``1d`` or combinations (``1h30m``);
    exits 2 on anything else, or zero."""
    value = text.strip().lower()
    if not _DURATION.fullmatch(value):
        fail(
            f"--expires-in {text!r} is not a duration: use seconds (3600) or a number with "
            "s, m, h or d (30m, 2h, 1h30m)",
            code="invalid_request",
            exit_code=2,
        )
    if value.isdigit():
        seconds = int(value)
    else:
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    if seconds <= 0:
        fail(f"--expires-in {text!r} must be longer than zero", code="invalid_request", exit_code=2)
    return seconds


def _time(value: str) -> str:
    """An ISO 8601 time from the server, shorter: UTC, to the second."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        return value
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _scopes(bg: dict[str, Any]) -> str:
    return " ".join(f"{s['tool']}:{s['tier']}" for s in bg["scopes"])


def _state(bg: dict[str, Any]) -> str:
    state = str(bg["state"])
    return f"[{_COLOUR.get(state, 'white')}]{state}[/]"


def _until(bg: dict[str, Any]) -> str:
    """When it stops (or stopped) counting: the early end when there was one."""
    if bg.get("ended_at"):
        return f"{_time(bg['ended_at'])} (ended early)"
    return _time(str(bg["expires_at"]))


def _describe(bg: dict[str, Any]) -> None:
    """One exception, as a person ending or reviewing it needs to see it."""
    console.print(f"[bold]{escape(bg['id'])}[/]  {_state(bg)}")
    rows = [
        ("agent", bg["agent"]),
        ("scopes", _scopes(bg)),
        ("justification", bg["justification"]),
        ("granted by", bg["granted_by"]),
        ("granted", bg["created_at"]),
        ("expires", bg["expires_at"]),
        ("ended", bg.get("ended_at")),
        ("ended by", bg.get("ended_by")),
        ("reviewed by", bg.get("reviewed_by")),
        ("reviewed", bg.get("reviewed_at")),
        ("review note", bg.get("review_note")),
    ]
    for label, value in rows:
        if value:
            console.print(f"  [cyan]{label:<14}[/]{escape(str(value))}")
    if bg["state"] == "overdue":
        console.print("  [red]its review is overdue[/]")


def _call(record: dict[str, Any]) -> str:
    if not record.get("tool"):
        return ""
    action = f".{record['action']}" if record.get("action") else ""
    tier = f" ({record['tier']})" if record.get("tier") else ""
    return f"{record['tool']}{action}{tier}"


def _outcome(record: dict[str, Any]) -> str:
    decision = str(record.get("decision") or "")
    code = record.get("code")
    text = decision if not code or code == decision else f"{decision}: {code}"
    colour = _DECISION_COLOUR.get(decision)
    return f"[{colour}]{escape(text)}[/]" if colour else escape(text)


def _calls_table(bg_id: str, calls: list[dict[str, Any]]) -> None:
    """Every audit record made under the exception: a table, then each record's detail
    (long, so below the table rather than in a column)."""
    gateway = [c for c in calls if c["event"] == "gateway.call"]
    refused = sum(1 for c in gateway if c["decision"] != "allow")
    console.print(
        f"{len(calls)} audit record(s) flagged with {escape(bg_id)}: "
        f"{len(gateway)} gateway call(s), {refused} not allowed"
    )
    if not calls:
        return
    table = Table(
        title=f"Under exception {escape(bg_id)}", title_justify="left", header_style="bold cyan"
    )
    for name in ("seq", "time", "event", "decision", "call", "task"):
        table.add_column(name, overflow="fold")
    for c in calls:
        table.add_row(
            str(c["seq"]),
            _time(str(c["time"])),
            escape(str(c["event"])),
            _outcome(c),
            escape(_call(c)),
            escape(str(c.get("task") or "")),
        )
    console.print(table)
    for c in calls:
        if c.get("detail"):
            console.print(f"  [cyan]{c['seq']:>5}[/]  {escape(str(c['detail']))}")


@breakglass_app.command("grant")
def breakglass_grant(
    agent: str = typer.Argument(..., help="The agent's SPIFFE ID.", show_default=False),
    scope: list[str] = typer.Option(
        ...,
        "--scope",
        help="tool:tier beyond the agent's ceiling (e.g. deploy:admin); repeatable.",
        show_default=False,
    ),
    justification: str = typer.Option(
        ...,
        "--justification",
        help="Why (required; at least breakglass.min_justification characters, audited).",
        show_default=False,
    ),
    expires_in: str | None = typer.Option(
        None,
        "--expires-in",
        help=(
            "How long it lasts: seconds (3600) or 30m, 2h, 1h30m, 1d; at most "
            "breakglass.max_duration_seconds. Default: breakglass.default_duration_seconds."
        ),
        show_default=False,
    ),
    as_owner: str = typer.Option(
        ...,
        "--as-owner",
        help="The owner id of the admin granting it (an owner with the admin role).",
        show_default=False,
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Grant an agent a temporary exception beyond its ceiling (every use is flagged)."""
    body: dict[str, Any] = {
        "agent": agent,
        "scopes": [parse_scope(item) for item in scope],
        "justification": justification,
        "as_owner": as_owner,
    }
    if expires_in is not None:
        body["expires_in_seconds"] = parse_duration(expires_in)
    data = AdminClient(url, token).post("/v1/admin/breakglass", json=body)
    if as_json:
        return print_json(data)
    console.print(
        f"[bold red]granted[/] {escape(data['id'])}: every use is flagged in the audit; it "
        f"ends by itself at its expiry, or sooner with `taskbound breakglass end "
        f"{escape(data['id'])} --as-owner …`"
    )
    _describe(data)


@breakglass_app.command("list")
def breakglass_list(
    state: str | None = typer.Option(
        None,
        "--state",
        help=(
            "active (in force), review (ended, waiting for review; overdue ones too), "
            "overdue (waiting too long) or reviewed, as of now."
        ),
        show_default=False,
    ),
    agent: str | None = typer.Option(
        None, "--agent", help="Only exceptions of this agent (SPIFFE ID).", show_default=False
    ),
    limit: int = typer.Option(100, min=1, max=1000, help="The most to list."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List break-glass exceptions, newest first."""
    if state is not None and state not in STATES:
        fail(
            f"--state {state!r} must be one of {', '.join(STATES)}",
            code="invalid_request",
            exit_code=2,
        )
    params = {"limit": str(limit)}
    if state:
        params["state"] = state
    if agent:
        params["agent"] = agent
    data = AdminClient(url, token).get("/v1/admin/breakglass", params=params)
    if as_json:
        return print_json(data)
    # Ids fold rather than shorten: a person copies them into `show`, `end` and `review`.
    table = Table(title="Break-glass exceptions", title_justify="left", header_style="bold cyan")
    for name in ("id", "state", "agent", "scopes", "granted by", "until", "reviewed by"):
        table.add_column(name, overflow="fold")
    for bg in data["exceptions"]:
        table.add_row(
            escape(bg["id"]),
            _state(bg),
            escape(bg["agent"]),
            escape(_scopes(bg)),
            escape(bg["granted_by"]),
            _until(bg),
            escape(bg.get("reviewed_by") or ""),
        )
    console.print(table)


@breakglass_app.command("show")
def breakglass_show(
    bg_id: str = typer.Argument(..., metavar="ID", help="The exception's id (bg_…)."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one exception and every audit record made under it (its calls included)."""
    data = AdminClient(url, token).get(f"/v1/admin/breakglass/{_path(bg_id)}")
    if as_json:
        return print_json(data)
    _describe(data)
    _calls_table(data["id"], data.get("calls") or [])


@breakglass_app.command("end")
def breakglass_end(
    bg_id: str = typer.Argument(..., metavar="ID", help="The exception's id (bg_…)."),
    as_owner: str = typer.Option(
        ...,
        "--as-owner",
        help="The owner id of the person ending it (its granter, or an owner with the admin role).",
        show_default=False,
    ),
    reason: str = typer.Option(
        "", "--reason", help="Why it ends early (recorded and audited).", show_default=False
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """End an exception now; every credential relying on it is revoked at once."""
    data = AdminClient(url, token).post(
        f"/v1/admin/breakglass/{_path(bg_id)}/end",
        json={"as_owner": as_owner, "reason": reason},
    )
    if as_json:
        return print_json(data)
    console.print(
        f"[green]ended[/] {escape(data['id'])}: {data['credentials_revoked']} credential(s) "
        f"revoked; it now waits for review (`taskbound breakglass review {escape(data['id'])}`)"
    )


@breakglass_app.command("review")
def breakglass_review(
    bg_id: str = typer.Argument(..., metavar="ID", help="The exception's id (bg_…)."),
    as_owner: str = typer.Option(
        ...,
        "--as-owner",
        help="The owner id of the reviewer (the reviewer role; never the granter).",
        show_default=False,
    ),
    note: str = typer.Option(
        ...,
        "--note",
        help="What the review found (required; recorded and audited).",
        show_default=False,
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Sign off an ended exception (read its calls with `show` first)."""
    data = AdminClient(url, token).post(
        f"/v1/admin/breakglass/{_path(bg_id)}/review",
        json={"as_owner": as_owner, "note": note},
    )
    if as_json:
        return print_json(data)
    console.print(
        f"[green]reviewed[/] {escape(data['id'])} by {escape(data['reviewed_by'])} at "
        f"{data['reviewed_at']}"
    )

"""`taskbound report posture|usage|blast-radius|alignment`: what each agent was granted
against what it used, blanket-token findings, what a subject can reach now, and how the
deployment lines up with OWASP Top 10 for Agentic Applications, CSA MAESTRO and NIST AI
RMF (docs/reports.md). Asked of a server through the admin API.

Every command prints rich tables; ``--json`` prints the report as the server answers it
(the CONTRACT of taskbound.service.reports); ``--html FILE`` writes the self-contained
HTML report (charts included) to send on or print.

Exit codes: 0 when the report was made (an empty window included: it says so); 1 when the
server refuses (an unknown agent: ``not_found``; a policy set that does not load:
``policy_invalid``) or cannot be reached; 2 for bad local input (options, an unwritable
file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    err_console,
    fail,
    handled,
    print_json,
)
from taskbound.errors import InvalidRequest
from taskbound.service.report_html import percent, render_report, when_text
from taskbound.service.report_request import parse_time

report_app = typer.Typer(
    help=(
        "Posture and reports: granted vs used authority (usage), blanket-token findings "
        "(posture), what a subject can reach now (blast-radius), and framework alignment. "
        "As tables, --json, or a self-contained --html report."
    ),
    no_args_is_help=True,
)

_SEVERITY: Final = {"high": "bold red", "medium": "yellow", "low": "blue"}
_STATUS: Final = {
    "met": ("✓", "green", "met"),
    "partly_met": ("◐", "yellow", "partly met"),
    "not_met": ("✗", "bold red", "not met"),
}
_DECISIONS: Final = (
    ("allow", "green", "allowed"),
    ("deny", "red", "denied"),
    ("approval_required", "yellow", "approval required"),
    ("error", "magenta", "error"),
)
_FRAMEWORKS: Final = {
    "owasp_asi": "OWASP ASI",
    "maestro": "CSA MAESTRO",
    "nist_ai_rmf": "NIST AI RMF",
}
_BAR: Final = 24

SinceOption = typer.Option(
    None,
    "--since",
    help=(
        "Start of the window: RFC 3339 with a zone, a date (2025-03-01, UTC) or a duration "
        "ago (7d, 24h, 90m). Default: 30 days before --until."
    ),
    show_default=False,
)
UntilOption = typer.Option(
    None,
    "--until",
    help="End of the window (same forms; a date means the end of that day). Default: now.",
    show_default=False,
)
HtmlOption = typer.Option(
    None,
    "--html",
    help="Also write the self-contained HTML report (inline CSS and SVG charts) to FILE.",
    show_default=False,
    dir_okay=False,
)


def _bad_input(message: str) -> NoReturn:
    fail(message, code="invalid_request", exit_code=2)


def _window(since: str | None, until: str | None) -> dict[str, str]:
    """The window as absolute times (checked here: bad input exits 2 before any request)."""
    now = datetime.now(UTC)
    try:
        end = parse_time(until, "--until", now, end=True) if until else now
        out = {"until": end.isoformat()}
        if since:
            start = parse_time(since, "--since", now)
            if start >= end:
                _bad_input("--since must be before --until")
            out["since"] = start.isoformat()
    except InvalidRequest as exc:
        _bad_input(exc.detail)
    return out


def _fetch(kind: str, params: Mapping[str, str | None], url: str, token: str | None) -> Any:
    client = AdminClient(url, token)
    with handled():
        return client.get(
            f"/v1/admin/reports/{kind}", params={k: v for k, v in params.items() if v}
        )


def _emit(data: dict[str, Any], as_json: bool, html: Path | None, show: Any) -> None:
    if html is not None:
        try:
            html.write_text(render_report(data), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {html}: {exc.strerror}", code="unwritable_file", exit_code=2)
    if as_json:
        print_json(data)
    else:
        show(data)
    if html is not None:
        err_console.print(f"[green]wrote[/] the HTML report to {escape(str(html))}")


# --- shared pieces ---------------------------------------------------------------------


def _head(title: str, data: Mapping[str, Any]) -> None:
    parts = [f"[bold]{escape(title)}[/]"]
    window = data.get("window")
    if window:
        parts.append(f"{when_text(window['since'])} → {when_text(window['until'])}")
    subject = data.get("subject")
    if subject:
        parts.append(f"{escape(str(subject['type']))} {escape(str(subject['id']))}")
    if data.get("policy_version"):
        parts.append(f"policy {escape(str(data['policy_version']))}")
    parts.append(f"[dim]generated {when_text(data.get('generated_at'))}[/]")
    console.print("  ·  ".join(parts), soft_wrap=True)
    if data.get("empty"):
        console.print(
            "[bold yellow]no data in this window[/]: nothing was recorded between "
            f"{when_text(window['since'] if window else '')} and "
            f"{when_text(window['until'] if window else '')} — an absence of evidence, not a "
            "clean bill of health.",
            soft_wrap=True,
        )


def _scope(s: Mapping[str, Any]) -> str:
    action = f".{s['action']}" if s.get("action") else ""
    return f"{s['tool']}{action} ({s['tier']})"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold cyan")
    for name in columns:
        table.add_column(name, justify="right" if name in _NUMERIC else "left", overflow="fold")
    return table


_NUMERIC: Final = frozenset(
    {"granted", "used", "never used", "tasks", "calls", "denied", "agents", "reach",
     "allowed", "approval", "error", "actions"}
)  # fmt: skip


def _bar(used: int, granted: int, top: int) -> Text:
    """Granted as a bar, the used part solid: ``█████░░░░``."""
    size = round(_BAR * granted / top) if top else 0
    solid = round(_BAR * used / top) if top else 0
    solid = min(solid, size)
    return Text("█" * solid, style="green") + Text("░" * (size - solid), style="dim")


# --- usage -----------------------------------------------------------------------------


def _show_usage(data: dict[str, Any]) -> None:
    _head("Granted vs used", data)
    t = data["totals"]
    console.print(
        f"{t['agents']} agent(s), [bold]{t['over_granted_agents']}[/] over-granted · "
        f"{t['used_count']} of {t['granted_count']} granted actions used · "
        f"[bold]{percent(t['unused_share'])}[/] of authority never used · "
        f"{t['calls']} call(s), {t['denied_calls']} denied · {t['tasks']} task(s)",
        soft_wrap=True,
    )
    agents = data["agents"]
    if agents:
        top = max(int(a["granted_count"]) for a in agents)
        table = _table(
            "Per agent", "agent", "owner", "granted vs used", "granted", "used",
            "never used", "tasks", "calls", "denied",
        )  # fmt: skip
        for a in agents:
            share = percent(a["unused_share"])
            table.add_row(
                escape(str(a["agent"])),
                escape(str(a.get("owner") or "—")),
                _bar(int(a["used_count"]), int(a["granted_count"]), top),
                str(a["granted_count"]),
                str(a["used_count"]),
                f"[red]{share}[/]" if a["unused_share"] else share,
                str(a["tasks"]),
                str(a["calls"]),
                str(a["denied_calls"]),
            )
        console.print(table)
    timeline = data.get("timeline") or []
    if timeline:
        table = _table("Calls per day", "day", "allowed", "denied", "approval", "error")
        for day in timeline:
            table.add_row(
                str(day["day"]),
                f"[green]{day['allow']}[/]",
                f"[red]{day['deny']}[/]" if day["deny"] else "0",
                f"[yellow]{day['approval_required']}[/]" if day["approval_required"] else "0",
                f"[magenta]{day['error']}[/]" if day["error"] else "0",
            )
        console.print(table)
    mix = data.get("decision_mix") or {}
    console.print(
        "Decision mix: "
        + " · ".join(f"[{colour}]{label}[/] {mix.get(k, 0)}" for k, colour, label in _DECISIONS)
    )
    for a in agents:
        rec = a.get("recommendation")
        if not rec:
            continue
        console.print(f"\n[bold]Least privilege for[/] {escape(str(a['agent']))}", soft_wrap=True)
        ceiling = ", ".join(_scope(s) for s in rec["ceiling"]) or "nothing"
        console.print(f"  narrower ceiling: [green]{escape(ceiling)}[/]", soft_wrap=True)
        if rec["removed"]:
            removed = ", ".join(_scope(s) for s in rec["removed"])
            console.print(f"  remove: [red]{escape(removed)}[/]", soft_wrap=True)
        if rec["forbidden_actions"]:
            forbid = ", ".join(_scope(s) for s in rec["forbidden_actions"])
            console.print(f"  forbid: [red]{escape(forbid)}[/]", soft_wrap=True)
        if rec.get("diff"):
            console.print("  policy diff (check with `taskbound policy test`; --json has it all):")
            for line in str(rec["diff"]).splitlines():
                style = (
                    "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
                )
                console.print(f"    [{style}]{escape(line)}[/]", soft_wrap=True, highlight=False)
    owners = data.get("owners") or []
    if owners:
        table = _table("Per owner", "owner", "agents", "granted", "used", "never used")
        for o in owners:
            table.add_row(
                escape(str(o.get("owner") or "—")),
                str(o["agents"]),
                str(o["granted_count"]),
                str(o["used_count"]),
                percent(o["unused_share"]),
            )
        console.print(table)


@report_app.command("usage")
def report_usage(
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    agent: str | None = typer.Option(
        None, "--agent", help="Only this agent (SPIFFE ID).", show_default=False
    ),
    owner: str | None = typer.Option(
        None, "--owner", help="Only agents of this owner.", show_default=False
    ),
    html: Path | None = HtmlOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Granted vs used: per agent and owner, the (tool, tier, action) granted and used in
    the window, the share never used, and a least-privilege recommendation (a narrower
    ceiling and a Cedar policy diff to check with `taskbound policy test`)."""
    params = _window(since, until) | {"agent": agent, "owner": owner}
    _emit(_fetch("usage", params, url, token), as_json, html, _show_usage)


# --- posture ---------------------------------------------------------------------------


def _evidence(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{k}={_evidence(v)}" for k, v in sorted(value.items()))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_evidence(v) for v in value)
    return "none" if value is None else str(value)


def _show_posture(data: dict[str, Any]) -> None:
    _head("Posture findings", data)
    s = data["summary"]
    console.print(
        f"[bold red]{s['high']} high[/] · [yellow]{s['medium']} medium[/] · "
        f"[blue]{s['low']} low[/] · {s['total']} finding(s)"
    )
    findings = data["findings"]
    if not findings:
        if not data.get("empty"):
            console.print("[green]no finding[/] in this window for the configured thresholds")
        return
    table = _table("Findings", "severity", "finding", "subject", "what", "evidence")
    for f in findings:
        colour = _SEVERITY.get(str(f["severity"]), "")
        subject = f["subject"]
        table.add_row(
            f"[{colour}]{escape(str(f['severity']))}[/]" if colour else escape(str(f["severity"])),
            escape(str(f["code"])),
            escape(f"{subject['type']} {subject['id']}"),
            escape(str(f["message"])),
            f"[dim]{escape(_evidence(f.get('evidence')))}[/]",
        )
    console.print(table)


@report_app.command("posture")
def report_posture(
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    html: Path | None = HtmlOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Blanket-token findings by severity: ceilings spanning many tools or every tier,
    unused authority, tasks asking more than they use, long TTL caps, standing or
    unreviewed break-glass, shared upstream secrets, agents without an active owner."""
    _emit(_fetch("posture", _window(since, until), url, token), as_json, html, _show_posture)


# --- blast radius ----------------------------------------------------------------------


def _show_blast_radius(data: dict[str, Any]) -> None:
    _head("Blast radius", data)
    t = data["totals"]
    console.print(
        f"{t['actions']} action(s) on {t['tools']} tool(s) in reach now: {t['direct']} "
        f"direct, {t['through_delegation']} through delegation, "
        f"[bold red]{t['admin_tier']}[/] at the admin tier"
    )
    reach = data["reach"]
    later = sum(1 for x in reach if not x.get("reachable_now", True))
    if t.get("via_exception") or later:
        console.print(
            f"[bold red]{t.get('via_exception', 0)}[/] relying on a break-glass exception, "
            f"{later} not reachable now (only at other hours of the coming week)"
        )
    if not reach:
        console.print(f"this {escape(str(data['subject']['type']))} can reach nothing now")
    else:
        table = _table(
            "Reach", "tool", "tier", "action", "risk", "approval", "when", "break-glass", "via",
            "allowed by",
        )  # fmt: skip
        for x in reach:
            colour = _SEVERITY.get(str(x["risk"]), "")
            table.add_row(
                escape(str(x["tool"])),
                escape(str(x["tier"])),
                escape(str(x["action"])),
                f"[{colour}]{escape(str(x['risk']))}[/]" if colour else escape(str(x["risk"])),
                "[yellow]required[/]" if x["requires_approval"] else "no",
                "always"
                if x.get("always", True)
                else ("now" if x.get("reachable_now", True) else "[yellow]not now[/]"),
                f"[red]{escape(str(x['exception']))}[/]" if x.get("exception") else "—",
                escape(" → ".join(str(v) for v in x["via"])),
                escape(", ".join(str(p) for p in x["policies"])),
            )
        console.print(table)
    delegates = data.get("delegates") or []
    if delegates:
        table = _table("Delegates", "agent", "owner", "reach")
        for d in delegates:
            table.add_row(
                escape(str(d["agent"])), escape(str(d.get("owner") or "—")), str(d["reach_count"])
            )
        console.print(table)


@report_app.command("blast-radius")
def report_blast_radius(
    agent: str | None = typer.Option(
        None, "--agent", help="The agent (SPIFFE ID).", show_default=False
    ),
    task: str | None = typer.Option(None, "--task", help="The task (tsk_…).", show_default=False),
    credential: str | None = typer.Option(
        None, "--credential", help="The credential (its jti).", show_default=False
    ),
    html: Path | None = HtmlOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Everything one agent, task or credential (exactly one) can reach now, directly and
    through delegation, as (tool, tier, action) with the policies that allow it —
    computed from the registry and the policy set, not from logs."""
    subjects = {"agent": agent, "task": task, "credential": credential}
    if sum(1 for v in subjects.values() if v) != 1:
        _bad_input("name exactly one of --agent, --task, --credential")
    _emit(_fetch("blast-radius", subjects, url, token), as_json, html, _show_blast_radius)


# --- alignment -------------------------------------------------------------------------


def _mark(status: str) -> str:
    mark, colour, label = _STATUS.get(status, ("?", "", status))
    return f"[{colour}]{mark} {label}[/]" if colour else escape(f"{mark} {label}")


def _show_alignment(data: dict[str, Any]) -> None:
    _head("Framework alignment", data)
    s = data["summary"]
    console.print(
        f"{_mark('met')} {s['met']} · {_mark('partly_met')} {s['partly_met']} · "
        f"{_mark('not_met')} {s['not_met']}"
    )
    table = _table("Controls", "status", "control", "evidence", "frameworks")
    for c in data["controls"]:
        frameworks = "\n".join(
            f"{name}: {', '.join(c['frameworks'].get(key) or [])}"
            for key, name in _FRAMEWORKS.items()
            if c["frameworks"].get(key)
        )
        table.add_row(
            _mark(str(c["status"])),
            f"[bold]{escape(str(c['title']))}[/]\n[dim]{escape(str(c['id']))}[/]",
            escape("\n".join(str(e) for e in c["evidence"])),
            escape(frameworks),
        )
    console.print(table)
    by = data.get("by_framework") or {}
    table = _table("By framework", "framework", "item", "status")
    for key, name in _FRAMEWORKS.items():
        for item, status in (by.get(key) or {}).items():
            table.add_row(name, escape(str(item)), _mark(str(status)))
    if table.row_count:
        console.print(table)


@report_app.command("alignment")
def report_alignment(
    html: Path | None = HtmlOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Each taskbound control, from this deployment's live settings and evidence, marked
    met / partly met / not met and mapped to OWASP Top 10 for Agentic Applications
    (ASI01–ASI10), CSA MAESTRO layers and NIST AI RMF functions."""
    _emit(_fetch("alignment", {}, url, token), as_json, html, _show_alignment)

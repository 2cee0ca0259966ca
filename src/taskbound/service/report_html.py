"""The reports as HTML (docs/reports.md): one self-contained file per report — CSS inline,
charts as inline SVG drawn here on the server, no script, no external resource — that
reads well on screen, printed, and sent on by email; the web UI shows the same parts.

Nothing is computed here beyond layout: every number shown comes from the report dict of
the CONTRACT (taskbound.service.reports). Every value reaches the page through Jinja2's
autoescaping (agent ids, messages and evidence are data, never markup); chart geometry
is plain numbers and fixed colours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from jinja2 import Environment, PackageLoader, StrictUndefined

__all__ = [
    "COLOURS",
    "Chart",
    "agents_chart",
    "decision_chart",
    "install",
    "percent",
    "render_error",
    "render_report",
    "report_context",
    "timeline_chart",
]

#: Decision colours (presentation attributes: they survive mail clients and printing).
COLOURS: Final = {
    "allow": "#1e7b34",
    "deny": "#b3261e",
    "approval_required": "#c98a00",
    "error": "#6b4fa0",
}
DECISIONS: Final = ("allow", "deny", "approval_required", "error")
LABELS: Final = {
    "allow": "allowed",
    "deny": "denied",
    "approval_required": "approval required",
    "error": "error",
    "met": "met",
    "partly_met": "partly met",
    "not_met": "not met",
}
MARKS: Final = {"met": "✓", "partly_met": "◐", "not_met": "✗"}
FRAMEWORKS: Final = {
    "owasp_asi": "OWASP Top 10 for Agentic Applications",
    "maestro": "CSA MAESTRO",
    "nist_ai_rmf": "NIST AI RMF",
}
TITLES: Final = {
    "usage": "Granted vs used",
    "posture": "Posture findings",
    "blast_radius": "Blast radius",
    "alignment": "Framework alignment",
}
_GRANTED: Final = "#c9d2de"
_AXIS: Final = "#8a94a3"


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str  # the tooltip, and what a screen reader or a test reads
    cls: str = ""


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    anchor: str = "start"
    cls: str = ""
    size: int = 11


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Chart:
    """An SVG chart as plain shapes; the template draws them (escaped)."""

    id: str
    title: str
    width: int
    height: int
    rects: list[Rect] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (colour, label)


def _n(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else str(value)


def percent(value: Any) -> str:
    """A share in [0, 1] as a percentage, to one decimal place when it is not whole."""
    try:
        share = float(value) * 100
    except (TypeError, ValueError):
        return str(value)
    return f"{share:.0f}%" if abs(share - round(share)) < 0.05 else f"{share:.1f}%"


def when_text(value: Any) -> str:
    """An RFC 3339 time as ``YYYY-MM-DD HH:MM UTC``; anything else as it is."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value or "")
    if when.tzinfo is None:
        return str(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def timeline_chart(timeline: Sequence[Mapping[str, Any]]) -> Chart | None:
    """Stacked bars per day: allowed, denied, approval required (and errors when any)."""
    if not timeline:
        return None
    kinds = [d for d in DECISIONS if d != "error" or any(day.get("error") for day in timeline)]
    top = max(max(sum(int(day.get(k, 0)) for k in kinds) for day in timeline), 1)
    left, right, upper, lower = 44, 12, 24, 34
    plot_h = 180
    slot = max(min(48.0, 760 / len(timeline)), 6.0)
    width = int(left + right + slot * len(timeline))
    chart = Chart(
        "chart-timeline", "Calls per day by decision", max(width, 320), upper + plot_h + lower
    )
    chart.lines.append(Line(left, upper + plot_h, left + slot * len(timeline), upper + plot_h))
    chart.lines.append(Line(left, upper, left, upper + plot_h))
    chart.texts.append(Text(left - 6, upper + 4, _n(top), "end", "axis"))
    chart.texts.append(Text(left - 6, upper + plot_h, "0", "end", "axis"))
    every = max(1, round(len(timeline) / 12))
    for i, day in enumerate(timeline):
        x = left + i * slot + slot * 0.15
        bar_w = slot * 0.7
        y = float(upper + plot_h)
        total = 0
        for kind in kinds:
            count = int(day.get(kind, 0))
            total += count
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            chart.rects.append(
                Rect(
                    round(x, 2),
                    round(y, 2),
                    round(bar_w, 2),
                    round(h, 2),
                    COLOURS[kind],
                    f"{day['day']}: {count} {LABELS[kind]}",
                    f"day-bar decision-{kind}",
                )
            )
        if slot >= 22 and total:
            chart.texts.append(
                Text(round(x + bar_w / 2, 2), round(y - 4, 2), _n(total), "middle", "total")
            )
        if i % every == 0:
            label = str(day["day"])[5:]  # MM-DD: the window states the year
            chart.texts.append(
                Text(round(x + bar_w / 2, 2), upper + plot_h + 14, label, "middle", "axis")
            )
    chart.legend = [(COLOURS[k], LABELS[k]) for k in kinds]
    return chart


def agents_chart(agents: Sequence[Mapping[str, Any]]) -> Chart | None:
    """Per agent, a bar of the actions granted with the part used drawn over it."""
    if not agents:
        return None
    top = max(max(int(a["granted_count"]) for a in agents), 1)
    left, bar_max, row = 12, 520, 46
    chart = Chart("chart-agents", "Granted vs used actions per agent", 760, 12 + row * len(agents))
    for i, a in enumerate(agents):
        y = 12 + i * row
        granted, used = int(a["granted_count"]), int(a["used_count"])
        chart.texts.append(Text(left, y + 11, str(a["agent"]), "start", "agent-label"))
        g_w = bar_max * granted / top
        summary = (
            f"{a['agent']}: {used} of {granted} granted actions used, "
            f"{percent(a['unused_share'])} unused"
        )
        chart.rects.append(
            Rect(left, y + 16, round(max(g_w, 1), 2), 16, _GRANTED, summary, "agent-bar")
        )
        if used:
            chart.rects.append(
                Rect(
                    left,
                    y + 16,
                    round(bar_max * used / top, 2),
                    16,
                    COLOURS["allow"],
                    summary,
                    "agent-used",
                )
            )
        chart.texts.append(
            Text(
                round(left + max(g_w, 1) + 8, 2),
                y + 28,
                f"{used} / {granted} used · {percent(a['unused_share'])} unused",
                "start",
                "bar-value",
            )
        )
    chart.legend = [(COLOURS["allow"], "used"), (_GRANTED, "granted, never used")]
    return chart


def decision_chart(mix: Mapping[str, Any]) -> Chart | None:
    """The decision mix as one bar split by decision, each part with its count and share."""
    total = sum(int(mix.get(k, 0)) for k in DECISIONS)
    if not total:
        return None
    width, bar_w, left = 760, 736, 12
    chart = Chart("chart-decisions", "Decision mix", width, 40)
    x = float(left)
    for kind in DECISIONS:
        count = int(mix.get(kind, 0))
        if not count:
            continue
        w = bar_w * count / total
        chart.rects.append(
            Rect(
                round(x, 2),
                8,
                round(w, 2),
                24,
                COLOURS[kind],
                f"{count} {LABELS[kind]} ({percent(count / total)})",
                f"mix-part decision-{kind}",
            )
        )
        x += w
    chart.legend = [
        (COLOURS[k], f"{LABELS[k]}: {_n(mix.get(k, 0))} ({percent(int(mix.get(k, 0)) / total)})")
        for k in DECISIONS
        if k != "error" or mix.get(k)
    ]
    return chart


def _matrix(report: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """The alignment matrix's columns: each framework with its items, in report order."""
    by = report.get("by_framework") or {}
    columns = []
    for key in FRAMEWORKS:
        items = list((by.get(key) or {}).keys())
        for control in report.get("controls", []):
            for item in control.get("frameworks", {}).get(key, []):
                if item not in items:
                    items.append(item)
        if items:
            columns.append((key, items))
    return columns


def report_context(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the templates' report parts need beside the report itself (the charts)."""
    kind = report.get("kind")
    context: dict[str, Any] = {"r": report, "title": TITLES.get(str(kind), "Report")}
    if kind == "usage":
        context["charts"] = [
            c
            for c in (
                timeline_chart(report.get("timeline", [])),
                decision_chart(report.get("decision_mix", {})),
                agents_chart(report.get("agents", [])),
            )
            if c is not None
        ]
    elif kind == "alignment":
        context["matrix"] = _matrix(report)
    return context


def install(env: Environment) -> None:
    """The filters and constants the report templates use, on ``env``."""
    env.filters["n"] = _n
    env.filters["pct"] = percent
    env.filters["when"] = when_text
    env.filters["label"] = lambda v: LABELS.get(str(v), str(v).replace("_", " "))
    env.globals["MARKS"] = MARKS
    env.globals["FRAMEWORKS"] = FRAMEWORKS
    env.globals["COLOURS"] = COLOURS


_env: Environment | None = None


def _environment() -> Environment:
    global _env
    if _env is None:
        env = Environment(
            loader=PackageLoader("taskbound.ui", "templates"),
            autoescape=True,  # every template, whatever its name
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=StrictUndefined,
        )
        install(env)
        _env = env
    return _env


def _css() -> str:
    env = _environment()
    assert env.loader is not None
    return env.loader.get_source(env, "report.css")[0]


def render_report(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML document."""
    env = _environment()
    return env.get_template("report.html").render(css=_css(), error=None, **report_context(report))


def render_error(kind: str, code: str, detail: str) -> str:
    """A report that could not be made, as a self-contained HTML document that says so
    (never an empty report that would read as "all good")."""
    env = _environment()
    return env.get_template("report.html").render(
        css=_css(),
        r={"kind": kind},
        title=TITLES.get(kind, "Report"),
        error={"code": code, "detail": detail},
    )


#: The self-contained report allows nothing but its own inline style (no script at all).
REPORT_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


def html_headers(kind: str) -> dict[str, str]:
    """The headers of a self-contained report served over HTTP."""
    return {
        "Content-Security-Policy": REPORT_CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Content-Disposition": f'inline; filename="taskbound-{kind.replace("_", "-")}-report.html"',
    }

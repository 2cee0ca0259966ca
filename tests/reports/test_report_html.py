"""The HTML report from the samples (the CONTRACT's dicts): self-contained, every number
of the sample on the page, every value escaped, charts drawn from the data, an empty
window said to be empty, a report that could not be made said to have failed."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from taskbound.service.report_html import (
    agents_chart,
    decision_chart,
    render_error,
    render_report,
    timeline_chart,
)
from tests.reports.samples import (
    ALIGNMENT,
    BLAST_RADIUS,
    HOSTILE,
    POSTURE,
    SAMPLES,
    USAGE,
    empty_posture,
    empty_usage,
)


class Elements(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Elements:
    found = Elements()
    found.feed(page)
    return found


def text_of(page: str) -> str:
    return " ".join(" ".join(parse(page).text).split())


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_report_is_one_self_contained_file(kind: str) -> None:
    page = render_report(SAMPLES[kind])
    assert page.startswith("<!doctype html>") or page.lstrip().startswith("<!doctype html>")
    elements = parse(page)
    tags = {tag for tag, _ in elements.tags}
    assert "script" not in tags
    assert "link" not in tags  # the CSS is inline
    assert "style" in tags
    for tag, attrs in elements.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or not re.match(r"(https?:)?//", value), (tag, attrs)
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
    assert "@import" not in page
    assert "url(" not in page


def test_every_number_of_the_usage_sample_is_on_the_page() -> None:
    text = text_of(render_report(USAGE))
    t = USAGE["totals"]
    for label, value in [
        ("Agents", t["agents"]),
        ("Over-granted agents", t["over_granted_agents"]),
        ("Actions granted", t["granted_count"]),
        ("Actions used", t["used_count"]),
        ("Authority never used", "50%"),
        ("Calls", t["calls"]),
        ("Denied calls", t["denied_calls"]),
        ("Tasks", t["tasks"]),
    ]:
        assert f"{label} {value}" in text
    for a in USAGE["agents"]:
        row = (
            f"{a['agent']} {a['owner']} {a['state']} {a['granted_count']} {a['used_count']} "
            f"{round(a['unused_share'] * 100)}% {a['tasks']} {a['calls']} {a['denied_calls']}"
        )
        assert row in text
        for u in a["used"]:
            assert f"{u['tool']} {u['tier']} {u['action']} {u['calls']}" in text
    assert "2025-03-30 16:02 UTC" in text  # last used
    for d in USAGE["timeline"]:
        assert f"{d['day']} {d['allow']} {d['deny']} {d['approval_required']} {d['error']}" in text
    assert "allowed 58 · denied 8 · approval required 3 · error 1" in text
    for o in USAGE["owners"]:
        assert f"{o['owner']} {o['agents']} {o['granted_count']} {o['used_count']}" in text
    # The recommendation: ceiling, what goes, and the policy diff and test cases verbatim.
    assert "narrow the ceiling to issues read ; remove issues write , issues admin" in text
    rec = USAGE["agents"][0]["recommendation"]
    page = render_report(USAGE)
    for part in ("cedar", "cases_yaml", "diff"):
        assert _escaped(rec[part]) in page
    assert "2025-03-01 00:00 UTC" in text
    assert "2025-03-31 00:00 UTC" in text


def _escaped(value: str) -> str:
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("'", "&#39;")
    )


def test_the_charts_are_drawn_from_the_data() -> None:
    timeline = timeline_chart(USAGE["timeline"])
    assert timeline is not None
    titles = [r.title for r in timeline.rects]
    # One segment per non-zero count, each titled with its day and number.
    expected = [
        f"{d['day']}: {d[k]} {label}"
        for d in USAGE["timeline"]
        for k, label in (
            ("allow", "allowed"),
            ("deny", "denied"),
            ("approval_required", "approval required"),
            ("error", "error"),
        )
        if d[k]
    ]
    assert titles == expected
    totals = [t.text for t in timeline.texts if t.cls == "total"]
    assert totals == ["18", "30", "22"]
    # Heights are proportional to the counts: the tallest day fills the plot.
    tallest = sum(r.height for r in timeline.rects if r.title.startswith("2025-03-29"))
    assert tallest == pytest.approx(180, abs=0.05)

    agents = agents_chart(USAGE["agents"])
    assert agents is not None
    bars = [r for r in agents.rects if r.cls == "agent-bar"]
    assert len(bars) == len(USAGE["agents"])
    assert bars[0].title.endswith("1 of 4 granted actions used, 75% unused")
    used = [r for r in agents.rects if r.cls == "agent-used"]
    assert [round(r.width / bars[0].width, 4) for r in used] == [0.25, 0.5]

    mix = decision_chart(USAGE["decision_mix"])
    assert mix is not None
    assert [r.title for r in mix.rects] == [
        "58 allowed (82.9%)",
        "8 denied (11.4%)",
        "3 approval required (4.3%)",
        "1 error (1.4%)",
    ]
    assert sum(r.width for r in mix.rects) == pytest.approx(736, abs=0.05)


def test_the_charts_are_inline_svg_with_the_numbers_in_their_titles() -> None:
    page = render_report(USAGE)
    svgs = re.findall(r"<svg xmlns=.*?</svg>", page, re.S)
    assert len(svgs) == 3
    assert page.count('class="agent-bar"') == 2
    assert "<title>2025-03-29: 25 allowed</title>" in page
    assert "<title>58 allowed (82.9%)</title>" in page


def test_posture_findings_by_severity_with_their_evidence() -> None:
    page = render_report(POSTURE)
    text = text_of(page)
    assert "High 2" in text
    assert "Medium 1" in text
    assert "Low 1" in text
    assert "Findings 4" in text
    rows = re.findall(r'<tr class="finding sev-(\w+)">', page)
    assert rows == ["high", "high", "medium", "low"]
    for f in POSTURE["findings"]:
        assert f["code"] in text
    assert "max_ttl_seconds 86400" in text
    assert "threshold_seconds 3600" in text
    assert "granted_count 4" in text
    assert "unused_share 0.75" in text


def test_blast_radius_reach_and_delegates() -> None:
    text = text_of(render_report(BLAST_RADIUS))
    t = BLAST_RADIUS["totals"]
    assert f"Actions in reach {t['actions']} Tools {t['tools']} Direct {t['direct']}" in text
    assert f"Through delegation {t['through_delegation']} Admin tier {t['admin_tier']}" in text
    assert (
        "deploy admin release high required not now — spiffe://taskbound.local/agents/bot → "
        "spiffe://taskbound.local/agents/triage default/admin-needs-approval"
    ) in text
    assert "issues read list low no always — spiffe://taskbound.local/agents/bot default/read" in (
        text
    )
    assert "issues write comment medium no now bg-7 spiffe://" in text
    assert f"Via break-glass {t['via_exception']}" in text
    assert "spiffe://taskbound.local/agents/triage carol 1" in text
    assert "sha256:4f2a9c" in text


def test_alignment_controls_and_matrix() -> None:
    page = render_report(ALIGNMENT)
    text = text_of(page)
    assert "Met 1 Partly met 1 Not met 1" in text
    assert "✗ not met Short-lived, task-bound credentials" in text
    for c in ALIGNMENT["controls"]:
        for e in c["evidence"]:
            assert e in text
    matrix = page[page.index('id="matrix"') :]
    matrix = matrix[: matrix.index("</table>")]
    header = re.findall(r'<abbr title="([^"]+)">', matrix)
    assert header == [
        "ASI03", "ASI07", "ASI10", "L3 Agent frameworks", "L4 Deployment and infrastructure",
        "L5 Evaluation and observability", "GOVERN", "MANAGE", "MEASURE",
    ]  # fmt: skip
    rows = re.findall(r"<tr><th scope=\"row\">(.*?)</th>(.*?)</tr>", matrix, re.S)
    marks = {name: re.findall(r'<td class="cell">(?:<span class="status status-(\w+)")?', cells)
             for name, cells in rows}  # fmt: skip
    # DPoP maps to ASI03, ASI07, L4 and MANAGE.
    assert marks["Sender-constrained credentials (DPoP)"] == [
        "met", "met", "", "", "met", "", "", "met", "",
    ]  # fmt: skip
    overall = matrix[matrix.index('class="overall"') :]
    assert re.findall(r"status-(\w+)\"", overall) == [
        "not_met", "met", "partly_met", "not_met", "met", "partly_met",
        "partly_met", "not_met", "partly_met",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_markup_in_any_value_is_shown_as_text(kind: str) -> None:
    report: dict[str, Any] = {**SAMPLES[kind]}
    evil = "<script>alert(1)</script>"
    if kind == "usage":
        report["agents"] = [dict(a, agent=HOSTILE, owner=evil) for a in USAGE["agents"]]
    elif kind == "posture":
        report["findings"] = [
            dict(f, message=evil, evidence={"note": evil}) for f in POSTURE["findings"]
        ]
    elif kind == "blast_radius":
        report["subject"] = {"type": "agent", "id": HOSTILE}
        report["reach"] = [
            dict(x, via=[HOSTILE], policies=[evil], exception=evil) for x in BLAST_RADIUS["reach"]
        ]
    else:
        report["controls"] = [dict(c, title=evil, evidence=[evil]) for c in ALIGNMENT["controls"]]
    page = render_report(report)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in {tag for tag, _ in parse(page).tags}


def test_the_samples_agent_with_markup_is_escaped() -> None:
    page = render_report(POSTURE)
    assert "agents/&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "no accountable owner &lt;b&gt;named&lt;/b&gt;" in page
    assert "<script" not in page
    assert "<b>named" not in page


@pytest.mark.parametrize("report", [empty_usage(), empty_posture()], ids=["usage", "posture"])
def test_an_empty_window_says_so_and_never_all_good(report: dict[str, Any]) -> None:
    page = render_report(report)
    text = text_of(page)
    assert "No data in this window." in text
    assert "not a clean bill of health" in text
    assert "No finding" not in text
    assert "all good" not in text.replace('never "all good"', "")
    assert "<svg xmlns" not in page  # no chart of nothing


def test_a_posture_without_findings_in_a_window_with_data_says_so() -> None:
    report = dict(POSTURE, findings=[], summary={"high": 0, "medium": 0, "low": 0, "total": 0})
    text = text_of(render_report(report))
    assert "No finding in this window" in text
    assert "No data in this window" not in text


def test_a_report_that_could_not_be_made_says_why() -> None:
    page = render_error("posture", "policy_invalid", "the policy set failed to load: <x>")
    text = text_of(page)
    assert "This report could not be made." in text
    assert "policy_invalid the policy set failed to load: <x>" in text
    assert "&lt;x&gt;" in page
    assert "Findings" not in text
    assert "No data" not in text
    assert 'id="report-error-code"' in page

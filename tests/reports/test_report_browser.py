"""The self-contained HTML report of a test deployment in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright, no browser downloaded): fetched from the admin
API with the admin token, its charts' SVG shapes must show the deployment's data — one
granted-vs-used bar per agent, one stacked segment per day and decision with its count,
the decision mix — and nothing may reach outside the file. A screenshot of each report
(and a printed PDF of the usage report) is kept under ``$TASKBOUND_TEST_ARTIFACTS``
(default ``test-artifacts/reports/``).

Skipped when Chromium or Playwright is missing, failed instead with
``TASKBOUND_REQUIRE_SERVICES=1``."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from taskbound.service.report_html import percent
from tests.api.conftest import AGENT, Live
from tests.reports.deployment import CALLS, TRIAGE
from tests.ui.test_browser import chromium_path

try:
    from playwright.async_api import async_playwright
except ImportError:  # chromium_path() skips (or fails when required)
    async_playwright = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TASKBOUND_TEST_ARTIFACTS") or REPO / "test-artifacts" / "reports")
LABELS = {"allow": "allowed", "deny": "denied", "approval_required": "approval required"}


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def base(live: Live) -> str:
    """The server as the browser reaches it (its own port on loopback)."""
    return str(live.http.base_url).rstrip("/")


def expected_days(live: Live) -> dict[str, dict[str, int]]:
    """The calls per UTC day and decision, from the deployment's own records."""
    days: dict[str, dict[str, int]] = {}
    for offset, _agent, _action, _tier, decision, count in CALLS:
        day = (live.clock.now() + timedelta(days=offset)).date().isoformat()
        days.setdefault(day, {})
        days[day][decision] = days[day].get(decision, 0) + count
    return days


async def test_the_html_report_renders_the_deployments_data_in_chromium(
    deployment: Live, artifacts: Path
) -> None:
    executable = chromium_path()
    live = deployment
    r = await live.http.get("/v1/admin/reports/usage", headers=live.admin)
    assert r.status_code == 200, r.text
    usage: dict[str, Any] = r.json()
    assert {a["agent"] for a in usage["agents"]} == {AGENT, TRIAGE}
    assert async_playwright is not None
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            context = await browser.new_context(
                viewport={"width": 1200, "height": 900},
                extra_http_headers={"Authorization": f"Bearer {live.admin_token}"},
                java_script_enabled=False,  # the report has none; charts are drawn server-side
            )
            page = await context.new_page()
            outside: list[str] = []
            page.on(
                "request",
                lambda req: (
                    None if req.url.startswith(base(live) + "/") else outside.append(req.url)
                ),
            )
            response = await page.goto(f"{base(live)}/v1/admin/reports/usage?format=html")
            assert response is not None
            assert response.status == 200
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert outside == []  # self-contained: nothing fetched beside the page itself

            # Granted vs used: one bar per agent, titled with its numbers, widths in ratio.
            bars = page.locator("#chart-agents rect.agent-bar")
            assert await bars.count() == len(usage["agents"])
            widest = max(a["granted_count"] for a in usage["agents"])
            widths: list[float] = []
            for i, a in enumerate(usage["agents"]):
                title = await bars.nth(i).locator("title").text_content()
                assert title == (
                    f"{a['agent']}: {a['used_count']} of {a['granted_count']} granted actions "
                    f"used, {percent(a['unused_share'])} unused"
                )
                box = await bars.nth(i).bounding_box()
                assert box is not None
                assert box["height"] > 0
                widths.append(box["width"])
            used = page.locator("#chart-agents rect.agent-used")
            assert await used.count() == sum(1 for a in usage["agents"] if a["used_count"])
            labels = await page.locator("#chart-agents text.bar-value").all_text_contents()
            assert labels == [
                f"{a['used_count']} / {a['granted_count']} used · "
                f"{percent(a['unused_share'])} unused"
                for a in usage["agents"]
            ]
            for width, a in zip(widths, usage["agents"], strict=True):
                assert width / max(widths) == pytest.approx(a["granted_count"] / widest, abs=0.01)

            # Usage over time: one segment per day and decision, titled with its count, and
            # the segments of a day stacked to its total.
            segments = page.locator("#chart-timeline rect.day-bar")
            titles = [
                await segments.nth(i).locator("title").text_content()
                for i in range(await segments.count())
            ]
            days = expected_days(live)
            want = [
                f"{day}: {counts[k]} {LABELS[k]}"
                for day, counts in sorted(days.items())
                for k in ("allow", "deny", "approval_required")
                if counts.get(k)
            ]
            assert titles == want
            totals = await page.locator("#chart-timeline text.total").all_text_contents()
            assert totals == [str(sum(c.values())) for _, c in sorted(days.items())]
            heights = []
            for i in range(await segments.count()):
                box = await segments.nth(i).bounding_box()
                assert box is not None
                heights.append(box["height"])
            counts = [int(t.split(": ")[1].split()[0]) for t in titles if t]
            ratios = {round(h / c, 1) for h, c in zip(heights, counts, strict=True)}
            assert len(ratios) == 1  # heights proportional to the counts

            # The decision mix, with each decision's count.
            mix = usage["decision_mix"]
            parts = await page.locator("#chart-decisions rect.mix-part title").all_text_contents()
            assert [p.split(" (")[0] for p in parts] == [
                f"{mix[k]} {LABELS[k]}" for k in ("allow", "deny", "approval_required") if mix[k]
            ]
            assert await page.locator("script").count() == 0
            await page.screenshot(path=str(artifacts / "usage.png"), full_page=True)
            await page.emulate_media(media="print")
            await page.pdf(path=str(artifacts / "usage.pdf"), format="A4", print_background=True)
            await page.emulate_media(media="screen")

            for kind, query in (
                ("posture", ""),
                ("blast-radius", f"&agent={AGENT}"),
                ("alignment", ""),
            ):
                response = await page.goto(
                    f"{base(live)}/v1/admin/reports/{kind}?format=html{query}"
                )
                assert response is not None
                assert response.status == 200, kind
                assert await page.locator("p.error").count() == 0
                await page.screenshot(path=str(artifacts / f"{kind}.png"), full_page=True)
            # The alignment matrix: one row per control, plus the overall row.
            r = await live.http.get("/v1/admin/reports/alignment", headers=live.admin)
            controls = r.json()["controls"]
            assert await page.locator("#matrix tbody tr").count() == len(controls) + 1
            assert outside == []
        finally:
            await browser.close()
    assert (artifacts / "usage.png").stat().st_size > 10_000

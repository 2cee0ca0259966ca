"""The reports in the web UI (/ui/reports): behind sign-in, for reviewers and admins, the
same report parts as the HTML report, a download of the self-contained file, and a report
that cannot be made shown with its reason in place."""

from __future__ import annotations

import html
import re

import pytest

from tests.api.conftest import Live
from tests.reports.conftest import fake
from tests.reports.samples import BOT, HOSTILE, FakeReports
from tests.ui.conftest import Browser, add_people


async def signed_in(live: Live, owner: str) -> Browser:
    await add_people(live)
    b = Browser(live)
    r = await b.sign_in(owner)
    assert r.status_code == 303, r.text
    return b


async def test_reports_need_a_session_and_an_oversight_role(server: Live) -> None:
    r = await Browser(server).get("/ui/reports/usage")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=%2Fui%2Freports%2Fusage"
    b = await signed_in(server, "carol")  # approver only
    r = await b.get("/ui/reports/usage")
    assert r.status_code == 403
    assert "role_required" in r.text
    assert fake(server).calls == []


@pytest.mark.parametrize("owner", ["erin", "frank"])  # admin, reviewer
async def test_the_index_is_linked_from_the_navigation(server: Live, owner: str) -> None:
    b = await signed_in(server, owner)
    r = await b.get("/ui/approvals")
    assert '<a href="/ui/reports">Reports</a>' in r.text
    r = await b.get("/ui/reports")
    assert r.status_code == 200
    for kind in ("posture", "usage", "blast-radius", "alignment"):
        assert f'href="/ui/reports/{kind}"' in r.text


async def test_the_usage_page_shows_the_report(server: Live) -> None:
    b = await signed_in(server, "frank")
    r = await b.get("/ui/reports/usage?since=7d&agent=" + BOT)
    assert r.status_code == 200, r.text
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    page = r.text
    assert '<link rel="stylesheet" href="/ui/static/report.css">' in page
    assert "<script" not in page
    assert page.count('class="agent-bar"') == 2
    assert "<title>2025-03-29: 25 allowed</title>" in page
    assert 'id="agents"' in page
    assert 'id="timeline"' in page
    assert f'value="{BOT}"' in page  # the filter kept
    assert fake(server).calls[-1][1]["agent"] == BOT
    download = re.search(r'<a class="button" href="([^"]+)">Download HTML</a>', page)
    assert download
    r = await b.get(html.unescape(download.group(1)))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-disposition"].startswith("attachment;")
    assert "style-src 'unsafe-inline'" in r.headers["content-security-policy"]
    assert r.text.lstrip().startswith("<!doctype html>")
    css = await b.get("/ui/static/report.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


async def test_posture_blast_radius_and_alignment_pages(server: Live) -> None:
    b = await signed_in(server, "erin")
    r = await b.get("/ui/reports/posture")
    assert r.status_code == 200
    assert re.findall(r'<tr class="finding sev-(\w+)">', r.text) == [
        "high",
        "high",
        "medium",
        "low",
    ]
    assert "agents/&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert HOSTILE not in r.text
    r = await b.get("/ui/reports/blast-radius")
    assert r.status_code == 200
    assert "Name one agent, task or credential" in r.text
    assert 'id="reach"' not in r.text
    assert f'<option value="{BOT}">' in r.text  # the registry's agents offered
    r = await b.get("/ui/reports/blast-radius?agent=" + BOT)
    assert 'id="reach"' in r.text
    assert 'id="delegates"' in r.text
    r = await b.get("/ui/reports/alignment")
    assert 'id="matrix"' in r.text
    assert 'id="controls"' in r.text


async def test_a_report_that_cannot_be_made_says_why_in_place(server: Live) -> None:
    b = await signed_in(server, "frank")
    r = await b.get("/ui/reports/usage?agent=spiffe://x/agents/nobody")
    assert r.status_code == 404
    assert "This report could not be made." in r.text
    assert '<code id="report-error-code">not_found</code>' in r.text
    assert 'name="agent" value="spiffe://x/agents/nobody"' in r.text  # the form, to fix it
    r = await b.get("/ui/reports/posture?since=soon")
    assert r.status_code == 400
    assert "invalid_request" in r.text
    setattr(server.services, "reports", FakeReports(broken=True))  # noqa: B010
    r = await b.get("/ui/reports/alignment")
    assert r.status_code == 503
    assert "policy_invalid" in r.text
    assert "Download HTML" not in r.text
    r = await b.get("/ui/reports/nonsense")
    assert r.status_code == 404


async def test_an_empty_window_says_so(server: Live) -> None:
    setattr(server.services, "reports", FakeReports(empty=True))  # noqa: B010
    b = await signed_in(server, "frank")
    r = await b.get("/ui/reports/usage")
    assert r.status_code == 200
    assert "No data in this window." in r.text


async def test_the_real_reports_render_in_the_ui(deployment: Live) -> None:
    b = await signed_in(deployment, "frank")
    for kind, query in (
        ("usage", ""),
        ("posture", ""),
        ("blast-radius", "?agent=" + BOT),
        ("alignment", ""),
    ):
        r = await b.get(f"/ui/reports/{kind}{query}")
        assert r.status_code == 200, (kind, r.text)
        assert "This report could not be made" not in r.text
        assert "Download HTML" in r.text
    r = await b.get("/ui/reports/usage")
    assert r.text.count('class="agent-bar"') == 2

"""`taskbound report posture|usage|blast-radius|alignment` against a live server: rich
tables, --json (the report as is), --html (the self-contained report), bad local input
(exit 2 before any request) and the server's refusals (exit 1 with the stable code)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

from tests.api.conftest import Live
from tests.cli.test_revocation_cli import Run, runner
from tests.reports.conftest import fake
from tests.reports.samples import BOT, HOSTILE, SAMPLES, FakeReports

ARGS = {
    "posture": [],
    "usage": [],
    "blast-radius": ["--agent", BOT],
    "alignment": [],
}
KIND = {"posture": "posture", "usage": "usage", "blast-radius": "blast_radius"}
KIND["alignment"] = "alignment"


async def cli(live: Live, *args: str) -> Run:
    """The command against ``live``, printed on a wide terminal (no folded cells)."""
    from taskbound.cli import common
    from taskbound.cli.main import app

    env = {
        "TASKBOUND_URL": live.base,
        "TASKBOUND_ADMIN_TOKEN": live.admin_token,
        "COLUMNS": "250",
    }
    # The CLI's console was made at import, whatever the terminal then: widen it here.
    wide, was = common.console, common.console.width
    wide.width = 250
    try:
        result = await asyncio.to_thread(runner.invoke, app, list(args), env=env)
    finally:
        wide.width = was
    return Run(result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("kind", sorted(ARGS))
async def test_json_is_the_report_as_is(server: Live, kind: str) -> None:
    run = await cli(server, "report", kind, *ARGS[kind], "--json")
    assert run.code == 0, run.text
    assert run.json() == SAMPLES[KIND[kind]]


async def test_usage_tables_with_bars_and_the_recommendation(server: Live) -> None:
    run = await cli(server, "report", "usage", "--since", "7d", "--agent", BOT)
    assert run.code == 0, run.text
    text = run.text
    assert "2 agent(s), 1 over-granted" in text
    assert "3 of 6 granted actions used · 50% of authority never used" in text
    assert "66 call(s), 8 denied · 12 task(s)" in text
    # The bot's bar: granted 4 of the widest 4, one used.
    assert "██████░░░░░░░░░░░░░░░░░░" in run.stdout
    assert "Decision mix: allowed 58 · denied 8 · approval required 3 · error 1" in text
    assert "narrower ceiling: issues (read)" in text
    assert "remove: issues (write), issues (admin)" in text
    assert "forbid: issues.get (read)" in text
    assert '+forbid (principal == Agent::"spiffe://taskbound.local/agents/bot",' in text
    for day in SAMPLES["usage"]["timeline"]:
        assert day["day"] in text
    name, args = fake(server).calls[-1]
    assert name == "usage"
    assert args["agent"] == BOT
    assert args["until"] - args["since"] == timedelta(days=7)


async def test_posture_findings_by_severity(server: Live) -> None:
    run = await cli(server, "report", "posture", "--since", "2025-03-01", "--until", "2025-03-31")
    assert run.code == 0, run.text
    text = run.text
    assert "2 high · 1 medium · 1 low · 4 finding(s)" in text
    order = [text.index(code) for code in (
        "ceiling_spans_all_tiers", "ttl_cap_too_long", "unused_authority", "agent_owner_missing"
    )]  # fmt: skip
    assert order == sorted(order)
    # Markup in a value is printed as it is (never read as rich markup).
    assert HOSTILE in text
    assert "no accountable owner <b>named</b>" in text


async def test_blast_radius_and_alignment_tables(server: Live) -> None:
    run = await cli(server, "report", "blast-radius", "--agent", BOT)
    assert run.code == 0, run.text
    assert "3 action(s) on 2 tool(s) in reach now: 2 direct, 1 through delegation, 1 at" in (
        run.text
    )
    assert "default/admin-needs-approval" in run.text
    assert "1 relying on a break-glass exception, 1 not reachable now" in run.text
    assert "not now" in run.text
    assert "bg-7" in run.text
    run = await cli(server, "report", "alignment")
    assert run.code == 0, run.text
    assert "✓ met 1 · ◐ partly met 1 · ✗ not met 1" in run.text
    assert "Short-lived, task-bound credentials" in run.text
    assert "✗ not met" in run.text
    assert "◐ partly met" in run.text


@pytest.mark.parametrize("kind", sorted(ARGS))
async def test_html_writes_the_self_contained_report(
    server: Live, kind: str, tmp_path: Path
) -> None:
    out = tmp_path / f"{kind}.html"
    run = await cli(server, "report", kind, *ARGS[kind], "--html", str(out), "--json")
    assert run.code == 0, run.text
    assert json.loads(run.stdout) == SAMPLES[KIND[kind]]  # stdout stays pure JSON
    page = out.read_text(encoding="utf-8")
    assert page.lstrip().startswith("<!doctype html>")
    assert "<script" not in page
    assert "wrote the HTML report" in run.stderr


async def test_an_empty_window_says_so(server: Live) -> None:
    setattr(server.services, "reports", FakeReports(empty=True))  # noqa: B010
    run = await cli(server, "report", "usage")
    assert run.code == 0
    assert "no data in this window" in run.text
    run = await cli(server, "report", "posture")
    assert "no data in this window" in run.text
    assert "no finding" not in run.text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["usage", "--since", "last week"], "--since must be"),
        (["usage", "--until", "2025-03-01T00:00:00"], "needs a time zone"),
        (["posture", "--since", "2025-03-02", "--until", "2025-03-01"], "before --until"),
        (["blast-radius"], "exactly one of --agent, --task, --credential"),
        (["blast-radius", "--agent", BOT, "--task", "tsk_1"], "exactly one"),
    ],
)
async def test_bad_local_input_exits_2_before_any_request(
    server: Live, args: list[str], says: str
) -> None:
    run = await cli(server, "report", *args)
    assert run.code == 2, run.text
    assert "(invalid_request)" in run.stderr
    assert says in run.text
    assert "Traceback" not in run.text
    assert fake(server).calls == []


async def test_the_servers_refusals_exit_1_with_their_code(server: Live, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    run = await cli(
        server, "report", "usage", "--agent", "spiffe://x/agents/nobody", "--html", str(out)
    )
    assert run.code == 1
    assert "(not_found)" in run.stderr
    assert "no such agent" in run.text
    assert not out.exists()  # no report file for a report that was not made
    setattr(server.services, "reports", FakeReports(broken=True))  # noqa: B010
    run = await cli(server, "report", "alignment")
    assert run.code == 1
    assert "(policy_invalid)" in run.stderr


async def test_an_unwritable_html_file_exits_2(server: Live, tmp_path: Path) -> None:
    run = await cli(server, "report", "alignment", "--html", str(tmp_path / "no" / "r.html"))
    assert run.code == 2
    assert "(unwritable_file)" in run.stderr


async def test_a_missing_token_exits_2(server: Live) -> None:
    from typer.testing import CliRunner

    from taskbound.cli.main import app

    result = CliRunner().invoke(app, ["report", "posture", "--url", server.base], env={})
    assert result.exit_code == 2
    assert "invalid_admin_token" in result.stderr


def test_help_names_every_report() -> None:
    from typer.testing import CliRunner

    from taskbound.cli.main import app

    result = CliRunner().invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    for kind in ARGS:
        assert kind in result.stdout

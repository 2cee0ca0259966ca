"""`taskbound breakglass grant|list|show|end|review` against a live server (SQLite and
PostgreSQL): human and --json output, a gateway call flagged under an exception, the review
queue and overdue state, refusals printed with the server's stable code, and bad input
refused locally before anything is sent."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from typer.testing import CliRunner

from taskbound.cli.main import app
from tests.api.conftest import AGENT, Live

from .test_revocation_cli import OTHER, cli, column

runner = CliRunner()
JUSTIFICATION = "incident 42: the release pipeline is stuck and must be unblocked"
WIPE = "/issues/issues"  # the issues tool's admin-tier action (DELETE)


async def people(live: Live) -> None:
    """ada grants (admin, and a reviewer too), root is another admin, rita only reviews."""
    for owner_id, roles in (
        ("ada", ["admin", "reviewer"]),
        ("root", ["admin"]),
        ("rita", ["reviewer"]),
    ):
        r = await live.http.post(
            "/v1/admin/owners",
            json={"id": owner_id, "contact": f"{owner_id}@example.com", "roles": roles},
            headers=live.admin,
        )
        assert r.status_code == 201, r.text


async def grant(live: Live, *extra: str, scope: str = "issues:admin") -> str:
    run = await cli(
        live,
        "breakglass",
        "grant",
        AGENT,
        "--scope",
        scope,
        "--justification",
        JUSTIFICATION,
        "--as-owner",
        "ada",
        "--json",
        *extra,
    )
    assert run.code == 0, run.text
    return str(run.json()["id"])


async def wipe_under_exception(live: Live) -> str:
    """The agent starts a task relying on the exception and makes an admin-tier call (held
    for approval by the default pack); the task's id."""
    agent = await live.agent()
    r = await agent.start(
        intent={
            "purpose": "unblock the release",
            "constraints": {"org": "acme", "repo": "web", "tiers": ["admin"]},
        },
        scopes=[{"tool": "issues", "tier": "admin"}],
    )
    assert r.status_code == 201, r.text
    task = r.json()
    (credential,) = task["credentials"]
    token = credential["access_token"]
    headers = {
        "Authorization": f"DPoP {token}",
        "DPoP": agent.proof("DELETE", WIPE, access_token=token),
    }
    r = await live.http.delete(WIPE, headers=headers)
    assert (r.status_code, r.json()["code"]) == (403, "approval_required"), r.text
    return str(task["id"])


# --- help and local validation (no server) ----------------------------------------------


def test_help_texts() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "breakglass" in result.output
    result = runner.invoke(app, ["breakglass", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for word in ("grant", "list", "show", "end", "review", "flagged"):
        assert word in text, word
    expected = {
        "grant": ("--scope", "tool:tier", "--justification", "--expires-in", "30m", "--as-owner"),
        "list": ("--state", "active", "reviewed", "--agent", "--limit"),
        "show": ("audit record", "--json"),
        "end": ("revoked", "--as-owner", "--reason"),
        "review": ("never the granter", "--note"),
    }
    for command, words in expected.items():
        result = runner.invoke(app, ["breakglass", command, "--help"])
        assert result.exit_code == 0, command
        text = " ".join(result.output.split())
        for word in words:
            assert word in text, (command, word)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scope", "issues"], "must be tool:tier"),
        (["--scope", ":admin"], "must be tool:tier"),
        (["--scope", "issues:"], "must be tool:tier"),
        (["--scope", "issues:root"], "'root' is not a tier"),
        (["--scope", "issues:admin", "--expires-in", "soon"], "is not a duration"),
        (["--scope", "issues:admin", "--expires-in", "2w"], "is not a duration"),
        (["--scope", "issues:admin", "--expires-in", "-5"], "is not a duration"),
        (["--scope", "issues:admin", "--expires-in", "0m"], "longer than zero"),
    ],
)
def test_grant_refuses_bad_input_locally(args: list[str], message: str) -> None:
    # Nothing listens on the URL: a request would fail otherwise than with exit code 2.
    env = {"TASKBOUND_URL": "http://127.0.0.1:9", "TASKBOUND_ADMIN_TOKEN": "tbat_x"}
    argv = ["breakglass", "grant", AGENT, "--justification", JUSTIFICATION, "--as-owner", "ada"]
    result = runner.invoke(app, argv + args, env=env)
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "invalid_request" in text
    assert message in text


def test_list_refuses_an_unknown_state_locally() -> None:
    env = {"TASKBOUND_URL": "http://127.0.0.1:9", "TASKBOUND_ADMIN_TOKEN": "tbat_x"}
    result = runner.invoke(app, ["breakglass", "list", "--state", "late"], env=env)
    assert result.exit_code == 2
    assert "must be one of active, review, overdue, reviewed" in " ".join(result.stderr.split())


def test_durations() -> None:
    from taskbound.cli.breakglass import parse_duration

    cases = {"90": 90, "90s": 90, "30m": 1800, "2h": 7200, "1d": 86400, "1h30m": 5400, "2H": 7200}
    for text, seconds in cases.items():
        assert parse_duration(text) == seconds, text


# --- against a live server ----------------------------------------------------------------


async def test_grant_list_show_end_review(live: Live) -> None:
    await people(live)
    now = live.clock.now()
    run = await cli(
        live,
        "breakglass",
        "grant",
        AGENT,
        "--scope",
        "issues:admin",
        "--justification",
        JUSTIFICATION,
        "--expires-in",
        "2h",
        "--as-owner",
        "ada",
    )
    assert run.code == 0, run.text
    for text in ("granted bg_", "issues:admin", "active", JUSTIFICATION, "ada"):
        assert text in run.text, text
    listed = (await cli(live, "breakglass", "list", "--json")).json()["exceptions"]
    (first,) = listed
    assert first["id"] in run.text
    assert datetime.fromisoformat(first["expires_at"]) == now + timedelta(hours=2)

    # --json, another admin, the default expiry (breakglass.default_duration_seconds).
    now = live.clock.advance(60)
    run = await cli(
        live,
        "breakglass",
        "grant",
        AGENT,
        "--scope",
        "deploy:admin",
        "--justification",
        JUSTIFICATION,
        "--as-owner",
        "root",
        "--json",
    )
    assert run.code == 0, run.text
    second = run.json()
    assert (second["state"], second["agent"], second["granted_by"]) == ("active", AGENT, "root")
    assert second["scopes"] == [{"tool": "deploy", "tier": "admin"}]
    assert datetime.fromisoformat(second["expires_at"]) == now + timedelta(hours=1)
    assert second["ended_at"] is second["reviewed_by"] is None

    run = await cli(live, "breakglass", "list", "--state", "active")
    assert run.code == 0, run.text
    assert column(run.stdout, 0) == second["id"] + first["id"]  # newest first
    assert "active" in column(run.stdout, 1)
    active = (await cli(live, "breakglass", "list", "--state", "active", "--json")).json()
    assert [bg["id"] for bg in active["exceptions"]] == [second["id"], first["id"]]
    for state in ("review", "reviewed"):
        data = (await cli(live, "breakglass", "list", "--state", state, "--json")).json()
        assert data == {"exceptions": []}, state
    data = (await cli(live, "breakglass", "list", "--agent", OTHER, "--json")).json()
    assert data == {"exceptions": []}

    # A call under the exception is flagged with it.
    task_id = await wipe_under_exception(live)
    run = await cli(live, "breakglass", "show", first["id"])
    assert run.code == 0, run.text
    for text in (
        f"{first['id']} active",
        JUSTIFICATION,
        f"4 audit record(s) flagged with {first['id']}: 1 gateway call(s), 1 not allowed",
        "held for approval apr_",
    ):
        assert text in run.text, text
    # The grant, the credential issued under it, the approval the held call asked for, and
    # the call itself.
    assert column(run.stdout, 2) == (
        "breakglass.grantedcredential.issuedapproval.requestedgateway.call"
    )
    assert column(run.stdout, 3) == "allowinfoapproval_requiredapproval_required"
    assert column(run.stdout, 4) == "issues(admin)" + "issues.wipe(admin)" * 2  # folded
    assert column(run.stdout, 5) == task_id * 3
    shown = (await cli(live, "breakglass", "show", first["id"], "--json")).json()
    assert shown["id"] == first["id"]
    events = [c["event"] for c in shown["calls"]]
    assert events[0] == "breakglass.granted"
    assert "gateway.call" in events
    assert {c["exception"] for c in shown["calls"]} == {first["id"]}
    # The other exception has nothing but its grant.
    other = (await cli(live, "breakglass", "show", second["id"], "--json")).json()
    assert [c["event"] for c in other["calls"]] == ["breakglass.granted"]

    # End early: the task's credential relying on it is revoked.
    run = await cli(
        live, "breakglass", "end", first["id"], "--as-owner", "root", "--reason", "incident over"
    )
    assert run.code == 0, run.text
    assert f"ended {first['id']}: 1 credential(s) revoked" in run.text
    run = await cli(live, "breakglass", "show", first["id"])
    for text in (f"{first['id']} review", "ended by root", "reason: incident over"):
        assert text in run.text, text
    assert column(run.stdout, 2).endswith("gateway.callbreakglass.ended")
    waiting = (await cli(live, "breakglass", "list", "--state", "review", "--json")).json()
    assert [bg["id"] for bg in waiting["exceptions"]] == [first["id"]]

    run = await cli(
        live, "breakglass", "review", first["id"], "--as-owner", "rita", "--note", "wipe held"
    )
    assert run.code == 0, run.text
    assert f"reviewed {first['id']} by rita" in run.text
    data = (await cli(live, "breakglass", "show", first["id"], "--json")).json()
    assert (data["state"], data["reviewed_by"], data["review_note"]) == (
        "reviewed",
        "rita",
        "wipe held",
    )
    assert data["calls"][-1]["event"] == "breakglass.reviewed"
    run = await cli(live, "breakglass", "list", "--state", "reviewed")
    assert (column(run.stdout, 0), column(run.stdout, 6)) == (first["id"], "rita")

    # The other one ends by itself and, left unreviewed, becomes overdue.
    live.clock.set(now + timedelta(hours=1, days=3))
    run = await cli(live, "breakglass", "list", "--state", "review")
    assert (column(run.stdout, 0), column(run.stdout, 1)) == (second["id"], "overdue")
    run = await cli(live, "breakglass", "show", second["id"])
    assert "its review is overdue" in run.text
    metrics = (await live.http.get("/metrics")).text
    assert "taskbound_breakglass_reviews_overdue 1.0" in metrics
    run = await cli(
        live, "breakglass", "review", second["id"], "--as-owner", "ada", "--note", "fine", "--json"
    )
    assert run.code == 0, run.text
    assert run.json()["state"] == "reviewed"


async def test_refusals_print_the_code(live: Live) -> None:
    await people(live)

    async def refused(code: str, *args: str) -> None:
        run = await cli(live, "breakglass", *args)
        assert run.code == 1, (args, run.text)
        assert f"({code})" in run.text, (code, run.text)

    base = ["grant", AGENT, "--justification", JUSTIFICATION]
    await refused("role_required", *base, "--scope", "issues:admin", "--as-owner", "rita")
    await refused("role_required", *base, "--scope", "issues:admin", "--as-owner", "nobody")
    await refused("already_in_ceiling", *base, "--scope", "issues:write", "--as-owner", "ada")
    await refused("invalid_request", *base, "--scope", "nope:admin", "--as-owner", "ada")
    too_long = ["--scope", "issues:admin", "--as-owner", "ada", "--expires-in", "4h1s"]
    await refused("expiry_too_long", *base, *too_long)  # the default maximum is 4 hours
    await refused(
        "justification_too_short",
        "grant",
        AGENT,
        "--scope",
        "issues:admin",
        "--justification",
        "because",
        "--as-owner",
        "ada",
    )
    await refused("not_found", "show", "bg_nope")
    await refused("not_found", "end", "bg_nope", "--as-owner", "ada")

    bg = await grant(live)
    await refused("not_ended", "review", bg, "--as-owner", "rita", "--note", "too soon")
    await refused("role_required", "end", bg, "--as-owner", "rita")  # neither granter nor admin
    run = await cli(live, "breakglass", "end", bg, "--as-owner", "ada", "--json")
    assert run.code == 0, run.text
    assert (run.json()["state"], run.json()["credentials_revoked"]) == ("review", 0)
    await refused("already_ended", "end", bg, "--as-owner", "root")
    await refused("self_review_not_allowed", "review", bg, "--as-owner", "ada", "--note", "ok")
    await refused("review_note_required", "review", bg, "--as-owner", "rita", "--note", " ")
    await refused("role_required", "review", bg, "--as-owner", "root", "--note", "ok")
    run = await cli(live, "breakglass", "review", bg, "--as-owner", "rita")
    assert run.code == 2  # --note is required
    run = await cli(live, "breakglass", "review", bg, "--as-owner", "rita", "--note", "ok")
    assert run.code == 0, run.text
    await refused("already_reviewed", "review", bg, "--as-owner", "rita", "--note", "again")

    # Every refusal is audited.
    records = await live.services.storage.list_audit(limit=1000)
    codes = [e.code for _, e in records if e.event == "breakglass.refused"]
    assert "self_review_not_allowed" in codes
    assert "already_in_ceiling" in codes

"""The revocation commands against a live server: agent standing (suspend, quarantine,
resume, retire, also as the singular `agent`), credentials, key withdrawal, the revocation
log and the feed; human and --json output, confirmations and errors."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from taskbound.cli.main import app
from tests.api.conftest import AGENT, Live

runner = CliRunner()
OTHER = "spiffe://taskbound.local/agents/other"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        """Everything printed, on one line (rich wraps long lines at its width)."""
        return " ".join((self.stdout + " " + self.stderr).split())

    def json(self) -> Any:
        return json.loads(self.stdout)


async def cli(live: Live, *args: str, input: str | None = None) -> Run:
    env = {"TASKBOUND_URL": live.base, "TASKBOUND_ADMIN_TOKEN": live.admin_token}
    result = await asyncio.to_thread(runner.invoke, app, list(args), env=env, input=input)
    return Run(result.exit_code, result.stdout, result.stderr)


async def agent_state(live: Live, spiffe_id: str = AGENT) -> str:
    r = await live.http.get(f"/v1/admin/agents/{quote(spiffe_id, safe='')}", headers=live.admin)
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


async def start_task(live: Live) -> dict[str, Any]:
    r = await (await live.agent()).start()
    assert r.status_code == 201, r.text
    return dict(r.json())


async def task_state(live: Live, task_id: str) -> str:
    r = await live.http.get(f"/v1/tasks/{task_id}", headers=live.admin)
    return str(r.json()["state"])


def column(table: str, index: int) -> str:
    """The text of one column of a rich table's body, its folded lines joined."""
    rows = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    return "".join(cells[index].strip() for cells in rows)


# --- help ----------------------------------------------------------------------------------


def test_help_lists_the_new_groups_and_hides_the_singular() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [line.strip("│ ").split(" ", 1)[0] for line in result.output.splitlines()]
    assert {"agents", "credentials", "keys", "revocations"} <= set(commands)
    assert "agent" not in commands
    # Hidden, not absent.
    result = runner.invoke(app, ["agent", "--help"])
    assert result.exit_code == 0
    assert "suspend" in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["agents", "suspend"], ["SPIFFE", "--reason", "--json"]),
        (["agents", "quarantine"], ["--reason", "--json"]),
        (["agents", "resume"], ["revoked", "--json"]),
        (["agents", "retire"], ["final", "--yes", "--json"]),
        (["agent", "suspend"], ["--reason"]),
        (["credentials", "revoke"], ["derived", "--reason", "--json"]),
        (["keys", "withdraw"], ["compromised", "--yes", "--reason", "--json"]),
        (["revocations", "list"], ["--after", "--limit", "--json"]),
        (["revocations", "status"], ["stale", "--json"]),
    ],
)
def test_every_command_has_help(args: list[str], words: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    for word in words:
        assert word in result.output, (args, word)


# --- agents --------------------------------------------------------------------------------


async def test_suspend_and_resume(live: Live) -> None:
    first, second = await start_task(live), await start_task(live)
    live.clock.advance(1)
    run = await cli(live, "agents", "suspend", AGENT, "--reason", "incident 42")
    assert run.code == 0, run.text
    assert f"suspended {AGENT} (2 live tasks revoked)" in run.text
    assert await agent_state(live) == "suspended"
    assert await task_state(live, first["id"]) == "revoked"
    assert await task_state(live, second["id"]) == "revoked"

    run = await cli(live, "agents", "suspend", AGENT)
    assert run.code == 0, run.text
    assert f"already suspended {AGENT}" in run.text

    live.clock.advance(1)
    run = await cli(live, "agents", "resume", AGENT, "--json")
    assert run.code == 0, run.text
    data = run.json()
    assert (data["spiffe_id"], data["state"], data["changed"]) == (AGENT, "active", True)
    run = await cli(live, "agents", "resume", AGENT)
    assert f"already active {AGENT}" in run.text

    # The reason went to the log, with the admin token as the cause.
    run = await cli(live, "revocations", "list", "--json")
    agent_entries = [e for e in run.json()["revocations"] if e["kind"] == "agent"]
    assert [(e["state"], e["reason"]) for e in agent_entries] == [
        ("suspended", "incident 42"),
        ("active", "agent active"),
    ]
    assert all(e["cause"].startswith("admin:adm_") for e in agent_entries)


async def test_the_singular_and_quarantine(live: Live) -> None:
    await start_task(live)
    live.clock.advance(1)
    run = await cli(live, "agent", "quarantine", AGENT, "--reason", "odd calls")
    assert run.code == 0, run.text
    assert f"quarantined {AGENT} (1 live task revoked)" in run.text
    live.clock.advance(1)
    run = await cli(live, "agent", "suspend", AGENT, "--json")
    assert run.code == 0, run.text
    assert (run.json()["state"], run.json()["changed"]) == ("suspended", True)
    live.clock.advance(1)
    run = await cli(live, "agent", "resume", AGENT)
    assert run.code == 0, run.text
    assert f"resumed {AGENT}" in run.text
    live.clock.advance(1)
    run = await cli(live, "agent", "suspend", AGENT)
    assert f"suspended {AGENT} (0 live tasks revoked)" in run.text


async def test_retire_asks_first(live: Live) -> None:
    task = await start_task(live)
    live.clock.advance(1)
    run = await cli(live, "agents", "retire", AGENT, input="n\n")
    assert run.code == 1
    assert "final" in run.stderr
    assert "Aborted" in run.text
    assert await agent_state(live) == "active"
    assert await task_state(live, task["id"]) == "active"

    run = await cli(live, "agents", "retire", AGENT, "--reason", "decommissioned", input="y\n")
    assert run.code == 0, run.text
    assert f"retired {AGENT} (1 live task revoked; this is final)" in run.text
    assert await agent_state(live) == "retired"

    run = await cli(live, "agents", "resume", AGENT)
    assert run.code == 1
    assert "conflict" in run.stderr
    assert await agent_state(live) == "retired"
    run = await cli(live, "agents", "retire", AGENT, "--yes")
    assert run.code == 0, run.text
    assert f"already retired {AGENT}" in run.text


async def test_retire_with_yes_and_json(live: Live) -> None:
    run = await cli(
        live,
        "agents",
        "create",
        "--spiffe-id",
        OTHER,
        "--owner",
        "alice",
        "--ceiling",
        "issues:read",
    )
    assert run.code == 0, run.text
    run = await cli(live, "agents", "retire", OTHER, "--yes", "--json")
    assert run.code == 0, run.text
    assert run.stderr == ""  # no prompt
    data = run.json()
    assert (data["spiffe_id"], data["state"], data["changed"]) == (OTHER, "retired", True)
    assert await agent_state(live) == "active"  # only the one named


async def test_agent_errors(live: Live) -> None:
    run = await cli(live, "agents", "suspend", "spiffe://taskbound.local/agents/ghost")
    assert run.code == 1
    assert "not_found" in run.stderr
    run = await cli(live, "agents", "suspend", AGENT, "--reason", "x" * 501)
    assert run.code == 1
    assert await agent_state(live) == "active"
    run = await cli(live, "agents", "suspend")
    assert run.code == 2  # the SPIFFE ID is required


# --- credentials and keys ------------------------------------------------------------------


async def test_credentials_revoke(live: Live) -> None:
    task = await start_task(live)
    jti, other = (c["jti"] for c in task["credentials"])
    run = await cli(live, "credentials", "revoke", jti, "--reason", "leaked")
    assert run.code == 0, run.text
    assert f"revoked credential {jti}" in run.text
    run = await cli(live, "credentials", "revoke", jti)
    assert run.code == 0, run.text
    assert f"unchanged {jti} is unknown, expired or already revoked" in run.text
    run = await cli(live, "credentials", "revoke", "cred_nope", "--json")
    assert run.json() == {"jti": "cred_nope", "changed": False}
    run = await cli(live, "credentials", "revoke", other, "--json")
    assert run.json() == {"jti": other, "changed": True}

    r = await live.http.get(f"/v1/admin/tasks/{task['id']}/credentials", headers=live.admin)
    revoked = {c["jti"]: c for c in r.json()["credentials"]}
    assert all(c["revoked_at"] for c in revoked.values())
    assert await task_state(live, task["id"]) == "active"
    run = await cli(live, "revocations", "list", "--json")
    entries = run.json()["revocations"]
    assert [(e["kind"], e["subject"], e["reason"]) for e in entries] == [
        ("credential", jti, "leaked"),
        ("credential", other, "revoked by an admin"),
    ]


async def test_keys_withdraw(live: Live) -> None:
    task = await start_task(live)
    run = await cli(live, "keys", "list", "--json")
    (kid,) = [k["kid"] for k in run.json()["keys"] if k["purpose"] == "credentials"]

    # A kid is a base64url thumbprint: it may begin with "-", so it goes after "--".
    run = await cli(live, "keys", "withdraw", "--", kid, input="n\n")
    assert run.code == 1
    assert "Every credential it signed is revoked" in run.stderr
    run = await cli(live, "keys", "list", "--json")
    assert kid in {k["kid"] for k in run.json()["keys"]}

    run = await cli(live, "keys", "withdraw", "--reason", "compromised", "--", kid, input="y\n")
    assert run.code == 0, run.text
    assert f"withdrew key {kid} (2 credentials revoked)" in run.text
    run = await cli(live, "keys", "list", "--json")
    keys = [k for k in run.json()["keys"] if k["purpose"] == "credentials"]
    assert [k["state"] for k in keys] == ["active"]
    assert kid not in {k["kid"] for k in keys}
    assert await task_state(live, task["id"]) == "active"

    run = await cli(live, "keys", "withdraw", "--yes", "--", kid)
    assert run.code == 1
    assert "not_found" in run.stderr
    run = await cli(live, "keys", "withdraw", "--yes", "--", "-no-such-kid")
    assert run.code == 1
    assert "no signing key '-no-such-kid'" in run.text
    (new,) = [k["kid"] for k in keys]
    run = await cli(live, "keys", "withdraw", "--yes", "--json", "--", new)
    assert run.code == 0, run.text
    assert run.json() == {"kid": new, "credentials_revoked": 0}
    run = await cli(live, "revocations", "list", "--json")
    withdrawn = [e for e in run.json()["revocations"] if e["kind"] == "key"]
    assert [(e["subject"], e["reason"]) for e in withdrawn] == [
        (kid, "compromised"),
        (new, "signing key withdrawn"),
    ]


# --- the log and the feed ------------------------------------------------------------------


async def test_revocations_list_and_status(live: Live) -> None:
    feed = live.services.revocations
    feed.start()  # as the server's lifespan does (the test server runs without one)
    run = await cli(live, "revocations", "list")
    assert run.code == 0, run.text
    assert "Revocations" in run.text
    tasks = [await start_task(live) for _ in range(3)]
    for t in tasks:
        assert (await cli(live, "tasks", "revoke", t["id"], "--reason", "cleanup")).code == 0

    run = await cli(live, "revocations", "list", "--json")
    data = run.json()
    assert [e["seq"] for e in data["revocations"]] == [1, 2, 3]
    assert [e["subject"] for e in data["revocations"]] == [t["id"] for t in tasks]
    assert {e["kind"] for e in data["revocations"]} == {"task"}
    assert set(data["feed"]) == {"seq", "age_seconds", "stale", "entries"}

    run = await cli(live, "revocations", "list", "--after", "1", "--limit", "1")
    assert run.code == 0, run.text
    # One row, nothing cut short on an 80-column terminal (cells fold onto more lines).
    assert column(run.stdout, 0) == "2"
    assert column(run.stdout, 2) == "task"
    assert column(run.stdout, 3) == tasks[1]["id"]
    assert column(run.stdout, 5).startswith("admin:adm_")
    assert column(run.stdout, 6) == "cleanup"
    assert "more may follow: --after 2" in run.text
    run = await cli(live, "revocations", "list", "--after", "3")
    assert "more may follow" not in run.text
    run = await cli(live, "revocations", "list", "--limit", "0")
    assert run.code == 2

    for _ in range(500):  # the feed follows the log (polling, or notified on PostgreSQL)
        if feed.state.seq == 3:
            break
        await asyncio.sleep(0.02)
    run = await cli(live, "revocations", "status", "--json")
    assert run.code == 0, run.text
    status = run.json()
    assert (status["stale"], status["seq"], status["entries"]) == (False, 3, 3)
    assert 0 <= status["age_seconds"] < 5
    run = await cli(live, "revocations", "status")
    assert run.code == 0, run.text
    assert "current" in run.text
    assert re.search(r"\b3\b", run.stdout)

"""The README's main job: `taskbound serve --demo` runs the whole scenario against a real
server on SQLite, over real HTTP, in a subprocess with a fresh home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import free_port


def run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBOUND_")} | {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "COLUMNS": "160",
    }
    exe = Path(sys.executable).with_name("taskbound")
    return subprocess.run(
        [str(exe), "serve", "--demo", "--exit-after-demo", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_serve_demo_runs_the_scenario_and_exits(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for needle in (
        "granted issues:read",
        "granted issues:write actions comment, merge",
        "granted tracker:read",
        "denied deploy:admin: beyond_ceiling",
        "-> 200, 2 issues",
        "never the agent's credential",
        "refused a write outside the intent (repo payroll): 403 policy_denied",
        "refused the write credential used for a read",
        "tools/call search -> 2 issues in WEB",
        "refused a call outside the intent (project PAY): 403 policy_denied",
        "PUT merge -> held: approval_required",
        "bob approved (approved)",
        "re-sent the very same call -> 200 merged",
        "the same call once more is held again",
        "refused a replayed DPoP proof: 401",
        "the sub-agent lists the issues -> 200",
        "not the parent's",
        "(the delegated one too) introspect as active=false",
        "refused a tool call with a credential of the ended task: 401",
        "refused a call of the suspended agent's live task: 401",
        "audit records verify",
        "demo complete",
    ):
        assert needle in out, needle
    # First start made the SQLite database in the data dir and the KEK outside it.
    assert (tmp_path / "data" / "taskbound" / "taskbound.db").exists()
    kek = tmp_path / "config" / "taskbound" / "kek"
    assert kek.exists()
    assert oct(kek.stat().st_mode & 0o777) == "0o600"
    # Nothing secret in the logs, and no library noise either.
    assert "demo-upstream-secret" not in result.stderr
    assert "demo-tracker-key" not in result.stderr
    assert "Warning" not in result.stderr


def test_the_demo_runs_again_on_the_same_data_on_another_port(tmp_path: Path) -> None:
    """A second run keeps the first run's tools (their audiences never move) and uses ids
    of its own."""
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "demo complete" in second.stdout

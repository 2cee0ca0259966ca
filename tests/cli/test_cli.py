"""The CLI against a live server: help, registry, tasks, keys, JSON output, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from taskbound.cli.main import app
from tests.api.conftest import Live

runner = CliRunner()


async def cli(live: Live, *args: str) -> tuple[int, str]:
    env = {"TASKBOUND_URL": live.base, "TASKBOUND_ADMIN_TOKEN": live.admin_token}
    result = await asyncio.to_thread(runner.invoke, app, list(args), env=env)
    return result.exit_code, result.output


def test_help_lists_the_command_groups() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in (
        "serve",
        "apply",
        "owners",
        "agents",
        "tools",
        "tasks",
        "keys",
        "identity",
        "admin",
    ):
        assert group in result.output


async def test_registry_and_tasks_through_the_cli(live: Live, tmp_path: Path) -> None:
    code, out = await cli(
        live,
        "owners",
        "create",
        "--id",
        "carol",
        "--contact",
        "c@example.com",
        "--role",
        "reviewer",
    )
    assert code == 0, out
    code, out = await cli(live, "owners", "list", "--json")
    assert {o["id"] for o in json.loads(out)["owners"]} == {"alice", "bob", "carol"}
    code, out = await cli(
        live,
        "agents",
        "create",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--owner",
        "carol",
        "--ceiling",
        "issues:read",
    )
    assert code == 0, out
    code, out = await cli(live, "agents", "show", "spiffe://example.org/x")
    assert json.loads(out)["ceiling"] == [{"tool": "issues", "tier": "read"}]
    code, out = await cli(live, "tools", "list", "--json")
    assert "upstream-secret-never-returned" not in out
    code, out = await cli(live, "tools", "list")
    assert code == 0
    assert "issues" in out

    agent = await live.agent()
    task = (await agent.start()).json()
    code, out = await cli(live, "tasks", "list", "--json", "--state", "active")
    assert [t["id"] for t in json.loads(out)["tasks"]] == [task["id"]]
    code, out = await cli(live, "tasks", "show", task["id"])
    assert len(json.loads(out)["credentials"]) == 2
    code, out = await cli(live, "tasks", "revoke", task["id"], "--reason", "test")
    assert code == 0
    assert "revoked" in out
    code, out = await cli(live, "tasks", "revoke", task["id"])
    assert "unchanged" in out


async def test_apply_from_yaml_and_errors(live: Live, tmp_path: Path) -> None:
    doc = tmp_path / "reg.yaml"
    doc.write_text("owners:\n  - {id: zed, contact: z@example.com}\n")
    code, out = await cli(live, "apply", "-f", str(doc), "--dry-run")
    assert code == 0
    assert "would be created" in out
    code, out = await cli(live, "apply", "-f", str(doc), "--json")
    assert json.loads(out)["created"] == ["owner/zed"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("owners:\n  - {id: zed, contact: z@example.com, colour: blue}\n")
    code, out = await cli(live, "apply", "-f", str(bad))
    assert code == 1
    assert "unknown_field" in out
    code, out = await cli(live, "apply", "-f", str(tmp_path / "missing.yaml"))
    assert code == 2


async def test_keys_and_identity(live: Live) -> None:
    code, out = await cli(live, "keys", "list", "--json")
    before = {k["kid"] for k in json.loads(out)["keys"]}
    code, out = await cli(live, "keys", "rotate", "--json")
    assert code == 0
    new = json.loads(out)["kid"]
    code, out = await cli(live, "keys", "list", "--json")
    after = json.loads(out)["keys"]
    assert {k["kid"] for k in after} == before | {new}
    code, out = await cli(
        live, "identity", "mint", "--spiffe-id", "spiffe://taskbound.local/agents/bot"
    )
    assert code == 0
    assert out.count(".") == 2


async def test_missing_admin_token_is_a_clear_error(live: Live) -> None:
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        ["owners", "list"],
        env={"TASKBOUND_URL": live.base, "TASKBOUND_ADMIN_TOKEN": ""},
    )
    assert result.exit_code == 2
    assert "admin token is required" in result.output


def test_generate_kek_and_config_check(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "generate-kek"])
    assert result.exit_code == 0
    assert len(result.output.strip()) == 43
    cfg = tmp_path / "tb.toml"
    cfg.write_text("[server]\nprot = 1\n")
    result = runner.invoke(app, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 1
    assert "unknown key" in result.output


def test_admin_init_creates_one_hashed_token(tmp_path: Path) -> None:
    import hashlib

    from taskbound.storage import open_storage

    cfg = tmp_path / "tb.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    result = runner.invoke(app, ["admin", "init", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    token = json.loads(result.output)["token"]
    assert token.startswith("tbat_")
    again = runner.invoke(app, ["admin", "init", "--config", str(cfg)])
    assert again.exit_code == 1
    assert "exists already" in again.output
    forced = runner.invoke(app, ["admin", "init", "--config", str(cfg), "--force", "--json"])
    assert forced.exit_code == 0

    async def stored() -> list[str]:
        storage = await open_storage(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'taskbound.db'}")
        try:
            return [t.token_hash for t in await storage.list_admin_tokens()]
        finally:
            await storage.close()

    hashes = asyncio.run(stored())
    assert len(hashes) == 2
    assert hashlib.sha256(token.encode()).hexdigest() in hashes
    assert token not in (tmp_path / "data" / "taskbound.db").read_bytes().decode("latin-1")


def _pack(tmp_path: Path) -> Path:
    import shutil

    from taskbound.service.policy import default_policy_dir

    pack = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), pack)
    return pack


def test_policy_test_passes_on_the_default_pack_and_covers_every_policy(tmp_path: Path) -> None:
    pack = _pack(tmp_path)
    result = runner.invoke(
        app, ["policy", "test", str(pack / "tests"), "--policies", str(pack), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["failed"] == []
    assert report["passed"] >= 20
    assert report["uncovered"] == []


def test_policy_test_fails_when_a_decision_changes(tmp_path: Path) -> None:
    pack = _pack(tmp_path)
    (pack / "zz.cedar").write_text(
        '@id("no-reads")\nforbid (principal, action in Action::"read", resource);\n'
    )
    result = runner.invoke(app, ["policy", "test", str(pack / "tests"), "--policies", str(pack)])
    assert result.exit_code == 1
    assert "failed" in result.output


def test_policy_validate_names_file_and_line(tmp_path: Path) -> None:
    pack = _pack(tmp_path)
    registry = str(pack / "tests" / "registry.yaml")
    ok = runner.invoke(app, ["policy", "validate", "--policies", str(pack), "--registry", registry])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    (pack / "zz.cedar").write_text(
        "// a comment\n\npermit (principal, action, resource)\n  when { principal.nope };\n"
    )
    bad = runner.invoke(
        app, ["policy", "validate", "--policies", str(pack), "--registry", registry, "--json"]
    )
    assert bad.exit_code == 1
    problems = json.loads(bad.output)["problems"]
    # The line of the offending attribute, and the id of the policy it sits in.
    assert any(p.startswith("zz.cedar:4: [zz.cedar:3]") for p in problems), problems


def test_policy_explain_and_diff(tmp_path: Path) -> None:
    pack = _pack(tmp_path)
    cases = str(pack / "tests" / "cases.yaml")
    result = runner.invoke(
        app,
        ["policy", "explain", cases, "--name", "another repo is refused", "--policies", str(pack)],
    )
    assert result.exit_code == 0, result.output
    assert "repo-constraint-binds-arguments" in result.output
    assert "constraints.cedar" in result.output
    new = tmp_path / "proposed"
    import shutil

    shutil.copytree(pack, new)
    (new / "zz.cedar").write_text(
        '@id("no-reads")\nforbid (principal, action in Action::"read", resource);\n'
    )
    result = runner.invoke(
        app, ["policy", "diff", str(pack), str(new), "--cases", str(pack / "tests"), "--json"]
    )
    assert result.exit_code == 0, result.output
    changed = {c["name"] for c in json.loads(result.output)}
    assert "a read is allowed" in changed
    assert "a write is allowed when the intent allows writes" not in changed

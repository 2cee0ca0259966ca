"""`taskbound token keygen` and `taskbound token exchange` against a live server (SQLite and
PostgreSQL): the command makes both DPoP proofs from JWK files and prints the delegated
credential, which the server then knows as bound to the delegate's key, with the chain in
its `act` claim; refusals exit non-zero with the RFC error and issue nothing."""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskbound.cli.main import app
from taskbound.core.clock import FakeClock
from taskbound.core.keys import jwk_thumbprint, private_key_from_bytes, public_jwk
from tests.api.conftest import AGENT, Agent, Live

runner = CliRunner()
DELEGATE = "spiffe://taskbound.local/agents/helper"


@pytest.fixture
def clock() -> FakeClock:
    # The command signs its proofs with the wall clock; the server's must agree.
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(autouse=True)
def _in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def cli(*args: str, input: str | None = None) -> Any:
    return runner.invoke(app, list(args), input=input)


async def acli(live: Live, *args: str, input: str | None = None) -> Any:
    """The command in a thread (the server runs on this event loop)."""
    env = {"TASKBOUND_URL": live.base}
    return await asyncio.to_thread(runner.invoke, app, list(args), env=env, input=input)


async def setup(live: Live, tmp_path: Path) -> dict[str, Any]:
    """A task of AGENT whose key lives in parent.jwk; a registered delegate with its key in
    helper.jwk and its identity in helper.svid; the parent credential in parent.token."""
    r = await live.http.post(
        "/v1/admin/agents",
        json={
            "spiffe_id": DELEGATE,
            "owner": "alice",
            "ceiling": [{"tool": "issues", "tier": "read"}],
        },
        headers=live.admin,
    )
    assert r.status_code == 201, r.text
    for name in ("parent", "helper"):
        assert cli("token", "keygen", str(tmp_path / f"{name}.jwk")).exit_code == 0
    parent_key = private_key_from_bytes((tmp_path / "parent.jwk").read_bytes(), "EdDSA")
    agent = Agent(live, await live.identity(AGENT), parent_key)
    r = await agent.start()
    assert r.status_code == 201, r.text
    task = r.json()
    (read,) = [c for c in task["credentials"] if c["tier"] == "read"]
    (tmp_path / "parent.token").write_text(read["access_token"] + "\n")
    (tmp_path / "helper.svid").write_text(await live.identity(DELEGATE))
    return {"task": task["id"], "token": read["access_token"]}


ARGS = (
    "token",
    "exchange",
    "--subject-token",
    "parent.token",
    "--subject-key",
    "parent.jwk",
    "--actor-token",
    "helper.svid",
    "--actor-key",
    "helper.jwk",
)


async def introspect(live: Live, token: str) -> dict[str, Any]:
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def credentials(live: Live, task_id: str) -> list[str]:
    r = await live.http.get(f"/v1/admin/tasks/{task_id}/credentials", headers=live.admin)
    return [c["jti"] for c in r.json()["credentials"]]


def test_keygen_writes_a_private_jwk_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "k.jwk"
    result = cli("token", "keygen", str(path))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    jwk = json.loads(path.read_text())
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    key = private_key_from_bytes(path.read_bytes(), "EdDSA")
    assert result.stdout.strip() == key.kid == jwk_thumbprint(public_jwk(key))
    # Never overwritten by accident; --force replaces it, still private.
    again = cli("token", "keygen", str(path))
    assert again.exit_code == 2
    assert "exists" in again.output
    assert private_key_from_bytes(path.read_bytes(), "EdDSA").kid == key.kid
    path.chmod(0o644)
    assert cli("token", "keygen", str(path), "--force", "--alg", "ES256").exit_code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["crv"] == "P-256"
    assert cli("token", "keygen", str(tmp_path / "x"), "--alg", "HS256").exit_code == 2


async def test_exchange_prints_a_credential_bound_to_the_delegate(
    live: Live, tmp_path: Path
) -> None:
    t = await setup(live, tmp_path)
    result = await acli(live, *ARGS, "--scope", "list")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    info = await introspect(live, token)
    assert info["active"] is True
    assert (info["sub"], info["client_id"], info["act"]) == (AGENT, DELEGATE, {"sub": DELEGATE})
    helper = private_key_from_bytes((tmp_path / "helper.jwk").read_bytes(), "EdDSA")
    assert info["cnf"] == {"jkt": helper.kid}
    assert info["authorization_details"][0]["actions"] == ["list"]
    assert info["txn"] == t["task"]
    assert len(await credentials(live, t["task"])) == 3  # read, write, the delegated one


async def test_exchange_json_stdin_and_narrowing_options(live: Live, tmp_path: Path) -> None:
    t = await setup(live, tmp_path)
    args = [a if a != "parent.token" else "-" for a in ARGS]
    details = json.dumps([{"type": "taskbound_tool", "constraints": {"org": "acme"}}])
    result = await acli(
        live,
        *args,
        "--resource",
        "https://gw.example/issues",  # the tool's audience in the test registry
        "--audience",
        "issues",
        "--authorization-details",
        details,
        "--json",
        input=t["token"],
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["token_type"], body["scope"]) == ("DPoP", "issues:read")
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["authorization_details"][0]["constraints"]["org"] == "acme"
    assert (await introspect(live, body["access_token"]))["active"] is True


async def test_a_refused_exchange_exits_with_the_rfc_error(live: Live, tmp_path: Path) -> None:
    t = await setup(live, tmp_path)
    before = await credentials(live, t["task"])
    for extra, error in (
        (("--scope", "issues:write"), "invalid_scope"),
        (("--resource", "https://elsewhere.example/"), "invalid_target"),
    ):
        result = await acli(live, *ARGS, *extra)
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert error in result.stderr
    # The parent's proof made with another key is no consent.
    swapped = [{"parent.jwk": "helper.jwk", "helper.jwk": "parent.jwk"}.get(a, a) for a in ARGS]
    result = await acli(live, *swapped)
    assert result.exit_code == 1
    assert "invalid_request" in result.stderr
    assert await credentials(live, t["task"]) == before


async def test_bad_local_input_is_refused_before_any_request(live: Live, tmp_path: Path) -> None:
    t = await setup(live, tmp_path)
    before = await credentials(live, t["task"])
    (tmp_path / "bad.jwk").write_text('{"kty": "oct", "k": "AAAA"}')
    (tmp_path / "empty.token").write_text("\n")
    for args, message in (
        ([*ARGS, "--authorization-details", "{nope"], "not JSON"),
        ([{"helper.jwk": "bad.jwk"}.get(a, a) for a in ARGS], "supported"),
        ([{"helper.jwk": "missing.jwk"}.get(a, a) for a in ARGS], "cannot read"),
        ([{"parent.token": "empty.token"}.get(a, a) for a in ARGS], "does not hold"),
        ([{"parent.token": "-", "helper.svid": "-"}.get(a, a) for a in ARGS], "only one"),
        ([*ARGS, "--actor-token-type", "saml"], "jwt or id_token"),
    ):
        result = await acli(live, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()), (message, result.stderr)
    assert await credentials(live, t["task"]) == before


def test_token_is_a_command_group() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    assert "token" in result.output
    result = cli("token", "exchange", "--help")
    assert result.exit_code == 0
    assert "--subject-key" in result.output

"""`taskbound audit list|tail|export|verify|checkpoint|checkpoints|keys|archive`.

Against a live server (SQLite and PostgreSQL): filtered listing, tail and follow, JSON
Lines and OCSF export, verification by the server and offline, retention by archive (then
verification across the archive and a live export). Offline verification is also fed
tampered, malformed and hostile files (built here with the core's own chain functions, in
the exact export format): each is reported with its stable kind or code and the right exit
code, never a traceback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskbound.cli import audit as audit_cli
from taskbound.cli.main import app
from taskbound.core import audit
from taskbound.core.keys import PrivateKey, generate_key, public_jwk
from taskbound.core.model import AuditEvent
from tests.api.conftest import AGENT, Live

from .test_revocation_cli import OTHER, Run, cli, column

runner = CliRunner()
ISSUER = "https://broker.example"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def event(i: int, when: datetime = T0, **more: Any) -> AuditEvent:
    """A gateway call record, varied by ``i`` (odd: denied, every third: the other agent)."""
    fields: dict[str, Any] = {
        "time": when + timedelta(seconds=i),
        "event": "gateway.call",
        "decision": "deny" if i % 2 else "allow",
        "code": "policy_denied" if i % 2 else None,
        "agent": OTHER if i % 3 == 0 else AGENT,
        "owner": "alice",
        "task": f"tsk_{i % 2}",
        "tool": "issues",
        "action": "list_issues",
        "tier": "read",
        "policies": ("default/read",),
        "latency_ms": 1.25,
        "upstream_status": None if i % 2 else 200,
        "detail": f"call {i}",
    }
    fields.update(more)
    return AuditEvent(**fields)


async def append(live: Live, count: int, start: int = 1, **more: Any) -> None:
    events = [event(i, live.clock.now(), **more) for i in range(start, start + count)]
    await live.services.storage.append_audits(events)


async def head(live: Live) -> int:
    """The sequence number of the chain's last record."""
    return (await live.services.storage.audit_head())[0]


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.text, run.text


async def save_keys(live: Live, path: Path) -> Path:
    run = await cli(live, "audit", "keys", "--out", str(path))
    assert run.code == 0, run.text
    return path


async def export(live: Live, path: Path, *args: str) -> Path:
    run = await cli(live, "audit", "export", "--out", str(path), *args)
    assert run.code == 0, run.text
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def edited(path: Path, old: str, new: str) -> Path:
    """A copy of ``path`` with one text replaced."""
    tampered = Path(f"tampered-{path.name}")
    tampered.write_text(path.read_text().replace(old, new, 1))
    return tampered


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are named relative to the test's directory: the messages that name them stay
    short enough not to be wrapped."""
    monkeypatch.chdir(tmp_path)


# --- help and local validation (no server) ----------------------------------------------


def test_help_texts() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "audit" in result.output
    result = runner.invoke(app, ["audit", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for word in ("list", "tail", "export", "verify", "checkpoint", "keys", "archive"):
        assert word in text, word
    expected = {
        "list": ("--agent", "--task", "--owner", "--tool", "--decision", "--txn", "--exception"),
        "tail": ("--follow", "--interval", "--max-seconds", "--lines", "--since", "--until"),
        "export": ("--format", "jsonl", "ocsf", "--out", "--after"),
        "verify": ("--file", "--jwks", "--issuer", "OFFLINE", "malformed_export", "bad_jwks"),
        "checkpoint": ("head",),
        "keys": ("--out", "rotation"),
        "archive": ("--through", "--out", "--config", "--data-dir", "deletes"),
    }
    for command, words in expected.items():
        result = runner.invoke(app, ["audit", command, "--help"])
        assert result.exit_code == 0, command
        text = " ".join(result.output.split())
        for word in words:
            assert word in text, (command, word)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["list", "--until", "2025-01-01T00:00:00"], "needs a time zone"),
        (["tail", "--since", "5 minutes"], "is not a time"),
        (["export", "--format", "csv"], "must be jsonl or ocsf"),
        (["verify", "--jwks", "keys.json"], "give it with --file"),
        (["verify", "--file", "export.jsonl"], "--jwks is required"),
    ],
)
def test_bad_input_is_refused_locally(args: list[str], message: str) -> None:
    # Nothing listens on the URL: a request would fail otherwise than with exit code 2.
    env = {"TASKBOUND_URL": "http://127.0.0.1:9", "TASKBOUND_ADMIN_TOKEN": "tbat_x"}
    result = runner.invoke(app, ["audit", *args], env=env)
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "invalid_request" in text
    assert message in text


# --- list, tail ----------------------------------------------------------------------------


async def test_list_with_filters(live: Live) -> None:
    base = await head(live)  # what setting the server up recorded (registry, policy)
    await append(live, 9)
    run = await cli(live, "audit", "list", "--after", str(base), "--json")
    assert run.code == 0, run.text
    records = run.json()["records"]
    assert [r["seq"] for r in records] == [base + i for i in range(1, 10)]
    assert records[0]["detail"] == "call 1"

    run = await cli(live, "audit", "list", "--agent", OTHER, "--json")
    assert [r["detail"] for r in run.json()["records"]] == ["call 3", "call 6", "call 9"]
    run = await cli(live, "audit", "list", "--decision", "deny", "--task", "tsk_1", "--json")
    assert [r["seq"] - base for r in run.json()["records"]] == [1, 3, 5, 7, 9]
    run = await cli(live, "audit", "list", "--desc", "--limit", "2", "--json")
    assert [r["seq"] - base for r in run.json()["records"]] == [9, 8]
    run = await cli(live, "audit", "list", "--after", str(base + 7), "--json")
    assert [r["seq"] - base for r in run.json()["records"]] == [8, 9]
    since = (live.clock.now() + timedelta(seconds=8)).isoformat()
    run = await cli(live, "audit", "list", "--since", since, "--json")
    assert [r["seq"] - base for r in run.json()["records"]] == [8, 9]
    run = await cli(live, "audit", "list", "--tool", "nope", "--json")
    assert run.json()["records"] == []

    run = await cli(live, "audit", "list", "--after", str(base), "--limit", "3")
    assert run.code == 0, run.text
    assert "Audit records (3)" in run.text
    assert column(run.stdout, 0) == "".join(str(base + i) for i in (1, 2, 3))
    assert "deny:policy_denied" in column(run.stdout, 3)
    assert f"--after {base + 3} lists the next ones" in run.text


async def test_list_refusal_keeps_the_server_code(live: Live) -> None:
    env = {"TASKBOUND_URL": live.base, "TASKBOUND_ADMIN_TOKEN": "tbat_wrong"}
    result = await asyncio.to_thread(runner.invoke, app, ["audit", "list"], env=env)
    assert result.exit_code == 1
    assert "invalid_admin_token" in result.stderr


async def test_tail_shows_the_latest_then_follows(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await head(live)
    await append(live, 5)
    run = await cli(live, "audit", "tail", "-n", "2", "--json")
    assert run.code == 0, run.text
    assert [json.loads(line)["seq"] - base for line in run.stdout.splitlines()] == [4, 5]

    run = await cli(live, "audit", "tail", "-n", "3")
    assert run.code == 0, run.text
    assert [int(line.split()[0]) - base for line in run.stdout.splitlines()] == [3, 4, 5]
    assert "call 5" in run.text

    # The follower has shown its latest record (its second request) before more arrive:
    # waited for, not slept on, so that a loaded machine cannot reorder the two.
    shown = threading.Event()
    calls = 0
    get = audit_cli.AdminClient.get

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        answer = get(self, *args, **kwargs)
        calls += 1
        if calls == 2:
            shown.set()
        return answer

    monkeypatch.setattr(audit_cli.AdminClient, "get", counting)
    follow = asyncio.create_task(
        cli(
            live,
            "audit",
            "tail",
            "--follow",
            "--agent",
            AGENT,
            "-n",
            "1",
            "--interval",
            "0.1",
            "--max-seconds",
            "5",
            "--json",
        )
    )
    assert await asyncio.to_thread(shown.wait, 30)
    await append(live, 4, start=6)  # 6 (the other agent), 7, 8, 9 (the other agent)
    run = await follow
    assert run.code == 0, run.text
    seen = [json.loads(line)["seq"] - base for line in run.stdout.splitlines()]
    assert seen == [5, 7, 8]


# --- export, server verification, checkpoints, keys ------------------------------------


async def test_export_checkpoints_keys_and_verify(live: Live) -> None:
    base = await head(live)
    await append(live, 6)
    run = await cli(live, "audit", "checkpoint", "--json")
    assert run.code == 0, run.text
    point = run.json()
    assert (point["type"], point["seq"]) == ("checkpoint", base + 6)
    run = await cli(live, "audit", "checkpoint")
    assert run.code == 0, run.text
    assert f"checkpoint of record {base + 6}" in run.text  # the head has not moved
    await append(live, 2, start=7)
    last = base + 8
    run = await cli(live, "audit", "checkpoints", "--json")
    assert [c["seq"] for c in run.json()["checkpoints"]] == [base + 6]
    run = await cli(live, "audit", "checkpoints")
    assert "Audit checkpoints (1)" in run.text

    path = await export(live, Path("audit.jsonl"))
    items = lines(path)
    assert [i["type"] for i in items] == ["record"] * last + ["checkpoint"]
    assert items[-1]["jws"] == point["jws"]
    assert items[base]["record"]["detail"] == "call 1"

    run = await cli(live, "audit", "export")  # to stdout
    assert run.code == 0, run.text
    assert run.stdout == path.read_text()
    run = await cli(live, "audit", "export", "--format", "ocsf", "--after", str(base + 6))
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert [e["unmapped"]["chain"]["seq"] - base for e in events] == [7, 8]
    assert {e["class_uid"] for e in events} == {6003}

    run = await cli(live, "audit", "keys")
    assert run.code == 0, run.text
    kids = {k["kid"] for k in run.json()["keys"]}
    keys = await save_keys(live, Path("audit-jwks.json"))
    assert {k["kid"] for k in json.loads(keys.read_text())["keys"]} == kids

    run = await cli(live, "audit", "verify")
    assert run.code == 0, run.text
    assert "ok" in run.text
    assert f"{last} record(s)" in run.text
    run = await cli(live, "audit", "verify", "--json")
    assert run.json()["ok"] is True

    issuer = live.services.settings.issuer
    args = ["audit", "verify", "--file", str(path), "--jwks", str(keys)]
    run = await cli(live, *args, "--issuer", issuer)
    assert run.code == 0, run.text
    assert f"records 1..{last}" in run.text
    assert "1 checkpoint(s) verified" in run.text
    assert f"records {base + 7}..{last} come after the last checkpoint" in run.text
    run = await cli(live, *args, "--json")
    view = run.json()
    assert (view["ok"], view["records"], view["signed_through"]) == (True, last, base + 6)

    run = await cli(live, *args, "--issuer", "https://elsewhere.example")
    assert run.code == 1
    assert "bad_checkpoint_signature" in run.text
    assert "issuer mismatch" in run.text

    # One field edited in the real export: found, with its record and line.
    tampered = edited(path, '"detail":"call 4"', '"detail":"call 44"')
    run = await cli(live, "audit", "verify", "--file", str(tampered), "--jwks", str(keys))
    assert run.code == 1, run.text
    assert "BROKEN" in run.text
    assert f"edited at record {base + 4}" in run.text
    assert f"{tampered} line {base + 4}" in run.text


# --- offline verification of tampered and hostile files ---------------------------------


@dataclass
class Chain:
    """A synthetic export in the server's exact format: 8 records, checkpoints at 4 and 8."""

    records: list[audit.ChainRecord]
    checkpoints: list[audit.Checkpoint]
    key: PrivateKey

    def lines(self) -> list[str]:
        items = [r.line() for r in self.records] + [c.line() for c in self.checkpoints]
        return [json.dumps(i, separators=(",", ":")) for i in items]


def make_chain(count: int = 8, key: PrivateKey | None = None) -> Chain:
    key = key or generate_key("EdDSA")
    records = audit.chain(0, audit.GENESIS, [event(i) for i in range(1, count + 1)])
    points = [
        audit.sign_checkpoint(seq=n, head=records[n - 1].hash, time=T0, issuer=ISSUER, key=key)
        for n in (4, count)
    ]
    return Chain(records, points, key)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain()


@pytest.fixture
def jwks(chain: Chain) -> Path:
    path = Path("audit-jwks.json")
    path.write_text(json.dumps({"keys": [public_jwk(chain.key)]}))
    return path


def verify(*argv: str) -> Run:
    result = runner.invoke(app, ["audit", "verify", *argv])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    run = Run(result.exit_code, result.stdout, result.stderr)
    no_traceback(run)
    return run


def write(text: str | bytes, name: str = "export.jsonl") -> Path:
    path = Path(name)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_an_intact_export_verifies(chain: Chain, jwks: Path) -> None:
    path = write("\n".join(chain.lines()) + "\n")
    run = verify("--file", str(path), "--jwks", str(jwks), "--issuer", ISSUER)
    assert run.code == 0, run.text
    assert "records 1..8" in run.text
    assert "2 checkpoint(s) verified" in run.text
    assert "warning" not in run.text
    assert "note" not in run.text
    # Without the final newline, and with blank lines, it is the same export.
    path = write("\n\n".join(chain.lines()))
    assert verify("--file", str(path), "--jwks", str(jwks)).code == 0


def _edit(lines: list[str], index: int, change: Callable[[dict[str, Any]], None]) -> None:
    item = json.loads(lines[index])
    change(item)
    lines[index] = json.dumps(item, separators=(",", ":"))


def _rewrite_from(chain: Chain, seq: int) -> list[str]:
    """Records from ``seq`` on edited and re-hashed, every link kept: only the signed
    checkpoint at the head shows it."""
    records = chain.records[: seq - 1]
    prev = records[-1].hash
    for r in chain.records[seq - 1 :]:
        body = dict(r.body) | {"decision": "allow"}
        digest = audit.record_hash(r.seq, prev, body)
        records.append(audit.ChainRecord(r.seq, prev, digest, body))
        prev = digest
    return Chain(records, chain.checkpoints, chain.key).lines()


def _tamper(case: str, chain: Chain) -> list[str]:
    lines = chain.lines()  # records at indexes 0..7, checkpoints (4, 8) at 8 and 9
    if case == "edit":
        _edit(lines, 4, lambda i: i["record"].update(agent=OTHER))
    elif case == "delete":
        del lines[4]
    elif case == "delete_first":
        del lines[0]
    elif case == "swap":
        lines[3], lines[4] = lines[4], lines[3]
    elif case == "swap_first":
        lines[0], lines[1] = lines[1], lines[0]
    elif case == "duplicate":
        lines.insert(3, lines[2])
    elif case == "truncate":
        del lines[6:8]  # records 7 and 8 cut; the checkpoint of record 8 kept
    elif case == "rehash_one":
        _edit(lines, 4, lambda i: i["record"].update(decision="allow"))
        item = json.loads(lines[4])
        item["hash"] = audit.record_hash(item["seq"], item["prev"], item["record"])
        lines[4] = json.dumps(item)
    elif case == "rewrite_tail":
        lines = _rewrite_from(chain, 6)
    elif case == "checkpoint_line":
        _edit(lines, 9, lambda i: i.update(hash=chain.records[6].hash))
    elif case == "forged_checkpoint":
        other = make_chain(key=generate_key("EdDSA"))
        lines[9] = json.dumps(other.checkpoints[1].line())
    elif case == "unhashable":
        _edit(lines, 2, lambda i: i["record"].update(upstream_status=2**60))
    elif case == "not_a_body":
        _edit(lines, 2, lambda i: i["record"].pop("detail"))
    else:  # pragma: no cover
        raise AssertionError(case)
    return lines


@pytest.mark.parametrize(
    ("case", "kind", "seq", "line", "detail"),
    [
        ("edit", "edited", 5, 5, "record 5's content does not match its hash"),
        ("delete", "missing", 6, 5, "records 5..5 are missing"),
        ("delete_first", "missing", 2, 1, "records 1..1 are missing: no checkpoint pins record 1"),
        ("swap", "reordered", 5, 4, "record 5 comes before record 4"),
        ("swap_first", "reordered", 2, 1, "record 2 comes before record 1"),
        ("duplicate", "reordered", 3, 4, "record 3 comes after record 3"),
        ("truncate", "truncated", 7, 8, "the chain ends at 6"),
        ("rehash_one", "inserted", 6, 6, "record 6 does not link to its predecessor"),
        ("rewrite_tail", "checkpoint_mismatch", 8, 10, "not the one the checkpoint signed"),
        ("checkpoint_line", "checkpoint_mismatch", 8, 10, "its signature is over record 8"),
        ("forged_checkpoint", "bad_checkpoint_signature", None, 10, "unknown kid"),
        ("unhashable", "malformed", 3, 3, "exceeds safe integer domain"),
        ("not_a_body", "malformed", 3, 3, "is not a record of format 1"),
    ],
)
def test_tampering_is_found(
    chain: Chain,
    jwks: Path,
    case: str,
    kind: str,
    seq: int | None,
    line: int,
    detail: str,
) -> None:
    path = write("\n".join(_tamper(case, chain)) + "\n")
    run = verify("--file", str(path), "--jwks", str(jwks), "--json")
    assert run.code == 1, run.text
    problem = run.json()["problem"]
    assert (problem["kind"], problem["seq"], problem["line"]) == (kind, seq, line), problem
    assert detail in problem["detail"]
    assert problem["file"] == str(path)
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 1
    assert f"BROKEN: {path}: {kind}" in run.text
    assert f"{path} line {line}" in run.text


def test_a_key_that_did_not_sign_is_a_bad_signature(chain: Chain, jwks: Path) -> None:
    path = write("\n".join(chain.lines()) + "\n")
    other = Path("other.json")
    other.write_text(json.dumps({"keys": [public_jwk(generate_key("EdDSA"))]}))
    run = verify("--file", str(path), "--jwks", str(other))
    assert run.code == 1
    assert "bad_checkpoint_signature" in run.text
    assert "unknown kid" in run.text
    # Another key published under the signing key's kid: the signature does not hold.
    impostor = public_jwk(generate_key("EdDSA")) | {"kid": chain.key.kid}
    other.write_text(json.dumps({"keys": [impostor]}))
    run = verify("--file", str(path), "--jwks", str(other))
    assert run.code == 1
    assert "bad_checkpoint_signature" in run.text
    assert "bad signature" in run.text
    # Keys saved over time may be given together (a rotation).
    run = verify("--file", str(path), "--jwks", str(jwks), "--jwks", "k2.json")
    assert run.code == 2
    assert "unreadable_file" in run.text
    Path("k2.json").write_text(json.dumps({"keys": [public_jwk(generate_key("ES256"))]}))
    assert verify("--file", str(path), "--jwks", str(jwks), "--jwks", "k2.json").code == 0


def test_an_export_without_checkpoints_verifies_with_a_warning(chain: Chain, jwks: Path) -> None:
    path = write("\n".join(chain.lines()[:8]) + "\n")
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 0, run.text
    assert "warning" in run.text
    assert "no checkpoint" in run.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
        (b"\x00\x01\x02 junk", "not a JSON object"),
        (b"[1, 2, 3]\n", "not a JSON object"),
        (b'{"type": "record", "seq": "1"}\n', "without a valid seq"),
        (b'{"type": "record", "seq": true}\n', "without a valid seq"),
        (b'{"type": "record", "seq": 1, "prev": 1, "hash": "x", "record": {}}\n', "prev and hash"),
        (
            b'{"type": "record", "seq": 1, "prev": "a", "hash": "b", "record": []}\n',
            "record object",
        ),
        (b'{"type": "checkpoint", "seq": 1, "jws": 5}\n', "without its jws"),
        (b'{"type": "note"}\n', "neither a record nor a checkpoint"),
        (b'{"class_uid": 6003, "time": 1}\n', "OCSF"),
        (b'{"type": "record", "latency_ms": NaN}\n', "NaN is not JSON"),
        (b"[" * 100_000 + b"\n", "not a JSON object"),
        (b"x" * (1 << 21), "longer than"),
    ],
)
def test_a_file_that_is_not_an_export_is_refused(jwks: Path, content: bytes, message: str) -> None:
    path = write(content)
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 1, run.text
    assert "malformed_export" in run.text
    assert message in run.text
    assert f"{path} line 1" in run.text


def test_a_truncated_or_empty_file_is_refused(chain: Chain, jwks: Path) -> None:
    text = "\n".join(chain.lines()) + "\n"
    path = write(text[: len(text) // 2])  # cut in the middle of a line
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 1
    assert "malformed_export" in run.text
    assert "not a JSON object" in run.text
    path = write("")
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 1
    assert "empty_export" in run.text
    path = write("\n".join(chain.lines()[8:]) + "\n")  # checkpoints only
    run = verify("--file", str(path), "--jwks", str(jwks))
    assert run.code == 1
    assert "empty_export" in run.text


def test_unreadable_files_are_bad_input(jwks: Path) -> None:
    run = verify("--file", "absent.jsonl", "--jwks", str(jwks))
    assert run.code == 2
    assert "unreadable_file" in run.text
    run = verify("--file", ".", "--jwks", str(jwks))
    assert run.code == 2
    assert "unreadable_file" in run.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not a JSON document"),
        (b"\xff\xfe\x00binary", "not a JSON document"),
        (b"[]", "must be a JSON object"),
        (b'{"foo": 1}', "needs a 'keys' array"),
        (b'{"keys": []}', "no signature verification key"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "private or secret members"),
        (b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}', "not a usable JWK Set"),
    ],
)
def test_a_bad_key_file_is_refused(chain: Chain, content: bytes, message: str) -> None:
    path = write("\n".join(chain.lines()) + "\n")
    keys = write(content, "jwks.json")
    run = verify("--file", str(path), "--jwks", str(keys))
    assert run.code == 2, run.text
    assert "bad_jwks" in run.text
    assert message in run.text


def test_a_private_key_file_is_refused(chain: Chain) -> None:
    path = write("\n".join(chain.lines()) + "\n")
    private = dict(chain.key.key.as_dict(private=True)) | {"kid": chain.key.kid}
    keys = write(json.dumps({"keys": [private]}), "jwks.json")
    run = verify("--file", str(path), "--jwks", str(keys))
    assert run.code == 2
    assert "bad_jwks" in run.text
    assert "private" in run.text
    # The export given as the key file.
    run = verify("--file", str(path), "--jwks", str(path))
    assert run.code == 2
    assert "bad_jwks" in run.text


def test_segments_verify_in_order_only(chain: Chain, jwks: Path) -> None:
    """An archive (records 1..4 with the checkpoint of 4) then the rest (5..8 with every
    checkpoint, as a live export after archiving holds them)."""
    lines = chain.lines()
    archive = write("\n".join([*lines[:4], lines[8]]) + "\n", "archive.jsonl")
    live = write("\n".join(lines[4:]) + "\n", "live.jsonl")
    assert verify("--file", str(archive), "--jwks", str(jwks)).code == 0
    # The live part alone starts right after a signed checkpoint: it verifies too.
    run = verify("--file", str(live), "--jwks", str(jwks))
    assert run.code == 0, run.text
    assert "records 5..8" in run.text
    run = verify("--file", str(archive), "--file", str(live), "--jwks", str(jwks))
    assert run.code == 0, run.text
    assert "records 1..8" in run.text
    run = verify("--file", str(live), "--file", str(archive), "--jwks", str(jwks), "--json")
    assert run.code == 1
    assert run.json()["problem"]["kind"] == "reordered"
    # Without the checkpoint that pins its start, the live part does not verify alone.
    bare = write("\n".join(lines[4:8]) + "\n", "bare.jsonl")
    run = verify("--file", str(bare), "--jwks", str(jwks), "--json")
    assert run.code == 1
    assert run.json()["problem"]["kind"] == "missing"


# --- archive (retention) ------------------------------------------------------------------


def config_file(live: Live, path: Path) -> Path:
    """The live server's configuration as a TOML file (what an operator passes)."""
    settings = live.services.settings
    assert settings.keys.kek is not None
    path.write_text(
        "[server]\n"
        f"port = {settings.server.port}\n"
        "[storage]\n"
        f"url = {json.dumps(settings.storage_url)}\n"
        "[keys]\n"
        f"kek = {json.dumps(settings.keys.kek.get_secret_value())}\n"
    )
    return path


async def test_archive_then_verify_across_the_archive_and_a_live_export(live: Live) -> None:
    base = await head(live)
    await append(live, 10)
    config = config_file(live, Path("taskbound.toml"))
    archive = Path("archive-1.jsonl")
    args = ["audit", "archive", "--config", str(config), "--out", str(archive)]

    run = await cli(live, *args, "--through", "1000000")
    assert run.code == 2, run.text
    assert "the head is never archived away" in run.text
    assert not await asyncio.to_thread(archive.exists)

    cut = base + 6
    run = await cli(live, *args, "--through", str(cut))
    assert run.code == 0, run.text
    assert f"archived records 1..{cut}" in run.text
    assert f"{cut} deleted" in run.text
    items = lines(archive)
    assert [i["seq"] for i in items if i["type"] == "record"] == list(range(1, cut + 1))
    assert [i["seq"] for i in items if i["type"] == "checkpoint"] == [cut]
    run = await cli(live, *args, "--through", str(cut + 2))
    assert run.code == 2
    assert "never overwritten" in run.text

    run = await cli(live, "audit", "list", "--json")
    assert run.json()["records"][0]["seq"] == cut + 1
    run = await cli(live, "audit", "verify")
    assert run.code == 0, run.text

    await append(live, 2, start=11)
    run = await cli(live, "audit", "checkpoint")
    assert run.code == 0, run.text
    keys = await save_keys(live, Path("audit-jwks.json"))
    exported = await export(live, Path("live.jsonl"))
    last = await head(live)
    issuer = live.services.settings.issuer
    run = await cli(
        live,
        "audit",
        "verify",
        "--file",
        str(archive),
        "--file",
        str(exported),
        "--jwks",
        str(keys),
        "--issuer",
        issuer,
    )
    assert run.code == 0, run.text
    assert f"records 1..{last}" in run.text
    assert "2 checkpoint(s)" in run.text

    # A second archive continues from the first; the three files verify as one chain.
    archive2 = Path("archive-2.jsonl")
    second = ["audit", "archive", "--config", str(config), "--out", str(archive2)]
    run = await cli(live, *second, "--through", str(base + 9))
    assert run.code == 0, run.text
    assert f"archived records {cut + 1}..{base + 9}" in run.text
    exported = await export(live, Path("live-2.jsonl"))
    last = await head(live)
    files = ["--file", str(archive), "--file", str(archive2), "--file", str(exported)]
    run = await cli(live, "audit", "verify", *files, "--jwks", str(keys))
    assert run.code == 0, run.text
    assert f"records 1..{last}" in run.text
    # The second archive alone starts right after the checkpoint pinning its first record.
    run = await cli(live, "audit", "verify", "--file", str(archive2), "--jwks", str(keys))
    assert run.code == 0, run.text
    # Skipping the middle archive is a gap.
    files = ["--file", str(archive), "--file", str(exported)]
    run = await cli(live, "audit", "verify", *files, "--jwks", str(keys))
    assert run.code == 1
    assert "missing" in run.text
    assert f"records {cut + 1}..{base + 9} are missing" in run.text

"""`taskbound audit list|tail|export|verify|checkpoint|checkpoints|keys|archive`: the
tamper-evident audit trail (docs/audit-format.md).

Every record carries the SHA-256 of its predecessor, and signed checkpoints pin the head.
``verify --file`` checks an export OFFLINE, with nothing but the file(s) and the audit
public keys (``keys``): the first record or checkpoint that does not hold is reported with
its kind, sequence number, file and line. ``archive`` moves the oldest records out of the
database into a file (retention); the chain is then verified across the archive file(s)
followed by a live export.

Exit codes: 0 when everything holds; 1 when the chain is broken, the export is not a valid
audit export (malformed, truncated, binary), or the server refuses; 2 for bad local input
(options, unreadable files, a bad key file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NoReturn

import httpx
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    err_console,
    fail,
    handled,
    print_json,
)
from taskbound.core import audit, jws
from taskbound.core.audit import ChainRecord, Problem, Report
from taskbound.core.keys import KeyRing

audit_app = typer.Typer(
    help=(
        "The tamper-evident audit trail: list, tail, export, verify (offline, from an "
        "export and the public keys), checkpoint, checkpoints, keys, archive."
    ),
    no_args_is_help=True,
)

#: A line of an export longer than this is refused (a record's detail is kept to 2,000
#: characters by every store: real lines are a few kilobytes).
MAX_LINE: Final = 1 << 20
#: A JWK Set file larger than this is refused.
MAX_JWKS: Final = 1 << 20
#: The algorithms an audit checkpoint may be signed with (``keys.algorithm``); each key of
#: the JWK Set is still held to the one algorithm it is registered for.
ALGORITHMS: Final = ("EdDSA", "ES256")
#: The most records one request of `GET /v1/admin/audit` answers.
PAGE: Final = 1000
_DECISION_COLOUR = {"allow": "green", "info": "cyan", "deny": "red", "error": "red"}
_DECISION_COLOUR["approval_required"] = "yellow"
#: Problems found at a checkpoint line rather than a record line.
_CHECKPOINT_KINDS = frozenset({"truncated", "checkpoint_mismatch", "bad_checkpoint_signature"})
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+[smhd])+")
_PART = re.compile(r"(\d+)([smhd])")


def _bad_input(message: str) -> NoReturn:
    fail(message, code="invalid_request", exit_code=2)


# --- shared options ------------------------------------------------------------------------


def _filter_option(name: str, what: str) -> Any:
    return typer.Option(None, f"--{name}", help=what, show_default=False)


AgentFilter = _filter_option("agent", "Only records of this agent (SPIFFE ID).")
TaskFilter = _filter_option("task", "Only records of this task (tsk_…).")
OwnerFilter = _filter_option("owner", "Only records on behalf of this owner.")
ToolFilter = _filter_option("tool", "Only records of calls to this tool.")
DecisionFilter = _filter_option(
    "decision", "Only this decision: allow, deny, approval_required, error or info."
)
TxnFilter = _filter_option("txn", "Only records of this delegation chain's transaction id.")
ExceptionFilter = _filter_option(
    "exception", "Only records made under this break-glass exception (bg_…)."
)
SinceFilter = _filter_option(
    "since",
    "Only records at or after this time: RFC 3339 with a zone (2025-01-31T09:00:00Z) or "
    "a duration ago (30m, 2h, 1d).",
)
UntilFilter = _filter_option("until", "Only records before this time (same forms as --since).")


def _when(text: str, option: str, now: datetime) -> str:
    """An RFC 3339 time for the API from ``text`` (a time with its zone, or a duration ago);
    exits 2 naming the option otherwise."""
    value = text.strip()
    if _DURATION.fullmatch(value.lower()):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value.lower()))
        return (now - timedelta(seconds=seconds)).isoformat()
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        _bad_input(
            f"{option} {text!r} is not a time: use RFC 3339 with a zone "
            "(2025-01-31T09:00:00Z) or a duration ago (30m, 2h, 1d)"
        )
    if when.tzinfo is None or when.utcoffset() is None:
        _bad_input(f"{option} {text!r} needs a time zone (e.g. Z or +01:00)")
    return when.isoformat()


def _filters(
    *,
    agent: str | None,
    task: str | None,
    owner: str | None,
    tool: str | None,
    decision: str | None,
    txn: str | None,
    exception: str | None,
    since: str | None,
    until: str | None,
) -> dict[str, str]:
    now = datetime.now(UTC)
    params = {
        "agent": agent,
        "task": task,
        "owner": owner,
        "tool": tool,
        "decision": decision,
        "txn": txn,
        "exception": exception,
        "since": None if since is None else _when(since, "--since", now),
        "until": None if until is None else _when(until, "--until", now),
    }
    return {k: v for k, v in params.items() if v}


# --- showing records -------------------------------------------------------------------------


def _time(value: Any, *, precise: bool = True) -> str:
    """An ISO 8601 time from the server, shorter: UTC, to the millisecond (or second)."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is None:
        return str(value)
    if not precise:
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _call(record: dict[str, Any]) -> str:
    if not record.get("tool"):
        return ""
    action = f".{record['action']}" if record.get("action") else ""
    tier = f" ({record['tier']})" if record.get("tier") else ""
    return f"{record['tool']}{action}{tier}"


def _outcome(record: dict[str, Any]) -> str:
    decision = str(record.get("decision") or "")
    code = record.get("code")
    text = decision if not code or code == decision else f"{decision}: {code}"
    colour = _DECISION_COLOUR.get(decision)
    return f"[{colour}]{escape(text)}[/]" if colour else escape(text)


def _note(record: dict[str, Any]) -> str:
    """What the columns leave out: the exception relied on, and the detail."""
    parts = []
    if record.get("exception"):
        parts.append(f"[bold red]under {escape(str(record['exception']))}[/]")
    if record.get("detail"):
        parts.append(escape(str(record["detail"])))
    return " ".join(parts)


def _table(records: Sequence[dict[str, Any]], title: str) -> Table:
    """The records as a table; a column empty in every row is left out."""
    cells: list[tuple[str, list[str]]] = [
        ("seq", [str(r["seq"]) for r in records]),
        ("time", [_time(r["time"], precise=False) for r in records]),
        ("event", [escape(str(r["event"])) for r in records]),
        ("decision", [_outcome(r) for r in records]),
        ("agent", [escape(str(r.get("agent") or "")) for r in records]),
        ("call", [escape(_call(r)) for r in records]),
        ("task", [escape(str(r.get("task") or "")) for r in records]),
        ("detail", [_note(r) for r in records]),
    ]
    shown = [(name, values) for name, values in cells if name == "seq" or any(values)]
    table = Table(title=title, title_justify="left", header_style="bold cyan")
    for name, _ in shown:
        table.add_column(name, overflow="fold")
    for row in zip(*(values for _, values in shown), strict=True):
        table.add_row(*row)
    return table


def _line(r: dict[str, Any]) -> str:
    """One record on one line (for `tail`)."""
    parts = [
        f"[cyan]{r['seq']:>7}[/]",
        _time(r["time"]),
        escape(str(r["event"])),
        _outcome(r),
    ]
    for value in (r.get("agent"), _call(r), r.get("task")):
        if value:
            parts.append(escape(str(value)))
    note = _note(r)
    if note:
        parts.append(f"[dim]—[/] {note}")
    return "  ".join(parts)


# --- list and tail -----------------------------------------------------------------------


@audit_app.command("list")
def audit_list(
    agent: str | None = AgentFilter,
    task: str | None = TaskFilter,
    owner: str | None = OwnerFilter,
    tool: str | None = ToolFilter,
    decision: str | None = DecisionFilter,
    txn: str | None = TxnFilter,
    exception: str | None = ExceptionFilter,
    since: str | None = SinceFilter,
    until: str | None = UntilFilter,
    after: int = typer.Option(
        0, "--after", min=0, help="Only records after this sequence number (paging)."
    ),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="The most to list."),
    desc: bool = typer.Option(
        False, "--desc", help="Newest first (--after is then ignored); oldest first otherwise."
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List audit records matching every filter given, oldest first (--desc: newest)."""
    params = _filters(
        agent=agent,
        task=task,
        owner=owner,
        tool=tool,
        decision=decision,
        txn=txn,
        exception=exception,
        since=since,
        until=until,
    )
    params["limit"] = str(limit)
    if desc:
        params["order"] = "desc"
    elif after:
        params["after"] = str(after)
    client = AdminClient(url, token)
    with handled():
        data = client.get("/v1/admin/audit", params=params)
    if as_json:
        return print_json(data)
    records = data["records"]
    console.print(_table(records, f"Audit records ({len(records)})"))
    if len(records) == limit and not desc:
        console.print(f"[dim]more may follow: --after {records[-1]['seq']} lists the next ones[/]")


def _print_records(records: Sequence[dict[str, Any]], as_json: bool) -> None:
    for r in records:
        if as_json:
            sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
        else:
            console.print(_line(r), soft_wrap=True, highlight=False)
    sys.stdout.flush()


@audit_app.command("tail")
def audit_tail(
    agent: str | None = AgentFilter,
    task: str | None = TaskFilter,
    owner: str | None = OwnerFilter,
    tool: str | None = ToolFilter,
    decision: str | None = DecisionFilter,
    txn: str | None = TxnFilter,
    exception: str | None = ExceptionFilter,
    since: str | None = SinceFilter,
    until: str | None = UntilFilter,
    lines: int = typer.Option(
        10, "--lines", "-n", min=0, max=1000, help="How many of the latest records to show first."
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new records as they are appended."
    ),
    interval: float = typer.Option(
        2.0, "--interval", min=0.05, max=3600, help="With --follow: seconds between polls."
    ),
    max_seconds: float | None = typer.Option(
        None,
        "--max-seconds",
        min=0,
        help="With --follow: stop after this many seconds (for scripts); forever otherwise.",
        show_default=False,
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Print the latest records, one per line (--json: one JSON object per line), and with
    --follow every new one as it arrives (polling `GET /v1/admin/audit?after=`)."""
    params = _filters(
        agent=agent,
        task=task,
        owner=owner,
        tool=tool,
        decision=decision,
        txn=txn,
        exception=exception,
        since=since,
        until=until,
    )
    client = AdminClient(url, token)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with handled():
        # The head first (unfiltered), so that following starts after it whatever matched.
        head = client.get("/v1/admin/audit", params={"order": "desc", "limit": "1"})["records"]
        last = int(head[0]["seq"]) if head else 0
        if lines:
            latest = client.get(
                "/v1/admin/audit", params=params | {"order": "desc", "limit": str(lines)}
            )["records"]
            latest.reverse()
            _print_records(latest, as_json)
            if latest:
                last = max(last, int(latest[-1]["seq"]))
        while follow:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(interval, left))
            else:
                time.sleep(interval)
            while True:
                page = client.get(
                    "/v1/admin/audit", params=params | {"after": str(last), "limit": str(PAGE)}
                )["records"]
                _print_records(page, as_json)
                if page:
                    last = int(page[-1]["seq"])
                if len(page) < PAGE:
                    break


# --- export ----------------------------------------------------------------------------


def _raise_for_problem(response: httpx.Response) -> None:
    """The server's refusal as the CLI prints every refusal (its stable code)."""
    if response.status_code < 400:
        return
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = body.get("code") or body.get("error") or f"http_{response.status_code}"
    detail = body.get("detail") or body.get("error_description") or response.reason_phrase
    fail(str(detail), code=str(code))


def _expected_records(client: AdminClient, after: int) -> int | None:
    """About how many records an export after ``after`` holds (for the progress bar)."""
    head = client.get("/v1/admin/audit", params={"order": "desc", "limit": "1"})["records"]
    first = client.get("/v1/admin/audit", params={"after": str(after), "limit": "1"})["records"]
    if not head or not first:
        return None
    return max(int(head[0]["seq"]) - int(first[0]["seq"]) + 1, 0)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@audit_app.command("export")
def audit_export(
    fmt: str = typer.Option(
        "jsonl",
        "--format",
        help=(
            "jsonl: the chain itself (records with seq, prev and hash, then the signed "
            "checkpoints), what `verify --file` checks; ocsf: one OCSF 1.3 event per record, "
            "for a SIEM."
        ),
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write to this file (replaced only once complete); standard output otherwise.",
        show_default=False,
    ),
    after: int = typer.Option(0, "--after", min=0, help="Only records after this sequence number."),
    url: str = UrlOption,
    token: str = TokenOption,
) -> None:
    """Export the audit chain as JSON Lines, streamed (progress shown when writing a file)."""
    if fmt not in ("jsonl", "ocsf"):
        _bad_input(f"--format {fmt!r} must be jsonl or ocsf")
    if out is not None and str(out) != "-" and out.is_dir():
        _bad_input(f"--out {out} is a directory")
    client = AdminClient(url, token)
    headers = {"Authorization": f"Bearer {token}"}
    params = {"format": fmt, "after": str(after)}
    base = url.rstrip("/")
    to_stdout = out is None or str(out) == "-"
    with handled():
        total = None if to_stdout else _expected_records(client, after)
        with (
            httpx.Client(base_url=base, headers=headers, timeout=30.0) as http,
            http.stream("GET", "/v1/admin/audit/export", params=params) as response,
        ):
            _raise_for_problem(response)
            if to_stdout:
                for text in response.iter_text():
                    sys.stdout.write(text)
                sys.stdout.flush()
                return
            assert out is not None
            part = out.with_name(f".{out.name}.part")
            count, size = _write_export(response, part, total)
            os.replace(part, out)
            _fsync_dir(out.parent)
    err_console.print(f"[green]exported[/] {count} line(s), {size} bytes, to {escape(str(out))}")


def _write_export(response: httpx.Response, part: Path, total: int | None) -> tuple[int, int]:
    """Stream the answer into ``part``, fsynced; (lines, bytes). Removed on failure."""
    count = size = 0
    columns = (
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
    )
    try:
        with (
            part.open("wb") as handle,
            Progress(*columns, console=err_console, transient=True) as progress,
        ):
            bar = progress.add_task("export", total=total)
            for chunk in response.iter_bytes():
                handle.write(chunk)
                size += len(chunk)
                count += chunk.count(b"\n")
                progress.update(bar, completed=min(count, total) if total else count)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        fail(f"cannot write {part}: {exc.strerror}", code="unwritable_file", exit_code=2)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return count, size


# --- offline verification -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Where:
    """A line of one of the files verified."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file} line {self.line}"


class ExportError(Exception):
    """The input is not a JSON Lines audit export (malformed, truncated or binary)."""

    def __init__(self, message: str, where: Where | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return self.message if self.where is None else f"{self.where}: {self.message}"


@dataclass(frozen=True, slots=True)
class CheckpointLine:
    """A checkpoint line: its JWS and what the line says it signs (both checked)."""

    jws: str
    seq: int | None
    hash: str | None
    where: Where


@dataclass(slots=True)
class Outcome:
    """The result of verifying files: the chain's report, where its problem is, and how far
    signed checkpoints vouch for it."""

    report: Report
    where: Where | None = None
    signed_through: int | None = None
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def view(self) -> dict[str, Any]:
        r, p = self.report, self.report.problem
        return {
            "ok": r.ok,
            "records": r.records,
            "checkpoints": r.checkpoints,
            "first_seq": r.first_seq,
            "last_seq": r.last_seq,
            "head": r.head,
            "signed_through": self.signed_through,
            "files": self.files,
            "problem": None
            if p is None
            else {
                "kind": p.kind,
                "seq": p.seq,
                "detail": p.detail,
                "file": None if self.where is None else self.where.file,
                "line": None if self.where is None else self.where.line,
            },
        }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_line(raw: bytes, where: Where) -> ChainRecord | CheckpointLine | None:
    """One line of an export: a record, a checkpoint, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ExportError("not UTF-8 text (binary data?)", where) from None
    if not text.strip():
        return None
    try:
        item = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ExportError("not a JSON object: nested too deeply", where) from None
    except ValueError as exc:  # JSONDecodeError included
        raise ExportError(f"not a JSON object: {str(exc)[:120]}", where) from None
    if not isinstance(item, dict):
        raise ExportError("not a JSON object", where)
    kind = item.get("type")
    if kind == "record":
        seq, prev, digest, body = (item.get(k) for k in ("seq", "prev", "hash", "record"))
        seq = _int(seq)
        if seq is None or not 1 <= seq < 2**53:
            raise ExportError("a record without a valid seq", where)
        if not isinstance(prev, str) or not isinstance(digest, str):
            raise ExportError(f"record {seq} without prev and hash strings", where)
        if not isinstance(body, dict):
            raise ExportError(f"record {seq} without a record object", where)
        return ChainRecord(seq, prev, digest, body)
    if kind == "checkpoint":
        token = item.get("jws")
        if not isinstance(token, str):
            raise ExportError("a checkpoint without its jws", where)
        head = item.get("hash")
        return CheckpointLine(
            token, _int(item.get("seq")), head if isinstance(head, str) else None, where
        )
    if "class_uid" in item:
        raise ExportError(
            "an OCSF event: only a JSON Lines export (--format jsonl) can be verified", where
        )
    raise ExportError("neither a record nor a checkpoint line", where)


class _Export:
    """The files of one chain, in order (archive segments, then a live export; files of
    published checkpoints may be given too). Read twice: once for the checkpoints (which
    come last in an export but decide where the chain may start), once streaming the
    records through :func:`taskbound.core.audit.verify`, so that memory stays flat."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def items(self) -> Iterator[tuple[ChainRecord | CheckpointLine, Where]]:
        for path in self.paths:
            try:
                handle = path.open("rb")
            except OSError as exc:
                raise ExportError(f"cannot read {path}: {exc.strerror}") from None
            with handle:
                number = 0
                while True:
                    try:
                        raw = handle.readline(MAX_LINE + 1)
                    except OSError as exc:
                        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
                    if not raw:
                        break
                    number += 1
                    where = Where(str(path), number)
                    if len(raw) > MAX_LINE:
                        raise ExportError(
                            f"longer than {MAX_LINE} bytes: not an audit export line", where
                        )
                    parsed = _parse_line(raw, where)
                    if parsed is not None:
                        yield parsed, where

    def scan(self) -> tuple[list[CheckpointLine], tuple[int, Where] | None]:
        """Every checkpoint line (each JWS once) and the first record (its seq, where);
        raises ExportError at the first line that is not valid."""
        checkpoints: dict[str, CheckpointLine] = {}
        first: tuple[int, Where] | None = None
        for item, where in self.items():
            if isinstance(item, CheckpointLine):
                checkpoints.setdefault(item.jws, item)
            elif first is None:
                first = (item.seq, where)
        return list(checkpoints.values()), first

    def chain(self) -> Iterator[ChainRecord]:
        """The records, in file order."""
        for item, _ in self.items():
            if isinstance(item, ChainRecord):
                yield item

    def where(self, index: int) -> Where | None:
        """Where the ``index``-th record (from 0) is."""
        position = -1
        for item, where in self.items():
            if isinstance(item, ChainRecord):
                position += 1
                if position == index:
                    return where
        return None


def _claims(token: str) -> dict[str, Any] | None:
    """A checkpoint's claims, signature NOT checked (used only once it verified)."""
    try:
        return jws.decode_claims(jws.parse_compact(token, max_length=4096))
    except jws.Rejected:
        return None


def verify_export(paths: Sequence[Path], keys: KeyRing, *, issuer: str | None = None) -> Outcome:
    """Verify the chain the files hold, in order, with :func:`taskbound.core.audit.verify`:
    every record against its hash and its link, every checkpoint's signature (with
    ``keys`` only) and head. A chain that does not start at record 1 links to the head a
    validly signed checkpoint states for the record before it (the end of an archived
    segment); without one, the records before it are missing. Raises
    :class:`ExportError` when a file is not a valid export."""
    files = [str(p) for p in paths]
    export = _Export(paths)
    checkpoints, first = export.scan()
    if first is None:
        raise ExportError("no audit records in " + ", ".join(files))
    first_seq, first_where = first
    start = audit.GENESIS
    pinned = first_seq > 1 and any(c.seq == first_seq - 1 for c in checkpoints)
    if pinned:
        # What the signature states, never the line's own fields.
        for point in (c for c in checkpoints if c.seq == first_seq - 1):
            try:
                signed = audit.verify_checkpoint(
                    point.jws, keys=keys, algorithms=ALGORITHMS, issuer=issuer
                )
            except jws.Rejected as exc:
                report = Report(
                    0, 0, None, None, start, Problem("bad_checkpoint_signature", None, str(exc))
                )
                return Outcome(report, point.where, files=files)
            if signed.seq == first_seq - 1:
                start = signed.hash
                break
    report = audit.verify(
        export.chain(),
        [c.jws for c in checkpoints],
        keys=keys,
        algorithms=ALGORITHMS,
        start_prev=start,
        issuer=issuer,
    )
    outcome = Outcome(report, files=files)
    problem = report.problem
    if problem is not None:
        if problem.kind == "bad_checkpoint_signature":
            outcome.where = checkpoints[report.checkpoints].where
        elif problem.kind in ("truncated", "checkpoint_mismatch"):
            outcome.where = checkpoints[report.checkpoints - 1].where
        else:  # the record the walk stopped at comes right after those that held
            outcome.where = export.where(report.records)
        if problem.kind == "missing" and report.records == 0 and start == audit.GENESIS:
            outcome.report = _with(
                report,
                Problem(
                    problem.kind,
                    problem.seq,
                    f"{problem.detail}: no checkpoint pins record {first_seq - 1}; give the "
                    "archive file(s) before it, in order",
                ),
            )
            outcome.where = first_where
        return outcome
    through = None
    for point in checkpoints:
        claims = _claims(point.jws) or {}
        seq, head = claims.get("seq"), claims.get("hash")
        if (point.seq is not None and point.seq != seq) or (
            point.hash is not None and point.hash != head
        ):
            outcome.report = _with(
                report,
                Problem(
                    "checkpoint_mismatch",
                    point.seq,
                    f"the checkpoint line says record {point.seq} ({point.hash}) but its "
                    f"signature is over record {seq} ({head})",
                ),
            )
            outcome.where = point.where
            return outcome
        if isinstance(seq, int) and (through is None or seq > through):
            through = seq
    outcome.signed_through = through
    return outcome


def _with(report: Report, problem: Problem) -> Report:
    return Report(
        report.records,
        report.checkpoints,
        report.first_seq,
        report.last_seq,
        report.head,
        problem,
    )


def load_jwks(paths: Sequence[Path]) -> KeyRing:
    """One key ring from JWK Set files (the audit keys saved over time); exits 2 with
    ``bad_jwks`` for anything that is not a usable public JWK Set."""
    keys: dict[str, dict[str, Any]] = {}
    anonymous: list[dict[str, Any]] = []
    for path in paths:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_JWKS + 1)
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}", code="unreadable_file", exit_code=2)
        if len(data) > MAX_JWKS:
            fail(f"{path} is too large for a JWK Set", code="bad_jwks", exit_code=2)
        try:
            document = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            fail(f"{path} is not a JSON document (a JWK Set)", code="bad_jwks", exit_code=2)
        try:
            KeyRing.from_jwks(document)  # each file must be a valid set on its own
        except ValueError as exc:
            fail(f"{path} is not a usable JWK Set: {exc}", code="bad_jwks", exit_code=2)
        for jwk in document["keys"]:
            kid = jwk.get("kid")
            if not isinstance(kid, str):
                anonymous.append(jwk)
            elif keys.setdefault(kid, jwk) != jwk:
                fail(
                    f"{path}: key {kid!r} differs from the key of that kid in another file",
                    code="bad_jwks",
                    exit_code=2,
                )
    try:
        ring = KeyRing.from_jwks({"keys": [*keys.values(), *anonymous]})
    except ValueError as exc:
        fail(f"the JWK Sets together are not usable: {exc}", code="bad_jwks", exit_code=2)
    if not len(ring):
        fail(
            "no signature verification key in " + ", ".join(str(p) for p in paths),
            code="bad_jwks",
            exit_code=2,
        )
    return ring


def _show(view: dict[str, Any], *, source: str) -> None:
    """A verification report as a person reads it."""
    problem = view["problem"]
    span = (
        f"records {view['first_seq']}..{view['last_seq']}"
        if view["first_seq"] is not None
        else "no records"
    )
    if problem is None:
        console.print(
            f"[bold green]ok[/]: {source}: {view['records']} record(s) ({span}) linked, "
            f"{view['checkpoints']} checkpoint(s) verified; head {view['head']}"
        )
        through = view.get("signed_through", "unknown")
        last = view["last_seq"]
        if through is None and last is not None:
            console.print(
                "[yellow]warning[/]: no checkpoint: the records are linked, but nothing "
                "signed vouches for them (a cut or a rewrite of the whole file would not "
                "show); take one with `taskbound audit checkpoint`"
            )
        elif isinstance(through, int) and last is not None and through < last:
            console.print(
                f"[yellow]note[/]: records {through + 1}..{last} come after the last "
                "checkpoint: linked, but not yet signed"
            )
        return
    where = ""
    if problem.get("file"):
        what = "the checkpoint at " if problem["kind"] in _CHECKPOINT_KINDS else ""
        where = f" ({what}{escape(str(problem['file']))} line {problem['line']})"
    seq = f" at record {problem['seq']}" if problem["seq"] is not None else ""
    console.print(
        f"[bold red]BROKEN[/]: {source}: [bold]{problem['kind']}[/]{seq}{where}",
        highlight=False,
    )
    console.print(f"  {escape(str(problem['detail']))}", highlight=False)
    if view["last_seq"] is not None:
        signed = f", {view['checkpoints']} checkpoint(s)" if view["checkpoints"] else ""
        console.print(f"  verified before it: {view['records']} record(s) ({span}){signed}")


@audit_app.command("verify")
def audit_verify(
    files: list[Path] = typer.Option(
        [],
        "--file",
        "-f",
        help=(
            "Verify this JSON Lines export OFFLINE instead of asking the server. Repeat it "
            "for one chain in several files, in order: the archive file(s), oldest first, "
            "then a live export; a file of published checkpoints (audit.checkpoint_file) "
            "may be added too."
        ),
        show_default=False,
    ),
    jwks: list[Path] = typer.Option(
        [],
        "--jwks",
        help=(
            "With --file: the audit public keys as a JWK Set file (`taskbound audit keys "
            "--out …`); repeat it for keys saved before a rotation."
        ),
        show_default=False,
    ),
    issuer: str | None = typer.Option(
        None,
        "--issuer",
        help="With --file: the `iss` every checkpoint must carry (the server's public URL).",
        show_default=False,
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Verify the audit chain: every record against its hash and its predecessor, every
    checkpoint's signature and head. Reports the first problem (edited, missing, inserted,
    reordered, truncated, checkpoint_mismatch, bad_checkpoint_signature, malformed) with
    its record and line; exit 1 when the chain is broken or a file is not a valid export
    (malformed_export), 2 for bad input (bad_jwks, unreadable_file)."""
    if not files:
        if jwks or issuer:
            _bad_input("--jwks and --issuer verify a file: give it with --file")
        client = AdminClient(url, token)
        with handled():
            view = client.get("/v1/admin/audit/verify")
        if as_json:
            print_json(view)
        else:
            _show(view | {"signed_through": "unknown"}, source="the server's store")
        raise typer.Exit(0 if view["ok"] else 1)
    if not jwks:
        _bad_input(
            "--jwks is required to verify a file offline: save the audit keys with "
            "`taskbound audit keys --out audit-jwks.json`"
        )
    for path in files:
        if not path.is_file():
            fail(f"{path} is not a readable file", code="unreadable_file", exit_code=2)
    ring = load_jwks(jwks)
    try:
        outcome = verify_export(files, ring, issuer=issuer)
    except ExportError as exc:
        code = "empty_export" if exc.message.startswith("no audit records") else "malformed_export"
        fail(f"not a valid audit export: {exc}", code=code)
    outcome.files = [str(p) for p in files]
    view = outcome.view()
    if as_json:
        print_json(view)
    else:
        _show(view, source=", ".join(escape(str(p)) for p in files))
    raise typer.Exit(0 if outcome.ok else 1)


# --- checkpoints and keys -----------------------------------------------------------------


@audit_app.command("checkpoint")
def audit_checkpoint(
    url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """Sign the chain's head now (published to audit.checkpoint_file and the webhook too);
    the existing checkpoint when the head has not moved."""
    client = AdminClient(url, token)
    with handled():
        data = client.post("/v1/admin/audit/checkpoints")
    if as_json:
        return print_json(data)
    console.print(
        f"[green]checkpoint[/] of record {data['seq']} signed at {_time(data['time'])}\n"
        f"  head {data['hash']}"
    )


@audit_app.command("checkpoints")
def audit_checkpoints(
    url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """List the signed checkpoints the server keeps, oldest first."""
    client = AdminClient(url, token)
    with handled():
        data = client.get("/v1/admin/audit/checkpoints")
    if as_json:
        return print_json(data)
    table = Table(
        title=f"Audit checkpoints ({len(data['checkpoints'])})",
        title_justify="left",
        header_style="bold cyan",
    )
    for name in ("seq", "time", "head"):
        table.add_column(name, overflow="fold")
    for c in data["checkpoints"]:
        table.add_row(str(c["seq"]), _time(c["time"]), c["hash"])
    console.print(table)


@audit_app.command("keys")
def audit_keys(
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write the JWK Set to this file (keep it with the archives); stdout otherwise.",
        show_default=False,
    ),
    url: str = UrlOption,
) -> None:
    """Print the public keys that verify audit checkpoints (/.well-known/audit-jwks.json).
    Save them with every archive and before every audit key rotation: `verify --file`
    needs them, and a rotated key is published only for a while."""
    with handled(), httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as http:
        response = http.get("/.well-known/audit-jwks.json")
        _raise_for_problem(response)
    try:
        document = response.json()
        KeyRing.from_jwks(document)
    except ValueError as exc:
        fail(f"the server's audit JWK Set is not usable: {exc}", code="bad_jwks")
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if out is None or str(out) == "-":
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}", code="unwritable_file", exit_code=2)
    err_console.print(f"[green]saved[/] {len(document['keys'])} key(s) to {escape(str(out))}")


# --- archive (retention) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Archived:
    first: int
    last: int
    records: int
    checkpoints: int
    deleted: int


async def _archive(settings: Any, through: int, out: Path) -> Archived:
    from taskbound.service.runtime import open_services

    services = await open_services(settings)
    try:
        storage, chain = services.storage, services.audit
        head, _ = await storage.audit_head()
        if through >= head:
            fail(
                f"record {through} is the head of the chain or beyond it (head {head}): "
                "the head is never archived away",
                code="invalid_request",
                exit_code=2,
            )
        try:
            point = await chain.checkpoint_at(through)
        except ValueError as exc:
            fail(str(exc), code="invalid_request", exit_code=2)
        points = [c for c in await storage.list_checkpoints(limit=1_000_000) if c.seq <= through]
        if point.seq not in {c.seq for c in points}:
            points.append(point)
        part = out.with_name(f".{out.name}.part")
        first = count = 0
        try:
            with part.open("x", encoding="utf-8") as handle:
                async for record in chain.records(0):
                    if record.seq > through:
                        break
                    first = first or record.seq
                    count += 1
                    handle.write(json.dumps(record.line(), separators=(",", ":")) + "\n")
                for c in points:
                    handle.write(json.dumps(c.line(), separators=(",", ":")) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            # Nothing is deleted unless the file, read back, verifies on its own.
            outcome = await asyncio.to_thread(
                verify_export, [part], chain.keyring(), issuer=chain.issuer
            )
            if not outcome.ok or outcome.report.last_seq != through:
                problem = outcome.report.problem
                what = "it ends early" if problem is None else f"{problem.kind}: {problem.detail}"
                fail(
                    f"the archive does not verify ({what}); nothing was deleted",
                    code="audit_chain_broken",
                )
            os.replace(part, out)
            _fsync_dir(out.parent)
        except ExportError as exc:
            fail(
                f"the archive does not read back: {exc}; nothing was deleted",
                code="malformed_export",
            )
        except OSError as exc:
            fail(f"cannot write {part}: {exc.strerror}", code="unwritable_file", exit_code=2)
        finally:
            part.unlink(missing_ok=True)
        try:
            deleted = await storage.delete_audit_through(through)
        except ValueError as exc:
            fail(f"{exc}; the archive is written, nothing was deleted", code="conflict")
        return Archived(first, through, count, len(points), deleted)
    finally:
        await services.aclose()


@audit_app.command("archive")
def audit_archive(
    through: int = typer.Option(
        ...,
        "--through",
        min=1,
        help="Archive every record up to and including this sequence number (not the head).",
        show_default=False,
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="The archive file to create (JSON Lines, like `export`); never overwritten.",
        show_default=False,
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Data directory for the SQLite default."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", envvar="TASKBOUND_CONFIG", help="TOML configuration file."
    ),
) -> None:
    """Retention: move the oldest records out of the database into a file. Works on the
    database directly (like `taskbound ui set-password`), with the configuration of the
    server: signs a checkpoint pinning record THROUGH, writes the records up to it and the
    checkpoints up to it to OUT (fsynced, verified read back), then deletes those records.
    Verify the whole chain later with `verify --file ARCHIVE… --file LIVE-EXPORT --jwks …`."""
    from taskbound.config import load_settings

    if out.exists():
        fail(f"{out} exists: an archive is never overwritten", code="invalid_request", exit_code=2)
    if not out.parent.is_dir():
        _bad_input(f"the directory of {out} does not exist")
    overrides = {"storage": {"data_dir": data_dir}} if data_dir is not None else None
    with handled():
        settings = load_settings(config, overrides=overrides)
    with handled(), warnings.catch_warnings():
        # joserfc warns on every EdDSA signature (RFC 9864 renames it); the name is kept.
        warnings.filterwarnings("ignore", message="EdDSA is deprecated via RFC 9864")
        done = asyncio.run(_archive(settings, through, out))
    console.print(
        f"[green]archived[/] records {done.first}..{done.last} ({done.records} record(s), "
        f"{done.checkpoints} checkpoint(s)) to {escape(str(out))}; {done.deleted} deleted "
        "from the database.\n"
        "Keep the file with the audit keys (`taskbound audit keys --out …`); verify with "
        f"`taskbound audit verify --file {escape(str(out))} --file LIVE-EXPORT.jsonl "
        "--jwks AUDIT-JWKS.json`"
    )

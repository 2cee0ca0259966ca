"""Benchmark: the audit chain.

In one run, on SQLite (a temporary file) and on PostgreSQL (a fresh schema, dropped
afterwards) when --postgres or $TASKBOUND_TEST_POSTGRES_URL names one:

1. appends, records/s, through the store (each append reads the chain's head under the
   store's lock, hashes every record with its predecessor's hash, inserts, commits):
   - one record per commit (``append_audit``, one after another);
   - batches of 64 (``append_audits``);
   - the group-commit writer (``AuditWriter``) under 64 concurrent callers, as the gateway
     uses it; the batch sizes it forms are noted.
   The raw limit, in the same run, on the same database, with the same commit pattern: a
   bare INSERT of the same rows (the values read back from the store, chain columns
   included, so the rows are byte for byte the same) into a table of the same definition
   and indexes, by the database driver itself — no head read, no hashing, no ORM. For the
   writer the raw inserts replay exactly the batch sizes the writer formed.
2. verification, records/s: ``core.audit.verify`` over the records read back; the raw
   limits: SHA-256 of the RFC 8785 canonical JSON of the same envelopes (what verify must
   do per record at least), and SHA-256 alone of the same canonical bytes. Reading the
   chain back from the store (``list_chain``) is shown too.

Bounded by --records (default 20,000; single-record commits take at most 2,000 of them,
as each waits for its own durable commit).

    .venv/bin/python bench/audit.py [--records 20000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import psycopg
import rfc8785
from psycopg import sql
from psycopg.types.json import Json
from sqlalchemy import MetaData
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.schema import CreateIndex, CreateTable

from taskbound.core import audit
from taskbound.core.model import AuditEvent
from taskbound.service.audit import AuditWriter
from taskbound.storage import open_storage
from taskbound.storage import schema as t
from taskbound.storage.base import Storage

BATCH = 64
CALLERS = 64
MAX_SINGLE = 1000
RAW_TABLE = "bench_raw_audit_events"


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_schema(url: str, schema: str) -> str:
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


def events(n: int) -> list[AuditEvent]:
    """``n`` records as the gateway writes them for allowed calls: every field a call
    fills in, each call with arguments of its own."""
    start = datetime.now(UTC)
    task = f"task_{secrets.token_hex(8)}"
    jti = f"cred_{secrets.token_hex(8)}"
    return [
        AuditEvent(
            time=start + timedelta(microseconds=i),
            event="gateway.call",
            decision="allow",
            agent="spiffe://taskbound.local/agents/bench",
            owner="alice",
            task=task,
            intent="triage the open issues of acme/web",
            jti=jti,
            tool="issues",
            action="list_issues",
            tier="read",
            argument_digest="sha256:" + hashlib.sha256(f"page={i}".encode()).hexdigest(),
            policies=("tiers-read", "constraints-org"),
            policy_version="sha256:" + "ab" * 32,
            latency_ms=1.234 + i % 100 / 1000,
            upstream_status=200,
            txn=task,
        )
        for i in range(n)
    ]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


# --- the raw limit: the driver, the same rows, the same table definition -------------------


class Raw:
    """Bare inserts into a copy of ``audit_events`` (same columns, types and indexes) on
    the same database, through the DB-API driver."""

    def __init__(self, dialect: str, connect: Callable[[], Any]) -> None:
        self.dialect = dialect
        self._conn = connect()
        copy = t.audit_events.to_metadata(
            MetaData(naming_convention=t.NAMING_CONVENTION), name=RAW_TABLE
        )
        engine_dialect = _dialect(dialect)
        ddl = [str(CreateTable(copy).compile(dialect=engine_dialect))]
        ddl += [str(CreateIndex(i).compile(dialect=engine_dialect)) for i in copy.indexes]
        # The same constraints and indexes, under names of their own (names are per schema).
        ddl = [re.sub(r"\b(pk|ix|ck|uq|fk)_audit_events", rf"\1_{RAW_TABLE}", d) for d in ddl]
        # SQL from our own constant names only (S608 does not apply).
        self.columns = [c.name for c in t.audit_events.columns]
        names = ", ".join(self.columns)
        marks = ", ".join("?" if dialect == "sqlite" else "%s" for _ in self.columns)
        self._insert = f"INSERT INTO {RAW_TABLE} ({names}) VALUES ({marks})"  # noqa: S608
        self._select = f"SELECT {names} FROM audit_events ORDER BY seq"  # noqa: S608
        self._begin = "BEGIN IMMEDIATE" if dialect == "sqlite" else "BEGIN"
        for statement in ddl:
            self._conn.execute(statement)

    def rows(self) -> list[tuple[Any, ...]]:
        """Every row of ``audit_events`` as stored, ready to insert again."""
        cur = self._conn.execute(self._select)
        found = [tuple(r) for r in cur.fetchall()]
        if self.dialect == "postgresql":
            at = self.columns.index("policies")
            found = [(*r[:at], Json(r[at]), *r[at + 1 :]) for r in found]
        return found

    def insert(self, rows: Sequence[tuple[Any, ...]], batches: Sequence[int]) -> float:
        """Seconds to insert ``rows``, one transaction per batch of the sizes given."""
        conn = self._conn
        cur = conn.cursor()
        at = 0
        started = time.perf_counter()
        for size in batches:
            chunk = rows[at : at + size]
            at += size
            conn.execute(self._begin)
            cur.executemany(self._insert, chunk)
            conn.execute("COMMIT")
        return time.perf_counter() - started

    def close(self) -> None:
        self._conn.close()


def _dialect(name: str) -> Dialect:
    return make_url("sqlite://" if name == "sqlite" else "postgresql+psycopg://").get_dialect()()


def sqlite_raw(path: Path) -> Raw:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None)
        # What the store's connections use (taskbound.storage.sql.configure_sqlite); the
        # synchronous level is the library's default for both.
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    return Raw("sqlite", connect)


def postgres_raw(url: str) -> Raw:
    return Raw("postgresql", lambda: psycopg.connect(conninfo(url), autocommit=True))


# --- the store -----------------------------------------------------------------------------


@dataclass
class Counting:
    """The store as the writer sees it, noting the size of every batch it commits."""

    storage: Storage
    batches: list[int] = field(default_factory=list)

    async def append_audits(self, records: Sequence[AuditEvent]) -> list[int]:
        self.batches.append(len(records))
        return await self.storage.append_audits(records)


@dataclass
class Appends:
    """Seconds each way of appending took, and the batch sizes the writer formed."""

    single: float
    batched: float
    writer: float
    writer_batches: list[int]
    chain_only: float  # audit.chain over the same records in memory: the hashing alone


async def appends(
    storage: Storage, single: list[AuditEvent], batched: list[AuditEvent], pooled: list[AuditEvent]
) -> Appends:
    started = time.perf_counter()
    for event in single:
        await storage.append_audit(event)
    single_s = time.perf_counter() - started

    started = time.perf_counter()
    for at in range(0, len(batched), BATCH):
        await storage.append_audits(batched[at : at + BATCH])
    batched_s = time.perf_counter() - started

    counting = Counting(storage)
    writer = AuditWriter(cast(Storage, counting))
    share = iter(pooled)

    async def caller() -> None:
        for event in share:
            await writer.append(event)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    writer_s = time.perf_counter() - started
    await writer.close()

    started = time.perf_counter()
    audit.chain(0, audit.GENESIS, batched)
    chain_s = time.perf_counter() - started
    return Appends(single_s, batched_s, writer_s, counting.batches, chain_s)


@dataclass
class Verification:
    records: int
    read: float
    verify: float
    canonical_sha256: float
    sha256: float


async def verification(storage: Storage) -> Verification:
    started = time.perf_counter()
    records: list[audit.ChainRecord] = []
    after = 0
    while page := await storage.list_chain(after=after, limit=5000):
        records.extend(page)
        after = page[-1].seq
    read_s = time.perf_counter() - started

    started = time.perf_counter()
    report = audit.verify(records)
    verify_s = time.perf_counter() - started
    assert report.ok, report.problem
    assert report.records == len(records)

    envelopes: list[dict[str, Any]] = [
        {"v": audit.FORMAT_VERSION, "seq": r.seq, "prev": r.prev, "record": dict(r.body)}
        for r in records
    ]
    started = time.perf_counter()
    digests = [hashlib.sha256(rfc8785.dumps(e)).hexdigest() for e in envelopes]
    canonical_s = time.perf_counter() - started
    assert digests == [r.hash for r in records]  # the raw limit computes what verify checks
    canonical = [rfc8785.dumps(e) for e in envelopes]
    started = time.perf_counter()
    for data in canonical:
        hashlib.sha256(data).hexdigest()
    sha_s = time.perf_counter() - started
    return Verification(len(records), read_s, verify_s, canonical_s, sha_s)


# --- one database --------------------------------------------------------------------------


def batches_of(n: int, size: int) -> list[int]:
    return [min(size, n - at) for at in range(0, n, size)]


def print_appends(name: str, sizes: tuple[int, int, int], a: Appends, raw: Raw) -> None:
    """The appends against bare inserts of the same rows in the same commit pattern."""
    n_single, n_batched, n_pooled = sizes
    rows = raw.rows()
    assert len(rows) == sum(sizes), (len(rows), sizes)
    raw_single = raw.insert(rows[:n_single], [1] * n_single)
    raw_batched = raw.insert(rows[n_single : n_single + n_batched], batches_of(n_batched, BATCH))
    raw_pooled = raw.insert(rows[n_single + n_batched :], a.writer_batches)

    print(f"{name}: appends (chained through the store; raw: bare INSERT of the same rows)")
    line = "  {:34} {:8.0f} records/s   raw {:8.0f} records/s   ratio raw / chained {:6.2f}x"
    for label, n, chained_s, raw_s in (
        (f"one record per commit ({n_single:,})", n_single, a.single, raw_single),
        (f"append_audits, {BATCH} a commit ({n_batched:,})", n_batched, a.batched, raw_batched),
        (f"AuditWriter, {CALLERS} callers ({n_pooled:,})", n_pooled, a.writer, raw_pooled),
    ):
        print(line.format(label, rate(n, chained_s), rate(n, raw_s), chained_s / raw_s))
    formed = sorted(a.writer_batches)
    print(
        f"  AuditWriter: {len(formed):,} commits, {n_pooled / len(formed):.1f} records each on"
        f" average (median {formed[len(formed) // 2]}, largest {formed[-1]})"
    )
    print(
        f"  group commit gain over one record per commit: append_audits "
        f"{a.single / n_single * n_batched / a.batched:5.1f}x, AuditWriter "
        f"{a.single / n_single * n_pooled / a.writer:5.1f}x"
    )
    print(
        f"  the chain alone (audit.chain in memory) {rate(n_batched, a.chain_only):8.0f}"
        f" records/s: {a.chain_only / a.batched:4.0%} of the time of append_audits"
    )


def print_verification(name: str, v: Verification) -> None:
    print(f"{name}: verification of {v.records:,} records")
    line = "  {:34} {:8.0f} records/s"
    print(line.format("read back (list_chain)", rate(v.records, v.read)))
    print(line.format("core.audit.verify", rate(v.records, v.verify)))
    for label, raw_s in (
        ("raw: RFC 8785 + SHA-256", v.canonical_sha256),
        ("raw: SHA-256 of canonical bytes", v.sha256),
    ):
        ratio = f"   ratio raw / verify {v.verify / raw_s:6.2f}x"
        print(line.format(label, rate(v.records, raw_s)) + ratio)


async def measure(url: str, n: int) -> tuple[tuple[int, int, int], Appends, Verification]:
    n_single = min(MAX_SINGLE, max(1, n // 10))
    n_batched = n // 2
    sizes = (n_single, n_batched, n - n_batched)
    single, batched, pooled = events(sizes[0]), events(sizes[1]), events(sizes[2])
    storage = await open_storage(url)
    try:
        a = await appends(storage, single, batched, pooled)
        v = await verification(storage)
    finally:
        await storage.close()
    return sizes, a, v


def run_on(name: str, url: str, raw: Callable[[], Raw], n: int) -> None:
    sizes, a, v = asyncio.run(measure(url, n))
    bare = raw()
    try:
        print_appends(name, sizes, a, bare)
    finally:
        bare.close()
    print_verification(name, v)


def on_sqlite(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        with contextlib.closing(sqlite3.connect(path)) as probe:
            sync = probe.execute("PRAGMA synchronous").fetchone()[0]
        name = f"SQLite (file, WAL, synchronous={sync})"
        run_on(name, f"sqlite+aiosqlite:///{path}", lambda: sqlite_raw(path), n)


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    schema = f"tb_bench_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo(base_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_schema(base_url, schema)
    finally:
        with psycopg.connect(conninfo(base_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def on_postgres(base_url: str, n: int) -> None:
    with postgres_schema(base_url) as url:
        run_on("PostgreSQL", url, lambda: postgres_raw(url), n)


def main() -> None:
    logging.getLogger("taskbound").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", type=int, default=20_000, help="records per database (bounded)"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TASKBOUND_TEST_POSTGRES_URL"),
        help="PostgreSQL URL (postgresql+psycopg://…); default $TASKBOUND_TEST_POSTGRES_URL;"
        " '' for none",
    )
    args = parser.parse_args()
    n = max(2 * BATCH, min(args.records, 200_000))
    print(
        f"audit chain: {n:,} records per database in groups, up to {MAX_SINGLE:,} more one per"
        " commit; raw limits measured in the same run"
    )
    on_sqlite(n)
    if args.postgres:
        on_postgres(args.postgres, n)
    else:
        print("PostgreSQL: skipped (pass --postgres or set TASKBOUND_TEST_POSTGRES_URL)")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="EdDSA is deprecated")
    main()

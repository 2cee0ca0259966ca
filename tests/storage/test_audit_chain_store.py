"""The audit chain store (AuditChainStore), conformance-tested on memory, SQLite and
PostgreSQL (conftest.py): gapless numbering and links, the head, checkpoints, retention,
the new list_audit filters, many writers at once, recorded arguments, the 0007
migration's backfill and the 0008 migration (arguments) keeping existing chains valid.

The race uses separate engines on the SQL backends, as gateway replicas would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from taskbound.core import audit
from taskbound.core.audit import GENESIS, ChainRecord, Checkpoint
from taskbound.core.clock import FakeClock
from taskbound.core.keys import KeyRing, public_jwk
from taskbound.core.model import AuditEvent
from taskbound.errors import Conflict
from taskbound.service.runtime import open_services
from taskbound.storage import Storage, codec, migrate, open_storage
from taskbound.storage import schema as t
from taskbound.storage.codec import AUDIT_DETAIL_MAX, AUDIT_TRUNCATED, audit_row
from taskbound.storage.migrate import alembic_config
from taskbound.storage.urls import parse_database_url
from tests.api.conftest import make_settings
from tests.core._crypto import key
from tests.services import postgres_url
from tests.storage.conftest import Backend, postgres_schema
from tests.storage.test_conformance import IST, full_audit, make_audit

ISSUER = "https://broker.example"
SIGNER = key("EdDSA", 80)
RING = KeyRing.from_jwks({"keys": [public_jwk(SIGNER)]})


async def whole_chain(storage: Storage, after: int = 0) -> list[ChainRecord]:
    out: list[ChainRecord] = []
    while True:
        page = await storage.list_chain(after=after, limit=97)
        out += page
        if len(page) < 97:
            return out
        after = page[-1].seq


def sign(record: ChainRecord, clock: FakeClock) -> Checkpoint:
    return audit.sign_checkpoint(
        seq=record.seq, head=record.hash, time=clock.now(), issuer=ISSUER, key=SIGNER
    )


async def checkpoint_at(storage: Storage, seq: int, clock: FakeClock) -> Checkpoint:
    (record,) = await storage.list_chain(after=seq - 1, limit=1)
    assert record.seq == seq
    point = sign(record, clock)
    await storage.add_checkpoint(point)
    return point


def verify(
    records: list[ChainRecord], points: Sequence[Checkpoint] = (), start_prev: str = GENESIS
) -> audit.Report:
    return audit.verify(
        records, [p.jws for p in points], keys=RING, algorithms=["EdDSA"], start_prev=start_prev
    )


async def fill(storage: Storage, clock: FakeClock, n: int) -> list[AuditEvent]:
    made = [
        full_audit(clock.advance(1), task=f"task-{i}") if i % 2 else make_audit(clock.advance(1))
        for i in range(n)
    ]
    for event in made:
        await storage.append_audit(event)
    return made


# --- numbering and links ------------------------------------------------------------------


async def test_an_empty_chain(storage: Storage) -> None:
    assert await storage.audit_head() == (0, GENESIS)
    assert await storage.list_chain() == []
    assert await storage.list_checkpoints() == []
    assert verify([]).ok


async def test_appends_are_numbered_gaplessly_and_linked(
    storage: Storage, clock: FakeClock
) -> None:
    one = full_audit(clock.now().astimezone(IST))
    assert await storage.append_audit(one) == 1
    batch = [make_audit(clock.advance(1), detail=f"b{i}") for i in range(5)]
    assert await storage.append_audits(batch) == [2, 3, 4, 5, 6]
    assert await storage.append_audits([]) == []
    assert await storage.append_audit(make_audit(clock.advance(1))) == 7
    chain = await storage.list_chain()
    assert [r.seq for r in chain] == list(range(1, 8))
    assert chain[0].prev == GENESIS
    for before, after in itertools.pairwise(chain):
        assert after.prev == before.hash
    report = verify(chain)
    assert report.ok, report.problem
    assert (report.records, report.first_seq, report.last_seq) == (7, 1, 7)
    assert await storage.audit_head() == (7, chain[-1].hash)
    assert report.head == chain[-1].hash
    # The body is what list_audit reads back, in the documented form.
    for record, (seq, event) in zip(chain, await storage.list_audit(), strict=True):
        assert record.seq == seq
        assert record.body == audit.body_of(event)
    assert chain[0].body["time"] == audit.body_of(one)["time"]
    assert chain[0].body["time"].endswith("Z")
    # The same records a fresh chain of the same events gives: nothing store-specific.
    events = [e for _, e in await storage.list_audit()]
    assert audit.chain(0, GENESIS, events) == chain


async def test_list_chain_pages(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 10)
    assert [r.seq for r in await storage.list_chain(after=3, limit=4)] == [4, 5, 6, 7]
    assert [r.seq for r in await storage.list_chain(after=8)] == [9, 10]
    assert await storage.list_chain(after=10) == []
    assert await storage.list_chain(limit=0) == []
    assert len(await whole_chain(storage)) == 10
    with pytest.raises(ValueError, match="after"):
        await storage.list_chain(after=-1)
    with pytest.raises(ValueError, match="limit"):
        await storage.list_chain(limit=-1)


async def test_a_long_chain_verifies_across_pages(storage: Storage, clock: FakeClock) -> None:
    for start in range(0, 300, 50):
        events = [make_audit(clock.advance(0.001), detail=f"{start + i}") for i in range(50)]
        assert await storage.append_audits(events) == list(range(start + 1, start + 51))
    chain = await whole_chain(storage)
    assert verify(chain).ok
    assert (await storage.audit_head())[0] == 300


async def test_stored_values_are_what_the_hash_covers(storage: Storage, clock: FakeClock) -> None:
    """The hash is computed before the row is written, the verification from what is read
    back: every value must come back exactly (microseconds, zones, floats, Unicode)."""
    odd = [
        full_audit(clock.now().astimezone(IST) + timedelta(microseconds=1)),
        make_audit(clock.advance(0.000001), latency_ms=0.1 + 0.2, upstream_status=-(2**31)),
        make_audit(clock.advance(1), latency_ms=1e-9, upstream_status=2**31 - 1),
        make_audit(clock.advance(1), latency_ms=123456789.987654321, policies=("",)),
        make_audit(clock.advance(1), detail="ünïcödé ✓ 🎉 \t\n\r", intent="", code=""),
        make_audit(clock.advance(1), latency_ms=-0.0, detail=" " * 3),
    ]
    await storage.append_audits(odd)
    chain = await storage.list_chain()
    assert verify(chain).ok
    assert chain[1].body["latency_ms"] == 0.3
    assert chain[3].body["latency_ms"] == 123456789.988


async def test_a_long_detail_is_cut_and_the_record_still_verifies(
    storage: Storage, clock: FakeClock
) -> None:
    long = "é" * (AUDIT_DETAIL_MAX + 500)
    exact = "x" * AUDIT_DETAIL_MAX
    seqs = await storage.append_audits(
        [make_audit(clock.now(), detail=long), make_audit(clock.now(), detail=exact)]
    )
    assert seqs == [1, 2]
    cut, kept = await storage.list_chain()
    assert cut.body["detail"] == "é" * (AUDIT_DETAIL_MAX - len(AUDIT_TRUNCATED)) + AUDIT_TRUNCATED
    assert len(cut.body["detail"]) == AUDIT_DETAIL_MAX
    assert kept.body["detail"] == exact
    assert verify([cut, kept]).ok
    (_, event), _ = await storage.list_audit()
    assert event.detail == cut.body["detail"]


@pytest.mark.parametrize(
    "bad",
    [
        {"detail": "a\x00b"},
        {"agent": "\x00"},
        {"policies": ("ok", "no\x00")},
        {"exception_id": "bg\x00"},
        {"latency_ms": float("nan")},
        {"latency_ms": float("inf")},
        {"upstream_status": 2**31},
        {"upstream_status": True},
    ],
    ids=["detail", "agent", "policies", "exception", "nan", "inf", "status-range", "status-bool"],
)
async def test_refused_events_leave_the_chain_untouched(
    storage: Storage, clock: FakeClock, bad: dict[str, object]
) -> None:
    await storage.append_audit(make_audit(clock.now()))
    head = await storage.audit_head()
    with pytest.raises(ValueError, match=r"NUL|finite|32-bit"):
        await storage.append_audit(replace(make_audit(clock.advance(1)), **bad))  # type: ignore[arg-type]
    # All or none: a good event beside a bad one is not stored either.
    good = make_audit(clock.advance(1))
    with pytest.raises(ValueError, match=r"NUL|finite|32-bit"):
        await storage.append_audits([good, replace(good, **bad)])  # type: ignore[arg-type]
    assert await storage.audit_head() == head
    assert await storage.append_audit(good) == 2
    assert verify(await storage.list_chain()).ok


# --- one chain under many writers ---------------------------------------------------------

WRITERS = 8
BATCHES = 25


async def test_concurrent_appends_from_separate_handles_make_one_chain(
    backend: Backend, clock: FakeClock
) -> None:
    storage = backend.storage
    await storage.append_audit(make_audit(clock.now(), detail="before"))
    handles = [backend.another() for _ in range(WRITERS)]
    await asyncio.gather(*(h.check() for h in handles))
    now = clock.now()

    async def writer(index: int, handle: Storage) -> list[list[int]]:
        out = []
        for batch in range(BATCHES):
            size = 1 + (index + batch) % 3
            events = [
                make_audit(now, agent=f"writer-{index}", detail=f"{index}/{batch}/{i}")
                for i in range(size)
            ]
            out.append(await handle.append_audits(events))
        return out

    results = await asyncio.gather(*(writer(i, h) for i, h in enumerate(handles)))
    total = 1 + sum(1 + (i + b) % 3 for i in range(WRITERS) for b in range(BATCHES))
    seqs = sorted(s for batches in results for batch in batches for s in batch)
    assert seqs == list(range(2, total + 1)), "gaps or duplicates"
    # A batch is one transaction: its records are consecutive.
    for batches in results:
        for batch in batches:
            assert batch == list(range(batch[0], batch[0] + len(batch)))
    chain = await whole_chain(storage)
    assert [r.seq for r in chain] == list(range(1, total + 1))
    report = verify(chain)
    assert report.ok, report.problem
    assert report.records == total
    assert await storage.audit_head() == (total, chain[-1].hash)
    # Each writer's records are in its own order in the chain.
    for index in range(WRITERS):
        mine = [r.body["detail"] for r in chain if r.body["agent"] == f"writer-{index}"]
        expected = [f"{index}/{b}/{i}" for b in range(BATCHES) for i in range(1 + (index + b) % 3)]
        assert mine == expected
    # Every handle sees the same head.
    heads = await asyncio.gather(*(h.audit_head() for h in handles))
    assert set(heads) == {(total, chain[-1].hash)}


# --- recorded arguments -------------------------------------------------------------------

CALL_ARGUMENTS = {"project": "WEB", "password": "[redacted]", "items": [{"n": 1, "p": 9.5}]}


async def test_records_with_arguments_are_chained_and_verify(
    storage: Storage, clock: FakeClock
) -> None:
    events = [
        make_audit(clock.advance(1)),
        full_audit(clock.advance(1), arguments=CALL_ARGUMENTS),
        make_audit(clock.advance(1), arguments={}),
        full_audit(clock.advance(1)),
    ]
    await storage.append_audits(events[:2])
    await storage.append_audits(events[2:])
    chain = await storage.list_chain()
    assert ["arguments" in r.body for r in chain] == [False, True, True, False]
    assert chain[1].body["arguments"] == CALL_ARGUMENTS
    assert chain[2].body["arguments"] == {}
    assert [r.body for r in chain] == [audit.body_of(e) for e in events]
    assert chain == audit.chain(0, GENESIS, events)
    points = [await checkpoint_at(storage, 4, clock)]
    report = verify(chain, points)
    assert report.ok, report.problem
    assert [e for _, e in await storage.list_audit()] == events


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_argument_edited_in_the_database_is_detected(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    with _database(kind, tmp_path) as url:
        storage = await open_storage(url)
        engine = create_engine(_sync(url))
        try:
            await storage.append_audits(
                [
                    make_audit(clock.advance(1), arguments={"a": 1}),
                    full_audit(clock.advance(1), arguments=CALL_ARGUMENTS),
                    make_audit(clock.advance(1), arguments={"a": 3}),
                ]
            )
            assert verify(await storage.list_chain()).ok
            c = t.audit_events.c
            for forged in (
                {**CALL_ARGUMENTS, "password": "hunter2"},
                {**CALL_ARGUMENTS, "items": [{"n": 2, "p": 9.5}]},
                None,  # the member removed: read back as a record without arguments
            ):
                with engine.begin() as conn:
                    conn.execute(t.audit_events.update().where(c.seq == 2).values(arguments=forged))
                report = verify(await storage.list_chain())
                assert report.problem is not None
                assert (report.problem.kind, report.problem.seq, report.records) == (
                    "edited",
                    2,
                    1,
                )
            with engine.begin() as conn:
                conn.execute(
                    t.audit_events.update().where(c.seq == 2).values(arguments=CALL_ARGUMENTS)
                )
            assert verify(await storage.list_chain()).ok
        finally:
            engine.dispose()
            await storage.close()


# --- checkpoints --------------------------------------------------------------------------


def same(a: Checkpoint, b: Checkpoint) -> bool:
    # The store keeps the JWS (which names the issuer), not the issuer beside it.
    return (a.seq, a.hash, a.time, a.kid, a.jws) == (b.seq, b.hash, b.time, b.kid, b.jws)


async def test_checkpoints_are_kept_in_order(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 9)
    chain = await storage.list_chain()
    points = []
    for seq in (6, 2, 9):
        clock.advance(0.123456)
        point = sign(chain[seq - 1], clock)
        await storage.add_checkpoint(point)
        points.append(point)
    kept = await storage.list_checkpoints()
    assert [p.seq for p in kept] == [2, 6, 9]
    by_seq = {p.seq: p for p in points}
    assert all(same(k, by_seq[k.seq]) for k in kept)
    assert all(k.time.tzinfo is not None for k in kept)
    assert [p.seq for p in await storage.list_checkpoints(after=2)] == [6, 9]
    assert [p.seq for p in await storage.list_checkpoints(after=5, limit=1)] == [6]
    assert [p.seq for p in await storage.list_checkpoints(after=9)] == []
    assert [p.seq for p in await storage.list_checkpoints(limit=2)] == [2, 6]
    report = verify(chain, kept)
    assert (report.ok, report.checkpoints) == (True, 3)


async def test_a_second_checkpoint_of_a_seq_conflicts(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 3)
    chain = await storage.list_chain()
    first = sign(chain[2], clock)
    await storage.add_checkpoint(first)
    clock.advance(1)
    with pytest.raises(Conflict):
        await storage.add_checkpoint(sign(chain[2], clock))
    (kept,) = await storage.list_checkpoints()
    assert same(kept, first)


async def test_a_checkpoint_with_nul_is_refused(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 1)
    (record,) = await storage.list_chain()
    point = sign(record, clock)
    with pytest.raises(ValueError, match="NUL"):
        await storage.add_checkpoint(replace(point, jws=point.jws + "\x00"))
    assert await storage.list_checkpoints() == []


# --- retention ----------------------------------------------------------------------------


async def test_delete_through_refuses_the_head_and_an_unpinned_record(
    storage: Storage, clock: FakeClock
) -> None:
    with pytest.raises(ValueError, match="head"):
        await storage.delete_audit_through(0)
    await fill(storage, clock, 10)
    await checkpoint_at(storage, 10, clock)
    for seq in (10, 11, 50):
        with pytest.raises(ValueError, match="head"):
            await storage.delete_audit_through(seq)
    for seq in (5, 0):
        with pytest.raises(ValueError, match=f"no checkpoint pins record {seq}"):
            await storage.delete_audit_through(seq)
    assert len(await storage.list_chain()) == 10


async def test_delete_through_a_pinned_record(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 10)
    whole = await storage.list_chain()
    head = await storage.audit_head()
    early = await checkpoint_at(storage, 2, clock)
    pin = await checkpoint_at(storage, 5, clock)
    assert await storage.delete_audit_through(5) == 5
    live = await storage.list_chain()
    assert live == whole[5:]
    assert await storage.audit_head() == head
    # The rest verifies from the pinned hash; the archived segment's checkpoints are kept
    # and skipped; from the start it is a gap.
    report = verify(live, [early, pin], start_prev=pin.hash)
    assert report.ok, report.problem
    assert (report.records, report.first_seq, report.checkpoints) == (5, 6, 2)
    missing = verify(live, [early, pin])
    assert missing.problem is not None
    assert (missing.problem.kind, missing.problem.seq) == ("missing", 6)
    # The archive and the live store together are the whole chain.
    assert verify(whole[:5] + live, [early, pin]).ok
    # Appends go on numbering and linking after the head.
    assert await storage.append_audit(make_audit(clock.advance(1))) == 11
    live = await storage.list_chain()
    assert live[-1].prev == whole[-1].hash
    assert verify(live, [early, pin], start_prev=pin.hash).ok
    # Again through the same record: nothing left to delete; further once pinned.
    assert await storage.delete_audit_through(5) == 0
    await checkpoint_at(storage, 8, clock)
    assert await storage.delete_audit_through(8) == 3
    assert [r.seq for r in await storage.list_chain()] == [9, 10, 11]
    assert [p.seq for p in await storage.list_checkpoints()] == [2, 5, 8]


async def test_numbers_are_not_reused_after_a_delete(storage: Storage, clock: FakeClock) -> None:
    await fill(storage, clock, 4)
    await checkpoint_at(storage, 3, clock)
    assert await storage.delete_audit_through(3) == 3
    assert await storage.append_audits([make_audit(clock.now())] * 2) == [5, 6]
    assert [r.seq for r in await storage.list_chain()] == [4, 5, 6]


# --- list_audit: the new filters ----------------------------------------------------------


async def test_list_audit_by_tool_txn_and_time(storage: Storage, clock: FakeClock) -> None:
    start = clock.now()
    rows = [
        ("github", "txn-1"),
        ("deploy", "txn-1"),
        ("github", None),
        ("github", "txn-2"),
        (None, "txn-2"),
        ("deploy", None),
    ]
    for i, (tool, txn) in enumerate(rows):
        await storage.append_audit(make_audit(start + timedelta(seconds=i), tool=tool, txn=txn))

    async def found(**kw: object) -> list[int]:
        return [n for n, _ in await storage.list_audit(**kw)]  # type: ignore[arg-type]

    assert await found(tool="github") == [1, 3, 4]
    assert await found(tool="deploy") == [2, 6]
    assert await found(txn="txn-1") == [1, 2]
    assert await found(txn="txn-2", tool="github") == [4]
    assert await found(tool="git") == []
    assert await found(tool="github%") == []
    assert await found(tool="github\x00") == []
    assert await found(txn="txn-1\x00") == []
    # since inclusive, until exclusive, any zone.
    at = [start + timedelta(seconds=i) for i in range(len(rows))]
    assert await found(since=at[2]) == [3, 4, 5, 6]
    assert await found(until=at[2]) == [1, 2]
    assert await found(since=at[1], until=at[4]) == [2, 3, 4]
    assert await found(since=at[1].astimezone(IST), until=at[4].astimezone(IST)) == [2, 3, 4]
    assert await found(since=at[1] + timedelta(microseconds=1)) == [3, 4, 5, 6]
    assert await found(until=at[0]) == []
    assert await found(since=at[3], until=at[3]) == []
    assert await found(since=at[5] + timedelta(days=1)) == []
    assert await found(since=at[1], tool="github", txn="txn-2") == [4]
    assert await found(since=at[1], descending=True) == [6, 5, 4, 3, 2]
    assert await found(until=at[4], descending=True, limit=2) == [4, 3]
    assert await found(since=at[1], after=3, limit=2) == [4, 5]


# --- the 0007 migration: chaining what was there ------------------------------------------


def _sync(url: str) -> str:
    return parse_database_url(url).sync_url.render_as_string(hide_password=False)


def _without_arguments(row: dict[str, object]) -> dict[str, object]:
    """An audit row as a schema before 0008 holds it."""
    assert row.pop("arguments") is None
    return row


@contextlib.contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "postgres":
        with postgres_schema(postgres_url()) as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_upgrading_chains_existing_records(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Records written under 0006 (no prev_hash, no hash; numbers that may skip, as a
    failed PostgreSQL insert uses one up) are chained in order by 0007, verify, and the
    chain goes on from them."""
    with _database(kind, tmp_path) as url:
        sync = _sync(url)
        command.upgrade(alembic_config(url=sync), "0006")
        engine = create_engine(sync)
        try:
            columns = {c["name"] for c in inspect(engine).get_columns("audit_events")}
            assert "hash" not in columns
            assert "prev_hash" not in columns
            old = [
                full_audit(clock.now().astimezone(IST), txn="txn-1", exception_id="bg-1"),
                make_audit(clock.advance(1.5), latency_ms=12.345678, detail="x" * 2000),
                make_audit(clock.advance(1), event="task.started", decision="info"),
                full_audit(clock.advance(0.000001), policies=()),
            ]
            seqs = [3, 4, 6, 10]
            with engine.begin() as conn:
                # The columns 0006 has: the chain's (and 0008's) are not part of the statement.
                conn.execute(
                    t.audit_events.insert(),
                    [
                        {**_without_arguments(audit_row(e)), "seq": s}
                        for s, e in zip(seqs, old, strict=True)
                    ],
                )
        finally:
            engine.dispose()
        await migrate(url)
        storage = await open_storage(url)
        try:
            chain = await storage.list_chain()
            assert [r.seq for r in chain] == seqs
            assert [r.body for r in chain] == [audit.body_of(e) for e in old]
            assert chain[0].prev == GENESIS
            report = verify(chain)
            assert report.ok, report.problem
            assert (report.first_seq, report.last_seq) == (3, 10)
            assert await storage.audit_head() == (10, chain[-1].hash)
            assert await storage.append_audit(make_audit(clock.advance(1))) == 11
            after = await storage.list_chain()
            assert after[-1].prev == chain[-1].hash
            assert verify(after).ok
        finally:
            await storage.close()
        # The service's check of the live store agrees: a migrated chain may start past 1.
        services = await open_services(make_settings(tmp_path, storage={"url": url}), clock=clock)
        try:
            assert await services.audit.checkpoint() is not None
            report = await services.audit.verify()
            assert report.ok, report.problem
            live = await services.storage.list_chain()
            assert (report.records, report.checkpoints, report.first_seq) == (len(live), 1, 3)
        finally:
            await services.aclose()


async def test_upgrading_an_empty_log(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    command.upgrade(alembic_config(url=_sync(url)), "0006")
    await migrate(url)
    storage = await open_storage(url)
    try:
        assert await storage.audit_head() == (0, GENESIS)
        assert await storage.append_audit(make_audit(datetime(2026, 1, 1, tzinfo=UTC))) == 1
        assert verify(await storage.list_chain()).ok
    finally:
        await storage.close()


# --- the 0008 migration: arguments, and every existing hash kept --------------------------


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_upgrading_to_0008_keeps_existing_chains_valid(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    """A chain (and its checkpoint) written under 0007 verifies unchanged after 0008, and
    goes on with records that carry arguments."""
    with _database(kind, tmp_path) as url:
        sync = _sync(url)
        command.upgrade(alembic_config(url=sync), "0007")
        engine = create_engine(sync)
        try:
            columns = {c["name"] for c in inspect(engine).get_columns("audit_events")}
            assert "arguments" not in columns
            assert "hash" in columns
            old = [
                full_audit(clock.now().astimezone(IST), txn="txn-1"),
                make_audit(clock.advance(1.5), latency_ms=12.345678),
                make_audit(clock.advance(1), event="task.started", decision="info"),
            ]
            rows = codec.chain_rows([audit_row(e) for e in old], 0, GENESIS)
            point = audit.sign_checkpoint(
                seq=3, head=rows[-1]["hash"], time=clock.now(), issuer=ISSUER, key=SIGNER
            )
            with engine.begin() as conn:
                conn.execute(t.audit_events.insert(), [_without_arguments(r) for r in rows])
                conn.execute(t.audit_checkpoints.insert(), codec.checkpoint_row(point))
        finally:
            engine.dispose()
        await migrate(url)
        storage = await open_storage(url)
        try:
            chain = await storage.list_chain()
            assert [r.hash for r in chain] == [r["hash"] for r in rows]
            assert all("arguments" not in r.body for r in chain)
            assert [e for _, e in await storage.list_audit()] == old
            report = verify(chain, await storage.list_checkpoints())
            assert report.ok, report.problem
            assert report.checkpoints == 1
            assert (
                await storage.append_audit(full_audit(clock.advance(1), arguments=CALL_ARGUMENTS))
                == 4
            )
            after = await storage.list_chain()
            assert after[:3] == chain
            assert after[3].body["arguments"] == CALL_ARGUMENTS
            assert verify(after, await storage.list_checkpoints()).ok
        finally:
            await storage.close()


async def test_downgrading_below_0008_refuses_to_drop_recorded_arguments(
    tmp_path: Path, clock: FakeClock
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'args.db'}"
    storage = await open_storage(url)
    try:
        await storage.append_audit(make_audit(clock.now()))
        await storage.append_audit(make_audit(clock.now(), arguments={"a": 1}))
    finally:
        await storage.close()
    with pytest.raises(RuntimeError, match="would break the audit chain"):
        command.downgrade(alembic_config(url=_sync(url)), "0007")
    storage = await open_storage(url)
    try:
        assert verify(await storage.list_chain()).ok  # nothing was dropped
    finally:
        await storage.close()
    # Without recorded arguments, the column goes.
    empty = f"sqlite:///{tmp_path / 'none.db'}"
    storage = await open_storage(empty)
    try:
        await storage.append_audit(make_audit(clock.now()))
    finally:
        await storage.close()
    command.downgrade(alembic_config(url=empty), "0007")
    engine = create_engine(empty)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("audit_events")}
    finally:
        engine.dispose()
    assert "arguments" not in columns

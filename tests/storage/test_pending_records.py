"""Records that commit with the change they record (taskbound.storage.pending), on every
backend: both land or neither does, whatever fails."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import psycopg
import pytest

from taskbound.core import audit
from taskbound.core.clock import FakeClock
from taskbound.errors import Conflict, StorageError
from taskbound.storage import Storage, sql
from taskbound.storage.pending import claim, recorded
from tests.services import postgres_conninfo
from tests.storage.conftest import Backend, allow_audit_inserts, refuse_audit_inserts
from tests.storage.test_conformance import (
    make_agent,
    make_audit,
    make_credential,
    make_owner,
    make_task,
)


async def _events(storage: Storage) -> list[str]:
    return [e.detail or "" for _, e in await storage.list_audit(limit=1000)]


async def _chain_verifies(storage: Storage) -> None:
    report = audit.verify(await storage.list_chain(limit=1000))
    assert report.ok, report


async def test_the_change_and_its_records_land_together(storage: Storage, clock: FakeClock) -> None:
    now = clock.now()
    first = make_audit(now, event="admin.owner.created", detail="alice created")
    second = make_audit(now, event="admin.note", detail="and noted")
    async with recorded(storage, first, second):
        await storage.create_owner(make_owner(now))
    assert await storage.get_owner("alice") is not None
    assert await _events(storage) == ["alice created", "and noted"]
    await _chain_verifies(storage)


async def test_a_failed_change_leaves_no_record(storage: Storage, clock: FakeClock) -> None:
    now = clock.now()
    await storage.create_owner(make_owner(now))
    with pytest.raises(Conflict):
        async with recorded(storage, make_audit(now, detail="alice created twice")):
            await storage.create_owner(make_owner(now))
    with pytest.raises(RuntimeError):
        async with recorded(storage, make_audit(now, detail="never")):
            raise RuntimeError("the change was refused before it was made")
    assert await _events(storage) == []


async def test_a_record_the_store_cannot_take_stops_the_change_first(
    storage: Storage, clock: FakeClock
) -> None:
    now = clock.now()
    with pytest.raises(ValueError, match="NUL"):
        async with recorded(storage, make_audit(now, detail="nul \x00 inside")):
            await storage.create_owner(make_owner(now))
    assert await storage.get_owner("alice") is None
    assert await _events(storage) == []


# The in-memory store has no audit store apart from itself that could fail.
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_when_the_audit_store_fails_the_change_does_not_happen(
    backend: Backend, clock: FakeClock
) -> None:
    assert backend.url is not None
    storage, now = backend.storage, clock.now()
    refuse_audit_inserts(backend.url)
    try:
        with pytest.raises(StorageError):
            async with recorded(storage, make_audit(now, detail="alice created")):
                await storage.create_owner(make_owner(now))
        assert await storage.get_owner("alice") is None
    finally:
        allow_audit_inserts(backend.url)
    # The store works again: the same change, with its record, now lands.
    async with recorded(storage, make_audit(now, detail="alice created")):
        await storage.create_owner(make_owner(now))
    assert await _events(storage) == ["alice created"]


async def test_a_write_that_changed_nothing_does_not_take_the_records(
    storage: Storage, clock: FakeClock
) -> None:
    now = clock.now()
    await storage.create_owner(make_owner(now))
    await storage.create_agent(make_agent(now))
    stray = make_credential(make_task(now, "no-such-task"), "jti-stray", now)
    async with recorded(storage, make_audit(now, detail="bob created")):
        # Refused (no live task): rolled back, so the records wait for the next write.
        assert not await storage.add_credential(stray, now)
        await storage.create_owner(make_owner(now, "bob"))
    assert await _events(storage) == ["bob created"]
    await _chain_verifies(storage)


async def test_records_wait_only_for_the_task_that_opened_the_block(
    storage: Storage, clock: FakeClock
) -> None:
    now = clock.now()
    seen: list[object] = []

    async def elsewhere() -> None:
        seen.append(claim())  # a task started inside the block inherits, never takes
        await storage.append_audit(make_audit(now, detail="another task's record"))

    async with recorded(storage, make_audit(now, detail="alice created")):
        await asyncio.create_task(elsewhere())
        await storage.create_owner(make_owner(now))
    assert seen == [None]
    assert await _events(storage) == ["another task's record", "alice created"]
    await _chain_verifies(storage)


async def test_records_of_two_changes_in_a_row_are_not_mixed(
    storage: Storage, clock: FakeClock
) -> None:
    now = clock.now()
    base = make_audit(now, event="admin.owner.created")
    async with recorded(storage, replace(base, detail="alice")):
        await storage.create_owner(make_owner(now))
    async with recorded(storage, replace(base, detail="bob")):
        await storage.create_owner(make_owner(now, "bob"))
    assert await _events(storage) == ["alice", "bob"]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_held_chain_lock_fails_an_append_in_bounded_time(
    backend: Backend, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session sitting on the chain's lock makes appends (and the changes they
    record) fail after the lock timeout, never hang; once it lets go, they land."""
    assert backend.url is not None
    monkeypatch.setattr(sql, "AUDIT_LOCK_TIMEOUT_MS", 200)
    storage, now = backend.storage, clock.now()
    with psycopg.connect(postgres_conninfo(backend.url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (sql._POSTGRES_AUDIT_LOCK,))
        started = time.monotonic()
        with pytest.raises(StorageError):
            await storage.append_audit(make_audit(now, detail="waits"))
        with pytest.raises(StorageError):
            async with recorded(storage, make_audit(now, detail="alice created")):
                await storage.create_owner(make_owner(now))
        assert time.monotonic() - started < 5
        holder.execute("SELECT pg_advisory_unlock(%s)", (sql._POSTGRES_AUDIT_LOCK,))
    assert await storage.get_owner("alice") is None
    await storage.append_audit(make_audit(now, detail="lands"))
    assert await _events(storage) == ["lands"]

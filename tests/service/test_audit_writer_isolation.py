"""Group commit shares the I/O, never a record's own failure: a record the store cannot
take fails its caller alone, and no caller is left waiting forever (closed writer, a store
answering with the wrong number of records)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from taskbound.core import audit
from taskbound.core.model import AuditEvent
from taskbound.errors import StorageError
from taskbound.service.audit import AuditWriter
from taskbound.storage import open_storage
from taskbound.storage.memory import MemoryStorage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def call(i: int, action: str | None = None) -> AuditEvent:
    return AuditEvent(T0, "gateway.call", "allow", detail=f"call {i}", action=action)


async def test_an_unstorable_record_fails_alone_on_sqlite(tmp_path: Path) -> None:
    storage = await open_storage(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    writer = AuditWriter(storage)
    try:
        events = [call(i) for i in range(10)]
        events.insert(5, call(99, action="wipe\x00"))  # no store keeps a NUL
        results = await asyncio.gather(*map(writer.append, events), return_exceptions=True)
        assert isinstance(results[5], ValueError)
        assert [r for i, r in enumerate(results) if i != 5] == list(range(1, 11))
        chain = await storage.list_chain(limit=100)
        assert [r.body["detail"] for r in chain] == [f"call {i}" for i in range(10)]
        assert audit.verify(chain).ok
    finally:
        await writer.close()
        await storage.close()


class PickyStorage(MemoryStorage):
    """A store with a rule of its own (the writer's checks cannot know it): it refuses,
    before writing anything, any batch holding a record whose detail is ``poison``."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        self.commits += 1
        await asyncio.sleep(0.001)
        if any(e.detail == "poison" for e in events):
            raise ValueError("this store refuses poison")
        return await super().append_audits(events)


async def test_a_record_the_store_refuses_in_a_batch_fails_alone() -> None:
    storage = PickyStorage()
    writer = AuditWriter(storage)
    events = [call(i) for i in range(20)]
    events.insert(7, AuditEvent(T0, "gateway.call", "deny", detail="poison"))
    results = await asyncio.gather(*map(writer.append, events), return_exceptions=True)
    assert isinstance(results[7], ValueError)
    landed = [r for i, r in enumerate(results) if i != 7 and isinstance(r, int)]
    assert sorted(landed) == list(range(1, 21))
    assert audit.verify(await storage.list_chain(limit=100)).ok
    await writer.close()


class StuckStorage(MemoryStorage):
    """A store whose commits never return (until cancelled)."""

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_closing_the_writer_fails_every_waiter_instead_of_leaving_it_hanging() -> None:
    writer = AuditWriter(StuckStorage())
    waiting = [asyncio.create_task(writer.append(call(i))) for i in range(5)]
    await asyncio.sleep(0.01)  # the first is being committed; the rest wait in the queue
    extra = asyncio.create_task(writer.append(call(5)))
    await asyncio.sleep(0)
    await writer.close()
    results = await asyncio.wait_for(
        asyncio.gather(*waiting, extra, return_exceptions=True), timeout=2
    )
    assert all(isinstance(r, StorageError) for r in results), results


class MiscountingStorage(MemoryStorage):
    """A broken store: answers one sequence number fewer than it was given records."""

    broken = True

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        seqs = await super().append_audits(events)
        return seqs[:-1] if self.broken else seqs


async def test_a_store_answering_the_wrong_count_fails_the_batch_and_the_writer_goes_on() -> None:
    storage = MiscountingStorage()
    writer = AuditWriter(storage)
    results = await asyncio.wait_for(
        asyncio.gather(*(writer.append(call(i)) for i in range(4)), return_exceptions=True),
        timeout=2,
    )
    assert all(isinstance(r, StorageError) for r in results), results
    storage.broken = False
    assert await writer.append(call(9)) > 0
    await writer.close()


@pytest.mark.parametrize(
    "bad",
    [
        AuditEvent(T0, "gateway.call", "deny", action="a\x00"),
        AuditEvent(T0, "gateway.call", "deny", detail="\x00"),
    ],
)
async def test_an_unstorable_record_is_refused_before_it_is_queued(bad: AuditEvent) -> None:
    storage = PickyStorage()
    writer = AuditWriter(storage)
    with pytest.raises(ValueError, match="NUL"):
        await writer.append(bad)
    assert storage.commits == 0
    await writer.close()

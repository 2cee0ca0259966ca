"""Group commit: concurrent appends share transactions, each caller waits for its own
durable record, and a failed commit fails every caller of that batch."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from taskbound.core.model import AuditEvent
from taskbound.service.audit import AuditWriter
from taskbound.storage.memory import MemoryStorage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.commits = 0
        self.fail = False

    async def append_audits(self, events):  # type: ignore[no-untyped-def]
        self.commits += 1
        await asyncio.sleep(0.001)  # a commit takes time; callers pile up meanwhile
        if self.fail:
            raise OSError("disk full")
        return await super().append_audits(events)


async def test_concurrent_appends_share_commits_and_all_land() -> None:
    storage = CountingStorage()
    writer = AuditWriter(storage)
    seqs = await asyncio.gather(
        *(writer.append(AuditEvent(T0, "gateway.call", "allow", detail=str(i))) for i in range(100))
    )
    assert sorted(seqs) == list(range(1, 101))
    assert storage.commits < 100  # grouped
    assert len(await storage.list_audit(limit=1000)) == 100
    await writer.close()


async def test_a_failed_commit_fails_every_waiter_and_the_writer_recovers() -> None:
    storage = CountingStorage()
    writer = AuditWriter(storage)
    storage.fail = True
    results = await asyncio.gather(
        *(writer.append(AuditEvent(T0, "gateway.call", "allow")) for _ in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, OSError) for r in results)
    storage.fail = False
    assert await writer.append(AuditEvent(T0, "gateway.call", "allow")) == 1
    await writer.close()


async def test_audit_store_failure_refuses_the_call() -> None:
    storage = CountingStorage()
    storage.fail = True
    writer = AuditWriter(storage)
    with pytest.raises(OSError, match="disk full"):
        await writer.append(AuditEvent(T0, "gateway.call", "allow"))
    await writer.close()

"""Group commit for audit records: calls that arrive together share one transaction, and
each caller still waits until its own record is durable (DESIGN.md invariant 2).

One writer task drains the queue: whatever accumulated while the previous commit ran goes
into the next one. Under no load that is one record per commit (no added latency); under
load the commits grow and the fsync cost is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from taskbound.core.model import AuditEvent
from taskbound.storage.base import Storage

log = logging.getLogger("taskbound.audit")

MAX_BATCH = 256


class AuditWriter:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: asyncio.Queue[tuple[AuditEvent, asyncio.Future[int]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def append(self, event: AuditEvent) -> int:
        """The record's sequence number once it is durable; raises when it could not be
        written (the caller must then refuse to answer)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put((event, done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                seqs = await self._storage.append_audits([event for event, _ in batch])
            except Exception as exc:  # every waiter of this batch learns it failed
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), seq in zip(batch, seqs, strict=True):
                if not done.done():
                    done.set_result(seq)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

"""Group commit for audit records: calls that arrive together share one transaction, and
each caller still waits until its own record is durable (DESIGN.md invariant 2).

One writer task drains the queue: whatever accumulated while the previous commit ran goes
into the next one. Under no load that is one record per commit (no added latency); under
load the commits grow and the fsync cost is shared.

Only the I/O is shared, never a record's own failure: a record the store cannot take (a
NUL character in a text field, a naive time) is refused to its caller before it joins a
batch, so it cannot fail the calls that would have shared its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from taskbound.core.model import AuditEvent
from taskbound.errors import StorageError
from taskbound.storage import codec
from taskbound.storage.base import Storage

log = logging.getLogger("taskbound.audit")

MAX_BATCH = 256

_Waiter = tuple[AuditEvent, asyncio.Future[int]]


class AuditWriter:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: asyncio.Queue[_Waiter] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def append(self, event: AuditEvent) -> int:
        """The record's sequence number once it is durable; raises when it could not be
        written (the caller must then refuse to answer)."""
        # The store's own checks (ValueError, TypeError), here, for this caller alone.
        codec.audit_row(event)
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
                await self._commit(batch)
            except asyncio.CancelledError:
                # Closed mid-commit: these callers are refused (their records may or may
                # not have landed; a refused call with a record is safe, the reverse not).
                _fail(batch, StorageError(internal="the audit writer was closed"))
                raise

    async def _commit(self, batch: list[_Waiter]) -> None:
        try:
            seqs = await self._storage.append_audits([event for event, _ in batch])
            if len(seqs) != len(batch):
                raise StorageError(internal="audit append returned a wrong number of records")
        except (ValueError, TypeError) as exc:
            # Refused before anything was written. Should a store refuse a record that
            # passed the checks in append, it alone fails: each is tried on its own.
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for waiter in batch:
                await self._commit([waiter])
            return
        except Exception as exc:  # every waiter of this batch learns it failed
            _fail(batch, exc)
            return
        for (_, done), seq in zip(batch, seqs, strict=True):
            if not done.done():
                done.set_result(seq)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Whoever still waits learns that their record was not written.
        while not self._queue.empty():
            _fail([self._queue.get_nowait()], StorageError(internal="the audit writer was closed"))


def _fail(batch: list[_Waiter], exc: BaseException) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(exc)

"""The revocation feed: how every gateway learns of revocations, and knows that it has.

A :class:`RevocationFeed` keeps a :class:`~taskbound.core.revocation.RevocationState`
current from the revocation log:

* at start it loads every entry that still matters, before the gateway serves;
* in this process, the broker calls :meth:`RevocationFeed.sync` after each revocation, so
  the state has it before the revoking request is answered;
* across processes sharing PostgreSQL, a dedicated connection LISTENs for the commit-time
  notification and catches up by sequence (``seq > last``) over that same connection, so
  nothing is missed across a reconnect or restart; on SQLite it polls;
* every successful catch-up *confirms* the feed. When the last confirmation is older than
  the staleness bound, :meth:`RevocationFeed.stale` says so and the gateway refuses calls
  (503 ``revocation_feed_stale``) until the feed has caught up again. A lost connection is
  retried with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from taskbound.config import Settings
from taskbound.core.clock import Clock
from taskbound.core.model import Revocation
from taskbound.core.revocation import RevocationState
from taskbound.storage.base import Storage

log = logging.getLogger("taskbound.revocations")

PAGE = 1000
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_PRUNE_EVERY = 60.0


class FeedSource(Protocol):
    """Where the feed reads the log and waits for news."""

    async def open(self) -> None: ...
    async def fetch(
        self, *, after: int, limit: int, live_at: datetime | None = None
    ) -> list[Revocation]: ...
    async def wait(self, seconds: float) -> bool: ...
    async def close(self) -> None: ...


class PollingSource:
    """Any store: read with ``list_revocations``; wait by sleeping."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def open(self) -> None:
        await self._storage.check()

    async def fetch(
        self, *, after: int, limit: int, live_at: datetime | None = None
    ) -> list[Revocation]:
        return await self._storage.list_revocations(after=after, limit=limit, live_at=live_at)

    async def wait(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return False

    async def close(self) -> None:
        pass


def source_for(settings: Settings, storage: Storage) -> FeedSource:
    """LISTEN/NOTIFY on PostgreSQL, polling otherwise."""
    url = settings.storage_url
    if settings.revocation.listen_url is not None:
        url = settings.revocation.listen_url.get_secret_value()
    if url.startswith("postgresql"):
        from taskbound.storage.pg_listen import PostgresListener

        return PostgresListener(url)
    return PollingSource(storage)


class RevocationFeed:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        clock: Clock,
        *,
        source: FeedSource | None = None,
        state: RevocationState | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        cfg = settings.revocation
        self.state = state or RevocationState()
        self._storage = storage
        self._clock = clock
        self._source = source or source_for(settings, storage)
        self._bound = cfg.staleness_bound_seconds
        self._heartbeat = cfg.heartbeat_seconds
        self._leeway = timedelta(seconds=settings.credentials.clock_leeway_seconds)
        self._monotonic = monotonic
        self._confirmed: float | None = None  # monotonic time the last catch-up started
        self._loaded = False
        self._task: asyncio.Task[None] | None = None
        self._was_stale = False
        self._last_prune = monotonic()
        self.applied = 0  # entries applied since start (for /metrics)
        self.failures = 0  # failed connection or catch-up attempts (for /metrics)
        # Told each batch of entries as it is applied (e.g. to drop cached answers).
        self.listeners: list[Callable[[list[Revocation]], None]] = []

    # --- state -------------------------------------------------------------------------

    def age(self) -> float | None:
        """Seconds since the feed was last confirmed; None before the first time."""
        if self._confirmed is None:
            return None
        return max(0.0, self._monotonic() - self._confirmed)

    def stale(self) -> float | None:
        """None while the feed is confirmed within the bound; otherwise its age (inf when
        it never was). A stale feed means: refuse calls."""
        age = self.age()
        if age is not None and age <= self._bound and self._loaded:
            if self._was_stale:
                self._was_stale = False
                log.warning("revocation feed recovered", extra={"event": "revocation.feed_ok"})
            return None
        if not self._was_stale:
            self._was_stale = True
            log.error(
                "revocation feed is stale: gateway calls are refused until it catches up",
                extra={"event": "revocation.feed_stale", "age_seconds": age},
            )
        return float("inf") if age is None else age

    # --- catching up -------------------------------------------------------------------

    async def load(self) -> None:
        """Load every entry that still matters (start-up, before serving) and confirm."""
        started = self._monotonic()
        await self._source.open()
        try:
            live_at = self._clock.now() - self._leeway
            while True:
                page = await self._source.fetch(after=self.state.seq, limit=PAGE, live_at=live_at)
                self._apply(page)
                if len(page) < PAGE:
                    break
            self._loaded = True
        except BaseException:
            await self._source.close()
            raise
        self._confirmed = started
        log.info(
            "revocation state loaded",
            extra={"event": "revocation.loaded", "seq": self.state.seq, "entries": len(self.state)},
        )

    async def sync(self) -> None:
        """Catch up now from the store (after a revocation made in this process), within
        the staleness bound (TimeoutError beyond it). Does not confirm the feed: only its
        own source can."""
        async with asyncio.timeout(self._bound):
            while True:
                page = await self._storage.list_revocations(after=self.state.seq, limit=PAGE)
                self._apply(page)
                if len(page) < PAGE:
                    return

    async def _catch_up(self) -> None:
        started = self._monotonic()
        async with asyncio.timeout(self._bound):
            while True:
                page = await self._source.fetch(after=self.state.seq, limit=PAGE)
                self._apply(page)
                if len(page) < PAGE:
                    break
        self._confirmed = started

    def _apply(self, entries: list[Revocation]) -> None:
        """Apply what is new. Readers run concurrently (the loop and ``sync``) and never
        hold a lock across I/O; this runs without awaiting, so keeping only entries past
        the state's sequence keeps them applied once and in order."""
        entries = [e for e in entries if e.seq > self.state.seq]
        if not entries:
            return
        for entry in entries:
            self.state.apply(entry)
        self.applied += len(entries)
        for listener in self.listeners:
            try:
                listener(entries)
            except Exception:
                log.exception("revocation listener failed")

    def _prune(self) -> None:
        if self._monotonic() - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = self._monotonic()
        dropped = self.state.prune(self._clock.now() - self._leeway)
        if dropped:
            log.debug("revocation state pruned", extra={"dropped": dropped})

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the log until cancelled: catch up, wait for a notification or the
        heartbeat, again; reconnect with backoff on any failure."""
        backoff = _BACKOFF_MIN
        opened = self._loaded
        while True:
            try:
                if not opened:
                    await self._source.open()
                    opened = True
                    if not self._loaded:
                        await self.load()
                while True:
                    await self._catch_up()
                    backoff = _BACKOFF_MIN
                    self._prune()
                    await self._source.wait(self._heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                log.warning(
                    "revocation feed failed; retrying",
                    extra={
                        "event": "revocation.feed_error",
                        "error": getattr(exc, "internal", None) or type(exc).__name__,
                        "retry_in": backoff,
                    },
                )
                with contextlib.suppress(Exception):
                    await self._source.close()
                opened = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._source.close()

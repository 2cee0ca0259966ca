"""Replay caches: remember keys (DPoP proof ``jti``s) until they expire.

:class:`MemoryReplayCache` serves one process. Several broker or gateway replicas need a
shared cache (Redis, DESIGN.md §6) so that a proof replayed to another replica is caught.
"""

from __future__ import annotations

import heapq
from datetime import datetime

from taskbound.storage.codec import utc


class MemoryReplayCache:
    """An in-process :class:`~taskbound.storage.base.ReplayCache` holding at most
    ``max_entries`` keys.

    Expired keys are pruned on every call, oldest expiry first, from a heap: each key is
    pushed and popped once, so a call costs amortised O(log n). When the cache is full of
    keys that have not expired yet it records nothing and answers True (fail closed): a
    flood of fresh proofs makes the gateway refuse proofs, never forget them.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._expiry: dict[str, datetime] = {}
        # (expires_at, key) for every key in _expiry, and nothing else.
        self._heap: list[tuple[datetime, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def seen(self, key: str, expires_at: datetime, now: datetime) -> bool:
        """True if ``key`` is recorded and unexpired at ``now``; else record it until
        ``expires_at`` and return False. True, recording nothing, when the cache is full."""
        expires_at, now = utc(expires_at), utc(now)
        self._prune(now)
        if key in self._expiry:
            return True
        if expires_at <= now:
            # Already stale: refuse it without recording (as the Redis cache does; a
            # proof whose acceptance window has passed must never count as fresh).
            return True
        if len(self._expiry) >= self._max_entries:
            return True
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return False

    def _prune(self, now: datetime) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            del self._expiry[key]

"""The replay cache contract (``storage.base.ReplayCache``), run against each implementation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbound.core.clock import FakeClock
from taskbound.storage import MemoryReplayCache, ReplayCache

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)

CacheFactory = Callable[[int], ReplayCache]
FACTORIES = [pytest.param(lambda n: MemoryReplayCache(max_entries=n), id="memory")]


@pytest.fixture(params=FACTORIES)
def make_cache(request: pytest.FixtureRequest) -> CacheFactory:
    factory: CacheFactory = request.param
    return factory


async def test_second_sighting_is_a_replay(make_cache: CacheFactory, clock: FakeClock) -> None:
    cache = make_cache(100)
    until = clock.now() + timedelta(seconds=60)
    assert await cache.seen("jti-1", until, clock.now()) is False
    assert await cache.seen("jti-1", until, clock.advance(59)) is True
    assert await cache.seen("jti-2", until, clock.now()) is False


async def test_forgotten_after_expiry(make_cache: CacheFactory, clock: FakeClock) -> None:
    cache = make_cache(100)
    until = clock.now() + timedelta(seconds=60)
    assert await cache.seen("jti-1", until, clock.now()) is False
    clock.set(until)  # expires_at is the first instant it is no longer remembered
    assert await cache.seen("jti-1", until + timedelta(seconds=60), clock.now()) is False
    assert await cache.seen("jti-1", until + timedelta(seconds=60), clock.now()) is True


async def test_already_expired_key_is_refused_and_not_recorded(
    make_cache: CacheFactory, clock: FakeClock
) -> None:
    cache = make_cache(1)
    assert await cache.seen("old", clock.now(), clock.now()) is True
    # It took no room: a fresh key still fits.
    assert await cache.seen("new", clock.now() + timedelta(seconds=5), clock.now()) is False


async def test_full_cache_fails_closed(make_cache: CacheFactory, clock: FakeClock) -> None:
    cache = make_cache(3)
    for i in range(3):
        assert (
            await cache.seen(f"k{i}", clock.now() + timedelta(seconds=10 + i), clock.now()) is False
        )
    # Full of live keys: a new key is refused, not recorded.
    assert await cache.seen("k3", clock.now() + timedelta(seconds=60), clock.now()) is True
    assert await cache.seen("k0", clock.now() + timedelta(seconds=60), clock.now()) is True
    # Once the earliest expires, its slot is free again.
    clock.advance(10)
    assert await cache.seen("k3", clock.now() + timedelta(seconds=60), clock.now()) is False
    assert await cache.seen("k4", clock.now() + timedelta(seconds=60), clock.now()) is True
    assert await cache.seen("k2", clock.now() + timedelta(seconds=60), clock.now()) is True


async def test_naive_times_are_refused(make_cache: CacheFactory) -> None:
    cache = make_cache(10)
    with pytest.raises(ValueError, match="naive"):
        await cache.seen("k", datetime(2026, 1, 1), T0)


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryReplayCache(max_entries=0)


async def test_memory_is_bounded_by_pruning(clock: FakeClock) -> None:
    cache = MemoryReplayCache(max_entries=50)
    for i in range(10_000):
        now = clock.advance(1)
        assert await cache.seen(f"jti-{i}", now + timedelta(seconds=30), now) is False
    assert len(cache) == 30


# One operation: (key index, lifetime in seconds, seconds the clock moves first).
_operations = st.lists(
    st.tuples(st.integers(0, 7), st.integers(-2, 20), st.integers(0, 6)), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(ops=_operations, capacity=st.integers(1, 6))
async def test_agrees_with_a_reference_model(
    ops: list[tuple[int, int, int]], capacity: int
) -> None:
    """Against a plain dict that prunes everything expired on each call."""
    cache = MemoryReplayCache(max_entries=capacity)
    model: dict[str, datetime] = {}
    now = T0
    for key_index, lifetime, step in ops:
        now += timedelta(seconds=step)
        key, expires_at = f"k{key_index}", now + timedelta(seconds=lifetime)
        model = {k: exp for k, exp in model.items() if exp > now}
        if key in model or expires_at <= now or len(model) >= capacity:
            expected = True
        else:
            model[key] = expires_at
            expected = False
        assert await cache.seen(key, expires_at, now) is expected
        assert len(cache) == len(model)

"""RedisReplayCache against the real Redis (``TASKBOUND_TEST_REDIS_URL``; see tests/services.py).

Expiry is Redis's own, on its clock, so these tests use real time: ``now`` is the wall clock
and lifetimes are a few hundred milliseconds. Every test uses fresh random keys, so runs
never see each other's keys, and deletes what it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from taskbound.errors import ConfigError, StorageError
from taskbound.storage import RedisReplayCache
from taskbound.storage.redis_replay import KEY_PREFIX, replay_key
from tests.services import redis_url

MakeCache = Callable[[], Awaitable[RedisReplayCache]]


def now() -> datetime:
    return datetime.now(UTC)


def fresh_key(label: str = "jti") -> str:
    return f"{label}-{secrets.token_hex(8)}"


@dataclass
class Raw:
    """A plain client on the test Redis, to look at what the caches wrote."""

    client: Redis
    stored: list[str] = field(default_factory=list)

    def track(self, key: str) -> str:
        """``key`` as the cache stores it in Redis, deleted after the test."""
        stored = replay_key(key)
        self.stored.append(stored)
        return stored


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    peek = Raw(Redis.from_url(redis_url()))
    try:
        yield peek
    finally:
        if peek.stored:
            await peek.client.delete(*peek.stored)
        await peek.client.aclose()


@pytest.fixture
async def make_cache() -> AsyncIterator[MakeCache]:
    """Caches on the test Redis, each with its own connection pool (as separate replicas
    would have), all closed afterwards."""
    url = redis_url()
    opened: list[RedisReplayCache] = []

    async def make() -> RedisReplayCache:
        cache = RedisReplayCache(url)
        opened.append(cache)
        await cache.check()
        return cache

    try:
        yield make
    finally:
        for cache in opened:
            await cache.close()


@pytest.mark.redis
async def test_first_use_then_replay(make_cache: MakeCache, raw: Raw) -> None:
    cache = await make_cache()
    key = fresh_key()
    stored = raw.track(key)
    until = now() + timedelta(seconds=30)
    sent = now()
    assert await cache.seen(key, until, sent) is False
    # The expiry is relative (PX, robust to clock skew between hosts): Redis counts it from
    # when the SET arrives, which a loaded machine may delay by a few milliseconds.
    delay_ms = int((now() - sent).total_seconds() * 1000) + 1
    assert await cache.seen(key, until, now()) is True
    assert await cache.seen(key, until + timedelta(seconds=30), now()) is True
    other = fresh_key()
    raw.track(other)
    assert await cache.seen(other, until, now()) is False

    # One namespaced, hashed key holding "1", expiring at expires_at (rounded up to the ms).
    assert stored == KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest()
    assert await raw.client.get(stored) == b"1"
    expire_ms = await raw.client.pexpiretime(stored)
    until_ms = int(until.timestamp() * 1000)
    assert until_ms <= expire_ms <= until_ms + delay_ms + 1
    # The first sighting's expiry stands; a replay does not extend it.
    assert await raw.client.pexpiretime(stored) == expire_ms


@pytest.mark.redis
async def test_forgotten_after_expiry(make_cache: MakeCache, raw: Raw) -> None:
    cache = await make_cache()
    key = fresh_key()
    raw.track(key)
    short = now() + timedelta(milliseconds=300)
    assert await cache.seen(key, short, now()) is False
    assert await cache.seen(key, short, now()) is True
    await asyncio.sleep(0.45)
    # Expired in Redis: a new sighting is recorded afresh, and remembered again.
    assert await cache.seen(key, now() + timedelta(milliseconds=300), now()) is False
    assert await cache.seen(key, now() + timedelta(seconds=30), now()) is True


@pytest.mark.redis
async def test_keys_live_as_long_as_each_was_told(make_cache: MakeCache, raw: Raw) -> None:
    cache = await make_cache()
    brief, lasting = fresh_key(), fresh_key()
    raw.track(brief)
    raw.track(lasting)
    assert await cache.seen(brief, now() + timedelta(milliseconds=250), now()) is False
    assert await cache.seen(lasting, now() + timedelta(seconds=30), now()) is False
    await asyncio.sleep(0.35)
    assert await cache.seen(lasting, now() + timedelta(seconds=30), now()) is True
    assert await cache.seen(brief, now() + timedelta(seconds=30), now()) is False


@pytest.mark.redis
async def test_stale_proof_is_refused_without_writing(make_cache: MakeCache, raw: Raw) -> None:
    cache = await make_cache()
    key = fresh_key()
    stored = raw.track(key)
    t = now()
    assert await cache.seen(key, t, t) is True
    assert await cache.seen(key, t - timedelta(seconds=1), t) is True
    assert await raw.client.exists(stored) == 0
    # Still unseen as far as Redis knows.
    assert await cache.seen(key, t + timedelta(seconds=30), t) is False


@pytest.mark.redis
async def test_naive_times_are_refused(make_cache: MakeCache) -> None:
    cache = await make_cache()
    with pytest.raises(ValueError, match="naive"):
        await cache.seen(fresh_key(), datetime(2026, 1, 1), now())
    with pytest.raises(ValueError, match="naive"):
        await cache.seen(fresh_key(), now(), datetime(2026, 1, 1))


@pytest.mark.redis
async def test_any_key_is_safe(make_cache: MakeCache, raw: Raw) -> None:
    cache = await make_cache()
    tag = secrets.token_hex(4)
    odd = [
        f"dpop:{tag}:" + "x" * 100_000,
        f"{tag} with spaces\r\nSET evil 1\r\n",
        f"{tag}\x00nul",
        f"{tag}:naïve ✓ 🔑",
        f"{tag}\ud800lone surrogate",
        f"{tag}*?[glob]",
    ]
    until = now() + timedelta(seconds=30)
    for key in odd:
        stored = raw.track(key)
        assert len(stored) == len(KEY_PREFIX) + 64
        assert await cache.seen(key, until, now()) is False
        assert await cache.seen(key, until, now()) is True
    assert await raw.client.exists("evil") == 0


@pytest.mark.redis
async def test_replicas_share_what_they_have_seen(make_cache: MakeCache, raw: Raw) -> None:
    first, second = await make_cache(), await make_cache()
    key, back = fresh_key(), fresh_key()
    raw.track(key)
    raw.track(back)
    until = now() + timedelta(seconds=30)
    assert await first.seen(key, until, now()) is False
    assert await second.seen(key, until, now()) is True
    assert await second.seen(back, until, now()) is False
    assert await first.seen(back, until, now()) is True


@pytest.mark.redis
async def test_concurrent_sightings_have_one_winner(make_cache: MakeCache, raw: Raw) -> None:
    caches = [await make_cache(), await make_cache()]
    key = fresh_key()
    raw.track(key)
    until = now() + timedelta(seconds=30)
    results = await asyncio.gather(
        *(caches[i % 2].seen(key, until, now()) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, bool) for r in results), results
    assert results.count(False) == 1
    assert results.count(True) == 19


@pytest.mark.redis
async def test_a_dropped_connection_is_replaced(make_cache: MakeCache, raw: Raw) -> None:
    """A pooled connection the server closed (a Redis restart, an idle timeout) is replaced
    before use, not reported as a failure."""
    cache = await make_cache()
    first, second = fresh_key(), fresh_key()
    raw.track(first)
    raw.track(second)
    until = now() + timedelta(seconds=30)
    assert await cache.seen(first, until, now()) is False
    # The one pooled connection, which the next call would reuse: the server drops it.
    connection_id = await cache._client.client_id()
    assert await raw.client.client_kill_filter(_id=str(connection_id)) == 1
    assert await cache.seen(second, until, now()) is False
    assert await cache.seen(first, until, now()) is True


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- failing closed (no Redis server needed) ---------------------------------------------


@pytest.mark.parametrize("url_form", ["plain", "password"])
async def test_redis_down_is_storage_error(url_form: str) -> None:
    port = _unused_port()
    userinfo = ":hunter2-secret@" if url_form == "password" else ""
    cache = RedisReplayCache(f"redis://{userinfo}127.0.0.1:{port}/0", timeout_s=1)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(StorageError) as caught:
            await cache.seen(fresh_key(), now() + timedelta(seconds=30), now())
        assert asyncio.get_running_loop().time() - started < 5
        error = caught.value
        assert error.status == 503
        assert error.detail == StorageError.default_detail
        for text in (error.detail, error.internal, str(error), repr(error)):
            assert "hunter2-secret" not in text
        with pytest.raises(StorageError):
            await cache.check()
    finally:
        await cache.close()


async def test_silent_redis_is_storage_error_within_the_timeout() -> None:
    """A server that accepts and never answers: the timeout ends the wait, closed."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(4096):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisReplayCache(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(StorageError):
            await cache.seen(fresh_key(), now() + timedelta(seconds=30), now())
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        await cache.close()
        server.close()
        await server.wait_closed()


@pytest.mark.redis
async def test_redis_error_reply_is_storage_error() -> None:
    """Not only a lost connection: any error Redis answers fails closed too."""
    no_such_db = urlsplit(redis_url())._replace(path="/99999")  # SELECT fails
    cache = RedisReplayCache(urlunsplit(no_such_db))
    try:
        with pytest.raises(StorageError):
            await cache.seen(fresh_key(), now() + timedelta(seconds=30), now())
    finally:
        await cache.close()


def test_bad_url_is_config_error() -> None:
    with pytest.raises(ConfigError):
        RedisReplayCache("http://:hunter2-secret@127.0.0.1:6379/0")

"""A replay cache in Redis, shared by every broker and gateway replica (DESIGN.md §6).

Each :meth:`RedisReplayCache.seen` is one atomic ``SET <key> 1 NX PX <ms left>``:
Redis decides which of any number of concurrent callers, on any replica, saw a key first,
and forgets the key by itself when it expires. Keys are ``taskbound:replay:`` followed by
the SHA-256 (hex) of the caller's key, so any input, however long or odd, makes a short,
safe Redis key.

Fails closed: a Redis that is down, slow or answering errors raises
:class:`~taskbound.errors.StorageError` (the caller answers 503), never "not seen".
There is no size limit to fail closed on; Redis's own ``maxmemory`` policy must not evict
these keys (``noeviction`` or a ``volatile-*`` policy on a dedicated database: a refused
write is a StorageError, an evicted key would be a replay let through).

The key lives for the time left until ``expires_at`` as the caller counts it (``expires_at
- now``, rounded up to the millisecond): a relative lifetime, so neither the Redis host's
clock nor a skew between hosts can shorten it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from taskbound.errors import ConfigError, StorageError
from taskbound.storage.codec import utc
from taskbound.storage.urls import redact

KEY_PREFIX = "taskbound:replay:"
DEFAULT_TIMEOUT_S = 2.0
# Idle pooled connections are PINGed before reuse after this long (a silently dead peer is
# found before a request needs it).
_HEALTH_CHECK_INTERVAL_S = 30

_MS = timedelta(milliseconds=1)


def replay_key(key: str, prefix: str = KEY_PREFIX) -> str:
    """The Redis key under which ``key`` is remembered."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return prefix + digest


def _ms_ceil(left: timedelta) -> int:
    return max(1, -(-left // _MS))


def _url_secrets(url: str) -> tuple[str, ...]:
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += parse_qs(parts.query).get("password", [])
    except ValueError:
        return ()
    return tuple(s for s in found if s)


class RedisReplayCache:
    """A :class:`~taskbound.storage.base.ReplayCache` in Redis.

    ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL as redis-py reads it
    (user, password and database number included). ``timeout_s`` bounds connecting and each
    reply. A failed command is not retried (redis-py would retry 10 times by default): a
    ``SET NX`` retried after its reply was lost would find its own key and call a fresh proof
    a replay, and a Redis that is down should be a quick 503, not a slow one. A pooled
    connection the server has closed is noticed and replaced before use, so a Redis restart
    costs no request.
    """

    def __init__(
        self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, prefix: str = KEY_PREFIX
    ) -> None:
        self._secrets = _url_secrets(url)
        self._prefix = prefix
        try:
            self._client: Redis = Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=_HEALTH_CHECK_INTERVAL_S,
            )
        except ValueError as exc:
            raise ConfigError(
                "the Redis URL is not valid", internal=redact(f"redis URL: {exc}", self._secrets)
            ) from None

    async def seen(self, key: str, expires_at: datetime, now: datetime) -> bool:
        """True if ``key`` is remembered (another replica may have recorded it), or if
        ``expires_at <= now`` (a stale proof: nothing is written); otherwise remember it
        until ``expires_at`` and return False. Raises StorageError when Redis fails."""
        expires_at, now = utc(expires_at), utc(now)
        if expires_at <= now:
            return True
        try:
            created = await self._client.set(
                replay_key(key, self._prefix), b"1", nx=True, px=_ms_ceil(expires_at - now)
            )
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        return not created

    async def check(self) -> None:
        """Health probe: return when Redis answers PING, raise StorageError when not."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def _error(self, exc: BaseException) -> StorageError:
        return StorageError(
            internal=redact(f"redis replay cache: {type(exc).__name__}: {exc}", self._secrets)
        )

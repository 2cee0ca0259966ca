"""Storage: the ports of :mod:`taskbound.storage.base` and their backends.

``open_storage(url)`` picks the backend from the URL:

* ``memory://`` — :class:`MemoryStorage`, in process, for tests and demos;
* ``sqlite:///path`` or ``sqlite+aiosqlite:///path`` — :class:`SqlStorage` on a SQLite file
  (created with its directory if missing; mode 0600);
* ``postgresql://…`` or ``postgresql+psycopg://…`` — :class:`SqlStorage` on PostgreSQL.

SQL databases are migrated to the newest schema first (:func:`migrate`).

Every backend orders list results the same way (text by code point):

* ``list_owners``, ``list_tools``: by id; ``list_agents``: by SPIFFE ID;
* ``list_tasks``: newest ``created_at`` first, then by id, cut at ``TaskFilter.limit``;
* ``list_credentials``: by ``issued_at``, then by jti;
* ``list_keys``: newest ``created_at`` first, the active key before retiring ones, then kid;
* ``list_admin_tokens``: by ``created_at``, then by id;
* ``list_audit``: by sequence number, ascending, after ``after``, cut at ``limit``;
* ``list_approvals``: newest ``created_at`` first, then by id, cut at ``limit``;
  ``list_approval_votes``: by ``voted_at``, then by approver;
* ``expire_tasks``: the ids, sorted.

Updates (``update_owner``, ``update_agent``, ``update_tool``) keep the stored ``created_at``.
``end_task`` and ``expire_tasks`` revoke only credentials not yet revoked (an earlier
revocation keeps its time and reason); ``expire_tasks`` uses the reason ``"expired"``.
Concurrent ``rotate_key`` calls for one purpose may raise ``Conflict`` on PostgreSQL: one
rotation wins, and there is never more than one active key.
"""

from __future__ import annotations

from taskbound.errors import ConfigError
from taskbound.storage.base import ReplayCache, Storage
from taskbound.storage.memory import MemoryStorage
from taskbound.storage.migrate import migrate
from taskbound.storage.redis_replay import RedisReplayCache
from taskbound.storage.replay import MemoryReplayCache
from taskbound.storage.sql import SqlStorage

__all__ = [
    "MemoryReplayCache",
    "MemoryStorage",
    "RedisReplayCache",
    "ReplayCache",
    "SqlStorage",
    "Storage",
    "migrate",
    "open_storage",
]

MEMORY_URL = "memory://"


async def open_storage(url: str) -> Storage:
    """The storage ``url`` names, with its schema migrated; ConfigError for an unsupported
    URL, StorageError when the database cannot be reached."""
    if url == MEMORY_URL:
        return MemoryStorage()
    if url.startswith(MEMORY_URL):
        raise ConfigError("memory:// takes no path or options")
    await migrate(url)
    return SqlStorage.from_url(url)

"""The SQL schema, defined once for SQLite and PostgreSQL.

The Alembic revisions in ``migrations/versions`` build exactly this schema; a test compares
them on both dialects.

Choices that hold on both dialects:

* Times are :class:`UTCDateTime`: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL; on SQLite, which
  has no time zones, the UTC wall time as SQLAlchemy's fixed-width text
  (``YYYY-MM-DD HH:MM:SS.ffffff``), so text order is time order and comparisons in SQL work.
  Values go in and come out as timezone-aware UTC with microseconds intact.
* Structured fields (roles, ceiling, actions, constraints, grants, denials, public JWKs) are
  JSON columns; nothing queries inside them.
* "At most one ACTIVE signing key per purpose" is ``UNIQUE (purpose, active_slot)``:
  ``active_slot`` is 1 for the active key and NULL for retiring ones, and both dialects treat
  NULLs as distinct in a unique constraint. A CHECK ties ``active_slot`` to ``state``.
* A tool's audience is unique: a credential for one tool must never verify at another.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC ``datetime`` on every dialect; naive values are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: taskbound stores timezone-aware UTC times only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


owners = Table(
    "owners",
    metadata,
    Column("id", String, primary_key=True),
    Column("contact", Text, nullable=False),
    Column("roles", JSON, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("spiffe_id", String, primary_key=True),
    Column("owner_id", String, ForeignKey("owners.id"), nullable=False, index=True),
    Column("state", String, nullable=False),
    Column("ceiling", JSON, nullable=False),
    Column("description", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

tools = Table(
    "tools",
    metadata,
    Column("id", String, primary_key=True),
    Column("audience", String, nullable=False, unique=True),
    Column("upstream_url", Text, nullable=False),
    Column("kind", String, nullable=False),
    Column("actions", JSON, nullable=False),
    Column("upstream_auth_header", String, nullable=False),
    Column("description", Text, nullable=False),
    Column("secret_ciphertext", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String, primary_key=True),
    Column("agent_id", String, ForeignKey("agents.spiffe_id"), nullable=False, index=True),
    Column("owner_id", String, ForeignKey("owners.id"), nullable=False, index=True),
    Column("purpose", Text, nullable=False),
    Column("constraints", JSON, nullable=False),
    Column("granted", JSON, nullable=False),
    Column("denied", JSON, nullable=False),
    Column("jkt", String, nullable=False),
    Column("state", String, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, index=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime, nullable=True),
    Column("end_reason", Text, nullable=True),
    # Serves list_tasks(state=...) and the expiry sweep (state = 'active' AND expires_at <= now).
    Index(None, "state", "expires_at"),
)

credentials = Table(
    "credentials",
    metadata,
    Column("jti", String, primary_key=True),
    Column("task_id", String, ForeignKey("tasks.id"), nullable=False, index=True),
    Column("agent_id", String, nullable=False),
    Column("tool", String, nullable=False),
    Column("tier", String, nullable=False),
    Column("actions", JSON, nullable=False),
    Column("jkt", String, nullable=False),
    Column("kid", String, nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoke_reason", Text, nullable=True),
    Column("parent_jti", String, nullable=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String, primary_key=True),
    Column("purpose", String, nullable=False),
    Column("alg", String, nullable=False),
    Column("public_jwk", JSON, nullable=False),
    Column("private_ciphertext", LargeBinary, nullable=False),
    Column("state", String, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retire_after", UTCDateTime, nullable=True),
    Column("active_slot", SmallInteger, nullable=True),
    UniqueConstraint("purpose", "active_slot"),
    CheckConstraint(
        "(state = 'active' AND active_slot = 1 AND retire_after IS NULL)"
        " OR (state = 'retiring' AND active_slot IS NULL AND retire_after IS NOT NULL)",
        name="active_slot",
    ),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", String, primary_key=True),
    Column("token_hash", String, nullable=False, unique=True),
    Column("description", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

"""Initial schema: owners, agents, tools, tasks, credentials, signing keys, admin tokens.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Self-contained on purpose: it spells out the types instead of importing
``taskbound.storage.schema``, which will move on while this revision must not. Times are
``DateTime(timezone=True)``, the storage type of ``schema.UTCDateTime``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("contact", sa.Text(), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_owners")),
    )
    op.create_table(
        "agents",
        sa.Column("spiffe_id", sa.String(), nullable=False),
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("ceiling", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["owners.id"], name=op.f("fk_agents_owner_id_owners")
        ),
        sa.PrimaryKeyConstraint("spiffe_id", name=op.f("pk_agents")),
    )
    op.create_index(op.f("ix_agents_owner_id"), "agents", ["owner_id"])
    op.create_table(
        "tools",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("audience", sa.String(), nullable=False),
        sa.Column("upstream_url", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
        sa.Column("upstream_auth_header", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tools")),
        sa.UniqueConstraint("audience", name=op.f("uq_tools_audience")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("constraints", sa.JSON(), nullable=False),
        sa.Column("granted", sa.JSON(), nullable=False),
        sa.Column("denied", sa.JSON(), nullable=False),
        sa.Column("jkt", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("ended_at", nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.spiffe_id"], name=op.f("fk_tasks_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], name=op.f("fk_tasks_owner_id_owners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index(op.f("ix_tasks_agent_id"), "tasks", ["agent_id"])
    op.create_index(op.f("ix_tasks_owner_id"), "tasks", ["owner_id"])
    op.create_index(op.f("ix_tasks_created_at"), "tasks", ["created_at"])
    op.create_index(op.f("ix_tasks_state_expires_at"), "tasks", ["state", "expires_at"])
    op.create_table(
        "credentials",
        sa.Column("jti", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("tool", sa.String(), nullable=False),
        sa.Column("tier", sa.String(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
        sa.Column("jkt", sa.String(), nullable=False),
        sa.Column("kid", sa.String(), nullable=False),
        _time("issued_at"),
        _time("expires_at"),
        _time("revoked_at", nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("parent_jti", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_credentials_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_credentials")),
    )
    op.create_index(op.f("ix_credentials_task_id"), "credentials", ["task_id"])
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("alg", sa.String(), nullable=False),
        sa.Column("public_jwk", sa.JSON(), nullable=False),
        sa.Column("private_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        _time("created_at"),
        _time("retire_after", nullable=True),
        sa.Column("active_slot", sa.SmallInteger(), nullable=True),
        sa.CheckConstraint(
            "(state = 'active' AND active_slot = 1 AND retire_after IS NULL)"
            " OR (state = 'retiring' AND active_slot IS NULL AND retire_after IS NOT NULL)",
            name=op.f("ck_signing_keys_active_slot"),
        ),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
        sa.UniqueConstraint(
            "purpose", "active_slot", name=op.f("uq_signing_keys_purpose_active_slot")
        ),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        _time("created_at"),
        _time("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_admin_tokens_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("admin_tokens")
    op.drop_table("signing_keys")
    op.drop_index(op.f("ix_credentials_task_id"), table_name="credentials")
    op.drop_table("credentials")
    op.drop_index(op.f("ix_tasks_state_expires_at"), table_name="tasks")
    op.drop_index(op.f("ix_tasks_created_at"), table_name="tasks")
    op.drop_index(op.f("ix_tasks_owner_id"), table_name="tasks")
    op.drop_index(op.f("ix_tasks_agent_id"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("tools")
    op.drop_index(op.f("ix_agents_owner_id"), table_name="agents")
    op.drop_table("agents")
    op.drop_table("owners")

"""Break-glass exceptions and the web UI's sign-in: the ``breakglass`` table, the exception
a credential or an audit record relies on, local passwords (Argon2id hashes) and server-side
UI sessions (keyed by the SHA-256 of the cookie).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Self-contained like 0001: the types are spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "breakglass",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("justification", sa.Text(), nullable=False),
        sa.Column("granted_by", sa.String(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("ended_at", nullable=True),
        sa.Column("ended_by", sa.String(), nullable=True),
        sa.Column("reviewed_by", sa.String(), nullable=True),
        _time("reviewed_at", nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.CheckConstraint("expires_at > created_at", name=op.f("ck_breakglass_window")),
        sa.CheckConstraint(
            "(reviewed_at IS NULL AND reviewed_by IS NULL)"
            " OR (reviewed_at IS NOT NULL AND reviewed_by IS NOT NULL"
            " AND reviewed_by <> granted_by)",
            name=op.f("ck_breakglass_review"),
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.spiffe_id"], name=op.f("fk_breakglass_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_breakglass")),
    )
    op.create_index(
        op.f("ix_breakglass_agent_id_expires_at"), "breakglass", ["agent_id", "expires_at"]
    )
    op.create_index(
        op.f("ix_breakglass_reviewed_at_expires_at"), "breakglass", ["reviewed_at", "expires_at"]
    )
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("exception_id", sa.String(), nullable=True))
        batch.create_index(batch.f("ix_credentials_exception_id"), ["exception_id"])
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("exception_id", sa.String(), nullable=True))
        batch.create_index(batch.f("ix_audit_events_exception_id_seq"), ["exception_id", "seq"])
    op.create_table(
        "owner_passwords",
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        _time("updated_at"),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["owners.id"], name=op.f("fk_owner_passwords_owner_id_owners")
        ),
        sa.PrimaryKeyConstraint("owner_id", name=op.f("pk_owner_passwords")),
    )
    op.create_table(
        "ui_sessions",
        sa.Column("id_hash", sa.String(), nullable=False),
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("csrf", sa.String(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["owners.id"], name=op.f("fk_ui_sessions_owner_id_owners")
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_ui_sessions")),
    )
    op.create_index(op.f("ix_ui_sessions_owner_id"), "ui_sessions", ["owner_id"])
    op.create_index(op.f("ix_ui_sessions_expires_at"), "ui_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ui_sessions_expires_at"), table_name="ui_sessions")
    op.drop_index(op.f("ix_ui_sessions_owner_id"), table_name="ui_sessions")
    op.drop_table("ui_sessions")
    op.drop_table("owner_passwords")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_index(batch.f("ix_audit_events_exception_id_seq"))
        batch.drop_column("exception_id")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_index(batch.f("ix_credentials_exception_id"))
        batch.drop_column("exception_id")
    op.drop_index(op.f("ix_breakglass_reviewed_at_expires_at"), table_name="breakglass")
    op.drop_index(op.f("ix_breakglass_agent_id_expires_at"), table_name="breakglass")
    op.drop_table("breakglass")

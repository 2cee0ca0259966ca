"""Revocation log: the ``revocations`` feed every gateway follows, the cursors of the
Shared Signals receivers, and the indexes the revocation cascade and key withdrawal use.

Revision ID: 0003
Revises: 0002
Create Date: 2026-03-01

Self-contained like 0001: the types are spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revocations",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(),
            nullable=False,
        ),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(), nullable=True),
        sa.Column("agent_id", sa.String(), nullable=True),
        sa.Column("task_id", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_revocations")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_revocations_expires_at"), "revocations", ["expires_at"])
    op.create_table(
        "signal_cursors",
        sa.Column("receiver", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("receiver", name=op.f("pk_signal_cursors")),
    )
    op.create_index(op.f("ix_credentials_parent_jti"), "credentials", ["parent_jti"])
    op.create_index(op.f("ix_credentials_kid"), "credentials", ["kid"])


def downgrade() -> None:
    op.drop_index(op.f("ix_credentials_kid"), table_name="credentials")
    op.drop_index(op.f("ix_credentials_parent_jti"), table_name="credentials")
    op.drop_table("signal_cursors")
    op.drop_index(op.f("ix_revocations_expires_at"), table_name="revocations")
    op.drop_table("revocations")

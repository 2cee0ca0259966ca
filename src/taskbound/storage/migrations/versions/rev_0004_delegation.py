"""Delegation: a credential counts the credentials exchanged from it (single-use
exchange is one conditional UPDATE), audit records carry the chain's ``txn``, and a
tool may get per-task upstream credentials by token exchange (``upstream_exchange``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-04-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(
            sa.Column("exchange_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("txn", sa.String(), nullable=True))
    with op.batch_alter_table("tools") as batch:
        batch.add_column(sa.Column("upstream_exchange", sa.JSON(), nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("may_act", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("may_act")
    with op.batch_alter_table("tools") as batch:
        batch.drop_column("upstream_exchange")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("txn")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("exchange_count")

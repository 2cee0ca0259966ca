"""A call's recorded arguments: the nullable JSON column ``audit_events.arguments``
(docs/audit-format.md, the optional body member ``arguments``). Existing records get NULL:
their bodies have no ``arguments`` member, so every hash, link and checkpoint stays valid.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Self-contained: the type is spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("arguments", sa.JSON(), nullable=True))


def downgrade() -> None:
    # The hash of a record with arguments covers them: dropping them would make the chain
    # fail verification from that record on. Refuse instead of breaking the evidence.
    events = sa.table("audit_events", sa.column("arguments"))
    recorded = op.get_bind().execute(
        sa.select(sa.func.count()).select_from(events).where(events.c.arguments.is_not(None))
    )
    if recorded.scalar_one():
        raise RuntimeError(
            "audit records carry arguments that their hashes cover; "
            "downgrading below 0008 would break the audit chain"
        )
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("arguments")

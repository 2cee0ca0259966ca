"""The audit chain: every record carries the SHA-256 of its predecessor and its own
(``prev_hash``, ``hash``; docs/audit-format.md, format 1), and signed checkpoints of the
chain's head are kept in ``audit_checkpoints``. Existing records are chained in sequence
order as they are.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from taskbound.core import audit
from taskbound.storage import codec, schema

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("prev_hash", sa.String(), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(), nullable=True))
    bind = op.get_bind()
    # The application's own table and codec: the values hashed are exactly those read back.
    events = schema.audit_events
    # Only the columns there are at this revision: later ones (0008's `arguments`) are not
    # yet, and these records have none of their values.
    later = {"arguments"}
    columns = [c for c in events.c if c.name not in later]
    prev = audit.GENESIS
    rows = bind.execute(sa.select(*columns).order_by(events.c.seq)).mappings().all()
    for row in rows:
        body = codec.audit_body({**row, **dict.fromkeys(later)})
        digest = audit.record_hash(int(row["seq"]), prev, body)
        bind.execute(
            sa.update(events).where(events.c.seq == row["seq"]).values(prev_hash=prev, hash=digest)
        )
        prev = digest
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("prev_hash", existing_type=sa.String(), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(), nullable=False)
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kid", sa.String(), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")

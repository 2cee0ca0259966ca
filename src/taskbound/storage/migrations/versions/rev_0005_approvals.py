"""Approvals: a human decision on one exact action of one task, and the votes cast on it
(one per approver, by primary key). At most one approval per (task, action digest) is open
(pending or approved) at a time: ``UNIQUE (task_id, action_digest, open_slot)``, with
``open_slot`` 1 while open and NULL once decided.

Revision ID: 0005
Revises: 0004
Create Date: 2026-04-15

Self-contained like 0001: the types are spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("tool", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("tier", sa.String(), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("argument_digest", sa.String(), nullable=False),
        sa.Column("action_digest", sa.String(), nullable=False),
        sa.Column("intent", sa.Text(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("required", sa.SmallInteger(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("open_slot", sa.SmallInteger(), nullable=True),
        sa.Column("approvals", sa.SmallInteger(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("decided_at", nullable=True),
        sa.Column("decided_by", sa.String(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        _time("use_by", nullable=True),
        _time("consumed_at", nullable=True),
        sa.CheckConstraint(
            "(state IN ('pending', 'approved') AND open_slot = 1)"
            " OR (state IN ('denied', 'expired', 'consumed') AND open_slot IS NULL)",
            name=op.f("ck_approvals_open_slot"),
        ),
        sa.CheckConstraint("required >= 1 AND approvals >= 0", name=op.f("ck_approvals_counts")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_approvals_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint(
            "task_id",
            "action_digest",
            "open_slot",
            name=op.f("uq_approvals_task_id_action_digest_open_slot"),
        ),
    )
    op.create_index(op.f("ix_approvals_state_created_at"), "approvals", ["state", "created_at"])
    op.create_table(
        "approval_votes",
        sa.Column("approval_id", sa.String(), nullable=False),
        sa.Column("approver", sa.String(), nullable=False),
        sa.Column("approve", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _time("voted_at"),
        sa.ForeignKeyConstraint(
            ["approval_id"],
            ["approvals.id"],
            name=op.f("fk_approval_votes_approval_id_approvals"),
        ),
        sa.PrimaryKeyConstraint("approval_id", "approver", name=op.f("pk_approval_votes")),
    )


def downgrade() -> None:
    op.drop_table("approval_votes")
    op.drop_index(op.f("ix_approvals_state_created_at"), table_name="approvals")
    op.drop_table("approvals")

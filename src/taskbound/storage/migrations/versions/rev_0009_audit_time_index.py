"""An index on ``audit_events (event, time)``: the posture reports (docs/reports.md)
aggregate the ``gateway.call`` records of a time range without scanning the whole log.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_audit_events_event_time"), "audit_events", ["event", "time"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_events_event_time"), table_name="audit_events")

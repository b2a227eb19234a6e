"""Feedback with its own idempotency key and a three-state verdict: `feedback_id` (unique per incident; empty for
entries stored before, and for calls that send none) and `verdict` (helpful / not_helpful / unspecified; NULL for
entries stored before, read from `helpful`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a history adopted from before migrations may already have the columns (created from newer models)
    inspector = sa.inspect(op.get_bind())
    columns = {column["name"] for column in inspector.get_columns("feedback")}
    if "feedback_id" not in columns:
        op.add_column("feedback", sa.Column("feedback_id", sa.String(64), nullable=True))
    if "verdict" not in columns:
        op.add_column("feedback", sa.Column("verdict", sa.String(16), nullable=True))
    if "ux_feedback_request_feedback_id" not in {index["name"] for index in inspector.get_indexes("feedback")}:
        op.create_index("ux_feedback_request_feedback_id", "feedback", ["request_id", "feedback_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_feedback_request_feedback_id", table_name="feedback")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("verdict")
        batch.drop_column("feedback_id")

"""The incident history as first deployed: images (once per SHA-256), incidents, feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("mime_type", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "incidents",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("plant_id", sa.String(16), nullable=False),
        sa.Column("equipment_id", sa.String(64), nullable=False),
        sa.Column("equipment_type", sa.String(40), nullable=False),
        sa.Column("problem_description", sa.Text(), nullable=False),
        sa.Column("image_sha256", sa.String(64), sa.ForeignKey("images.sha256"), nullable=True),
        sa.Column("image_mime_type", sa.String(32), nullable=False),
        sa.Column("input_fingerprint", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("requires_manual_review", sa.Boolean(), nullable=False),
        sa.Column("referenced_sop_ids", sa.JSON(), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_incidents_equipment_created", "incidents", ["plant_id", "equipment_id", "created_at"])
    op.create_index("ix_incidents_created", "incidents", ["created_at", "request_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), sa.ForeignKey("incidents.request_id"), nullable=False),
        sa.Column("helpful", sa.Boolean(), nullable=False),
        sa.Column("resolution_notes", sa.Text(), nullable=False),
        sa.Column("helpful_sop_ids", sa.JSON(), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("incidents")
    op.drop_table("images")

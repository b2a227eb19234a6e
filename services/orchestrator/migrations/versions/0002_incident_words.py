"""The similar-incident index: one row per content word of each incident's problem description, filled for the
incidents already stored.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BACKFILL_BATCH = 1000


def upgrade() -> None:
    words = op.create_table(
        "incident_words",
        sa.Column("plant_id", sa.String(16), primary_key=True),
        sa.Column("equipment_id", sa.String(64), primary_key=True),
        sa.Column("word", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("request_id", sa.String(64), sa.ForeignKey("incidents.request_id"), primary_key=True),
        sa.Column("words", sa.Integer(), nullable=False),
    )
    # the words as the running code indexes them (the tokeniser is the project's one)
    from services.orchestrator.history import indexed_words

    incidents = sa.table(
        "incidents",
        sa.column("request_id", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("plant_id", sa.String),
        sa.column("equipment_id", sa.String),
        sa.column("problem_description", sa.Text),
    )
    connection = op.get_bind()
    after = ""
    while True:  # keyset batches: bounded memory on a large history
        batch = connection.execute(
            sa.select(incidents)
            .where(incidents.c.request_id > after)
            .order_by(incidents.c.request_id)
            .limit(BACKFILL_BATCH)
        ).all()
        if not batch:
            break
        rows = []
        for request_id, created_at, plant_id, equipment_id, problem in batch:
            found = indexed_words(problem)
            rows += [
                {
                    "plant_id": plant_id,
                    "equipment_id": equipment_id,
                    "word": word,
                    "created_at": created_at,
                    "request_id": request_id,
                    "words": len(found),
                }
                for word in sorted(found)
            ]
        if rows:
            op.bulk_insert(words, rows)
        after = batch[-1][0]


def downgrade() -> None:
    op.drop_table("incident_words")

"""Alembic environment of the incident history. Run by `IncidentStore` at start (upgrade to head on the
connection it passes in `config.attributes["connection"]`), or by hand:
`alembic -x url=postgresql+psycopg://... -c services/orchestrator/migrations/alembic.ini upgrade head`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text

from services.orchestrator.history import Base

config = context.config
target_metadata = Base.metadata
# Orchestrator replicas may start together against one PostgreSQL: one migrates, the others wait for it.
PG_LOCK_KEY = 724_901_003


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})"))
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).begin() as conn:
        run_migrations(conn)

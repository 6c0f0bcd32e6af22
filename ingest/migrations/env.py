"""Alembic's entry point: runs the revisions on the connection `ingest.migrations.upgrade` passes in."""

from __future__ import annotations

from alembic import context

# batch mode: SQLite alters a table by copying it, which later revisions may need.
context.configure(connection=context.config.attributes["connection"], render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

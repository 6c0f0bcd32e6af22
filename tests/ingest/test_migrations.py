"""The store's schema goes through Alembic: a store made before migrations keeps its rows, and the
tables the migrations build are exactly the models' tables."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

import ingest.dead_letters  # noqa: F401 - registers its table on Base
import ingest.lag  # noqa: F401 - registers its table on Base
from ingest.migrations import SCRIPTS
from ingest.store import Base, make_engine

_PRE_MIGRATION = [  # what proxyloop created before migrations (ingest/store.py at contract v1), in brief
    "CREATE TABLE labels (event_id VARCHAR(256) PRIMARY KEY, kind VARCHAR(16), source_id VARCHAR(256), item JSON, "
    "deleted BOOLEAN, occurred_at DATETIME, stored_at DATETIME, seq INTEGER)",
    "CREATE TABLE label_history (id INTEGER PRIMARY KEY, event_id VARCHAR(256), kind VARCHAR(16), "
    "action VARCHAR(16), item JSON, occurred_at DATETIME, recorded_at DATETIME)",
    "CREATE TABLE trigger_watermark (id INTEGER PRIMARY KEY, expert_total INTEGER, proxy_total INTEGER)",
    "INSERT INTO labels VALUES ('e1', 'expert', 'ann', '{\"type\": \"features\", \"x\": [1.0], \"y_w\": 0, "
    "\"y_l\": 1}', 0, '2026-11-01 00:00:00', '2026-11-01 00:00:00', 1)",
]


def test_a_store_from_before_migrations_keeps_its_rows_and_reaches_the_newest_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    old = sa.create_engine(url)
    with old.begin() as connection:
        for statement in _PRE_MIGRATION:
            connection.execute(sa.text(statement))
    old.dispose()

    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT event_id, source_id FROM labels")).all() == [("e1", "ann")]
        assert MigrationContext.configure(connection).get_current_revision() == "0003"
        tables = set(sa.inspect(connection).get_table_names())
    assert {"dead_letters", "lag_samples", "new_label_cursor", "snapshots", "retrain_runs"} <= tables
    assert "trigger_watermark" not in tables


def test_the_migrations_build_exactly_the_tables_the_models_declare(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/fresh.db")
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def _store_at(url: str, revision: str, *statements: str) -> None:
    """A store an older proxyloop left: migrated to `revision` only, then `statements` run on it."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    old = sa.create_engine(url)
    with old.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        for statement in statements:
            connection.execute(sa.text(statement))
    old.dispose()


def test_0003_adds_the_labels_source_and_the_labels_stored_before_record_none(tmp_path: Path) -> None:
    """Labels record where they came from (a Label Studio project), so reconciling one project sweeps no other's;
    those stored before name none, and reconciliation leaves them alone."""
    url = f"sqlite:///{tmp_path}/at-0002.db"
    _store_at(url, "0002", "INSERT INTO labels VALUES ('labelstudio-annotation-1', 'expert', 'labelstudio-user-1', "
                           "'{}', 0, '2026-11-01 00:00:00', '2026-11-01 00:00:00', 1)")
    engine = make_engine(url)
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == "0003"
        column = {c["name"]: c for c in sa.inspect(connection).get_columns("labels")}["source"]
        assert column["nullable"] and column["type"].length == 256
        assert connection.execute(sa.text("SELECT event_id, source FROM labels")).all() == [
            ("labelstudio-annotation-1", None)]

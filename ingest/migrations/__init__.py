"""The store's schema history (Alembic): every change to the tables is a revision here.

`ingest.store.make_engine` upgrades a store to the newest revision when a process first opens it,
so a user upgrading proxyloop keeps their data. New revision: `alembic -c ingest/migrations/alembic.ini
revision -m "what changes"` from the repository root, then write its upgrade.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

SCRIPTS = Path(__file__).resolve().parent
# Alembic runs migrations through module-level proxies (alembic.context, alembic.op): one at a time per process.
_ONE_AT_A_TIME = threading.Lock()


def upgrade(engine: Engine) -> None:
    """Bring the store to the newest revision (a no-op when it is there already)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    with _ONE_AT_A_TIME, engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

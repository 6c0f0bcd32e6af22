"""Baseline: the store's tables as proxyloop created them before migrations (event contract v1).

Creates only what is missing, so a store made before migrations existed (tables created directly
from the models) keeps its rows and joins the history here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TABLES: dict[str, Callable[[], list[sa.Column[Any]]]] = {
    "labels": lambda: [
        sa.Column("event_id", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(16), index=True, nullable=False),
        sa.Column("source_id", sa.String(256), nullable=False),
        sa.Column("item", sa.JSON(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seq", sa.Integer(), index=True, nullable=False),
    ],
    "label_history": lambda: [
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(256), index=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("item", sa.JSON(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    ],
    "labelstudio_sync": lambda: [
        sa.Column("project_id", sa.Integer(), primary_key=True),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ],
    "snapshots": lambda: [
        sa.Column("snapshot_id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_expert", sa.Integer(), nullable=False),
        sa.Column("n_proxy", sa.Integer(), nullable=False),
        sa.Column("event_ids", sa.JSON(), nullable=False),
    ],
    "trigger_watermark": lambda: [
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_total", sa.Integer(), nullable=False),
        sa.Column("proxy_total", sa.Integer(), nullable=False),
    ],
    "retrain_runs": lambda: [
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ],
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, columns in _TABLES.items():
        if name not in existing:
            op.create_table(name, *columns())

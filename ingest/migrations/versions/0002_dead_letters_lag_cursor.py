"""Ingest that never stalls: a row per dead letter, lag samples, the new-label cursor; trigger_watermark dropped.

dead_letters: what was refused, so a batch read again sends no letter twice and letters can be
replayed. lag_samples: per-partition lag over time (`proxyloop status`, the ingest-health flow).
new_label_cursor: threshold checks count only new rows. trigger_watermark was replaced by the cursor.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("topic", sa.String(256), primary_key=True),
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("offset", sa.Integer(), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("reason_code", sa.String(32), index=True, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("payload_uri", sa.String(1024), nullable=True),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True), index=True, nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replays", sa.Integer(), nullable=False),
    )
    op.create_table(
        "lag_samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), index=True, nullable=False),
        sa.Column("consumer_group", sa.String(256), nullable=False),
        sa.Column("topic", sa.String(256), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("end_offset", sa.Integer(), nullable=False),
        sa.Column("committed", sa.Integer(), nullable=True),
        sa.Column("lag", sa.Integer(), nullable=False),
    )
    op.create_index("ix_lag_samples_partition_at", "lag_samples", ["consumer_group", "topic", "partition", "at"])
    op.create_table(
        "new_label_cursor",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("expert_new", sa.Integer(), nullable=False),
        sa.Column("proxy_new", sa.Integer(), nullable=False),
    )
    op.drop_table("trigger_watermark")

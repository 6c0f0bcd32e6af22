"""Labels record their source: the project a Label Studio label came from.

labels.source: an expert label's `source` when it names more than the contract's default
("labelstudio/project-3", the demo's "labelstudio/simulated"), so reconciling one project never
retracts another project's labels. Nullable: rows stored before this revision name none, and
reconciliation leaves them alone (`proxyloop labelstudio retract-project` withdraws them on purpose).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("labels", sa.Column("source", sa.String(256), nullable=True))

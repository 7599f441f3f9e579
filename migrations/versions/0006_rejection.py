"""Open-set rejection: the collection's rejection rule, and per class its shift (mean out-of-fold
score of its own samples) and an optional threshold of its own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN: a batch rebuild of ``classes`` would drop a table that proxies and samples
    # reference, which SQLite's foreign keys refuse inside the migration's transaction
    op.add_column("collection", sa.Column("rejection", sa.String))
    op.add_column("classes", sa.Column("shift", sa.Float))
    op.add_column("classes", sa.Column("threshold", sa.Float))


def downgrade() -> None:
    for table, column in (("classes", "threshold"), ("classes", "shift"), ("collection", "rejection")):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")  # SQLite >= 3.35, in place

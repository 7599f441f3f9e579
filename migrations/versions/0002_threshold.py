"""Open-set rejection: a stored score threshold below which a query gets no class.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.add_column(sa.Column("threshold", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.drop_column("threshold")

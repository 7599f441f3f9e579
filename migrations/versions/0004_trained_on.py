"""Retraining approximate indexes: how many proxies the IVF lists were trained on, so a full
compaction can retrain them once the collection has outgrown that sample.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.add_column(sa.Column("trained_on", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.drop_column("trained_on")

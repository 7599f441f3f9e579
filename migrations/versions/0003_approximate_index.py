"""Scale: stored search parameters (e.g. nprobe) and memory budget of approximate indexes, and
the progress of chunked, resumable ingestion per source file.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.add_column(sa.Column("search_params", sa.String))
        batch.add_column(sa.Column("memory_budget", sa.Integer))
    op.create_table(
        "ingest", sa.Column("source", sa.String, primary_key=True), sa.Column("rows_done", sa.Integer, nullable=False)
    )


def downgrade() -> None:
    op.drop_table("ingest")
    with op.batch_alter_table("collection") as batch:
        batch.drop_column("memory_budget")
        batch.drop_column("search_params")

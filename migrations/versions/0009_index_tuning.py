"""IVF search tuned to a recall target: the nprobe chosen, the recall@1 it reached on held-out
proxies against exact search, the target and the number of queries (JSON; None: not tuned, e.g.
an exact index or an nprobe the user gave).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("collection", sa.Column("index_tuning", sa.String))


def downgrade() -> None:
    op.execute("ALTER TABLE collection DROP COLUMN index_tuning")

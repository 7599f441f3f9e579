"""Segment checksums: the BLAKE2b-128 of each segment file's bytes, recorded when it is written and
checked whenever it is read, so a damaged or altered file is refused instead of answering wrongly.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segments", sa.Column("checksum", sa.String))  # None for files written before


def downgrade() -> None:
    op.execute("ALTER TABLE segments DROP COLUMN checksum")

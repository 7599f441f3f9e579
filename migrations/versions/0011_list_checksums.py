"""Inverted-list checksums: an IVF proxy file's lists, each hashed when the file is written, so a
memory-mapped file is verified list by list as queries first touch it (verified.py) instead of
answering from a damaged byte, and still opens without reading it. NULL for files written before
(and for other kinds): those are verified whole before their first answer.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segments", sa.Column("lists", sa.LargeBinary))


def downgrade() -> None:
    op.execute("ALTER TABLE segments DROP COLUMN lists")

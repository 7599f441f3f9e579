"""The streaming least-squares head (``generator="ls"`` in a collection, lshead.py): its settings
``ls_reg`` (the ridge relative to the data's second moment; None: chosen by leave-one-out) and
``features`` (the width of the random ReLU features; None: the embeddings), and ``ridge``, the
absolute ridge lambda fixed by the first add. Its Gram matrix lives in a segment file of kind
``gram`` (no schema change: segments name their kind). Collections of other generators leave the
three columns empty.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

COLUMNS = {"ls_reg": sa.Float, "features": sa.Integer, "ridge": sa.Float}


def upgrade() -> None:
    for name, kind in COLUMNS.items():  # plain ALTERs: a batch's table copy would break the triggers naming it
        op.add_column("collection", sa.Column(name, kind))


def downgrade() -> None:
    for name in COLUMNS:
        op.execute(f"ALTER TABLE collection DROP COLUMN {name}")

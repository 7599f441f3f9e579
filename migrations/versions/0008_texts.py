"""Provenance: the text (and an optional reference, such as a row id) each kept sample was
embedded from, keyed by the sample's vector id, so a collection can show a class's examples and
the training examples behind an answer, and be exported with them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "texts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),  # the sample's vector id
        sa.Column("class_id", sa.Integer, nullable=False),
        sa.Column("text", sa.String),
        sa.Column("ref", sa.String),
    )
    op.create_index("ix_texts_class_id", "texts", ["class_id"])


def downgrade() -> None:
    op.drop_index("ix_texts_class_id", "texts")
    op.drop_table("texts")

"""auto and blend: k may be left for auto to choose (nullable), the blend weight alpha, and what
auto chose at the first add (JSON: the concrete setting and the cross-validation table).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("collection") as batch:
        batch.alter_column("k", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("alpha", sa.Float))
        batch.add_column(sa.Column("auto_choice", sa.String))


def downgrade() -> None:
    # 0004 knows no auto: keep what it chose where it chose (a blend, which 0004 cannot serve, is lost)
    op.execute(
        "UPDATE collection SET generator = json_extract(auto_choice, '$.generator'), "
        "k = json_extract(auto_choice, '$.k'), aggregation = json_extract(auto_choice, '$.aggregation') "
        "WHERE auto_choice IS NOT NULL"
    )
    op.execute("UPDATE collection SET k = 20 WHERE k IS NULL")  # not yet chosen: the paper's k
    with op.batch_alter_table("collection") as batch:
        batch.drop_column("auto_choice")
        batch.drop_column("alpha")
        batch.alter_column("k", existing_type=sa.Integer, nullable=False)

"""The samples a streaming least-squares head's ridge was chosen on (``ridge_rows``): the ridge is
chosen again once the samples in its Gram matrix have doubled or halved since (lshead.py), and this
count is what says so after a crash or in another process. None: a collection of another generator,
or one made before this revision (its ridge was chosen on its first add; its next write chooses again).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("collection", sa.Column("ridge_rows", sa.BigInteger))  # plain ALTER: as 0015, for the triggers


def downgrade() -> None:
    op.execute("ALTER TABLE collection DROP COLUMN ridge_rows")

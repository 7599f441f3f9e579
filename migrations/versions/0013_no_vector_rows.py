"""No row per stored vector: the ``proxies`` and ``samples`` tables go. The classes' ranges
(``proxy_lo``..``proxy_hi``, ``0``..``n_samples``) already name every live vector id, which is what
``check`` compared the index files with; the rows repeated them, one per vector, with the segment
holding it. At ten million classes they were 40M rows (2 GB of the database), written by every
add and rewritten by every compaction that merged their files.

Downgrade makes the rows again from the classes' ranges, each naming the newest segment file of
its kind (which file holds a vector was kept only here; the older code reads it only to check
that the segment exists).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

RANGES = {"proxies": ("proxy_lo", "proxy_hi"), "samples": ("0", "n_samples")}


def upgrade() -> None:
    for name in RANGES:
        op.drop_index(f"ix_{name}_segment_id", name)
        op.drop_index(f"ix_{name}_class_id", name)
        op.drop_table(name)


def downgrade() -> None:
    for name, (lo, hi) in RANGES.items():
        op.create_table(
            name,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("class_id", sa.Integer, sa.ForeignKey("classes.id"), nullable=False),
            sa.Column("segment_id", sa.Integer, sa.ForeignKey("segments.id"), nullable=False),
        )
        op.create_index(f"ix_{name}_class_id", name, ["class_id"])
        op.create_index(f"ix_{name}_segment_id", name, ["segment_id"])
        op.execute(
            f"WITH RECURSIVE j(class_id, at, hi) AS (SELECT id, {lo}, {hi} FROM classes WHERE {hi} > {lo} "
            "UNION ALL SELECT class_id, at + 1, hi FROM j WHERE at + 1 < hi) "
            f"INSERT INTO {name} (id, class_id, segment_id) SELECT (class_id << 24) + at, class_id, "
            f"(SELECT MAX(id) FROM segments WHERE kind = '{name}') FROM j "
            f"WHERE EXISTS (SELECT 1 FROM segments WHERE kind = '{name}')"
        )

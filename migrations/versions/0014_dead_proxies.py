"""Dead proxies named in the database: ``dead_proxies`` holds the id range (``class_id``, ``lo``,
``hi``) of every class's proxies that a removal, upsert or re-imprint made dead while they stay in
their segment file, written by SQLite triggers on every delete of a class row and every change of
its range, and deleted as compactions drop those vectors from the files (Lucene's per-segment
deletes). A collection that has removed classes opens its memory-mapped files by marking these ids
dead, instead of reading every id of the mapped files and the class rows of them (O(proxies): 22 s
at ten million classes).

The proxies that were already dead at upgrade are not known to SQL (they are in the files only):
open sees that the files hold more vectors than ``live_proxies`` plus the dead ranges, and reads the
class rows as before, until a compaction has rewritten those files.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

TRIGGERS = {
    "classes_dead_delete": "AFTER DELETE ON classes WHEN OLD.proxy_hi > OLD.proxy_lo BEGIN "
    "INSERT INTO dead_proxies (class_id, lo, hi) VALUES (OLD.id, OLD.proxy_lo, OLD.proxy_hi); END",
    "classes_dead_update": "AFTER UPDATE OF proxy_lo, proxy_hi ON classes WHEN OLD.proxy_hi > OLD.proxy_lo "
    "AND (NEW.proxy_lo != OLD.proxy_lo OR NEW.proxy_hi != OLD.proxy_hi) BEGIN "
    "INSERT INTO dead_proxies (class_id, lo, hi) VALUES (OLD.id, OLD.proxy_lo, OLD.proxy_hi); END",
}


def upgrade() -> None:
    op.create_table(
        "dead_proxies",
        sa.Column("class_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("lo", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("hi", sa.Integer, nullable=False),
    )
    for name, body in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name}")
    op.drop_table("dead_proxies")

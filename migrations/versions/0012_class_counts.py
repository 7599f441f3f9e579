"""Class rows readable one by one: ``classes.changed``, the version whose write last set a row (a
reader of an older version can use a row written no later than its own), and class counts kept by
the database: ``collection.n_classes`` and ``collection.live_proxies`` (the
sum over classes of ``proxy_hi - proxy_lo``), maintained by SQLite triggers on every insert,
update and delete of a class row. A collection opens, counts its classes and learns whether any
vector of its files is dead (removed or re-imprinted since it was written: the files hold more
vectors than the classes' ranges) without reading the class table, which at ten million classes
is 1.2 GB and seconds to read.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TRIGGERS = {
    "classes_counts_insert": "AFTER INSERT ON classes BEGIN UPDATE collection SET n_classes = n_classes + 1, "
    "live_proxies = live_proxies + NEW.proxy_hi - NEW.proxy_lo; END",
    "classes_counts_update": "AFTER UPDATE OF proxy_lo, proxy_hi ON classes BEGIN UPDATE collection "
    "SET live_proxies = live_proxies + (NEW.proxy_hi - NEW.proxy_lo) - (OLD.proxy_hi - OLD.proxy_lo); END",
    "classes_counts_delete": "AFTER DELETE ON classes BEGIN UPDATE collection SET n_classes = n_classes - 1, "
    "live_proxies = live_proxies - (OLD.proxy_hi - OLD.proxy_lo); END",
}


def upgrade() -> None:
    op.add_column("classes", sa.Column("changed", sa.Integer))
    op.add_column("collection", sa.Column("n_classes", sa.BigInteger))
    op.add_column("collection", sa.Column("live_proxies", sa.BigInteger))
    op.execute(
        "UPDATE collection SET n_classes = (SELECT COUNT(*) FROM classes), "
        "live_proxies = (SELECT COALESCE(SUM(proxy_hi - proxy_lo), 0) FROM classes)"
    )
    for name, body in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name}")
    op.execute("ALTER TABLE collection DROP COLUMN live_proxies")
    op.execute("ALTER TABLE collection DROP COLUMN n_classes")
    op.execute("ALTER TABLE classes DROP COLUMN changed")

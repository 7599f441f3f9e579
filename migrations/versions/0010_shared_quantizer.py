"""Proxy segment files of an IVF collection are written without their coarse quantizer: every one
uses the template file's (segments.share_quantizer). A small add's file shrank from the
quantizer's 6 MiB (4,096 lists of 384-d) to kilobytes, and with it the add's write, hash, fsync
and the later unlink. No table changes: the revision tells older code, which would read such a
file as damaged, that it is too old. Files written before keep their own quantizer and are read
as they are.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # nothing in the database changes; see the docstring


def downgrade() -> None:
    pass  # older code cannot read proxy files written since; `imprint compact` under it cannot help either

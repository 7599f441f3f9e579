"""Initial schema: collection config, embedder, classes, segments, proxies, samples.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _vectors(name: str) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("class_id", sa.Integer, sa.ForeignKey("classes.id"), nullable=False),
        sa.Column("segment_id", sa.Integer, sa.ForeignKey("segments.id"), nullable=False),
    )
    op.create_index(f"ix_{name}_class_id", name, ["class_id"])
    op.create_index(f"ix_{name}_segment_id", name, ["segment_id"])


def upgrade() -> None:
    op.create_table(
        "collection",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("generator", sa.String, nullable=False),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("pre_norm", sa.String, nullable=False),
        sa.Column("post_norm", sa.String, nullable=False),
        sa.Column("inf_norm", sa.String, nullable=False),
        sa.Column("aggregation", sa.String, nullable=False),
        sa.Column("m", sa.Integer, nullable=False),
        sa.Column("metric", sa.String, nullable=False),
        sa.Column("vote", sa.String, nullable=False),
        sa.Column("random_state", sa.Integer, nullable=False),
        sa.Column("index_factory", sa.String, nullable=False),
        sa.Column("keep_samples", sa.Boolean, nullable=False),
        sa.Column("dimension", sa.Integer),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("next_class_id", sa.Integer, nullable=False),
        sa.Column("quantile_targets", sa.LargeBinary),
        sa.Column("metric_transform", sa.LargeBinary),
    )
    op.create_table(
        "embedder",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("path", sa.String, nullable=False),
        sa.Column("dimension", sa.Integer),
        sa.Column("revision", sa.String),
    )
    op.create_table(
        "classes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("label", sa.String, nullable=False),
        sa.Column("label_kind", sa.String, nullable=False),
        sa.Column("n_samples", sa.Integer, nullable=False),
        sa.Column("proxy_lo", sa.Integer, nullable=False),
        sa.Column("proxy_hi", sa.Integer, nullable=False),
        sa.Column("sample_hi", sa.Integer, nullable=False),
        sa.UniqueConstraint("label_kind", "label", name="uq_classes_label"),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("file", sa.String, nullable=False, unique=True),
        sa.Column("n_vectors", sa.Integer, nullable=False),
    )
    _vectors("proxies")
    _vectors("samples")


def downgrade() -> None:
    for name in ("samples", "proxies", "segments", "classes", "embedder", "collection"):
        op.drop_table(name)

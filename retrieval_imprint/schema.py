"""The schema of a collection's SQLite database (SQLAlchemy Core tables).

Tables: ``collection`` (one row: the GEN/NORM/AGG config, index type, dimension, current
version, fixed quantile targets and Mahalanobis map, rejection threshold, search parameters),
``embedder`` (model identity), ``classes`` (label and id ranges: the live vector ids of every
segment file, ``segments.py``), ``segments`` (the FAISS files that hold proxies and samples),
``ingest`` (rows of each source file committed by a chunked, resumable ingestion), ``texts`` (what
each kept sample was embedded from). A segment of kind ``template`` is an approximate index's
trained, empty index that every proxy segment copies; segments of kind ``means`` hold the class
means of a blend (one per class); the one segment of kind ``gram`` holds a streaming
least-squares head's Gram matrix (lshead.py). No table has a row per vector (migration 0013).
Triggers on ``classes`` keep ``collection.n_classes`` and ``live_proxies`` (the classes' proxy
count) up to date (migration 0012), and ``dead_proxies`` (the id ranges of proxies removed or
re-imprinted but still in segment files, migration 0014), so a collection opens without reading
its class table.

Schema changes happen only through Alembic revisions in ``migrations/`` (installed as
``retrieval_imprint.migrations``); ``metadata`` must equal the head revision's schema, which a
test checks with Alembic's autogenerate comparison. The SQL that reads and writes these tables
is store.py's; the Alembic steps that bring a database to this schema are here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    inspect,
)  # fmt: skip

from .errors import CollectionDamagedError

metadata = MetaData()

collection = Table(
    "collection",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("generator", String, nullable=False),
    Column("k", Integer),  # None: chosen by generator auto (see auto_choice)
    Column("pre_norm", String, nullable=False),
    Column("post_norm", String, nullable=False),
    Column("inf_norm", String, nullable=False),
    Column("aggregation", String, nullable=False),
    Column("m", Integer, nullable=False),
    Column("metric", String, nullable=False),
    Column("vote", String, nullable=False),
    Column("random_state", Integer, nullable=False),
    Column("index_factory", String, nullable=False),
    Column("keep_samples", Boolean, nullable=False),
    Column("dimension", Integer),
    Column("version", Integer, nullable=False),
    Column("next_class_id", Integer, nullable=False),
    Column("quantile_targets", LargeBinary),
    Column("metric_transform", LargeBinary),
    Column("threshold", Float),
    Column("search_params", String),  # JSON, e.g. {"nprobe": 16}
    Column("memory_budget", Integer),
    Column("trained_on", Integer),  # proxies the IVF lists were trained on (None: exact, or unknown)
    Column("alpha", Float),  # blend weight (None: chosen by auto)
    Column("auto_choice", String),  # JSON: the concrete GEN/AGG setting fixed at the first add, and its CV table
    Column("rejection", String),  # open-set rule, max or shift (None: max, a collection made before it)
    Column("index_tuning", String),  # JSON: the nprobe tuned to a recall target, and the recall it reached
    # the classes, and the sum of their proxy_hi - proxy_lo: kept by triggers on classes (migration 0012)
    Column("n_classes", BigInteger),
    Column("live_proxies", BigInteger),
    # the streaming least-squares head (lshead.py, migration 0015): its settings and its ridge lambda
    Column("ls_reg", Float),  # None: chosen by leave-one-out
    Column("features", Integer),  # width of the random ReLU features (None: the embeddings)
    Column("ridge", Float),
    Column("ridge_rows", BigInteger),  # the samples the ridge was chosen on (migration 0016)
)

embedder = Table(
    "embedder",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False),
    Column("path", String, nullable=False),
    Column("dimension", Integer),
    Column("revision", String),
)

classes = Table(
    "classes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("label", String, nullable=False),
    Column("label_kind", String, nullable=False),
    Column("n_samples", Integer, nullable=False),
    Column("proxy_lo", Integer, nullable=False),
    Column("proxy_hi", Integer, nullable=False),
    Column("sample_hi", Integer, nullable=False),
    Column("shift", Float),  # mean out-of-fold score of the class's own samples (rule shift; None: unknown)
    Column("threshold", Float),  # the class's own rejection threshold (None: the collection's)
    Column("changed", Integer),  # the version whose write last set this row (None: before migration 0012)
    UniqueConstraint("label_kind", "label", name="uq_classes_label"),
)

segments = Table(
    "segments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String, nullable=False),
    Column("file", String, nullable=False, unique=True),
    Column("n_vectors", Integer, nullable=False),
    Column("checksum", String),  # BLAKE2b-128 of the file's bytes, checked as it is read (None: not recorded)
    Column("lists", LargeBinary),  # an IVF proxy file's per-list checksums (verified.py; None: not recorded)
)

# the proxy id ranges (class_id << 24 | lo .. hi) of classes removed or re-imprinted whose vectors
# are still in segment files: written by triggers on classes, deleted as compactions drop them
# (migration 0014); a collection opens its mapped files without reading the class table
dead_proxies = Table(
    "dead_proxies",
    metadata,
    Column("class_id", Integer, primary_key=True, autoincrement=False),
    Column("lo", Integer, primary_key=True, autoincrement=False),
    Column("hi", Integer, nullable=False),
)

ingest = Table(
    "ingest",
    metadata,
    Column("source", String, primary_key=True),  # a hash of the source's rows (ingestion.fingerprint)
    Column("rows_done", Integer, nullable=False),
)

texts = Table(
    "texts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # the kept sample's vector id
    Column("class_id", Integer, nullable=False),
    Column("text", String),  # what the sample was embedded from (None: added as a vector)
    Column("ref", String),  # the user's reference of the row (an id column), if given
    Index("ix_texts_class_id", "class_id"),
)


def alembic_config(conn: Connection) -> Config:
    """Alembic configuration running the packaged migrations on ``conn``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("retrieval_imprint.migrations")))
    cfg.attributes["connection"] = conn
    return cfg


def schema_revision_of(engine: Engine, db_path: Path) -> tuple[str | None, str, bool]:
    """``schema_revision`` on a fresh connection, with a file that is not a collection's SQLite
    database (garbage, truncated, or empty of our tables) reported as damage, not a traceback."""
    with engine.connect() as conn:  # SQLite's own errors are typed by sqlite_error
        current, head, known = schema_revision(conn)
        if current is None and not inspect(conn).has_table("collection"):
            raise CollectionDamagedError(
                f"{db_path} holds no collection (no tables): not made by retrieval-imprint, or emptied"
            )
    return current, head, known


def schema_revision(conn: Connection) -> tuple[str | None, str, bool]:
    """``(current, head, known)``: the database's revision, the code's head, and whether the code
    knows the database's revision (False: the database is newer than this code)."""
    script = ScriptDirectory.from_config(alembic_config(conn))
    current = MigrationContext.configure(conn).get_current_revision()
    known = current is None or any(rev.revision == current for rev in script.walk_revisions())
    head = script.get_current_head()
    assert head is not None, "the packaged migrations have one head"
    return current, head, known


def migrate(conn: Connection, revision: str = "head", *, down: bool = False) -> None:
    """Upgrade (or downgrade) the database on ``conn`` to ``revision`` (the caller's transaction)."""
    (command.downgrade if down else command.upgrade)(alembic_config(conn), revision)

"""The label map: a collection's SQLite database (SQLAlchemy Core), its Alembic migrations, and
every SQL statement the package runs (the tables are schema.py's).

Connections run SQLite in WAL mode with a busy timeout; writers open ``BEGIN IMMEDIATE``
transactions (``writing``), readers plain ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, create_engine, delete, event, insert, select, update

from . import schema
from .errors import (
    CollectionDamagedError,
    CollectionIOError,
    CollectionLockedError,
    CollectionNotFoundError,
    NotACollectionError,
    SchemaVersionError,
)
from .params import AUTO, STORED
from .schema import classes, collection, dead_proxies, embedder, ingest, segments, texts
from .segments import CLASS_SHIFT, DB_NAME, range_ids

BUSY_TIMEOUT_MS = 10_000
SQL_CHUNK = 400  # values per IN (...) list: SQLite caps bound parameters


def connect(db_path: Path, *, read_only: bool = False) -> Engine:
    """An engine on ``db_path`` with WAL, a busy timeout, foreign keys, and explicit BEGINs; with
    ``read_only`` (a folder this process cannot write: a read-only mount, an image layer), SQLite's
    immutable read-only mode, which needs no journal, no ``-shm`` file and no WAL switch (and so
    cannot see writes left in a ``-wal`` file: those are refused, not silently missed)."""
    if read_only:
        wal = db_path.with_name(db_path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise CollectionIOError(
                f"{db_path} is read-only here and its last writes are still in {wal.name} (its "
                "writer stopped before closing): open it once where it is writable"
            )
        engine = create_engine(f"sqlite:///file:{quote(str(db_path.resolve()))}?mode=ro&immutable=1&uri=true")
    else:
        engine = create_engine(f"sqlite:///{db_path}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not pysqlite, emits BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> Exception | None:
        return sqlite_error(db_path, context.original_exception)

    return engine


def sqlite_error(db_path: Path, exc: BaseException) -> Exception | None:
    """SQLite's failure on a collection's database as this package's one-line error, whatever
    statement met it (SQLAlchemy raises what this returns): a damaged or foreign file is
    ``CollectionDamagedError``, a file that cannot be read or written ``CollectionIOError``,
    another process's lock ``CollectionLockedError``. None (SQLAlchemy's own error) for the rest:
    a constraint this code broke is a bug, and keeps its traceback."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return None
    name, reason = getattr(exc, "sqlite_errorname", "") or "", str(exc).strip() or type(exc).__name__
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return CollectionLockedError(
            f"{db_path} is locked by another process ({reason}); try again, or wait longer with imprint --wait"
        )
    if name.startswith(
        (
            "SQLITE_READONLY",
            "SQLITE_CANTOPEN",
            "SQLITE_IOERR",
            "SQLITE_FULL",
            "SQLITE_PERM",
            "SQLITE_AUTH",
            "SQLITE_NOMEM",
        )
    ):
        return CollectionIOError(f"could not use the collection's database {db_path} ({reason}); nothing was changed")
    return CollectionDamagedError(
        f"{db_path} is damaged or is not a collection's database ({reason}): restore it from a copy, or re-index"
    )


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction that takes SQLite's write lock up front (``BEGIN IMMEDIATE``). SQLite's
    own failures (a full disk, a read-only file) roll it back and become ``CollectionIOError``
    (``sqlite_error``)."""
    with engine.connect() as conn:
        conn.execution_options(immediate=True)
        with conn.begin():
            yield conn


def migrate(engine: Engine, revision: str = "head", *, down: bool = False) -> None:
    """Upgrade (or downgrade) the database to ``revision`` with the packaged Alembic scripts, in
    one writing transaction (``schema.migrate``)."""
    with writing(engine) as conn:
        schema.migrate(conn, revision, down=down)


# ----------------------------------------------------------------- reads and writes of one version
def create_database(
    db_path: Path, settings: dict[str, Any], embedder_row: dict[str, Any] | None, auto_choice: str | None = None
) -> None:
    """A new collection's database at ``db_path``, at the schema's head, with its settings row
    (the resolved ``settings``, and what auto chose where that is known already) and its
    embedder's row, at version 0 with no classes."""
    engine = connect(db_path)
    try:
        migrate(engine)
        _initialize(engine, settings, embedder_row, auto_choice)
    finally:
        engine.dispose()


def _initialize(
    engine: Engine, settings: dict[str, Any], embedder_row: dict[str, Any] | None, auto_choice: str | None
) -> None:
    with writing(engine) as conn:
        conn.execute(
            insert(collection).values(
                id=1,
                **{name: settings[name] for name in STORED} | {"ls_reg": _number(settings["ls_reg"])},
                index_factory=settings["index"],
                memory_budget=settings["memory_budget"],
                keep_samples=settings["keep_samples"],
                dimension=settings["dimension"],
                search_params=json.dumps(settings["search_params"]) if settings["search_params"] else None,
                auto_choice=auto_choice,
                version=0,
                next_class_id=0,
                n_classes=0,
                live_proxies=0,
            )
        )
        if embedder_row is not None:
            conn.execute(insert(embedder).values(id=1, **embedder_row))


def _number(ls_reg: float | str) -> float | None:
    """``ls_reg`` as its column holds it: a number, or NULL for auto."""
    return None if ls_reg == AUTO else float(ls_reg)


def read_state(conn: Connection) -> tuple[dict[str, Any], dict[str, Any] | None, set[str], list[Any]]:
    """The collection row, the embedder row, the kinds of its labels and ``(kind, file, checksum,
    n_vectors, lists)`` segment rows: none of it grows with the classes (the class table is read by
    ``class_columns`` or ``class_rows``)."""
    cfg: dict[str, Any] = dict(conn.execute(select(collection)).mappings().one())
    cfg["ls_reg"] = AUTO if cfg["ls_reg"] is None else cfg["ls_reg"]
    emb = conn.execute(select(embedder)).mappings().first()
    kinds = {
        kind
        for kind in ("str", "int")  # an index seek each: SELECT DISTINCT would scan every class
        if conn.execute(select(classes.c.id).where(classes.c.label_kind == kind).limit(1)).first() is not None
    }
    segs = conn.execute(
        select(segments.c.kind, segments.c.file, segments.c.checksum, segments.c.n_vectors, segments.c.lists).order_by(
            segments.c.id
        )
    ).all()
    return cfg, dict(emb) if emb is not None else None, kinds, list(segs)


def live_proxies(conn: Connection) -> int | None:
    """The classes' proxy count, as the triggers keep it (``schema.py``)."""
    return conn.execute(select(collection.c.live_proxies)).scalar_one()


def dead_proxy_ids(conn: Connection) -> np.ndarray:
    """The ids of proxies removed or re-imprinted that segment files still hold, as the triggers
    record them (``schema.py``), sorted."""
    rows = np.array(conn.execute(select(dead_proxies.c.class_id, dead_proxies.c.lo, dead_proxies.c.hi)).all(), np.int64)
    if not len(rows):
        return np.zeros(0, np.int64)
    return np.sort(range_ids(rows[:, 0], rows[:, 1], rows[:, 2]))


def forget_dead(conn: Connection, ids: np.ndarray | None = None) -> None:
    """Forget the dead ranges holding these ids (None: every range), dropped from the files by a compaction."""
    if ids is None:
        conn.execute(delete(dead_proxies))
        return
    pairs = [{"c": int(c), "j": int(j)} for c, j in zip(ids >> CLASS_SHIFT, ids & ((1 << CLASS_SHIFT) - 1))]
    if pairs:
        conn.execute(
            delete(dead_proxies).where(
                dead_proxies.c.class_id == bindparam("c"),
                dead_proxies.c.lo <= bindparam("j"),
                dead_proxies.c.hi > bindparam("j"),
            ),
            pairs,
        )


def n_classes(conn: Connection) -> int:
    """The classes, as the triggers count them (``schema.py``)."""
    return conn.execute(select(collection.c.n_classes)).scalar_one()


def version(conn: Connection) -> int:
    return conn.execute(select(collection.c.version)).scalar_one()


def insert_segment(conn: Connection, kind: str, segment: Any, n_vectors: int) -> None:
    """Record a segment file (``segments.Segment``) holding ``n_vectors``."""
    conn.execute(
        insert(segments).values(
            kind=kind, file=segment.name, checksum=segment.checksum, n_vectors=n_vectors, lists=segment.lists
        )
    )


def delete_classes(conn: Connection, class_ids: np.ndarray) -> None:
    """Delete these classes' rows and their samples' texts: their vectors are no longer live (the
    classes' ranges name the live ones), and leave the files at the next compaction."""
    for i in range(0, len(class_ids), SQL_CHUNK):
        chunk = class_ids[i : i + SQL_CHUNK].tolist()
        conn.execute(delete(texts).where(texts.c.class_id.in_(chunk)))
        conn.execute(delete(classes).where(classes.c.id.in_(chunk)))


def insert_texts(
    conn: Connection, ids: np.ndarray, owners: np.ndarray, rows: Sequence[str | None], refs: Sequence[str | None] | None
) -> None:
    """Record the text (and reference) of each new kept sample ``ids`` of classes ``owners``."""
    refs = refs if refs is not None else [None] * len(rows)
    conn.execute(
        insert(texts),
        [
            {"id": int(i), "class_id": int(c), "text": t, "ref": r}
            for i, c, t, r in zip(ids.tolist(), owners.tolist(), rows, refs)
        ],
    )


def texts_of(conn: Connection, ids: Sequence[int]) -> dict[int, tuple[str | None, str | None]]:
    """``{sample id: (text, ref)}`` of those ``ids`` that have a recorded text."""
    out = {}
    for i in range(0, len(ids), SQL_CHUNK):
        chunk = [int(v) for v in ids[i : i + SQL_CHUNK]]
        out.update(
            {
                row.id: (row.text, row.ref)
                for row in conn.execute(select(texts.c.id, texts.c.text, texts.c.ref).where(texts.c.id.in_(chunk)))
            }
        )
    return out


def replace_segments(conn: Connection, kind: str, old: Sequence[str], segment: Any, n_vectors: int) -> None:
    """Record the new ``segment`` in place of segments ``old``, whose live vectors it holds."""
    insert_segment(conn, kind, segment, n_vectors)
    conn.execute(delete(segments).where(segments.c.file.in_(old)))


def forget_segments(conn: Connection, files: Sequence[str]) -> None:
    """Drop the rows of segment files holding no vectors of their own (candidates) that went away."""
    if files:
        conn.execute(delete(segments).where(segments.c.file.in_(files)))


def set_template(conn: Connection, segment: Any) -> None:
    """Make ``segment`` the one template segment (an IVF index's trained, empty index)."""
    conn.execute(delete(segments).where(segments.c.kind == "template"))
    conn.execute(insert(segments).values(kind="template", file=segment.name, checksum=segment.checksum, n_vectors=0))


def rows_done(conn: Connection, source: str) -> int:
    """Rows of ``source`` committed by a chunked ingestion (0 if none)."""
    return int(conn.execute(select(ingest.c.rows_done).where(ingest.c.source == source)).scalar() or 0)


def set_rows_done(conn: Connection, source: str, done: int) -> None:
    conn.execute(delete(ingest).where(ingest.c.source == source))
    conn.execute(insert(ingest).values(source=source, rows_done=int(done)))


def set_collection(conn: Connection, **values: Any) -> None:
    """Set columns of the collection row (``version`` with every change a write commits)."""
    conn.execute(update(collection).values(**values))


def set_embedder(conn: Connection, **values: Any) -> None:
    conn.execute(update(embedder).values(**values))


def delete_segments(conn: Connection, kinds: Sequence[str]) -> None:
    """Forget every segment file of these kinds."""
    conn.execute(delete(segments).where(segments.c.kind.in_(list(kinds))))


def open_database(path: Path) -> tuple[Engine, str | None, str]:
    """An engine on the database of the collection at ``path``, its schema revision and this
    code's head; an error if there is no collection or its schema is newer than this code knows."""
    db = path / DB_NAME
    if not path.exists():
        raise CollectionNotFoundError(f"no collection at {path}")
    if not db.is_file():
        raise NotACollectionError(f"{path} is not a collection (no {DB_NAME} in it)")
    if not db.stat().st_size:
        raise CollectionDamagedError(
            f"{db} is empty (truncated, or never written): the collection's database is lost; restore it from a "
            "copy or re-index"
        )
    engine = connect(db, read_only=not os.access(path, os.W_OK))
    current, head, known = schema.schema_revision_of(engine, db)
    if not known:
        raise SchemaVersionError(
            f"{path} has schema revision {current}, newer than this retrieval-imprint knows (up to {head}): "
            "upgrade the package to open it"
        )
    return engine, current, head

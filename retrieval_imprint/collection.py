"""Collections: an imprinted head on disk that grows and shrinks one class at a time.

A collection is a directory (laid out in docs/collections.md): a SQLite label map, ``imprint.db``
(store.py), and immutable FAISS segment files (segments.py) of proxies, kept samples and an IVF
index's trained, empty template.

**Writes are atomic.** A write only ever adds segment files, then one SQLite transaction records
them and the new version. A crash before the commit leaves the previous state (the next writer
deletes the orphan file); after it, the new one. Removed and re-imprinted vectors stay in their
segments until ``compact()`` (automatic past ``COMPACT_SEGMENTS`` segments) rewrites the live ones.
**Readers never wait for a writer** (``snapshot.py``); one writer at a time holds ``writer.lock``,
a second gets ``CollectionLockedError`` naming the holder's pid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine

from . import classrows, compaction, interface, provenance, ranking, segments, snapshot, store, training, writes
from . import labels as lab
from . import params as spec
from .calibration import Calibrated
from .embed import Embedder, model_fingerprint, recorded_embedder, resolve_model
from .errors import (
    CollectionChangedError,
    CollectionDamagedError,
    CollectionIOError,
    CollectionStateError,
    DataError,
    InvalidParameterError,
    SchemaVersionError,
)
from .integrity import CheckReport, check
from .interface import Shared, check_tunable, check_unchanged, check_vectors, labelled_rows, query_rows, staging
from .normalize import normalize
from .ranking import QueryResult
from .segments import DB_NAME
from .snapshot import Snapshot

COMPACT_SEGMENTS = 16
T = TypeVar("T")
RETRAIN_GROWTH = 4


class Collection(Calibrated, Shared):
    """An imprinted head stored in a directory; see the module docstring for the layout."""

    def __init__(self, path: Path, engine, lock_timeout: float = 0.0) -> None:  # use create(), open()...
        self.path = path
        self.lock_timeout = lock_timeout  # seconds a write waits for another process's write to finish
        self._engine = engine
        self._embedder: Embedder | None = None
        self._s = snapshot.read(path, engine)

    @property
    def snapshot(self) -> snapshot.Snapshot:
        """The committed version this object answers from (``snapshot.Snapshot``): take it once for a whole
        answer, as ``refresh()`` may replace it meanwhile. For the modules that answer and write over a collection's
        insides (``ranking``, ``writes``, ``merge``, ``shardhead``); not to be changed outside a ``writing()`` block."""
        return self._s

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of the collection's database (``store.py``)."""
        return self._engine

    # ----------------------------------------------------------------- create, open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        preset: str | None = None,
        lock_timeout: float = 0.0,
        auto_choice: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Collection:
        """Create an empty collection at ``path`` (a new or empty directory).

        ``settings`` are the stored GEN/NORM/AGG parameters and the collection settings of
        ``params.py`` (``model``, ``index``, ``memory_budget``, ``search_params``, ``keep_samples``,
        ``dimension``), over the defaults and ``preset``; fixed for every later add.
        ``auto_choice``: what auto chose for this data before (an exported collection made again),
        taken by the first add instead of choosing anew.
        """
        s = spec.check_collection(spec.resolve(settings, spec.collection_scope(), preset))
        path = Path(path)
        with staging(path) as staged:
            (staged / segments.READERS_LOCK).touch()
            where = resolve_model(s["model"]) if s["model"] is not None else None
            embedder = None if where is None else {
                "name": s["model"], "path": where, "dimension": s["dimension"], "revision": model_fingerprint(where)
            }  # fmt: skip
            store.create_database(
                staged / DB_NAME, s, embedder, None if auto_choice is None else json.dumps(auto_choice)
            )
        return cls.open(path, lock_timeout=lock_timeout)

    @classmethod
    def open(cls, path: str | os.PathLike, *, upgrade: bool = False, lock_timeout: float = 0.0) -> Collection:
        """Open an existing collection; ``upgrade=True`` migrates an older schema first; writes wait
        up to ``lock_timeout`` seconds for another process's write to finish."""
        engine, current, head = store.open_database(Path(path))
        if current != head:
            if not upgrade:
                raise SchemaVersionError(
                    f"{path} has schema revision {current}, older than {head}: run "
                    f"`imprint db upgrade {path}` (or Collection.open(path, upgrade=True))"
                )
            store.migrate(engine)
        return cls(Path(path), engine, lock_timeout)

    @classmethod
    def upgrade(cls, path: str | os.PathLike) -> tuple[str | None, str]:
        """Migrate the database at ``path`` to this version's schema; returns ``(before, after)``."""
        engine, current, head = store.open_database(Path(path))
        if current != head:
            store.migrate(engine)
        engine.dispose()
        return current, head

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike, *, preset: str | None = None, lock_timeout: float = 0.0, **settings: Any
    ) -> Collection:
        """Open the collection at ``path`` if there is one, else create it. The settings given (and
        the preset's) must then match the stored ones; a ``SettingsClashError`` lists every clash."""
        if not (Path(path) / DB_NAME).exists():
            return cls.create(path, preset=preset, lock_timeout=lock_timeout, **settings)
        col = cls.open(path, lock_timeout=lock_timeout)
        col.check_settings(preset=preset, **settings)
        return col

    def check_settings(self, *, preset: str | None = None, **settings: Any) -> None:
        """Raise ``SettingsClashError`` if any setting given here differs from the stored one."""
        stored = {**self.config, "model": self.model, "index": self.config["index_factory"]}
        stored["search_params"] = self.search_params or None
        check_unchanged(self.path, spec.preset(preset) | settings, stored)

    def refresh(self) -> bool:
        """Pick up another process's writes; True if the collection changed."""
        with self._engine.connect() as conn:
            if store.version(conn) == self._s.version:
                return False
        self._s = snapshot.read(self.path, self._engine)
        return True

    def close(self) -> None:
        self._engine.dispose()

    # ----------------------------------------------------------------- reading
    def current(self, read: Callable[[Snapshot], T]) -> T:
        """``read(snapshot)``; where another process's write has changed the class rows it needs
        since this snapshot was taken, on the version now committed, read with its class table."""
        try:
            return read(self._s)
        except CollectionChangedError:
            self._s = snapshot.read(self.path, self._engine, table=True)
            return read(self._s)

    @property
    def classes(self) -> list:
        """Labels, in the order their classes were added."""
        return self.current(lambda s: s.table.labels.tolist())

    def __len__(self) -> int:
        return self.current(lambda s: s.n_classes)

    @property
    def config(self) -> dict[str, Any]:
        keys = (*spec.STORED, "index_factory", "memory_budget", "keep_samples", "dimension", "threshold")
        ridge = {k: self._s.config[k] for k in ("ridge", "ridge_rows")} if self._s.config["generator"] == "ls" else {}
        return {**{key: self._s.config[key] for key in keys}, **ridge, "search_params": self.search_params}

    @property
    def dimension(self) -> int | None:
        """The vectors' dimension (None before the first add, where none was given)."""
        return self._s.dimension

    @property
    def params(self) -> dict[str, Any]:
        """The concrete GEN/NORM/AGG parameters answers follow: the stored ones with what auto chose."""
        return self._s.params

    @property
    def n_shards(self) -> int:
        """1: a collection is its own only shard (``ShardedCollection`` has S)."""
        return 1

    @property
    def search_params(self) -> dict[str, int]:
        """Stored search parameters of an approximate index (e.g. ``{"nprobe": 16}``)."""
        return self._s.search_params

    @property
    def auto_choice(self) -> dict[str, Any] | None:
        """The concrete generator, k, aggregation and alpha fixed at the first add, with each candidate's held-out
        accuracy (``cv_results``); None before the first add."""
        return self._s.auto_choice

    @property
    def model(self) -> str | None:
        """The recorded embedder's name (None for a collection of vectors of unknown origin)."""
        return self._s.embedder["name"] if self._s.embedder else None

    def info(self) -> dict[str, Any]:
        """Config, sizes and files, as plain data."""
        return {"path": str(self.path), **self.current(lambda s: interface.snapshot_info(s, self.path, self.config))}

    def class_table(self) -> list[dict[str, Any]]:
        """One row per class, in insertion order: label, samples, proxies."""
        return self.current(lambda s: s.table.rows())

    def query(
        self,
        Q: Any,
        top: int = 1,
        *,
        threshold: float | None = None,
        model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> QueryResult:
        """The ``top`` best classes for each query vector (rows of ``Q``), best first.

        ``threshold`` (default: the stored one, if any) turns classes scoring below it into "no
        class" (None). ``model``, if given, must be the collection's embedder. ``search_params``
        (e.g. ``{"nprobe": 64}``) replace the stored ones for this call (approximate indexes).
        """

        def answer(s: Snapshot) -> QueryResult:  # one snapshot for the whole answer
            if s.proxies is None or not s.proxies.ntotal:
                raise CollectionStateError(f"collection {self.path} has no classes yet")
            rows, k = query_rows(Q, top, model, self.model, s.dimension, s.config["inf_norm"])
            owner, scores = ranking.rank(s, rows, k, ranking.search_params(s, search_params))
            return ranking.answer(s, owner, scores, threshold)

        return self.current(answer)

    def embedder(self, *, progress: bool = False) -> Embedder:
        """The collection's embedding model (loaded on first use; cached embeddings), checked to be
        the one the collection was made with: a model changed in place would embed differently."""
        if self._embedder is None:
            self._embedder = recorded_embedder(self._s.embedder, self.path)
        self._embedder.progress = progress
        return self._embedder

    def examples(self, label: object) -> list[dict[str, Any]]:
        """The kept samples of class ``label``: ``sample`` (index in the class), ``text`` and ``ref``
        (None where it was added as a vector) (``provenance.py``)."""
        class_id = int(self._class_ids([label])[0])
        return self.current(lambda s: provenance.examples(self._engine, s, self.path, class_id))

    def explain(
        self, Q: Any, n: int = 3, *, threshold: float | None = None, answers: Sequence[object] | None = None
    ) -> list[list[dict[str, Any]]]:
        """Each query's ``n`` kept samples of its answer (of ``answers``, if given: a sharded collection's) most
        similar to it (text, ref, score; none where it is rejected): the training examples the answer rests on."""
        n = spec.check_int("n", n, 1)
        labels = self.query(Q, 1, threshold=threshold).labels[:, 0] if answers is None else answers
        owner = self.current(lambda s: s.table.ids_of(labels))
        s = snapshot.read(self.path, self._engine, samples=True)  # the samples, read as the answers were
        Q = normalize(check_vectors(Q, "Q", self._s.dimension), self._s.config["inf_norm"], what="Q")
        return provenance.explain(self._engine, s, self.path, Q, owner, n)

    @property
    def members(self) -> list[Collection]:
        """The plain collections holding the classes: this one."""
        return [self]

    def member_of(self, labels: Sequence[object]) -> np.ndarray:
        """The position in ``members`` of each label's class: 0."""
        return np.zeros(len(labels), np.int64)

    def check(self) -> CheckReport:
        """Verify from disk that the database and the index files agree (``integrity.check``)."""
        return check(self.path, self._engine)

    @classmethod
    def verify(cls, path: str | os.PathLike) -> CheckReport:
        """``check`` a collection that may be too damaged to open: damage (and an unreadable database) is reported."""
        try:
            engine, _, _ = store.open_database(Path(path))
            return check(Path(path), engine)
        except (CollectionDamagedError, CollectionIOError) as exc:
            return CheckReport(False, [str(exc)])

    # ----------------------------------------------------------------- writing
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock, start from the latest committed state, and on any failure drop the in-memory
        changes by reloading what is on disk. A streaming ls head grown past its ridge chooses it again after."""
        with segments.writer_lock(self.path, self.lock_timeout):
            self.refresh()
            self._s.check_files(self.path)  # damage found before a write, not after it has committed
            segments.delete_unlisted(self.path, self._s.listed())
            try:
                yield
                writes.rechoose_ridge(self.path, self._engine, self._s)
            except BaseException:
                self._s = snapshot.read(self.path, self._engine)
                raise

    def add(
        self,
        X: Any,
        labels: Sequence[object],
        *,
        model: str | None = None,
        replace: bool | set = False,
        checkpoints: Sequence[tuple[str, int]] = (),
        texts: Sequence[str | None] | None = None,
        refs: Sequence[str | None] | None = None,
        auto_choice: str | None = None,
    ) -> Collection:
        """Imprint samples ``X`` ``(n, d)`` with their ``labels``: new labels become new classes; an
        existing class is re-imprinted from its kept samples plus the new ones, or, with
        ``replace``, from the new ones alone (an upsert; the class keeps no per-class threshold;
        ``replace`` may also name the label entries to replace). ``model``, if given, must be the
        collection's embedder. Atomic.

        For ingestion (``ingestion.py``, ``sharded.py``): ``checkpoints`` ``(source, rows_done)``
        record in the same transaction how far ingestions have come; ``texts`` and ``refs``: what
        each row was embedded from, kept; ``auto_choice``: what auto chose elsewhere (a sharded
        collection's first add), taken instead of choosing on these rows if this collection has
        not chosen yet."""
        X, codes, entries = labelled_rows(X, labels, self._s.dimension, self.model, model, "add")
        with self.writing():
            if auto_choice is not None and self._s.config["auto_choice"] is None:
                self._s.config["auto_choice"] = auto_choice
            kinds = self._s.label_kinds
            if len(kinds) <= 1:  # (a collection made before the rule may mix them: left as it is)
                lab.check_kind(entries, next(iter(kinds), None))
            replaced = set(entries) if replace is True else replace or ()
            writes.add(self.path, self._engine, self._s, X, codes, entries, checkpoints, replaced, texts, refs)
            if len(self._s.files["proxies"]) > COMPACT_SEGMENTS:
                compaction.compact(self.path, self._engine, self._s, full=False)
        return self

    def train(
        self, X: Any, labels: Sequence[object], *, classes: int | None = None, model: str | None = None
    ) -> Collection:
        """Before the first add, train an IVF index's lists (and make auto's choice) on a sample
        ``X`` with ``labels`` drawn across all the data to come, not the first add's classes alone;
        adds no class. ``classes``: how many it will hold (sizes ``index="auto"``). Atomic."""
        X, codes, entries = labelled_rows(X, labels, self._s.dimension, self.model, model, "train")
        with self.writing():
            training.train(self.path, self._engine, self._s, X, codes, entries, classes)
        return self

    def remove(self, labels: Sequence[object]) -> Collection:
        """Remove the classes with these labels (all must exist; otherwise nothing is removed)."""
        entries = list(
            dict.fromkeys(lab.stored_entry(label, f"row {row}") for row, label in enumerate(lab.as_sequence(labels)))
        )
        if not entries:
            raise DataError("no labels given: nothing to remove")
        with self.writing():
            writes.remove(self.path, self._engine, self._s, entries)
        return self

    def restore(self, threshold: float | None, classes: dict[Any, tuple], ridge: tuple | None = None) -> Collection:
        """Set the collection's threshold, by label each class's own threshold and rejection shift
        (``(threshold, shift)``, None: none) and a streaming ls head's ``ridge`` (``(lambda, samples it
        was chosen on)``, None: as chosen here), in one write: what an export carries of a collection's
        state, restored by ``ingest`` when it makes the collection again."""
        with self.writing():
            ids = self._class_ids(list(classes)).tolist()
            writes.restore(self._engine, self._s, threshold, dict(zip(ids, classes.values())), ridge)
        return self

    def set_search_params(self, **params: int) -> Collection:
        """Store the search parameters of an approximate index, e.g. ``set_search_params(nprobe=32)``."""
        if self._s.config["index_factory"] == "Flat":
            raise CollectionStateError(
                "search parameters apply to approximate (IVF) indexes; this collection's index is exact"
            )
        checked = spec.check_search_params("search_params", params) or {}
        with self.writing():
            writes.set_search_params(self._engine, self._s, checked)
        return self

    def set_threshold(self, threshold: float | None, *, label: object = None) -> Collection:
        """Store the open-set rejection threshold ``query`` compares rejection scores with (None:
        never reject), or, with ``label``, that class's own threshold (None: the collection's)."""
        if threshold is not None and (isinstance(threshold, bool) or not np.isfinite(threshold)):
            raise InvalidParameterError(f"threshold={threshold!r} is not valid; expected a finite number or None")
        value = None if threshold is None else float(threshold)
        with self.writing():
            if label is None:
                writes.set_values(self._engine, self._s, threshold=value)
            else:
                writes.set_class_threshold(self._engine, self._s, int(self._class_ids([label])[0]), value)
        return self

    def _class_ids(self, labels: Sequence[object]) -> np.ndarray:
        with self._engine.connect() as conn:  # one lookup in the unique index, not the whole class table
            return classrows.class_ids(conn, labels, self.path)

    def existing(self, entries: Sequence[tuple[str, str]]) -> set:
        """Which of these label entries are classes here (one SQL lookup, not a scan per label)."""
        with self._engine.connect() as conn:
            return set(classrows.find_classes(conn, list(entries)))

    def compact(self, *, retrain: bool | None = None) -> Collection:
        """Rewrite the live vectors into one segment per kind and delete the old files.

        An IVF proxy index (Flat or SQfp16 codes) is also retrained on a sample of the live proxies
        when they have grown to ``RETRAIN_GROWTH`` times those its lists were trained on (the
        first add's): classes added later crowd into the lists nearest them, so recall at a given
        nprobe falls and queries slow down. ``retrain=True`` retrains now, ``False`` never.
        """
        with self.writing():
            retrain = self.outgrown if retrain is None else compaction.check_retrain(self.path, self._s, retrain)
            compaction.compact(self.path, self._engine, self._s, retrain=retrain)
        return self

    def tune(self) -> dict[str, Any]:
        """Choose again what the settings leave to ``auto``, by cross-validation on every kept
        sample, and re-imprint every class with that choice in one atomic write; returns the new
        ``auto_choice``. Needs a collection that keeps its samples."""
        check_tunable(self)
        with self.writing():
            writes.retune(self.path, self._engine, self._s)
        return self._s.auto_choice or {}

    @property
    def outgrown(self) -> bool:
        """Whether the IVF lists were trained on under 1 / ``RETRAIN_GROWTH`` of the live proxies (compact retrains)."""
        return self._s.outgrown(RETRAIN_GROWTH)

    def rows_done(self, source: str) -> int:
        """Rows of ``source`` already committed by an ingestion (``ingestion.py``)."""
        with self._engine.connect() as conn:
            return store.rows_done(conn, source)

    def record_progress(self, checkpoints: Sequence[tuple[str, int]]) -> None:
        """Record ``(source, rows_done)`` of ingestions whose rows held nothing for this collection
        (a shard that owns none of a chunk's classes)."""
        with self.writing(), store.writing(self._engine) as conn:
            for source, done in checkpoints:
                store.set_rows_done(conn, source, done)

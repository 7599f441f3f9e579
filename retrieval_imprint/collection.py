"""Collections: an imprinted head on disk that grows and shrinks one class at a time.

A collection is a directory::

    imprint.db              SQLite label map (``store.py``): config, embedder, classes, segments, ids
    proxies-00000007.faiss  immutable FAISS segments (IndexIDMap2 over a flat index) ...
    samples-00000007.faiss  ... of proxies and, with ``keep_samples``, of the pre-normalised samples
    writer.lock             held (flock) by the one process writing; holds its pid
    readers.lock            held shared (flock) by readers while they open the segments they read

**Ids.** A vector's 64-bit id is ``class_id << 24 | j``: the class is ``id >> 24``, so mapping search
results to labels is arithmetic on arrays, never SQL. Class ids are never reused; a class's live
proxies are ``j`` in ``[proxy_lo, proxy_hi)`` (regenerating a class moves the range forward).

**Writes are atomic.** A write only ever *adds* files: the new vectors go to a fresh segment file
(written to ``.tmp``, fsynced, renamed, directory fsynced), then one SQLite transaction records the
segment, the id rows and the new version. A crash before the commit leaves the previous state (the
orphan file is deleted by the next writer); after it, the new one. Removed and regenerated vectors
stay in their segments until ``compact()`` (automatic past ``COMPACT_SEGMENTS`` segments) rewrites
the live ones into one file; loading skips dead ids by their class ranges.

**Concurrency.** Readers never wait for a writer: they read the database (WAL) and the immutable
segments, and pick up new versions on ``refresh()`` or reopen. While a reader lists the segments and
opens them (not while it reads them: an open file outlives its deletion) it holds ``readers.lock``
shared; a writer deletes superseded segment files only when it can take that lock exclusively
without waiting, and otherwise leaves them for a later write, so a file a reader has just seen
listed is never deleted before the reader opens it. One writer at a time holds ``writer.lock``; a
second gets ``CollectionLockedError`` naming the holder's pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import faiss
import numpy as np
from sqlalchemy import delete, insert, select, tuple_, update

from . import store
from ._groups import Grouped, label_keys
from .aggregate import rank_classes, vote_weights
from .classifier import check_params
from .embed import DEFAULT_MODEL, Embedder, EmbeddingCache, model_revision, resolve_model
from .evaluate import Calibration, calibrate
from .generate import GENERATORS, generate
from .index import ProxyIndex, choose_index, default_nprobe, mahalanobis_map, parse_size
from .normalize import normalize, quantile_targets

DB_NAME = "imprint.db"
LOCK_NAME = "writer.lock"
READERS_LOCK = "readers.lock"
CLASS_SHIFT = 24
MAX_PER_CLASS = 1 << CLASS_SHIFT
COMPACT_SEGMENTS = 16
RETRAIN_GROWTH = 4
_SQL_CHUNK = 400
CHECK_ATTEMPTS = 20


class CollectionLockedError(RuntimeError):
    """Another process is writing to the collection."""


class SchemaVersionError(RuntimeError):
    """The database schema is older (upgrade it) or newer (upgrade the package) than this code."""


@dataclass(frozen=True)
class QueryResult:
    """Per query, the ``top`` best classes, best first: ``labels`` ``(n_q, top)`` (None where there
    is no further class or its score is below the threshold) and ``scores`` ``(n_q, top)`` (NaN there).
    Scores are the aggregated class scores: best-proxy similarity (``max``) or vote share (``mnn``)."""

    labels: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CheckReport:
    ok: bool
    problems: list[str]


def _label_entry(label: object, row: int) -> tuple[str, str]:
    """``(kind, text)`` stored for a label: kind ``str`` or ``int``."""
    if isinstance(label, (str, np.str_)):
        if not label.strip():
            raise ValueError(f"label at row {row} is blank")
        return "str", str(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return "int", str(int(label))
    raise ValueError(f"label at row {row} is {type(label).__name__} {label!r}: labels must be str or int")


def _encode_labels(labels: Sequence[object]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Class codes ``(n,)`` and the distinct ``(kind, text)`` label entries in first-appearance order.

    All-str or all-int labels are checked once per distinct label (numpy does the grouping);
    anything else row by row, so that an error names the first bad row either way.
    """
    values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    types = set(map(type, values))
    if types in ({str}, {int}):
        uniq, first, codes = np.unique(np.array(values), return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        return rank[codes.ravel()], [_label_entry(uniq[i].item(), int(first[i])) for i in order]
    seen: dict[tuple[str, str], int] = {}
    codes = np.fromiter((seen.setdefault(_label_entry(v, row), len(seen)) for row, v in enumerate(values)),
                        np.int64, len(values))
    return codes, list(seen)


def _label_value(kind: str, text: str) -> object:
    return int(text) if kind == "int" else text


def _check_vectors(X: object, what: str, dimension: int | None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d); got shape {X.shape}")
    if not len(X):
        raise ValueError(f"{what} is empty: nothing to {'add' if what == 'X' else 'query'}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{what} must hold real numbers; got dtype {X.dtype}")
    X = np.asarray(X, np.float32)  # no copy for float32 input: nothing below writes to it
    bad = np.flatnonzero(~np.isfinite(X).all(1))
    if len(bad):
        raise ValueError(f"{what} row {bad[0]} holds NaN or infinity ({len(bad)} such rows)")
    if dimension is not None and X.shape[1] != dimension:
        raise ValueError(f"{what} has dimension {X.shape[1]}, but this collection holds {dimension}-d vectors")
    return X


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _class_ranges(class_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which ``ids`` are live: their class exists and ``j`` lies in that class's ``[lo, hi)``."""
    cls, j = ids >> CLASS_SHIFT, ids & (MAX_PER_CLASS - 1)
    pos = np.minimum(np.searchsorted(class_ids, cls), max(len(class_ids) - 1, 0))
    if not len(class_ids):
        return np.zeros(len(ids), bool)
    return (class_ids[pos] == cls) & (lo[pos] <= j) & (j < hi[pos])


class Collection:
    """An imprinted head stored in a directory; see the module docstring for the layout."""

    def __init__(self, path: Path, engine, samples: bool = False) -> None:  # use create() or open()
        self.path = path
        self._engine = engine
        self._samples: ProxyIndex | None = None
        self._embedder: Embedder | None = None
        self._load(samples)

    # ----------------------------------------------------------------- create, open, load
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        model: str | None = DEFAULT_MODEL,
        generator: str = "kmeans",
        k: int = 20,
        pre_norm: str = "l2",
        post_norm: str = "l2",
        inf_norm: str = "l2",
        aggregation: str = "max",
        m: int = 1,
        metric: str = "ip",
        vote: str = "uniform",
        random_state: int = 0,
        index: str = "Flat",
        memory_budget: str | int | None = None,
        search_params: dict[str, int] | None = None,
        keep_samples: bool = True,
        dimension: int | None = None,
    ) -> "Collection":
        """Create an empty collection at ``path`` (a new or empty directory).

        GEN/NORM/AGG arguments are ``ImprintClassifier``'s and fixed for every later add. ``model``
        is the embedder recorded for ``add_texts``/``query_texts`` and identity checks (None: the
        collection holds precomputed vectors of unknown origin). ``keep_samples`` stores the samples
        so a class that receives new samples can be re-imprinted from all of them.

        ``index``: ``"Flat"`` (exact, default), a FAISS IVF factory string (``"IVF4096,SQ8"``,
        ``"IVF1024,PQ48"``, ...) trained on the first add's proxies, or ``"auto"``: the most
        accurate of those whose proxies fit ``memory_budget`` (``"8GB"``), chosen at the first add.
        ``search_params`` (e.g. ``{"nprobe": 32}``) default to nprobe = nlist / 64 (at least 32).
        """
        params = dict(generator=generator, k=k, pre_norm=pre_norm, post_norm=post_norm, inf_norm=inf_norm,
                      aggregation=aggregation, m=m, metric=metric, vote=vote, ls_reg=0.0)
        check_params(params)
        del params["ls_reg"]
        if not GENERATORS[generator].per_class:
            raise ValueError(f"generator={generator!r} needs every class at once (it is not imprinting), so "
                             "it cannot grow a collection one class at a time; use ImprintClassifier for it")
        if not isinstance(index, str) or not (index in ("Flat", "auto") or index.startswith("IVF")):
            raise ValueError(f"index={index!r} is not valid; expected 'Flat', 'auto' or a FAISS IVF factory "
                             "string such as 'IVF4096,SQ8'")
        if index == "auto" and memory_budget is None:
            raise ValueError("index='auto' chooses from a memory budget: give memory_budget, e.g. '8GB'")
        budget = parse_size(memory_budget) if memory_budget is not None else None
        if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
            raise ValueError(f"random_state={random_state!r} is not valid; a collection needs an int seed")
        if dimension is not None and (not isinstance(dimension, int) or dimension < 1):
            raise ValueError(f"dimension={dimension!r} is not valid; expected a positive integer")
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} already exists and is not an empty directory")
        staging = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / READERS_LOCK).touch()
        engine = store.connect(staging / DB_NAME)
        try:
            store.migrate(engine)
            with store.writing(engine) as conn:
                conn.execute(insert(store.collection).values(
                    id=1, **params, random_state=int(random_state), index_factory=index, memory_budget=budget,
                    search_params=json.dumps(search_params) if search_params else None,
                    keep_samples=bool(keep_samples), dimension=dimension, version=0, next_class_id=0))
                if model is not None:
                    conn.execute(insert(store.embedder).values(
                        id=1, name=model, path=resolve_model(model), dimension=dimension,
                        revision=model_revision(resolve_model(model))))
        finally:
            engine.dispose()
        os.replace(staging, path)  # the collection appears whole or not at all
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, upgrade: bool = False) -> "Collection":
        """Open an existing collection; ``upgrade=True`` migrates an older schema first."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no collection at {path}")
        if not (path / DB_NAME).is_file():
            raise ValueError(f"{path} is not a collection (no {DB_NAME} in it)")
        engine = store.connect(path / DB_NAME)
        with engine.connect() as conn:
            current, head, known = store.schema_revision(conn)
        if not known:
            raise SchemaVersionError(f"{path} has schema revision {current}, newer than this retrieval-imprint "
                                     f"knows (up to {head}): upgrade the package to open it")
        if current != head:
            if not upgrade:
                raise SchemaVersionError(f"{path} has schema revision {current}, older than {head}: run "
                                         f"`imprint db upgrade {path}` (or Collection.open(path, upgrade=True))")
            store.migrate(engine)
        return cls(path, engine)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold ``readers.lock`` shared: no writer deletes a segment file meanwhile (see module doc)."""
        try:
            fd = os.open(self.path / READERS_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:  # a read-only directory without the file (made before it existed): read unlocked
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self, samples: bool = False) -> None:
        """Read one committed version: the database rows and the segment files they name (the
        samples' too if ``samples``). The files are opened under ``readers.lock`` and read after it
        is released (an open file outlives its deletion), so writers never wait on a slow load."""
        with ExitStack() as stack:
            with self._reading():
                with self._engine.connect() as conn, conn.begin():
                    cfg = dict(conn.execute(select(store.collection)).mappings().one())
                    emb = conn.execute(select(store.embedder)).mappings().first()
                    rows = conn.execute(select(store.classes.c.id, store.classes.c.label,
                                               store.classes.c.label_kind, store.classes.c.n_samples,
                                               store.classes.c.proxy_lo, store.classes.c.proxy_hi,
                                               store.classes.c.sample_hi).order_by(store.classes.c.id)).all()
                    segs = conn.execute(select(store.segments.c.kind, store.segments.c.file)
                                        .order_by(store.segments.c.id)).all()
                kinds = ("template", "proxies", "samples") if samples else ("template", "proxies")
                opened = {name: stack.enter_context(self._open_file(name)) for kind, name in segs if kind in kinds}
            self._set_state(cfg, emb, rows, segs, opened)
            if samples and cfg["keep_samples"] and cfg["dimension"]:
                self._samples = self._merge_files("samples", self._segment_files["samples"], opened)

    def _set_state(self, cfg: dict, emb: Any, rows: list, segs: list, opened: dict[str, BinaryIO]) -> None:
        d = cfg["dimension"]
        self._config = cfg
        self._embedder_row = dict(emb) if emb is not None else None
        self._class_ids = np.array([r[0] for r in rows], np.int64)
        self._labels = np.empty(len(rows), object)
        self._labels[:] = [_label_value(r[2], r[1]) for r in rows]
        n_samples, lo, hi, s_hi = (np.array([r[i] for r in rows], np.int64) for i in range(3, 7))
        self._n_samples, self._proxy_lo, self._proxy_hi, self._sample_hi = n_samples, lo, hi, s_hi
        self._segment_files = {kind: [f for k_, f in segs if k_ == kind]
                               for kind in ("proxies", "samples", "template")}
        self._targets = (np.frombuffer(cfg["quantile_targets"], np.float32).copy()
                         if cfg["quantile_targets"] is not None else None)
        self._transform = (np.frombuffer(cfg["metric_transform"], np.float32).reshape(d, d).copy()
                           if cfg["metric_transform"] is not None else None)
        ready = d is not None and (cfg["metric"] != "mahalanobis" or self._transform is not None)
        ready = ready and (cfg["index_factory"] == "Flat" or bool(self._segment_files["template"]))
        template = self._segment_files["template"]
        self._template = (ProxyIndex(d, cfg["metric"], self._transform, index=self._read_file(
            template[0], opened[template[0]])) if template else None)
        self._proxies = self._merge_files("proxies", self._segment_files["proxies"], opened) if ready else None
        self._samples = None  # loaded on first need (re-imprinting a class, check)

    @contextmanager
    def _open_file(self, name: str) -> Iterator[BinaryIO]:
        try:
            file = open(self.path / name, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"collection {self.path}: index file {name} is missing") from None
        with file:
            yield file

    def _read_file(self, name: str, file: BinaryIO) -> faiss.Index:
        """The FAISS index in segment file ``name``, read from its open ``file``."""
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(file.read))
        except RuntimeError as exc:
            raise ValueError(f"collection {self.path}: index file {name} is unreadable or truncated "
                             f"({str(exc).strip().splitlines()[0]})") from None
        if index.d != self._config["dimension"]:
            raise ValueError(f"collection {self.path}: index file {name} holds {index.d}-d vectors, "
                             f"expected {self._config['dimension']}")
        return index

    def _new_index(self, kind: str) -> ProxyIndex:
        """An empty in-memory index for ``kind``: a copy of the trained template, or exact."""
        if kind == "proxies" and self._template is not None:
            return self._template.empty_like()
        if kind == "proxies":
            return ProxyIndex(self._config["dimension"], self._config["metric"], self._transform, with_ids=True)
        return ProxyIndex(self._config["dimension"], "euclidean", None, with_ids=True)

    def _merge_files(self, kind: str, files: list[str], opened: dict[str, BinaryIO] | None = None) -> ProxyIndex:
        """The live vectors (by the class ranges) of these ``kind`` segment files, in one index.
        Files not in ``opened`` are opened here: only the writer may, as no one else deletes them."""
        merged = self._new_index(kind)
        with ExitStack() as stack:
            for name in files:
                file = opened[name] if opened and name in opened else stack.enter_context(self._open_file(name))
                merged.merge(self._read_file(name, file))
        hi = self._proxy_hi if kind == "proxies" else self._sample_hi
        lo = self._proxy_lo if kind == "proxies" else np.zeros_like(hi)
        ids = merged.ids
        dead = ids[~_class_ranges(self._class_ids, lo, hi, ids)]
        if len(dead):
            merged.remove(dead)
        merged.set_search(self.search_params if kind == "proxies" else None)
        return merged

    def _samples_index(self) -> ProxyIndex:
        """The stored samples, loaded on first need (by the writer, which alone deletes files)."""
        if self._samples is None:
            self._samples = self._merge_files("samples", self._segment_files["samples"])
        return self._samples

    def refresh(self) -> bool:
        """Pick up another process's writes; True if the collection changed."""
        with self._engine.connect() as conn:
            version = conn.execute(select(store.collection.c.version)).scalar_one()
        if version == self._config["version"]:
            return False
        self._load()
        return True

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    @property
    def classes(self) -> list:
        """Labels, in the order their classes were added."""
        return self._labels.tolist()

    def __len__(self) -> int:
        return len(self._class_ids)

    @property
    def config(self) -> dict[str, Any]:
        keys = ("generator", "k", "pre_norm", "post_norm", "inf_norm", "aggregation", "m", "metric", "vote",
                "random_state", "index_factory", "memory_budget", "keep_samples", "dimension", "threshold")
        return {**{key: self._config[key] for key in keys}, "search_params": self.search_params}

    @property
    def search_params(self) -> dict[str, int]:
        """Stored search parameters of an approximate index (e.g. ``{"nprobe": 16}``)."""
        return json.loads(self._config["search_params"]) if self._config["search_params"] else {}

    @property
    def model(self) -> str | None:
        """The recorded embedder's name (None for a collection of vectors of unknown origin)."""
        return self._embedder_row["name"] if self._embedder_row else None

    def info(self) -> dict[str, Any]:
        """Config, sizes and files, as plain data."""
        files = [f for kind in self._segment_files.values() for f in kind]
        return {
            "path": str(self.path),
            "classes": len(self),
            "proxies": int((self._proxy_hi - self._proxy_lo).sum()),
            "samples": int(self._n_samples.sum()),
            "version": self._config["version"],
            "config": self.config,
            "trained_on": self._config["trained_on"],
            "embedder": dict(self._embedder_row) if self._embedder_row else None,
            "segments": files,
            "bytes_on_disk": sum((self.path / f).stat().st_size for f in files + [DB_NAME]),
        }

    def class_table(self) -> list[dict[str, Any]]:
        """One row per class, in insertion order: label, samples, proxies."""
        return [{"label": label, "samples": int(n), "proxies": int(p)}
                for label, n, p in zip(self._labels, self._n_samples, self._proxy_hi - self._proxy_lo)]

    def _check_model(self, model: str | None, action: str) -> None:
        if model is not None and self.model is not None and model != self.model:
            raise ValueError(f"{action} vectors embedded with {model!r}, but this collection uses {self.model!r}")

    def query(self, Q: Any, top: int = 1, *, threshold: float | None = None, model: str | None = None,
              search_params: dict[str, int] | None = None) -> QueryResult:
        """The ``top`` best classes for each query vector (rows of ``Q``), best first.

        ``threshold`` (default: the stored one, if any) turns classes scoring below it into "no
        class" (None). ``model``, if given, must be the collection's embedder. ``search_params``
        (e.g. ``{"nprobe": 64}``) override the stored ones for this call (approximate indexes).
        """
        if not len(self):
            raise ValueError(f"collection {self.path} has no classes yet")
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise ValueError(f"top={top!r} is not valid; expected an integer >= 1")
        self._check_model(model, "query")
        Q = normalize(_check_vectors(Q, "Q", self._config["dimension"]), self._config["inf_norm"], what="Q")
        cfg, ntotal = self._config, self._proxies.ntotal
        ivf = faiss.try_extract_index_ivf(self._proxies.index)
        if search_params and ivf is None:
            raise ValueError("search_params apply to approximate (IVF) indexes; this collection's index is exact")
        restore = {"nprobe": ivf.nprobe} if search_params else None
        self._proxies.set_search(search_params)
        try:
            owner, scores = self._rank(Q, top, ntotal)
        finally:
            self._proxies.set_search(restore)
        return self._answer(owner, scores, threshold)

    def _rank(self, Q: np.ndarray, top: int, ntotal: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self._config
        if cfg["aggregation"] == "max":
            depth = top if top == 1 else min(ntotal, top * (cfg["k"] if cfg["k"] > 0 else 4))
            while True:
                sim, _, ids = self._proxies.search(Q, depth)
                owner, scores = rank_classes(ids >> CLASS_SHIFT, sim.astype(np.float64), top)
                if depth >= ntotal or (owner >= 0).all():
                    break
                depth = min(ntotal, depth * 4)
        else:
            _, dist, ids = self._proxies.search(Q, min(cfg["m"], ntotal))
            owner, scores = rank_classes(ids >> CLASS_SHIFT, vote_weights(dist, cfg["vote"]), top, vote=True,
                                         ties="nearest")
        return owner, scores

    def _answer(self, owner: np.ndarray, scores: np.ndarray, threshold: float | None) -> QueryResult:
        cfg = self._config
        threshold = cfg["threshold"] if threshold is None else threshold
        if threshold is not None:
            owner = np.where(scores >= threshold, owner, -1)
        labels = np.full(owner.shape, None, object)
        found = owner >= 0
        labels[found] = self._labels[np.searchsorted(self._class_ids, owner[found])]
        return QueryResult(labels, np.where(found, scores, np.nan).astype(np.float32))

    def predict(self, Q: Any, *, threshold: float | None = None, model: str | None = None,
                search_params: dict[str, int] | None = None) -> np.ndarray:
        """The best class of each query (None where rejected by the threshold)."""
        return self.query(Q, 1, threshold=threshold, model=model, search_params=search_params).labels[:, 0]

    def _text_embedder(self) -> Embedder:
        if self._embedder_row is None:
            raise ValueError(f"collection {self.path} records no embedding model; add and query vectors instead")
        if self._embedder is None:
            self._embedder = Embedder(self._embedder_row["name"], cache=EmbeddingCache.default())
        return self._embedder

    def query_texts(self, texts: Sequence[str], top: int = 1, *, threshold: float | None = None) -> QueryResult:
        """``query`` on texts embedded with the collection's model."""
        return self.query(self._text_embedder().encode(texts), top, threshold=threshold, model=self.model)

    # ----------------------------------------------------------------- writing
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer lock, start from the latest committed state, and on any failure drop the
        in-memory changes by reloading what is on disk."""
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise CollectionLockedError(f"collection {self.path} is locked by pid {holder} "
                                            "(another process is writing to it)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self.refresh()
            self._delete_unlisted()
            try:
                yield
            except BaseException:
                self._load()
                raise
        finally:
            os.close(fd)  # releases the lock

    def _delete_unlisted(self) -> None:
        """Delete segment files the committed version does not name (superseded by a compaction, or
        left by a crashed writer) if no reader is opening segments now; else a later write will."""
        fd = os.open(self.path / READERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            keep = {f for files in self._segment_files.values() for f in files}
            for file in self.path.iterdir():
                if file.suffix in (".faiss", ".tmp") and file.name not in keep:
                    file.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _write_segment(self, kind: str, version: int, index: ProxyIndex) -> str:
        """Durably write ``index`` as a new segment file; returns its name."""
        name = f"{kind}-{version:08d}.faiss"
        tmp = self.path / f"{name}.tmp"
        faiss.write_index(index.index, str(tmp))
        _fsync(tmp)
        os.replace(tmp, self.path / name)
        _fsync(self.path)
        return name

    def _find_classes(self, conn, entries: list[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        """Existing class rows for ``(kind, text)`` label entries, keyed by entry."""
        c = store.classes.c
        found = {}
        for i in range(0, len(entries), _SQL_CHUNK):
            chunk = entries[i : i + _SQL_CHUNK]
            for row in conn.execute(select(c.id, c.label_kind, c.label, c.n_samples, c.proxy_hi, c.sample_hi)
                                    .where(tuple_(c.label_kind, c.label).in_(chunk))):
                found[(row.label_kind, row.label)] = row
        return found

    def add(self, X: Any, labels: Sequence[object], *, model: str | None = None,
            checkpoint: tuple[str, int] | None = None) -> "Collection":
        """Imprint samples ``X`` ``(n, d)`` with their ``labels``: new labels become new classes; an
        existing class is re-imprinted from its kept samples plus the new ones. Atomic.

        ``checkpoint=(source, rows_done)`` records, in the same transaction, how far a chunked
        ingestion of ``source`` has come (see ``rows_done``)."""
        X = _check_vectors(X, "X", self._config["dimension"])
        if len(labels) != len(X):
            raise ValueError(f"X has {len(X)} rows but labels has {len(labels)}")
        self._check_model(model, "add")
        codes, entries = _encode_labels(labels)
        with self._writing():
            self._add(X, codes, entries, checkpoint)
        return self

    def rows_done(self, source: str) -> int:
        """Rows of ``source`` already committed by chunked adds with ``checkpoint`` (0 if none)."""
        with self._engine.connect() as conn:
            done = conn.execute(select(store.ingest.c.rows_done).where(store.ingest.c.source == source)).scalar()
        return int(done or 0)

    def _add(self, X: np.ndarray, codes: np.ndarray, uniq: list[tuple[str, str]],
             checkpoint: tuple[str, int] | None) -> None:
        cfg = dict(self._config)
        X = normalize(X, cfg["pre_norm"], what="X")
        with self._engine.connect() as conn:
            existing = self._find_classes(conn, uniq)
        if existing and not cfg["keep_samples"]:
            label = next(iter(existing))[1]
            raise ValueError(f"class {label!r} already exists and this collection keeps no samples, so it cannot be "
                             "re-imprinted from old and new samples together; remove it and add all its samples, "
                             "or create the collection with keep_samples=True")
        d = X.shape[1]
        if cfg["dimension"] is None:
            emb_dim = self._embedder_row["dimension"] if self._embedder_row else None
            if emb_dim is not None and emb_dim != d:
                raise ValueError(f"X has dimension {d}, but the collection's model gives {emb_dim}-d vectors")
            cfg["dimension"] = d
            self._config["dimension"] = d

        # per class: old kept samples first, then the new ones (the order a one-go build sees)
        next_id = cfg["next_class_id"]
        class_id = np.empty(len(uniq), np.int64)
        old_samples, old_hi, old_proxy_hi = [], np.zeros(len(uniq), np.int64), np.zeros(len(uniq), np.int64)
        for i, entry in enumerate(uniq):
            row = existing.get(entry)
            if row is None:
                class_id[i], next_id = next_id, next_id + 1
                old_samples.append(np.zeros((0, d), np.float32))
            else:
                class_id[i], old_hi[i], old_proxy_hi[i] = row.id, row.sample_hi, row.proxy_hi
                ids = (row.id << CLASS_SHIFT) + np.arange(row.sample_hi, dtype=np.int64)
                old_samples.append(self._samples_index().reconstruct(ids))
        new_rows = np.argsort(codes, kind="stable")
        new_counts = np.bincount(codes, minlength=len(uniq))
        new_starts = np.concatenate([[0], np.cumsum(new_counts)])
        parts = []
        for i in range(len(uniq)):
            parts.append(old_samples[i])
            parts.append(X[new_rows[new_starts[i] : new_starts[i + 1]]])
        sizes = np.array([len(o) for o in old_samples]) + new_counts
        values = [_label_value(*e) for e in uniq]
        groups = Grouped(np.concatenate(parts), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                         label_keys(values))
        W, owner = generate(cfg["generator"], groups, cfg["k"], cfg["random_state"])

        if cfg["post_norm"] == "quantile" and self._targets is None:
            self._targets = quantile_targets(W)
        W = normalize(W, cfg["post_norm"], targets=self._targets, what="proxies")
        if cfg["metric"] == "mahalanobis" and self._transform is None:
            self._transform = mahalanobis_map(W)
        template = None
        if self._proxies is None:
            factory = cfg["index_factory"]
            if factory == "auto":
                factory = choose_index(len(W), d, cfg["memory_budget"])
            if factory != "Flat":
                self._template = ProxyIndex.trained(factory, W, cfg["metric"], self._transform, cfg["random_state"])
                nlist = faiss.extract_index_ivf(self._template.index).nlist
                cfg["search_params"] = cfg["search_params"] or json.dumps({"nprobe": default_nprobe(nlist)})
                self._config["search_params"] = cfg["search_params"]
                template = self._write_segment("template", cfg["version"] + 1, self._template)
                cfg["trained_on"] = self._config["trained_on"] = len(W)
            cfg["index_factory"] = self._config["index_factory"] = factory
            self._proxies = self._new_index("proxies")
            self._proxies.set_search(self.search_params)

        n_proxies = np.bincount(owner, minlength=len(uniq))
        if (n_proxies + old_proxy_hi).max() >= MAX_PER_CLASS or (sizes.max() >= MAX_PER_CLASS):
            raise ValueError(f"a class may hold at most {MAX_PER_CLASS - 1} proxies and samples")
        proxy_lo = old_proxy_hi
        proxy_hi = proxy_lo + n_proxies
        j = np.arange(len(W)) - np.concatenate([[0], np.cumsum(n_proxies)])[owner]
        proxy_ids = (class_id[owner] << CLASS_SHIFT) + proxy_lo[owner] + j
        version = cfg["version"] + 1

        segment = self._new_index("proxies")
        segment.add(W, proxy_ids)
        files = {"proxies": (self._write_segment("proxies", version, segment), proxy_ids, class_id[owner])}
        if cfg["keep_samples"]:
            s_owner = np.repeat(np.arange(len(uniq)), new_counts)
            s_ids = (class_id[s_owner] << CLASS_SHIFT) + old_hi[s_owner] + (
                np.arange(len(X)) - new_starts[s_owner])
            s_index = self._new_index("samples")
            s_index.add(X[new_rows], s_ids)
            files["samples"] = (self._write_segment("samples", version, s_index), s_ids, class_id[s_owner])

        regenerated = class_id[[i for i, e in enumerate(uniq) if e in existing]]
        c = store.classes.c
        with store.writing(self._engine) as conn:
            for i in range(0, len(regenerated), _SQL_CHUNK):
                chunk = regenerated[i : i + _SQL_CHUNK].tolist()
                conn.execute(delete(store.proxies).where(store.proxies.c.class_id.in_(chunk)))
            new = [dict(id=int(class_id[i]), label=e[1], label_kind=e[0], n_samples=int(sizes[i]),
                        proxy_lo=int(proxy_lo[i]), proxy_hi=int(proxy_hi[i]), sample_hi=int(sizes[i]))
                   for i, e in enumerate(uniq) if e not in existing]
            if new:
                conn.execute(insert(store.classes), new)
            for i, e in enumerate(uniq):
                if e in existing:
                    conn.execute(update(store.classes).where(c.id == int(class_id[i])).values(
                        n_samples=int(sizes[i]), proxy_lo=int(proxy_lo[i]), proxy_hi=int(proxy_hi[i]),
                        sample_hi=int(sizes[i])))
            for kind, (name, ids, owners) in files.items():
                self._insert_segment(conn, kind, name, ids, owners)
            if template is not None:
                conn.execute(insert(store.segments).values(kind="template", file=template, n_vectors=0))
            conn.execute(update(store.collection).values(
                version=version, next_class_id=next_id, dimension=d, index_factory=cfg["index_factory"],
                search_params=cfg["search_params"], trained_on=cfg["trained_on"],
                quantile_targets=None if self._targets is None else self._targets.tobytes(),
                metric_transform=None if self._transform is None else self._transform.tobytes()))
            conn.execute(update(store.embedder).values(dimension=d))
            if checkpoint is not None:
                source, done = checkpoint
                conn.execute(delete(store.ingest).where(store.ingest.c.source == source))
                conn.execute(insert(store.ingest).values(source=source, rows_done=int(done)))

        # the same change in memory, without rereading the segments
        if len(regenerated):
            self._proxies.remove(self._range_ids(
                regenerated, self._proxy_lo[np.searchsorted(self._class_ids, regenerated)],
                self._proxy_hi[np.searchsorted(self._class_ids, regenerated)]))
        self._proxies.add(W, proxy_ids)
        if self._samples is not None and "samples" in files:
            self._samples.add(X[new_rows], files["samples"][1])
        for kind, (name, _, _) in files.items():
            self._segment_files[kind].append(name)
        if template is not None:
            self._segment_files["template"] = [template]
        is_new = np.array([e not in existing for e in uniq], bool)
        pos = np.searchsorted(self._class_ids, class_id[~is_new])
        for array, value in ((self._n_samples, sizes), (self._proxy_lo, proxy_lo), (self._proxy_hi, proxy_hi),
                             (self._sample_hi, sizes)):
            array[pos] = value[~is_new]
        added = np.empty(int(is_new.sum()), object)
        added[:] = [v for v, n in zip(values, is_new) if n]
        self._labels = np.concatenate([self._labels, added])
        self._class_ids = np.concatenate([self._class_ids, class_id[is_new]])
        self._n_samples = np.concatenate([self._n_samples, sizes[is_new]])
        self._proxy_lo = np.concatenate([self._proxy_lo, proxy_lo[is_new]])
        self._proxy_hi = np.concatenate([self._proxy_hi, proxy_hi[is_new]])
        self._sample_hi = np.concatenate([self._sample_hi, sizes[is_new]])
        self._config.update(version=version, next_class_id=next_id, dimension=d,
                            quantile_targets=None if self._targets is None else self._targets.tobytes(),
                            metric_transform=None if self._transform is None else self._transform.tobytes())
        if len(self._segment_files["proxies"]) > COMPACT_SEGMENTS:
            self._compact(full=False)

    @staticmethod
    def _range_ids(class_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Every id ``class << 24 | j`` with ``lo <= j < hi``, class by class."""
        counts = hi - lo
        base = np.repeat((class_ids << CLASS_SHIFT) + lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return base + np.arange(int(counts.sum()), dtype=np.int64)

    def _insert_segment(self, conn, kind: str, name: str, ids: np.ndarray, owners: np.ndarray) -> None:
        seg_id = conn.execute(insert(store.segments).values(kind=kind, file=name, n_vectors=len(ids))
                              ).inserted_primary_key[0]
        table = store.proxies if kind == "proxies" else store.samples
        if len(ids):
            conn.execute(insert(table), [{"id": a, "class_id": b, "segment_id": seg_id}
                                         for a, b in zip(ids.tolist(), owners.tolist())])

    def add_texts(self, texts: Sequence[str], labels: Sequence[object]) -> "Collection":
        """``add`` on texts embedded with the collection's model."""
        texts = list(texts)
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        return self.add(self._text_embedder().encode(texts), labels, model=self.model)

    def remove(self, labels: Sequence[object]) -> "Collection":
        """Remove the classes with these labels (all must exist; otherwise nothing is removed)."""
        entries = list(dict.fromkeys(_label_entry(label, row) for row, label in enumerate(labels)))
        if not entries:
            raise ValueError("no labels given: nothing to remove")
        with self._writing():
            with self._engine.connect() as conn:
                found = self._find_classes(conn, entries)
            missing = [e[1] for e in entries if e not in found]
            if missing:
                raise ValueError(f"no class {missing[0]!r} in collection {self.path} "
                                 f"({len(missing)} unknown label(s)); nothing was removed")
            ids = np.array(sorted(found[e].id for e in entries), np.int64)
            with store.writing(self._engine) as conn:
                for i in range(0, len(ids), _SQL_CHUNK):
                    chunk = ids[i : i + _SQL_CHUNK].tolist()
                    for table in (store.proxies, store.samples):
                        conn.execute(delete(table).where(table.c.class_id.in_(chunk)))
                    conn.execute(delete(store.classes).where(store.classes.c.id.in_(chunk)))
                conn.execute(update(store.collection).values(version=self._config["version"] + 1))
            pos = np.searchsorted(self._class_ids, ids)
            self._proxies.remove(self._range_ids(ids, self._proxy_lo[pos], self._proxy_hi[pos]))
            if self._samples is not None:
                self._samples.remove(self._range_ids(ids, np.zeros_like(pos), self._sample_hi[pos]))
            keep = np.ones(len(self._class_ids), bool)
            keep[pos] = False
            for name in ("_class_ids", "_labels", "_n_samples", "_proxy_lo", "_proxy_hi", "_sample_hi"):
                setattr(self, name, getattr(self, name)[keep])
            self._config["version"] += 1
        return self

    def set_search_params(self, **params: int) -> "Collection":
        """Store the search parameters of an approximate index, e.g. ``set_search_params(nprobe=32)``."""
        if self._config["index_factory"] == "Flat":
            raise ValueError("search parameters apply to approximate (IVF) indexes; this collection's index is exact")
        with self._writing():
            merged = json.dumps({**self.search_params, **params})
            if self._proxies is not None:
                self._proxies.set_search(params)
            with store.writing(self._engine) as conn:
                conn.execute(update(store.collection).values(search_params=merged, version=self._config["version"] + 1))
            self._config.update(search_params=merged, version=self._config["version"] + 1)
        return self

    def set_threshold(self, threshold: float | None) -> "Collection":
        """Store the open-set rejection threshold used by ``query`` (None: never reject)."""
        if threshold is not None and not np.isfinite(threshold):
            raise ValueError(f"threshold={threshold!r} is not valid; expected a finite number or None")
        with self._writing():
            with store.writing(self._engine) as conn:
                conn.execute(update(store.collection).values(threshold=threshold,
                                                             version=self._config["version"] + 1))
            self._config.update(threshold=threshold, version=self._config["version"] + 1)
        return self

    def calibrate(self, X: Any, labels: Sequence[object], X_oos: Any = None, *,
                  target_accuracy: float | None = None) -> Calibration:
        """Choose and store the rejection threshold from validation queries ``X`` with their true
        ``labels`` and, optionally, out-of-scope queries ``X_oos`` (see ``evaluate.calibrate``)."""
        found = self.query(X, 1, threshold=-np.inf)
        truth = [_label_entry(label, row) for row, label in enumerate(labels)]
        if len(truth) != len(found):
            raise ValueError(f"X has {len(found)} rows but labels has {len(truth)}")
        correct = np.array([p is not None and _label_entry(p, 0) == t for p, t in zip(found.labels[:, 0], truth)])
        oos = self.query(X_oos, 1, threshold=-np.inf).scores[:, 0] if X_oos is not None else None
        result = calibrate(found.scores[:, 0], correct, oos, target_accuracy=target_accuracy)
        self.set_threshold(result.threshold if np.isfinite(result.threshold) else None)
        return result

    def compact(self, *, retrain: bool | None = None) -> "Collection":
        """Rewrite the live vectors into one segment per kind and delete the old files.

        An IVF proxy index (Flat or SQfp16 codes) is also retrained on a sample of the live proxies
        when they have grown to ``RETRAIN_GROWTH`` times those its lists were trained on (the
        first add's): classes added later crowd into the lists nearest them, so recall at a given
        nprobe falls and queries slow down. ``retrain=True`` retrains now, ``False`` never.
        """
        with self._writing():
            if retrain and self._template is None:
                raise ValueError(f"collection {self.path} has an exact index; only IVF indexes are retrained")
            if retrain and not self._template.retrainable():
                raise ValueError(f"collection {self.path}: index={self._config['index_factory']!r} cannot be "
                                 "retrained; only IVF-Flat and IVF-SQfp16 codes re-encode without loss")
            self._compact(retrain=self.outgrown if retrain is None else retrain)
        return self

    @property
    def outgrown(self) -> bool:
        """True when the IVF lists (Flat or SQfp16 codes) were trained on fewer than 1 /
        ``RETRAIN_GROWTH`` of the live proxies: ``compact()`` would retrain them."""
        trained_on = self._config["trained_on"]
        return (self._template is not None and self._template.retrainable() and trained_on is not None
                and self._proxies.ntotal >= RETRAIN_GROWTH * trained_on)

    def _compact(self, full: bool = True, retrain: bool = False) -> None:
        """Merge segment files into one per kind: all of them (``full``), or all but the largest,
        so that the automatic compaction after many small adds rewrites only the small ones.
        ``retrain`` (full only): re-encode the proxies under IVF lists trained on them."""
        version = self._config["version"] + 1
        kinds = ["proxies"] + (["samples"] if self._config["keep_samples"] else [])
        victims = {}
        for kind in kinds:
            files = sorted(self._segment_files[kind], key=lambda f: (self.path / f).stat().st_size)
            victims[kind] = files if full else files[:-1]
        merged = {kind: self._merge_files(kind, files) for kind, files in victims.items()
                  if (len(files) > 1 or full) and not (retrain and kind == "proxies")}
        template = None
        if retrain:  # from the live proxies in memory, which the merged files would only repeat
            self._template, merged["proxies"] = self._proxies.retrained(self._config["index_factory"],
                                                                        self._config["random_state"])
            merged["proxies"].set_search(self.search_params)
            template = self._write_segment("template", version, self._template)
        written = {kind: self._write_segment(kind, version, index) for kind, index in merged.items()}
        with store.writing(self._engine) as conn:
            for kind, name in written.items():
                seg_id = conn.execute(insert(store.segments).values(
                    kind=kind, file=name, n_vectors=merged[kind].ntotal)).inserted_primary_key[0]
                table = store.proxies if kind == "proxies" else store.samples
                old_ids = select(store.segments.c.id).where(store.segments.c.file.in_(victims[kind]))
                conn.execute(update(table).where(table.c.segment_id.in_(old_ids)).values(segment_id=seg_id))
                conn.execute(delete(store.segments).where(store.segments.c.file.in_(victims[kind])))
            if template is not None:
                conn.execute(delete(store.segments).where(store.segments.c.kind == "template"))
                conn.execute(insert(store.segments).values(kind="template", file=template, n_vectors=0))
                conn.execute(update(store.collection).values(trained_on=merged["proxies"].ntotal))
            conn.execute(update(store.collection).values(version=version))
        self._config["version"] = version
        for kind, name in written.items():
            self._segment_files[kind] = [f for f in self._segment_files[kind] if f not in victims[kind]] + [name]
        if template is not None:
            self._segment_files["template"] = [template]
            self._config["trained_on"] = merged["proxies"].ntotal
            self._proxies = merged["proxies"]
        self._delete_unlisted()

    # ----------------------------------------------------------------- integrity
    def check(self) -> CheckReport:
        """Verify, from disk, that the database and the index files agree: every named file exists
        and loads with the right dimension, and the live vector ids equal the database's id rows.
        Safe beside a writer: it compares one committed version (retrying if a commit lands between
        reading the database and loading the files)."""
        for _ in range(CHECK_ATTEMPTS):
            report = self._check_version()
            if report is not None:
                return report
        raise RuntimeError(f"collection {self.path}: a writer committed during each of {CHECK_ATTEMPTS} "
                           "attempts to check it; run check() when writes pause")

    def _check_version(self) -> CheckReport | None:
        """``check()`` on the current version; None if a writer committed while it read."""
        problems: list[str] = []
        with self._engine.connect() as conn, conn.begin():
            version = conn.execute(select(store.collection.c.version)).scalar_one()
            current, head, _ = store.schema_revision(conn)
            if current != head:
                problems.append(f"schema revision {current} is not the head {head}")
            db_ids = {kind: np.array(conn.execute(select(table.c.id, table.c.class_id)).all(), np.int64
                                     ).reshape(-1, 2)
                      for kind, table in (("proxies", store.proxies), ("samples", store.samples))}
            seg_names = conn.execute(select(store.segments.c.file)).scalars().all()
            orphan_rows = conn.execute(select(store.proxies.c.id).where(
                store.proxies.c.segment_id.not_in(select(store.segments.c.id)))).first()
        if orphan_rows is not None:
            problems.append("proxy rows name a segment that does not exist")
        try:
            fresh = Collection(self.path, self._engine, samples=True)
            if fresh._config["version"] != version:
                return None
            loaded = {"proxies": fresh._proxies.ids if fresh._proxies is not None else np.zeros(0, np.int64)}
            if fresh._samples is not None:
                loaded["samples"] = fresh._samples.ids
        except (FileNotFoundError, ValueError) as exc:
            return CheckReport(False, problems + [str(exc)])
        for kind, ids in loaded.items():
            rows = db_ids[kind]
            if len(ids) != len(np.unique(ids)):
                problems.append(f"{kind}: duplicate ids in the index files")
            if not np.array_equal(np.sort(ids), np.sort(rows[:, 0])):
                problems.append(f"{kind}: the index files hold {len(ids)} live vectors and the database "
                                f"{len(rows)} id rows, and their ids differ")
            if (rows[:, 0] >> CLASS_SHIFT != rows[:, 1]).any():
                problems.append(f"{kind}: an id row names another class than its id encodes")
        expected = int((fresh._proxy_hi - fresh._proxy_lo).sum())
        if expected != len(loaded["proxies"]):
            problems.append(f"proxies: the class ranges count {expected}, the index holds {len(loaded['proxies'])}")
        missing = [f for f in seg_names if not (self.path / f).is_file()]
        problems += [f"segment file {f} is missing" for f in missing]
        return CheckReport(not problems, problems)

"""Ingestion: labelled data files into a collection, chunk by chunk, resumable.

``ingest(path, sources)`` reads and checks every source before anything is written (vectors beyond
``HELD_BYTES`` wait in a memory-mapped temporary file, so 1M classes in 20 Parquet files do not
need their 12 GB of vectors in RAM), opens the collection at ``path`` (its stored settings must
match any given) or creates it when the first chunk is ready, embeds texts with the collection's
model, and adds the rows. Up to ``chunk_size`` rows go in one atomic write; larger inputs go chunk
by chunk, cut where the label changes when rows are grouped by label (a class is then imprinted
from all its samples at once). Each write also records, per source (identified by its content:
``fingerprint``), how many of its rows are done, so rerunning an interrupted ingestion, from Python
or ``imprint index``, continues after the last committed chunk, and a source ingested whole before
is skipped (``again=True`` adds it anyway) rather than doubling its classes' samples.
``upsert=True`` gives classes that existed before the call the new data's samples instead of adding
to theirs. A new IVF collection filled chunk by chunk has its lists trained first on a sample of
whole classes drawn across every source (``training_sample``), not on the first chunk's classes
alone; at the end, lists the collection has outgrown are retrained on everything.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import labels as lab
from .collection import Collection
from .embed import Embedder, embed_all
from .errors import DataError, SettingsClashError
from .interface import ImprintCollection
from .params import DEFAULT_CHUNK, check_int, collection_scope, resolve
from .progress import bar
from .readers import Dataset, read
from .sharded import ShardedCollection, open_any
from .shards import exists, is_sharded

HELD_BYTES = 1 << 30  # vectors held in memory from the check to the write; beyond, in a temporary file


@dataclass(frozen=True)
class IngestReport:
    collection: str
    rows: int  # rows added by this call
    resumed_after: int  # rows an earlier, interrupted ingestion of the same sources had committed
    new_classes: int
    classes: int
    proxies: int
    retrained: bool  # IVF lists retrained on all proxies at the end
    auto_choice: dict[str, Any] | None = None  # the concrete setting (and CV table) fixed at the first add
    skipped: tuple[str, ...] = ()  # sources ingested whole before, not added again
    created: bool = False  # this call created the collection (and auto made its choice)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(ds: Dataset) -> str:
    """What identifies a source across runs: a hash of its rows (labels and texts or vectors), so
    the same data is recognised under another name or format, and a changed file starts over."""
    digest = hashlib.sha256(repr([lab.entry(v) for v in ds.need("labels")]).encode())
    if ds.vectors is None:
        digest.update("\0".join(ds.need("texts")).encode())
    else:
        digest.update(np.ascontiguousarray(ds.vectors, "<f4").tobytes())  # as bytes: little-endian float32
    return f"rows:{len(ds)}:{digest.hexdigest()[:32]}"


def chunks(labels: Sequence[Any], start: int, size: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``size`` from ``start``, cut where the label changes when possible, so
    that grouped data never splits a class."""
    lo, n = start, len(labels)
    while lo < n:
        hi = min(lo + size, n)
        if hi < n:
            cut = hi
            while cut > lo + 1 and labels[cut - 1] == labels[cut]:
                cut -= 1
            hi = cut if cut > lo + 1 else hi
        yield lo, hi
        lo = hi


class _Target:
    """The collection being ingested into: opened, or created when the first chunk (or the training sample) is ready."""

    def __init__(
        self,
        path: Path,
        preset: str | None,
        settings: dict[str, Any],
        lock_timeout: float,
        shards: int,
        auto_choice: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.preset, self.settings, self.lock_timeout = path, preset, settings, lock_timeout
        self.shards, self.auto_choice = shards, auto_choice
        self.col = open_any(path, lock_timeout=lock_timeout) if exists(path) else None
        self.created = False
        if self.col is not None:
            self.col.check_settings(preset=preset, **settings, **({"shards": shards} if is_sharded(path) else {}))
            if shards > 1 and not is_sharded(path):
                raise SettingsClashError(f"{path} already exists with other settings: shards={shards} (collection: 1)")

    def __len__(self) -> int:
        return len(self.col) if self.col is not None else 0

    def rows_done(self, source: str) -> int:
        return self.col.rows_done(source) if self.col is not None else 0

    def _create(self) -> ImprintCollection:
        """The collection, created with the ingestion's settings where there is none yet."""
        if self.col is None:
            make = (
                functools.partial(ShardedCollection.create, shards=self.shards)
                if self.shards > 1
                else Collection.create
            )
            self.col = make(
                self.path,
                preset=self.preset,
                lock_timeout=self.lock_timeout,
                auto_choice=self.auto_choice,
                **self.settings,
            )
            self.created = True
        return self.col

    def train(self, X: Any, parts: list[Dataset], n_classes: int) -> None:
        """Create the collection and train its IVF lists on rows ``X`` of ``parts`` (``Collection.train``)."""
        col = self._create()
        assert isinstance(col, Collection)  # sharded collections train at each shard's first add
        col.train(X, [v for p in parts for v in p.need("labels")], classes=n_classes)

    def add(self, X: Any, parts: list[Dataset], checkpoints: list[tuple[str, int]], replace: set) -> None:
        """Add rows ``X`` of ``parts`` (their labels, texts and refs) in one write."""
        col = self._create()
        texts: list[str | None] | None = None
        if any(p.texts for p in parts):
            texts = [t for p in parts for t in (p.texts or [None] * len(p))]  # type: ignore[list-item]  # list invariance
        refs = [r for p in parts for r in (p.refs or [None] * len(p))] if any(p.refs for p in parts) else None
        col.add(
            X,
            [v for p in parts for v in p.need("labels")],
            checkpoints=checkpoints,
            replace=replace,
            texts=texts,
            refs=refs,
        )

    def discard_if_unwritten(self) -> None:
        """Remove a collection this ingestion created and never wrote to: no stub is left with
        settings that failed."""
        if self.created and self.col is not None and not len(self.col):  # (trained at most)
            self.col.close()
            shutil.rmtree(self.path, ignore_errors=True)


def ingest(
    path: str | os.PathLike,
    sources: Sequence[str | os.PathLike | Dataset],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
    embedder: Embedder | None = None,
    again: bool = False,
    upsert: bool = False,
    vectors_model: str | None = None,
    preset: str | None = None,
    lock_timeout: float = 0.0,
    shards: int = 1,
    **settings: Any,
) -> IngestReport:
    """Add the labelled rows of ``sources`` (data files, or ``readers.Dataset``) to the collection
    at ``path``, creating it with ``preset`` and ``settings`` if there is none (or with those an
    ``imprint export`` file carries); see the module docstring. ``embedder``: the model's embedder
    to use (default: the collection's, cached); ``vectors_model``: the model that made vectors
    that do not say so themselves (vectors of another model than the collection's are refused);
    ``lock_timeout``: seconds each write waits for another process writing to the collection;
    ``shards`` > 1 makes a new collection a ``ShardedCollection`` of that many shards."""
    chunk_size = check_int("chunk_size", chunk_size, 1)
    shards = check_int("shards", shards, 1)
    datasets = _read_all(sources, Path(path).resolve().parent)
    if not datasets:
        raise DataError("no data sources given: nothing to index")
    for ds in datasets:
        if ds.labels is None:
            raise DataError(f"{ds.source}: no labels to index")
    exported = [ds for ds in datasets if ds.settings]
    remade = not exists(Path(path)) and exported and not settings and preset is None
    if remade:  # an exported collection made again as it was: its settings, then its state
        settings = dict(exported[0].settings or {})
    state = exported[0].state if remade else None
    target = _Target(
        Path(path), preset, settings, lock_timeout, shards, state.get("auto_choice") if state is not None else None
    )
    resolved = None  # a new collection's settings
    if target.col is not None:
        model = target.col.model
    else:
        resolved = resolve(settings, collection_scope(), preset)
        model = resolved["model"]
    if any(ds.vectors is None for ds in datasets) and model is None:
        raise DataError(f"{path} holds precomputed vectors (no model recorded); index vectors, not texts")
    for ds in datasets:
        check_vectors_model(ds, model, vectors_model)
    if embedder is not None and model is not None and embedder.name != model:
        raise DataError(f"the embedder is {embedder.name!r}, but the collection uses {model!r}")
    if embedder is None and model is not None:  # an existing collection's is checked to be its model
        embedder = target.col.embedder() if target.col is not None else Embedder(model)
    if embedder is not None:
        embedder.progress = progress
        embedder.locate()
    before = {lab.entry(label) for label in target.col.classes} if target.col is not None else set()
    plan = [(ds, fingerprint(ds)) for ds in datasets]
    starts = [0 if again else target.rows_done(source) for _, source in plan]
    skipped = tuple(ds.source for (ds, _), start in zip(plan, starts) if start >= len(ds))
    todo = [(ds, source, start) for (ds, source), start in zip(plan, starts) if start < len(ds)]
    upserting = _Upsert(before if upsert else set(), todo)
    resumed = sum(start for _, _, start in todo)
    total = sum(len(ds) - start for ds, _, start in todo)
    try:
        if todo and total <= chunk_size:  # one atomic write
            parts = [ds.part(start, len(ds)) for ds, _, start in todo]
            target.add(
                embed_all(parts, embedder),
                parts,
                [(source, len(ds)) for ds, source, _ in todo],
                upserting.take([v for part in parts for v in part.need("labels")]),
            )
        elif todo:
            if resolved is not None and shards == 1 and resolved["index"] != "Flat":  # lists to train: on all the data
                sample, n_classes = training_sample(todo, chunk_size, resolved["random_state"])
                target.train(embed_all(sample, embedder), sample, n_classes)
            _add_chunks(target, todo, embedder, chunk_size, progress, upserting)
    except BaseException:
        target.discard_if_unwritten()
        raise
    col = target.col
    assert col is not None  # made by the first add, or opened
    if (
        state is not None
        and target.created
        and (state.get("threshold") is not None or state["classes"] or state.get("ridge"))
    ):
        col.restore(
            state.get("threshold"),
            {label: v for ds in exported if ds.state for label, v in ds.state["classes"].items()},
            state.get("ridge"),
        )
    retrained = col.outgrown
    if retrained:
        col.compact()
    seen = {lab.entry(label) for ds, _, _ in todo for label in ds.need("labels")}
    info = col.info()
    col.close()  # the caller gets a report, not the collection: its connections close now
    return IngestReport(
        str(path),
        total,
        resumed,
        len(seen - before),
        info["classes"],
        info["proxies"],
        retrained,
        col.auto_choice,
        skipped,
        target.created,
    )


def training_sample(todo: list, chunk_size: int, seed: int) -> tuple[list[Dataset], int]:
    """Rows of whole classes drawn across every source, to train a new collection's IVF lists on
    before the first chunk is added (else that chunk's classes alone train them, and classes of
    later chunks fit them poorly): classes in a seeded order of their labels (the same in any row
    order) while their rows total at most ``chunk_size``, at least one class; and how many classes
    there are in all."""
    entries = [[lab.entry(label) for label in ds.labels[start:]] for ds, _, start in todo]  # once a row
    rows = Counter(entry for part in entries for entry in part)
    drawn = [entry for _, entry in sorted(zip(np.random.default_rng(seed).permutation(len(rows)), sorted(rows)))]
    chosen = set(drawn[: max(1, int(np.sum(np.cumsum([rows[e] for e in drawn]) <= chunk_size)))])
    sample = [
        ds.take(start + np.flatnonzero([entry in chosen for entry in part]))
        for (ds, _, start), part in zip(todo, entries)
    ]
    return [part for part in sample if len(part)], len(rows)


def _read_all(sources: Sequence[str | os.PathLike | Dataset], beside: Path) -> list[Dataset]:
    """Every source read and checked; once the vectors read pass ``HELD_BYTES`` in all, each
    further file's vectors move to a temporary file beside the collection, memory-mapped and
    unlinked at once (nothing is left behind; the OS pages them in as their chunks are added)."""
    out, held = [], 0
    for source in sources:
        ds = source if isinstance(source, Dataset) else read(Path(source))
        if ds.vectors is not None and not isinstance(source, Dataset) and not isinstance(ds.vectors, np.memmap):
            held += ds.vectors.nbytes
            if held > HELD_BYTES:
                ds = replace(ds, vectors=_spill(ds.vectors, beside))
        out.append(ds)
    return out


def _spill(X: np.ndarray, beside: Path) -> np.ndarray:
    """``X`` in an unlinked, memory-mapped temporary file in ``beside`` (else the temp folder)."""
    fd, name = tempfile.mkstemp(prefix=".imprint-spill-", suffix=".npy", dir=beside if beside.is_dir() else None)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(name, mode="w+", dtype=X.dtype, shape=X.shape)
        out[:] = X
    finally:
        os.unlink(name)
    return out


def check_vectors_model(ds: Dataset, model: str | None, vectors_model: str | None) -> None:
    """Vectors for a collection of ``model``'s embeddings must be that model's: as the file says
    (``ds.model``), or as the caller says (``vectors_model``); unknown vectors are refused, since
    another model's vectors answer nonsense without any error."""
    if ds.vectors is None or model is None:
        return
    made_by = ds.model or vectors_model
    if made_by is None:
        raise DataError(
            f"{ds.source}: vectors of unknown origin for a collection of {model!r} embeddings; if "
            f"{model!r} made them, say so (--vectors-model {model}, or vectors_model=)"
        )
    if made_by != model:
        raise DataError(f"{ds.source}: vectors made by {made_by!r}, but the collection holds {model!r} embeddings")


class _Upsert:
    """Which classes an upsert replaces: those that existed before the ingestion, each once (the
    first write that has its rows replaces it; later chunks add to it). Rows of an interrupted run
    already committed count as that first write."""

    def __init__(self, existing: set, todo: list) -> None:
        self.left = set(existing)
        for ds, _, start in todo:
            self.left -= {lab.entry(v) for v in ds.labels[:start]}

    def take(self, labels: Sequence[Any]) -> set:
        hit = {lab.entry(v) for v in labels} & self.left
        self.left -= hit
        return hit


def _add_chunks(
    target: _Target, todo: list, embedder: Embedder | None, chunk_size: int, progress: bool, upserting: _Upsert
) -> None:
    """Add every source chunk by chunk from its first row not yet done, each chunk recording its
    progress."""
    first, started = len(target), time.perf_counter()
    with bar(
        total=sum(len(ds) - start for ds, _, start in todo), unit="row", desc="indexing", enabled=progress
    ) as shown:
        for ds, source, start in todo:
            for lo, hi in chunks(ds.labels, start, chunk_size):
                part = ds.part(lo, hi)
                target.add(embed_all([part], embedder), [part], [(source, hi)], upserting.take(part.labels))
                shown.update(hi - lo)
                rate = (len(target) - first) / max(time.perf_counter() - started, 1e-9)
                shown.set_postfix(classes=len(target), classes_per_s=f"{rate:.0f}")

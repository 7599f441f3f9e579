"""Sharded collections: S ordinary collections that build, grow and answer as one.

A sharded collection is a directory (docs/collections.md, "Shards")::

    shards.json     the manifest: shard count, how labels are assigned, what auto chose
    shard-0000/     one ordinary collection per shard (collection.py), same settings
    shard-0001/ ...

A class lives whole in shard ``label_key(label) % S`` (``labels.label_key``: a 64-bit BLAKE2b
key of the label, the same in every process and on every machine, never Python's salted
``hash``). So a class's score (max, blend) is exact in its shard, and the best classes of the
whole are the best of each shard's best; an ``mnn`` vote takes the m nearest proxies over all
shards before it counts. Global class numbers are ``local * S + shard``: unique, and in each
shard's insertion order, so equal scores break the same way within a shard and in the merge.
Auto chooses once, on the first add's rows, for every shard (the manifest keeps the choice).

A write goes to each owning shard's writer and is atomic in that shard; one that spans shards
commits shard by shard, in shard order. Ingestions record their progress in every shard, so an
interrupted ``imprint index`` resumes exactly: a shard skips the chunks it has committed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import labels as lab
from . import params as spec
from . import ranking, segments, shardhead, writes
from .auto import stored_choice
from .calibration import Calibrated
from .collection import Collection
from .embed import Embedder
from .errors import CollectionDamagedError, CollectionNotFoundError, CollectionStateError, DataError, SettingsClashError
from .integrity import CheckReport
from .interface import ImprintCollection, Shared, check_tunable, labelled_rows, query_rows, staging, writing_all
from .merge import combined_info, merge, part
from .ranking import QueryResult
from .shards import directories, is_sharded, new_manifest, pooled, read_manifest, shard_name, shard_of, write_manifest


def kind_of(path: str | os.PathLike) -> type[Collection] | type[ShardedCollection]:
    """``ShardedCollection`` where ``path`` holds a manifest, else ``Collection``: the class whose
    ``open``, ``verify`` and ``upgrade`` apply."""
    return ShardedCollection if is_sharded(path) else Collection


def open_any(path: str | os.PathLike, **options: Any) -> ImprintCollection:
    """``open`` of the collection at ``path``, sharded or not (``retrieval_imprint.open``)."""
    return kind_of(path).open(path, **options)


class ShardedCollection(Calibrated, Shared):
    """``Collection``'s API over S shard collections; see the module docstring."""

    def __init__(self, path: Path, shards: list[Collection], manifest: dict[str, Any], lock_timeout: float) -> None:
        self.path = path
        self.shards = shards
        self.lock_timeout = lock_timeout
        self._manifest = manifest
        self._whole = shardhead.WholeHead()  # a streaming ls collection's head of every shard

    # ----------------------------------------------------------------- create, open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        shards: int,
        preset: str | None = None,
        lock_timeout: float = 0.0,
        auto_choice: dict[str, Any] | None = None,
        **settings: Any,
    ) -> ShardedCollection:
        """Create an empty collection of ``shards`` shards at ``path`` (a new or empty directory);
        ``settings``, ``preset`` and ``auto_choice`` as ``Collection.create``, the same for every shard."""
        n = spec.check_int("shards", shards, 1)
        path = Path(path)
        with staging(path) as staged:
            for i in range(n):
                Collection.create(staged / shard_name(i), preset=preset, auto_choice=auto_choice, **settings).close()
            choice = None if auto_choice is None else json.dumps(auto_choice)
            write_manifest(staged, new_manifest(n, choice))
        return cls.open(path, lock_timeout=lock_timeout)

    @classmethod
    def open(cls, path: str | os.PathLike, *, upgrade: bool = False, lock_timeout: float = 0.0) -> ShardedCollection:
        """Open a sharded collection (every shard; ``upgrade`` migrates each one's schema)."""
        path = Path(path)
        if not path.exists():
            raise CollectionNotFoundError(f"no collection at {path}")
        manifest = read_manifest(path)
        shards = [Collection.open(d, upgrade=upgrade, lock_timeout=lock_timeout) for d in directories(path)]
        return cls(path, shards, manifest, lock_timeout)

    @classmethod
    def upgrade(cls, path: str | os.PathLike) -> tuple[str | None, str]:
        """``Collection.upgrade`` of every shard; returns the first shard's ``(before, after)``."""
        return next(Collection.upgrade(d) for d in directories(path))

    @classmethod
    def verify(cls, path: str | os.PathLike) -> CheckReport:
        """``check`` a sharded collection that may be too damaged to open: damage is reported."""
        try:
            manifest = read_manifest(Path(path))
        except CollectionDamagedError as exc:
            return CheckReport(False, [str(exc)])
        reports = [
            Collection.verify(Path(path) / shard_name(i))
            if (Path(path) / shard_name(i)).is_dir()
            else CheckReport(False, ["the shard's directory is missing"])
            for i in range(manifest["shards"])
        ]
        if not all(r.ok for r in reports):
            return CheckReport(False, [f"{shard_name(i)}: {p}" for i, r in enumerate(reports) for p in r.problems])
        with cls.open(path) as col:
            return col.check()

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        *,
        shards: int,
        preset: str | None = None,
        lock_timeout: float = 0.0,
        **settings: Any,
    ) -> ShardedCollection:
        """Open the sharded collection at ``path`` (its shard count and settings must be these) or
        create it."""
        if not Path(path).exists() or not any(Path(path).iterdir()):
            return cls.create(path, shards=shards, preset=preset, lock_timeout=lock_timeout, **settings)
        col = cls.open(path, lock_timeout=lock_timeout)
        col.check_settings(shards=shards, preset=preset, **settings)
        return col

    def check_settings(self, *, shards: int | None = None, preset: str | None = None, **settings: Any) -> None:
        """Raise ``SettingsClashError`` if the shard count or any setting given differs from the stored."""
        if shards is not None and shards != self.n_shards:
            raise SettingsClashError(
                f"{self.path} already exists with other settings: shards={shards} (collection: {self.n_shards})"
            )
        self.shards[0].check_settings(preset=preset, **settings)

    def refresh(self) -> bool:
        """Pick up other processes' writes; True if any shard changed."""
        changed = [col.refresh() for col in self.shards]
        self._manifest = read_manifest(self.path)
        return any(changed)

    def close(self) -> None:
        for col in self.shards:
            col.close()

    # ----------------------------------------------------------------- reading
    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (``shards.json``) as last read: shard count, label hash, what auto chose."""
        return self._manifest

    @property
    def members(self) -> list[Collection]:
        """The plain collections holding the classes: the shards."""
        return self.shards

    def member_of(self, labels: Sequence[object]) -> np.ndarray:
        """The shard of each label."""
        return shard_of(labels, self.n_shards)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def classes(self) -> list:
        """Labels, shard by shard, each shard's in the order its classes were added."""
        return [label for col in self.shards for label in col.classes]

    def __len__(self) -> int:
        return sum(len(col) for col in self.shards)

    @property
    def config(self) -> dict[str, Any]:
        """The settings every shard shares (search parameters may differ: see ``info()["shards"]``); a
        streaming ls collection's ``ridge`` is the whole's (shardhead.py), not a shard's."""
        ridge = self._manifest.get("ridge")
        return self.shards[0].config | ({} if ridge is None else {"ridge": ridge["lam"], "ridge_rows": ridge["rows"]})

    @property
    def model(self) -> str | None:
        return self.shards[0].model

    @property
    def dimension(self) -> int | None:
        return next((col.dimension for col in self.shards if col.dimension is not None), None)

    @property
    def auto_choice(self) -> dict[str, Any] | None:
        """What auto chose at the first add, for every shard (None before it)."""
        chosen = self._manifest["auto_choice"]
        return json.loads(chosen) if chosen else None

    @property
    def outgrown(self) -> bool:
        """True when some shard's IVF lists would be retrained by ``compact()``."""
        return any(col.outgrown for col in self.shards)

    def info(self) -> dict[str, Any]:
        """The whole collection's sizes and settings (``config``), and each shard's own ``info()``."""
        parts = [col.info() for col in self.shards]
        return {**combined_info(self.path, parts, self.auto_choice), "config": self.config}

    def class_table(self) -> list[dict[str, Any]]:
        """One row per class (label, samples, proxies, shard), shard by shard."""
        return [{**row, "shard": i} for i, col in enumerate(self.shards) for row in col.class_table()]

    def examples(self, label: object) -> list[dict[str, Any]]:
        """The kept samples of class ``label`` (``Collection.examples``), from its shard."""
        return self.shards[int(shard_of([label], self.n_shards)[0])].examples(label)

    def explain(self, Q: Any, n: int = 3, *, threshold: float | None = None) -> list[list[dict[str, Any]]]:
        """``Collection.explain``: each query's answer is its shard's best class too, so the shard
        that owns the answer explains it."""
        answer = self.predict(Q, threshold=threshold)
        out: list[list[dict[str, Any]]] = [[] for _ in answer]
        found = np.flatnonzero(answer != None)  # noqa: E711 (elementwise)
        owner = shard_of(answer[found].tolist(), self.n_shards)
        Q = np.asarray(Q)
        for i in np.unique(owner):
            rows = found[owner == i]
            for r, rows_out in zip(rows, self.shards[i].explain(Q[rows], n, threshold=threshold, answers=answer[rows])):
                out[r] = rows_out
        return out

    def embedder(self, *, progress: bool = False) -> Embedder:
        """The embedding model every shard was made with (``Collection.embedder``)."""
        return self.shards[0].embedder(progress=progress)

    def query(
        self,
        Q: Any,
        top: int = 1,
        *,
        threshold: float | None = None,
        model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> QueryResult:
        """``Collection.query`` over every shard: the same answer one collection of all the classes
        gives (equal scores in any order of equal classes)."""
        live = [(i, col) for i, col in enumerate(self.shards) if len(col)]
        if not live:
            raise CollectionStateError(f"collection {self.path} has no classes yet")
        first = live[0][1]
        Q, top = query_rows(Q, top, model, first.model, first.dimension, first.config["inf_norm"])
        mapped = self._manifest.get("ridge") is not None  # a streaming ls head: z(q) of the whole (shardhead.py)
        if mapped:
            snaps = [col.snapshot for col in self.shards]
            n_classes = sum(col.snapshot.searched.ntotal for _, col in live)  # shards with no class have no index
            Q = self._whole.of(snaps, self._manifest["ridge"]).queries(Q, n_classes)
        parts = []
        for i, col in live:  # one version for the shard's whole part
            parts.append(
                col.current(
                    lambda s: part(
                        s, ranking.search_params(s, search_params), i, self.n_shards, Q, top, threshold, mapped
                    )
                )
            )
        return merge(parts, top, first.params)

    def check(self) -> CheckReport:
        """``Collection.check`` of every shard, and that each class lives in the shard its label
        hashes to (a shard copied into another's place, or a changed hash, would hide classes)."""
        problems = []
        for i, col in enumerate(self.shards):
            report = col.check()
            problems += [f"{shard_name(i)}: {p}" for p in report.problems]
            if report.ok and len(col):
                wrong = np.flatnonzero(shard_of(col.classes, self.n_shards) != i)
                if len(wrong):
                    problems.append(
                        f"{shard_name(i)}: class {col.classes[wrong[0]]!r} belongs in shard "
                        f"{int(shard_of([col.classes[wrong[0]]], self.n_shards)[0])} "
                        f"({len(wrong)} misplaced classes)"
                    )
        return CheckReport(not problems, problems)

    # ----------------------------------------------------------------- writing
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
    ) -> ShardedCollection:
        """``Collection.add``: each class's rows go to its shard (atomic per shard). Everything
        that can be checked before a write is checked for all the rows first, so bad input changes
        no shard."""
        first = self.shards[0]
        dimension = next((col.snapshot.dimension for col in self.shards if col.snapshot.dimension), None)
        X, codes, entries = labelled_rows(X, labels, dimension, first.model, model, "add")
        kinds = set().union(*(col.snapshot.label_kinds for col in self.shards))
        lab.check_kind(entries, next(iter(kinds), None) if len(kinds) == 1 else None)
        owner = shard_of([lab.value(*e) for e in entries], self.n_shards)
        rows = owner[codes]
        if not first.config["keep_samples"] and replace is not True:
            for i, col in enumerate(self.shards):
                found = col.existing([e for e, j in zip(entries, owner) if j == i and e not in (replace or ())])
                if found:
                    raise DataError(
                        f"class {next(iter(found))[1]!r} already exists and this collection keeps no "
                        "samples, so it cannot be re-imprinted from old and new samples together; remove "
                        "it and add all its samples, or create the collection with keep_samples=True"
                    )
        choice = self.auto_choice_for(X, codes, entries)
        for i, col in enumerate(self.shards):
            if checkpoints and all(col.rows_done(source) >= done for source, done in checkpoints):
                continue  # committed by an interrupted run
            mine = np.flatnonzero(rows == i)
            if not len(mine):
                if checkpoints:
                    col.record_progress(checkpoints)
                continue
            col.add(
                X[mine],
                [labels[int(r)] for r in mine],
                model=model,
                replace=replace if isinstance(replace, bool) else set(replace),
                checkpoints=checkpoints,
                texts=None if texts is None else [texts[int(r)] for r in mine],
                refs=None if refs is None else [refs[int(r)] for r in mine],
                auto_choice=choice,
            )
        self.rechoose_ridge()
        return self

    @property
    def chosen(self) -> bool:
        """Whether the first add has chosen what it chooses for every shard (``auto_choice_for``)."""
        ls = self.shards[0].snapshot.config["generator"] == "ls"
        return self._manifest["auto_choice"] is not None and not (ls and self._manifest.get("ridge") is None)

    def auto_choice_for(self, X: np.ndarray, codes: np.ndarray, entries: list) -> str:
        """What auto chose for every shard (and a streaming ls collection's ridge of the whole,
        shardhead.py); at the first add, chosen on its rows and recorded."""
        if not self.chosen:
            with segments.writer_lock(self.path, self.lock_timeout):
                self._manifest = read_manifest(self.path)
                cfg, made = self.shards[0].snapshot.config, dict[str, Any]()
                keys = lab.entry_keys(entries)
                if self._manifest["auto_choice"] is None:
                    made["auto_choice"] = stored_choice(cfg, X, codes, keys)
                if cfg["generator"] == "ls" and self._manifest.get("ridge") is None:
                    made["ridge"] = shardhead.first(cfg, X, codes, keys)
                if made:
                    self._manifest = {**self._manifest, **made}
                    write_manifest(self.path, self._manifest)
        return self._manifest["auto_choice"]

    def rechoose_ridge(self, force: bool = False) -> None:
        """A streaming ls collection whose samples doubled or halved since the whole's ridge was chosen
        (or ``force``: ``tune``) has it chosen again on every shard's kept samples (shardhead.py)."""
        ridge, snaps = self._manifest.get("ridge"), [col.snapshot for col in self.shards]
        if ridge is not None and (force or shardhead.outgrown(snaps, ridge)):
            with segments.writer_lock(self.path, self.lock_timeout):
                ridge = shardhead.rechosen(snaps, [col.path for col in self.shards], ridge)
                self._manifest = {**read_manifest(self.path), "ridge": ridge}
                write_manifest(self.path, self._manifest)

    def rows_done(self, source: str) -> int:
        """Rows of ``source`` every shard has committed (an ingestion resumes from here)."""
        return min(col.rows_done(source) for col in self.shards)

    def remove(self, labels: Sequence[object]) -> ShardedCollection:
        """Remove the classes with these labels (all must exist; otherwise nothing is removed)."""
        values = lab.as_sequence(labels)
        if not values:
            raise DataError("no labels given: nothing to remove")
        entries = [lab.stored_entry(v, f"row {r}") for r, v in enumerate(values)]
        owner = shard_of([lab.value(*e) for e in entries], self.n_shards)
        for i, col in enumerate(self.shards):
            mine = [e for e, j in zip(entries, owner) if j == i]
            missing = set(mine) - col.existing(mine)
            if missing:
                raise DataError(f"no class {lab.value(*next(iter(missing)))!r} in collection {self.path}")
        for i in np.unique(owner):
            self.shards[i].remove([v for v, j in zip(values, owner) if j == i])
        self.rechoose_ridge()
        return self

    def set_threshold(self, threshold: float | None, *, label: object = None) -> ShardedCollection:
        """``Collection.set_threshold``: the collection's threshold in every shard, a class's in its own."""
        if label is not None:
            self.shards[int(shard_of([label], self.n_shards)[0])].set_threshold(threshold, label=label)
            return self
        for col in self.shards:
            col.set_threshold(threshold)
        return self

    def restore(
        self, threshold: float | None, classes: dict[Any, tuple], ridge: tuple | None = None
    ) -> ShardedCollection:
        """``Collection.restore``: the threshold in every shard, each class's values in its own, the
        ridge the whole's (each shard keeps its own, for itself: shardhead.py)."""
        owner = shard_of(list(classes), self.n_shards) if classes else np.zeros(0, np.int64)
        for i, col in enumerate(self.shards):
            col.restore(threshold, {label: v for (label, v), j in zip(classes.items(), owner) if j == i})
        if ridge is not None and self._manifest.get("ridge") is not None:
            with segments.writer_lock(self.path, self.lock_timeout):
                self._manifest = {**read_manifest(self.path), "ridge": shardhead.entry(*ridge)}
                write_manifest(self.path, self._manifest)
        return self

    def set_search_params(self, **params: int) -> ShardedCollection:
        """``Collection.set_search_params`` in every shard."""
        for col in self.shards:
            col.set_search_params(**params)
        return self

    def compact(self, *, retrain: bool | None = None) -> ShardedCollection:
        """``Collection.compact`` of every shard (``retrain=None``: each shard that has outgrown its lists)."""
        for col in self.shards:
            col.compact(retrain=retrain)
        return self

    def tune(self) -> dict[str, Any]:
        """``Collection.tune`` of the whole: one choice, cross-validated on every shard's kept
        samples together (as auto chose at the first add), then each shard re-imprinted with it,
        shard by shard, every shard's writer lock held; the manifest records it last."""
        check_tunable(self)
        with writing_all(self.shards):
            live = [col for col in self.shards if len(col)]
            kept = [col.snapshot.kept_samples(col.path) for col in live]
            choice = stored_choice(self.config, *pooled(kept))
            for col, samples in zip(live, kept):
                writes.retune(col.path, col.engine, col.snapshot, choice, samples)
            with segments.writer_lock(self.path, self.lock_timeout):
                self._manifest = {**read_manifest(self.path), "auto_choice": choice}
                write_manifest(self.path, self._manifest)
            self.rechoose_ridge(force=True)
        return self.auto_choice or {}

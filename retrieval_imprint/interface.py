"""What every collection offers, one directory or a sharded one: the typed interface, and the
methods and input checks both kinds share, written once.

``ImprintCollection`` is a ``Protocol``: ``Collection`` and ``ShardedCollection`` implement it (a
type checker verifies both: ``sharded.open_any``, which is ``retrieval_imprint.open``, returns either
as one; tests/test_layers.py runs it). It extends ``searchable.Searchable``, what a server needs,
which the Ray shard router implements too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from . import labels as lab
from . import params as spec
from . import provenance, segments, snapshot
from .errors import CollectionExistsError, CollectionStateError, DataError, SettingsClashError
from .normalize import normalize
from .searchable import Searchable

if TYPE_CHECKING:
    from .integrity import CheckReport
    from .openset import Calibration
    from .ranking import QueryResult


@runtime_checkable
class ImprintCollection(Searchable, Protocol):
    """A head on disk that grows and shrinks one class at a time (``Collection``'s API)."""

    path: Path

    @property
    def classes(self) -> list: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def auto_choice(self) -> dict[str, Any] | None: ...
    @property
    def outgrown(self) -> bool: ...
    def class_table(self) -> list[dict[str, Any]]: ...
    def examples(self, label: object) -> list[dict[str, Any]]: ...
    def explain(self, Q: Any, n: int = 3, *, threshold: float | None = None) -> list[list[dict[str, Any]]]: ...
    def predict(
        self, Q: Any, *, threshold: float | None = None, model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> np.ndarray: ...  # fmt: skip
    def query_texts(self, texts: Sequence[str], top: int = 1, *, threshold: float | None = None) -> QueryResult: ...
    def check(self) -> CheckReport: ...
    def add(
        self, X: Any, labels: Sequence[object], *, model: str | None = None, replace: bool | set = False,
        checkpoints: Sequence[tuple[str, int]] = (), texts: Sequence[str | None] | None = None,
        refs: Sequence[str | None] | None = None,
    ) -> Any: ...  # fmt: skip
    def check_settings(self, *, preset: str | None = None, **settings: Any) -> None: ...
    def restore(self, threshold: float | None, classes: dict[Any, tuple], ridge: tuple | None = None) -> Any: ...
    def add_texts(
        self, texts: Sequence[str], labels: Sequence[object], *, replace: bool = False,
        refs: Sequence[str] | None = None,
    ) -> Any: ...  # fmt: skip
    def remove(self, labels: Sequence[object]) -> Any: ...
    def set_threshold(self, threshold: float | None, *, label: object = None) -> Any: ...
    def set_search_params(self, **params: int) -> Any: ...
    def compact(self, *, retrain: bool | None = None) -> Any: ...
    def calibrate(self, X: Any = None, labels: Sequence[object] | None = None, X_oos: Any = None, *,
                  target_accuracy: float | None = None, target_oos_recall: float | None = None,
                  target_false_rejection: float | None = None, rule: str | None = None,
                  margin: float = ...) -> Calibration: ...  # fmt: skip
    def export(self, out: Any) -> int: ...
    def tune(self) -> dict[str, Any]: ...
    def rows_done(self, source: str) -> int: ...
    def close(self) -> None: ...


Self = TypeVar("Self", bound="Shared")


class Shared:
    """The methods whose body is the same for a collection and a sharded one: each is written in
    terms of ``query``, ``add``, ``embedder`` and ``model``, which each kind implements."""

    model: Any
    query: Any
    add: Any
    embedder: Any
    close: Any
    members: Any  # the plain collections holding the classes (itself, or the shards)
    auto_choice: Any
    config: Any

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(
        self,
        Q: Any,
        *,
        threshold: float | None = None,
        model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> np.ndarray:
        """The best class of each query (None where rejected by the threshold)."""
        return self.query(Q, 1, threshold=threshold, model=model, search_params=search_params).labels[:, 0]

    def query_texts(self, texts: Sequence[str], top: int = 1, *, threshold: float | None = None) -> QueryResult:
        """``query`` on texts embedded with the collection's model."""
        return self.query(self.embedder().encode(texts), top, threshold=threshold, model=self.model)

    def add_texts(
        self: Self,
        texts: Sequence[str],
        labels: Sequence[object],
        *,
        replace: bool = False,
        refs: Sequence[str] | None = None,
    ) -> Self:
        """``add`` on texts embedded with the collection's model; the texts (and ``refs``, e.g.
        row ids) are kept beside the samples (``examples``, ``explain``)."""
        texts, labels, refs = text_rows(texts, labels, refs)
        self.add(self.embedder().encode(texts), labels, model=self.model, replace=replace, texts=texts, refs=refs)
        return self

    def export(self, out: str | os.PathLike) -> int:
        """Write every kept sample with its label, text and ref, and the collection's settings, to
        the Parquet file ``out`` (a sharded collection's shard by shard); ``ingest`` (``imprint
        index``, with or without ``--shards``) makes an equal collection from it. Returns the
        rows written."""
        live = [col for col in self.members if len(col)] or self.members[:1]
        tables = [provenance.export(c.engine, snapshot.read(c.path, c.engine, samples=True), c.path) for c in live]
        first = self.members[0]
        cfg = first.config  # the settings ``ingest`` creates a collection with, and its state
        settings = {
            **{k: cfg[k] for k in spec.STORED},
            "index": cfg["index_factory"],
            "keep_samples": True,
            "model": first.model,
            "search_params": first.search_params or None,
        }
        whole = self.config  # a sharded streaming ls collection's ridge is the whole's, not shard 0's
        ridge = [whole["ridge"], whole["ridge_rows"]] if whole.get("ridge") is not None else None
        state = {"threshold": cfg["threshold"], "auto_choice": self.auto_choice, "ridge": ridge}
        return provenance.write_export(tables, Path(out), self.model, settings, state)


@contextmanager
def staging(path: Path) -> Iterator[Path]:
    """A new collection built in a hidden directory beside ``path`` and renamed into place when the
    block ends: it appears whole or not at all (the directory is removed if the block fails)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CollectionExistsError(f"{path} already exists and is not an empty directory")
    staged = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    os.replace(staged, path)


def check_vectors(X: object, what: str, dimension: int | None) -> np.ndarray:
    """``X`` as a finite float32 ``(n, d)`` array of the collection's dimension, or a ``DataError``."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"{what} must be a 2-D array (n, d); got shape {X.shape}")
    if not len(X):
        raise DataError(f"{what} is empty: nothing to {'add' if what == 'X' else 'query'}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise DataError(f"{what} must hold real numbers; got dtype {X.dtype}")
    X = np.asarray(X, np.float32)  # no copy for float32 input: nothing below writes to it
    bad = np.flatnonzero(~np.isfinite(X).all(1))
    if len(bad):
        raise DataError(f"{what} row {bad[0]} holds NaN or infinity ({len(bad)} such rows)")
    if dimension is not None and X.shape[1] != dimension:
        raise DataError(f"{what} has dimension {X.shape[1]}, but this collection holds {dimension}-d vectors")
    return X


def check_model(recorded: str | None, given: str | None, action: str) -> None:
    """A ``DataError`` where vectors said to be embedded with model ``given`` meet a collection
    recorded with another (``action``: "query", "add")."""
    if given is not None and recorded is not None and given != recorded:
        raise DataError(f"{action} vectors embedded with {given!r}, but this collection uses {recorded!r}")


def labelled_rows(
    X: object, labels: Sequence[object], dimension: int | None, recorded: str | None, model: str | None, action: str
) -> tuple[np.ndarray, np.ndarray, list[lab.Entry]]:
    """What every write of labelled vectors checks first (the vectors, one label per row, the model
    they were embedded with); returns them with each row's class code and the label entries."""
    X = check_vectors(X, "X", dimension)
    labels = lab.as_sequence(labels)
    if len(labels) != len(X):
        raise DataError(f"X has {len(X)} rows but labels has {len(labels)}")
    check_model(recorded, model, action)
    codes, entries = lab.encode_stored(labels)
    return X, codes, entries


def query_rows(
    Q: object, top: int, model: str | None, recorded: str | None, dimension: int | None, inf_norm: str
) -> tuple[np.ndarray, int]:
    """What every ``query`` checks first: ``top``, the model the vectors were embedded with, the
    vectors themselves; returns them after NORMinf, and ``top``."""
    top = spec.check_int("top", top, 1)
    check_model(recorded, model, "query")
    return normalize(check_vectors(Q, "Q", dimension), inf_norm, what="Q"), top


def text_rows(
    texts: Sequence[str], labels: Sequence[object], refs: Sequence[object] | None
) -> tuple[list, list, list[str] | None]:
    """``add_texts``'s arguments as lists of one length (refs as strings), or a ``DataError``."""
    texts, labels = lab.as_sequence(texts, "texts"), lab.as_sequence(labels)
    if len(texts) != len(labels) or (refs is not None and len(refs) != len(texts)):
        raise DataError(
            f"{len(texts)} texts but {len(labels)} labels" + (f" and {len(refs)} refs" if refs is not None else "")
        )
    return texts, labels, None if refs is None else [str(r) for r in refs]


def check_tunable(col: Any) -> None:
    """Raise ``CollectionStateError`` unless ``col`` (sharded or not) has classes and keeps samples."""
    if not col.config["keep_samples"]:
        raise CollectionStateError(f"collection {col.path} keeps no samples, so there is nothing to tune on")
    if not len(col):
        raise CollectionStateError(f"collection {col.path} has no classes yet")


def snapshot_info(s: snapshot.Snapshot, directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Sizes, the settings ``config``, files and what was chosen of one version ``s``, as plain data
    (``Collection.info``)."""
    files = [f for kind in s.files.values() for f in kind]
    tuning = s.config.get("index_tuning")
    return {
        "classes": len(s.table),
        "proxies": int(s.table.n_proxies.sum()),
        "samples": int(s.table.n_samples.sum()),
        "version": s.version,
        "config": config,
        "trained_on": s.config["trained_on"],
        "auto_choice": s.auto_choice,
        "index_tuning": json.loads(tuning) if tuning else None,
        "embedder": dict(s.embedder) if s.embedder else None,
        "segments": files,
        "bytes_on_disk": sum(
            p.stat().st_size for p in map(directory.joinpath, [*files, segments.DB_NAME]) if p.exists()
        ),
    }


@contextmanager
def writing_all(collections: Sequence[Any]) -> Iterator[None]:
    """Hold every one of ``collections``' writer locks (``Collection.writing``), in order."""
    with ExitStack() as stack:
        for col in collections:
            stack.enter_context(col.writing())
        yield


def check_unchanged(path: object, given: dict[str, Any], stored: dict[str, Any]) -> None:
    """A ``SettingsClashError`` listing every collection setting ``given`` (resolved) that differs
    from the ``stored`` one of the collection at ``path``."""
    checked = spec.resolve(given, spec.collection_scope())
    if given.get("index") == "auto" and stored["memory_budget"] is not None:
        stored = {**stored, "index": "auto"}  # auto chose the stored factory at the first add
    clash = [
        f"{name}={checked[name]!r} (collection: {stored[name]!r})" for name in given if checked[name] != stored[name]
    ]
    if clash:
        raise SettingsClashError(f"{path} already exists with other settings: {'; '.join(clash)}")

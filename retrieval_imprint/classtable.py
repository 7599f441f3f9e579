"""The class table in memory: one row per class, as parallel arrays sorted by class id; the whole
table (``Snapshot.table``) or the rows of a few classes (``Snapshot.rows_of``, ``subset``).

Queries map a proxy id to its class by arithmetic (``segments.class_of``) and the class to its row
by a binary search here. Writers change the table through ``upsert`` and
``drop`` only, after their transaction commits, so it always mirrors one committed version.
Columns keep room to grow (doubling), so adding a class appends in place: copying seven columns of
a million classes on every add cost 12.8 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import labels as lab
from . import segments
from .errors import DataError

COLUMNS = ("ids", "labels", "n_samples", "proxy_lo", "proxy_hi", "shift", "threshold")
FEW_LABELS = 16  # up to this many distinct labels, ids_of compares each with the label column


class _Column:
    """A column of the table: the first ``len(table)`` entries of its storage, as a view."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.storage = "_" + name

    def __get__(self, table: ClassTable | None, owner: type | None = None) -> Any:
        return self if table is None else getattr(table, self.storage)[: len(table)]

    def __set__(self, table: ClassTable, values: np.ndarray) -> None:
        if len(values) != len(table):
            raise ValueError(f"a column of {len(table)} classes cannot hold {len(values)} values")
        setattr(table, self.storage, values)


class ClassTable:
    ids = _Column()  # (C,) int64, ascending: class ids grow with each new class
    labels = _Column()  # (C,) object: str or int
    n_samples = _Column()  # (C,) int64; also the end of the class's sample ids
    proxy_lo = _Column()  # (C,) int64: live proxies are j in [proxy_lo, proxy_hi)
    proxy_hi = _Column()  # (C,) int64
    shift = _Column()  # (C,) float64: the class's rejection shift (NaN: unknown)
    threshold = _Column()  # (C,) float64: the class's own rejection threshold (NaN: the collection's)

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        n_samples: np.ndarray,
        proxy_lo: np.ndarray,
        proxy_hi: np.ndarray,
        shift: np.ndarray,
        threshold: np.ndarray,
    ) -> None:
        self._n = len(ids)
        for name, values in zip(COLUMNS, (ids, labels, n_samples, proxy_lo, proxy_hi, shift, threshold)):
            setattr(self, name, values)

    @classmethod
    def from_columns(cls, cols: dict[str, Any]) -> ClassTable:
        """From ``classrows.class_columns``."""
        labels = np.empty(len(cols["id"]), object)
        labels[:] = cols["label"]
        return cls(
            cols["id"], labels, cols["n_samples"], cols["proxy_lo"], cols["proxy_hi"], cols["shift"], cols["threshold"]
        )

    def __len__(self) -> int:
        return self._n

    def subset(self, class_ids: np.ndarray) -> ClassTable:
        """The rows of these class ids (sorted, distinct) that the table holds, as a table of their own."""
        pos = np.minimum(self.positions(class_ids), max(len(self) - 1, 0))
        pos = pos[self.ids[pos] == class_ids] if len(self) else pos[:0]
        return ClassTable(*(getattr(self, name)[pos] for name in COLUMNS))

    def positions(self, class_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, class_ids)

    def find(self, label: object) -> int | None:
        """The class id of ``label`` (None if there is no such class; a ``DataError`` if no class
        could have it: labels are str or int)."""
        lab.stored_entry(label)
        found = int(self.ids_of([label])[0])
        return None if found < 0 else found

    def require(self, labels: Sequence[object] | np.ndarray, collection: object) -> np.ndarray:
        """The class ids of ``labels`` (one lookup, ``ids_of``), or a ``DataError`` naming the first
        that is no class of ``collection``."""
        ids = self.ids_of(labels)
        if (ids < 0).any():
            raise DataError(f"no class {labels[int(np.argmax(ids < 0))]!r} in collection {collection}")
        return ids

    def ids_of(self, labels: Sequence[object] | np.ndarray) -> np.ndarray:
        """The class id of each label (-1 for None, or a label of no class). A few distinct labels
        are each compared with the whole label column at once (10 ms at 1M classes); more are
        looked up in a dict of the table made for the call (0.5 s at 1M classes)."""
        wanted = [None if v is None else lab.entry(v) for v in labels]
        distinct: set[tuple[str, str]] = {e for e in wanted if e is not None}
        if len(distinct) <= FEW_LABELS:
            hits = {e: np.flatnonzero(self.labels == lab.value(*e)) for e in distinct if e[0] in ("str", "int")}
            found = {e: int(self.ids[hit[0]]) for e, hit in hits.items() if len(hit)}
        else:
            found = {lab.entry(v): int(i) for i, v in zip(self.ids, self.labels)}
        return np.array([-1 if e is None else found.get(e, -1) for e in wanted], np.int64)

    def labels_of(self, class_ids: np.ndarray) -> np.ndarray:
        return self.labels[self.positions(class_ids)]

    @property
    def n_proxies(self) -> np.ndarray:
        return self.proxy_hi - self.proxy_lo

    def proxy_ids(self, class_ids: np.ndarray) -> np.ndarray:
        """Ids of the live proxies of these classes."""
        pos = self.positions(class_ids)
        return segments.range_ids(class_ids, self.proxy_lo[pos], self.proxy_hi[pos])

    def sample_ids(self, class_ids: np.ndarray) -> np.ndarray:
        """Ids of the kept samples of these classes."""
        pos = self.positions(class_ids)
        return segments.range_ids(class_ids, np.zeros_like(pos), self.n_samples[pos])

    def mean_ids(self, class_ids: np.ndarray) -> np.ndarray:
        """Ids of the class means of these classes (``class << 24 | proxy_lo``: they change whenever
        a class is re-imprinted, like its proxies' range)."""
        return (class_ids << segments.CLASS_SHIFT) + self.proxy_lo[self.positions(class_ids)]

    def live(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Which vector ids of ``kind`` ("proxies", "samples" or "means") belong to the live version."""
        if kind == "proxies":
            return segments.live(self.ids, self.proxy_lo, self.proxy_hi, ids)
        if kind == "means":
            return segments.live(self.ids, self.proxy_lo, self.proxy_lo + 1, ids)
        return segments.live(self.ids, np.zeros_like(self.ids), self.n_samples, ids)

    def upsert(
        self,
        class_ids: np.ndarray,
        labels: Sequence[object],
        n_samples: np.ndarray,
        proxy_lo: np.ndarray,
        proxy_hi: np.ndarray,
        shift: np.ndarray,
    ) -> None:
        """Update the rows of existing classes (keeping their own thresholds) and append new ones
        (their ids exceed every old id)."""
        pos = np.minimum(self.positions(class_ids), max(len(self) - 1, 0))
        old = (self.ids[pos] == class_ids) if len(self) else np.zeros(len(class_ids), bool)
        pos = pos[old]
        self.n_samples[pos], self.proxy_lo[pos], self.proxy_hi[pos] = n_samples[old], proxy_lo[old], proxy_hi[old]
        self.shift[pos] = shift[old]
        added = np.empty(int((~old).sum()), object)
        added[:] = [v for v, o in zip(labels, old) if not o]
        new = {
            "ids": class_ids[~old],
            "labels": added,
            "n_samples": n_samples[~old],
            "proxy_lo": proxy_lo[~old],
            "proxy_hi": proxy_hi[~old],
            "shift": shift[~old],
            "threshold": np.full(len(added), np.nan),
        }
        n, k = self._n, len(added)
        for name in COLUMNS:
            storage = getattr(self, "_" + name)
            if n + k > len(storage):  # grow by doubling: appends are amortised O(1)
                grown = np.empty(max(2 * len(storage), n + k), storage.dtype)
                grown[:n] = storage[:n]
                setattr(self, "_" + name, grown)
                storage = grown
            storage[n : n + k] = new[name]
        self._n = n + k

    def drop(self, class_ids: np.ndarray) -> None:
        keep = np.ones(len(self), bool)
        keep[self.positions(class_ids)] = False
        columns = {name: getattr(self, name)[keep] for name in COLUMNS}
        self._n = int(keep.sum())
        for name, values in columns.items():
            setattr(self, name, values)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per class, in insertion order: label, samples, proxies, shift and own threshold
        (None where unknown or unset)."""
        return [
            {"label": label, "samples": int(n), "proxies": int(p), "shift": _or_none(sh), "threshold": _or_none(t)}
            for label, n, p, sh, t in zip(self.labels, self.n_samples, self.n_proxies, self.shift, self.threshold)
        ]


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)

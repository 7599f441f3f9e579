"""The class table in memory: one row per class, as parallel arrays sorted by class id.

Queries map a proxy id to its class by arithmetic (``segments.class_of``) and the class to its label
by a binary search here: no SQL per query. Writers change the table through ``upsert`` and
``drop`` only, after their transaction commits, so it always mirrors one committed version.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from . import labels as lab
from . import segments


@dataclass
class ClassTable:
    ids: np.ndarray  # (C,) int64, ascending: class ids grow with each new class
    labels: np.ndarray  # (C,) object: str or int
    n_samples: np.ndarray  # (C,) int64; also the end of the class's sample ids
    proxy_lo: np.ndarray  # (C,) int64: live proxies are j in [proxy_lo, proxy_hi)
    proxy_hi: np.ndarray  # (C,) int64
    shift: np.ndarray  # (C,) float64: the class's rejection shift (NaN: unknown)
    threshold: np.ndarray  # (C,) float64: the class's own rejection threshold (NaN: the collection's)

    @classmethod
    def from_columns(cls, cols: dict[str, Any]) -> "ClassTable":
        """From ``store.class_columns``."""
        labels = np.empty(len(cols["id"]), object)
        labels[:] = cols["label"]
        return cls(cols["id"], labels, cols["n_samples"], cols["proxy_lo"], cols["proxy_hi"], cols["shift"],
                   cols["threshold"])

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, class_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, class_ids)

    def find(self, label: object) -> int | None:
        """The class id of ``label`` (None if there is no such class)."""
        wanted = lab.stored_entry(label)
        return next((int(i) for i, v in zip(self.ids, self.labels) if lab.entry(v) == wanted), None)

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

    def upsert(self, class_ids: np.ndarray, labels: Sequence[object], n_samples: np.ndarray, proxy_lo: np.ndarray,
               proxy_hi: np.ndarray, shift: np.ndarray) -> None:
        """Update the rows of existing classes (keeping their own thresholds) and append new ones
        (their ids exceed every old id)."""
        old = np.isin(class_ids, self.ids)
        pos = self.positions(class_ids[old])
        self.n_samples[pos], self.proxy_lo[pos], self.proxy_hi[pos] = n_samples[old], proxy_lo[old], proxy_hi[old]
        self.shift[pos] = shift[old]
        added = np.empty(int((~old).sum()), object)
        added[:] = [v for v, o in zip(labels, old) if not o]
        for name, value in (("ids", class_ids), ("labels", added), ("n_samples", n_samples),
                            ("proxy_lo", proxy_lo), ("proxy_hi", proxy_hi), ("shift", shift),
                            ("threshold", np.full(len(class_ids), np.nan))):
            new = value if name == "labels" else value[~old]
            setattr(self, name, np.concatenate([getattr(self, name), new]))

    def drop(self, class_ids: np.ndarray) -> None:
        keep = np.ones(len(self), bool)
        keep[self.positions(class_ids)] = False
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[keep])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per class, in insertion order: label, samples, proxies, shift and own threshold
        (None where unknown or unset)."""
        return [{"label": label, "samples": int(n), "proxies": int(p), "shift": _or_none(sh), "threshold": _or_none(t)}
                for label, n, p, sh, t in zip(self.labels, self.n_samples, self.n_proxies, self.shift, self.threshold)]


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)

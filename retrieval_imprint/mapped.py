"""A proxy index whose bulk is a memory-mapped segment file: how a large collection opens in
milliseconds with almost nothing resident.

``MappedProxyIndex`` searches two FAISS indexes as one: ``mapped``, the largest proxy segment
mapped read-only from its file (``segments.map_segment``), and ``index``, an ordinary in-memory
index of the same trained kind holding every other proxy (the small segments of later adds, and
what this process adds). Adds go to ``index``. A mapped index cannot remove vectors (FAISS aborts
on a write to a mapped list), so proxies removed from it — a removed or re-imprinted class — are
*dead*: left out of every search by an id selector, and rewritten away by the next compaction
that merges the file. Each query searches both and keeps the best ``m`` (``faiss.merge_knn_results``).
Every list of the mapped file a query scans is verified first (verified.py): no reads at open, and
no answer from a damaged byte. Where the file has fast-scan ``candidates`` (a refined index,
refine.py), a query scans those instead and reads only its best candidates from the mapped lists
(verified likewise), re-ranking them exactly.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from . import ivf, refine
from .index import ProxyIndex


class MappedProxyIndex(ProxyIndex):
    """``delta``'s settings and vectors plus the read-only ``mapped`` IVF index, less its dead ids."""

    def __init__(
        self, delta: ProxyIndex, mapped: faiss.Index, verifier: Any, candidates: faiss.Index | None = None
    ) -> None:
        super().__init__(
            delta.index.d, delta.metric, delta.transform, index=delta.index, search_params=delta.search_params
        )
        self.mapped, self.verifier = mapped, verifier  # verified.ListVerifier or FileVerifier
        self._searched = faiss.downcast_index(mapped)  # what search_verified takes: the IVF index itself
        self._mapped_ids: np.ndarray | None = None  # sorted; read from the mapped lists on first need
        self._dead = np.zeros(0, np.int64)
        self.candidates = candidates
        self._reranker = refine.Reranker(mapped, verifier.ensure) if candidates is not None else None
        self._batch = self._selector = None

    def mark_dead(self, ids: np.ndarray) -> None:
        """Leave these ids of the mapped file out of every search from now on."""
        self._dead = np.union1d(self._dead, np.asarray(ids, np.int64))
        # FAISS holds raw pointers to the selectors: keep both alive as long as they are used
        self._batch = faiss.IDSelectorBatch(self._dead) if len(self._dead) else None
        self._selector = faiss.IDSelectorNot(self._batch) if len(self._dead) else None

    @property
    def ntotal(self) -> int:
        return self.mapped.ntotal - len(self._dead) + self.index.ntotal

    def mapped_ids(self) -> np.ndarray:
        """Every id in the mapped file, dead or not, sorted."""
        if self._mapped_ids is None:
            self._mapped_ids = np.sort(ivf.list_ids(self.mapped))
        return self._mapped_ids

    def _in_mapped(self, ids: np.ndarray) -> np.ndarray:
        stored = self.mapped_ids()
        if not len(stored):
            return np.zeros(len(ids), bool)
        return stored[np.minimum(np.searchsorted(stored, ids), len(stored) - 1)] == ids

    @property
    def ids(self) -> np.ndarray:
        stored = self.mapped_ids()
        return np.concatenate([stored[~np.isin(stored, self._dead)], super().ids])

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids from the in-memory part; mark those in the mapped file dead."""
        ids = np.unique(np.asarray(ids, np.int64))
        removed = super().remove(ids) if self.index.ntotal else 0
        newly = ids[self._in_mapped(ids) & ~np.isin(ids, self._dead)]
        if len(newly):
            self.mark_dead(newly)
        return removed + len(newly)

    def _nearest(self, Q: np.ndarray, m: int, params: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
        searched = ivf.with_quantizer_beam(params or self.search_params, self.hnsw_quantized)
        if self.candidates is not None and self._reranker is not None:
            D, ids = refine.search(self.candidates, self._reranker, Q, m, searched, self._dead)
        else:
            D, ids = ivf.search_verified(self._searched, Q, m, searched, self._selector, self.verifier.ensure)
        if not self.index.ntotal:
            return D, ids
        D2, ids2 = super()._nearest(Q, m, params)
        keep_max = self.mapped.metric_type == faiss.METRIC_INNER_PRODUCT
        return faiss.merge_knn_results(np.stack([D, D2]), np.stack([ids, ids2]), keep_max=keep_max)

    def retrained(self, factory: str, seed: int = 0) -> tuple[ProxyIndex, ProxyIndex]:
        """As ``ProxyIndex.retrained``, from an in-memory copy of every live vector (this is the
        one step that brings the mapped file into memory: a compaction that retrains)."""
        if not self.retrainable():
            return super().retrained(factory, seed)  # refuses, naming the index
        full = self.empty_like()
        for part, dead in ((self.mapped, self._dead), (self.index, None)):
            for ids, X in ivf.decoded_lists(part):
                keep = ~np.isin(ids, dead) if dead is not None else slice(None)
                full.index.add_with_ids(X[keep], ids[keep])  # decoded vectors are already prepared
        return full.retrained(factory, seed)

    def __getstate__(self) -> dict:
        raise TypeError(
            "a collection's memory-mapped proxy index cannot be pickled: send the collection's "
            "path and open it where it is needed"
        )

"""A proxy index whose bulk is memory-mapped segment files: how a large collection opens in
milliseconds with almost nothing resident.

``MappedProxyIndex`` searches several FAISS indexes as one: the ``parts``, each a proxy segment of
at least ``segments.MAP_MIN`` bytes mapped read-only from its file (``segments.map_segment``), and
``index``, an ordinary in-memory index of the same trained kind holding every other proxy (the
small segments of later adds, and what this process adds). Adds go to ``index``. A mapped index
cannot remove vectors (FAISS aborts on a write to a mapped list), so proxies removed from a part —
a removed or re-imprinted class — are *dead*: left out of every search by an id selector, and
rewritten away by the next compaction that merges the file. Each query makes one coarse search
(the parts share the template's quantizer, and so does the in-memory index), scans those lists in
every part and in the in-memory index, and keeps the best ``m`` (``faiss.merge_knn_results``).
Every list of a mapped file a query scans is verified first (verified.py): no reads at open, and no
answer from a damaged byte. Where a file has fast-scan ``candidates`` (a refined index, refine.py), a query scans those
instead (mapped and verified likewise) and reads only its best candidates from the mapped lists;
the candidates of every file are decoded and re-ranked exactly together (refine.reranked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from . import ivf, refine
from .device import current, faiss_gpu
from .index import ProxyIndex
from .verified import ListVerifier


@dataclass
class Mapped:
    """One mapped proxy file: its IVF index, the check of its lists (``verified.ListVerifier`` or
    ``FileVerifier``) and, for a refined index, its fast-scan candidates and the check of their
    lists (None: read and checked whole)."""

    index: faiss.Index
    verifier: Any
    candidates: faiss.Index | None = None
    verify_candidates: ivf.Verify | None = None

    def __post_init__(self) -> None:
        self.searched = faiss.downcast_index(self.index)  # what search_verified takes: the IVF index itself
        sizes = self.verifier.sizes if isinstance(self.verifier, ListVerifier) else None  # read once, shared
        self.reranker = (
            refine.Reranker(self.index, self.verifier.ensure_at, sizes, mapped=True)
            if self.candidates is not None
            else None
        )
        self.quantizer = faiss.extract_index_ivf(self.index).quantizer  # shared with the template's (one coarse search)

    def search(
        self,
        Q: np.ndarray,
        m: int,
        params: dict[str, int] | None,
        selector: Any,
        assigned: ivf.Assignment | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``m`` nearest live proxies of prepared queries ``Q`` in this file (one without
        candidates), in the lists ``assigned`` by its quantizer (``ivf.assign``; else found here)."""
        return ivf.search_verified(self.searched, Q, m, params, selector, self.verifier.ensure, assigned)

    def candidates_of(
        self, Q: np.ndarray, m: int, params: dict[str, int] | None, assigned: ivf.Assignment | None = None
    ) -> tuple[refine.Reranker, np.ndarray]:
        """A file with candidates: its re-ranker and the positions of its candidates for ``Q``."""
        assert self.candidates is not None and self.reranker is not None
        return self.reranker, refine.candidates_of(self.candidates, Q, m, params, assigned, self.verify_candidates)


class MappedProxyIndex(ProxyIndex):
    """``delta``'s settings and vectors plus the read-only mapped ``parts``, less their dead ids."""

    def __init__(self, delta: ProxyIndex, parts: list[Mapped]) -> None:
        super().__init__(
            delta.index.d, delta.metric, delta.transform, index=delta.index, search_params=delta.search_params
        )
        self.parts = parts
        self._mapped_ids: np.ndarray | None = None  # sorted; read from the mapped lists on first need
        self._dead = np.zeros(0, np.int64)
        self._batch = self._selector = None

    def mark_dead(self, ids: np.ndarray) -> None:
        """Leave these ids of the mapped files out of every search from now on."""
        self._dead = np.union1d(self._dead, np.asarray(ids, np.int64))
        # FAISS holds raw pointers to the selectors: keep both alive as long as they are used
        self._batch = faiss.IDSelectorBatch(self._dead) if len(self._dead) else None
        self._selector = faiss.IDSelectorNot(self._batch) if len(self._dead) else None

    @property
    def ntotal(self) -> int:
        return sum(part.index.ntotal for part in self.parts) - len(self._dead) + self.index.ntotal

    def mapped_ids(self) -> np.ndarray:
        """Every id in the mapped files, dead or not, sorted."""
        if self._mapped_ids is None:
            self._mapped_ids = np.sort(np.concatenate([ivf.list_ids(part.index) for part in self.parts]))
        return self._mapped_ids

    @property
    def ids(self) -> np.ndarray:
        stored = self.mapped_ids()
        return np.concatenate([stored[~np.isin(stored, self._dead)], super().ids])

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (live ones: in the in-memory index or the mapped files) from the in-memory
        index; mark the others dead in the mapped files, which are not read for it (O(ids))."""
        ids = np.unique(np.asarray(ids, np.int64))
        in_memory = np.isin(ids, super().ids) if self.index.ntotal else np.zeros(len(ids), bool)
        removed = super().remove(ids[in_memory]) if in_memory.any() else 0
        newly = ids[~in_memory & ~np.isin(ids, self._dead)]
        if len(newly):
            self.mark_dead(newly)
        return removed + len(newly)

    def _nearest(self, Q: np.ndarray, m: int, params: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
        searched = ivf.with_quantizer_beam({**self.search_params, **(params or {})}, self.hnsw_quantized)
        assigned: dict[Any, ivf.Assignment] = {}  # one coarse search per quantizer: every file shares the template's
        found = []
        refined: dict[int, list] = {}  # candidates by quantizer: files that decode alike
        for part in self.parts:
            key = int(part.quantizer.this)
            if key not in assigned:
                assigned[key] = ivf.assign(part.searched, Q, searched)
            if part.candidates is not None:
                refined.setdefault(key, []).append(part.candidates_of(Q, m, searched, assigned[key]))
            else:
                found.append(part.search(Q, m, searched, self._selector, assigned[key]))
        for candidates in refined.values():  # re-ranked together: one decode and one top-m a query block
            found.append(refine.reranked(Q, candidates, m, self._dead))
        if self.index.ntotal:
            found.append(self._nearest_in_memory(Q, m, params, searched, assigned))
        if len(found) == 1:
            return found[0]
        keep_max = self.index.metric_type == faiss.METRIC_INNER_PRODUCT
        return faiss.merge_knn_results(
            np.stack([D for D, _ in found]), np.stack([i for _, i in found]), keep_max=keep_max
        )

    def _nearest_in_memory(
        self,
        Q: np.ndarray,
        m: int,
        params: dict[str, int] | None,
        searched: dict[str, int] | None,
        assigned: dict[Any, ivf.Assignment],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The in-memory index's answer: in the lists already found for the files where it shares their
        quantizer (``ProxyIndex.empty_like``: a second coarse search cost as much as the scan of every file)."""
        key = int(faiss.extract_index_ivf(self.index).quantizer.this) if self.is_ivf else None
        on_cpu = faiss_gpu(current()) is None  # where ProxyIndex._nearest searches an IVF index
        if key in assigned and isinstance(self.index, faiss.IndexIVF) and on_cpu:
            return ivf.search_assigned(self.index, Q, m, assigned[key], searched)
        return super()._nearest(Q, m, params)

    def retrained(self, factory: str, seed: int = 0) -> tuple[ProxyIndex, ProxyIndex]:
        """As ``ProxyIndex.retrained``, from every live vector of the mapped files (each verified whole
        first) and the in-memory index: the one step that reads all of the mapped files, a compaction
        that retrains."""
        for part in self.parts:
            part.verifier.ensure(None)
        parts = [(p.index, self._dead) for p in self.parts] + ([(self.index, None)] if self.index.ntotal else [])
        return self.retrained_from(parts, factory, seed)

    def __getstate__(self) -> dict:
        raise TypeError(
            "a collection's memory-mapped proxy index cannot be pickled: send the collection's "
            "path and open it where it is needed"
        )

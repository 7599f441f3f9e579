"""The proxy index: proxies in a FAISS index, searched under any of the AGG metrics.

Max aggregation is a top-1 search of this index; m-NN is a top-m search. FAISS metrics cover inner
product (``ip``; ``cosine`` L2-normalises both sides first), ``euclidean`` (L2), ``manhattan``
(L1) and ``chebyshev`` (Linf). ``mahalanobis`` is Euclidean search after the linear map
``x -> x L`` with ``L L^T = VI = (cov(W) + 1e-6 I)^-1``. Searches return similarities (higher is
closer: the inner product, or minus the distance) and distances (``1 - ip`` for the inner-product
metrics, used by distance-weighted votes).

Without ids, row ``i`` has id ``i`` (the estimator); with ids (``IndexIDMap2``, or an IVF index
from ``ivf.py``), ids are the caller's 64-bit numbers, removed by id (collections).
Searches may run from several threads at once; adds and removals may not run beside them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import faiss
import numpy as np

from . import gemm, ivf, torch_search
from .device import current, faiss_gpu, to_device, to_gpu, to_numpy
from .errors import DataError
from .normalize import l2_normalize

_FAISS_METRIC = {
    "ip": faiss.METRIC_INNER_PRODUCT,
    "cosine": faiss.METRIC_INNER_PRODUCT,
    "euclidean": faiss.METRIC_L2,
    "manhattan": faiss.METRIC_L1,
    "chebyshev": faiss.METRIC_Linf,
    "mahalanobis": faiss.METRIC_L2,
}
_TORCH_KIND = {
    faiss.METRIC_INNER_PRODUCT: "ip",
    faiss.METRIC_L2: "l2",
    faiss.METRIC_L1: "l1",
    faiss.METRIC_Linf: "linf",
}
MAHALANOBIS_RIDGE = 1e-6
SMALL_BATCH = 20  # below this many queries FAISS does not use BLAS (a float16 pre-scan may go first)
SMALL_ADD = 1000  # vectors below which an add runs on one thread (OpenMP start-up costs more)
HALF_SCAN_MIN = 1 << 22  # stored floats (16 MiB) from which few queries scan a float16 copy first
HALF_EXTRA = 16  # candidates beyond m that the float16 scan hands to the exact re-rank
_FP16_MAX = 65504.0


def mahalanobis_map(W: np.ndarray) -> np.ndarray:
    """``L`` ``(d, d)`` with ``L L^T = (cov(W) + 1e-6 I)^-1``, so ``|(x - y) L|`` is the Mahalanobis distance."""
    if len(W) < 2:
        raise DataError(
            "metric='mahalanobis' needs at least 2 proxies to estimate their covariance; "
            "got 1 proxy (one class with one proxy, or 1 sample)"
        )
    cov = np.cov(W.astype(np.float64), rowvar=False) + MAHALANOBIS_RIDGE * np.eye(W.shape[1])
    return np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)


def _flat(d: int, metric: int) -> faiss.Index:
    """A flat index of the same class ``faiss.read_index`` returns, so segments can be merged."""
    if metric == faiss.METRIC_INNER_PRODUCT:
        return faiss.IndexFlatIP(d)
    if metric == faiss.METRIC_L2:
        return faiss.IndexFlatL2(d)
    return faiss.IndexFlat(d, metric)


def _half_bound(X: np.ndarray) -> float:
    """How far float16 storage can move ``x . q`` per unit ``|q|``, for the rows of ``X``: relative
    rounding 2^-11 per entry, plus float32 summation over d terms done twice."""
    return float(np.sqrt(np.einsum("ij,ij->i", X, X).max())) * (2.0**-11 + 2 * X.shape[1] * 2.0**-24)


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """FAISS's calls from this thread run on one OpenMP thread inside the block (the setting is per thread)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class ProxyIndex:
    """A FAISS index of dimension ``d`` under ``metric`` (``transform``: the Mahalanobis map): exact
    unless built from a trained IVF index (``trained``). ``search_params`` are an IVF index's
    defaults for each search (``{"nprobe": 64}``); a search may override them for itself."""

    def __init__(
        self,
        d: int,
        metric: str = "ip",
        transform: np.ndarray | None = None,
        *,
        with_ids: bool = False,
        index: faiss.Index | None = None,
        search_params: dict[str, int] | None = None,
    ) -> None:
        if metric == "mahalanobis" and transform is None:
            raise ValueError("metric='mahalanobis' needs its linear map (see mahalanobis_map)")
        self.metric = metric
        self.transform = transform
        if index is None:
            index = _flat(d, _FAISS_METRIC[metric])
            if with_ids:
                index = faiss.IndexIDMap2(index)
        self.index = index
        self.search_params = search_params or {}
        # float16 copy and its error bound (copy None: entries beyond float16's range); see _half_scan.
        # Both lazy copies (this and the device mirror) are made under _copies_lock.
        self._half: tuple[faiss.Index | None, float] | None = None
        self._copies_lock = threading.Lock()
        self._mirror: tuple | None = None  # (device, ntotal, vectors, squared norms): see _on_device

    @classmethod
    def build(cls, W: np.ndarray, metric: str = "ip") -> ProxyIndex:
        """Index of proxies ``W`` ``(P, d)``, row ``i`` with id ``i`` (Mahalanobis map fitted on ``W``)."""
        out = cls(W.shape[1], metric, mahalanobis_map(W) if metric == "mahalanobis" else None)
        out.add(W)
        return out

    @classmethod
    def trained(
        cls, factory: str, W: np.ndarray, metric: str, transform: np.ndarray | None, seed: int = 0
    ) -> ProxyIndex:
        """An empty IVF index (``ivf.train``) for proxies like ``W``, trained on a sample of them."""
        out = cls(W.shape[1], metric, transform)
        out.index = ivf.train(
            factory, W, metric, _FAISS_METRIC[metric], seed, prepare=lambda X: out.prepare(X, "proxies")
        )
        return out

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @functools.cached_property
    def hnsw_quantized(self) -> bool:
        """An IVF index whose lists an HNSW graph finds (``ivf.hnsw_quantized``), looked up once."""
        return ivf.hnsw_quantized(self.index)

    @property
    def is_ivf(self) -> bool:
        return ivf.is_ivf(self.index)

    def retrainable(self) -> bool:
        """An IVF index whose codes re-encode without loss (``ivf.retrainable``)."""
        return self.is_ivf and ivf.retrainable(self.index)

    def retrained(self, factory: str, seed: int = 0) -> tuple[ProxyIndex, ProxyIndex]:
        """``(template, filled)``: this IVF index's vectors under retrained lists (``ivf.retrain``)."""
        return self.retrained_from([(self.index, None)], factory, seed)

    def retrained_from(
        self, parts: Sequence[tuple[faiss.Index, np.ndarray | None]], factory: str, seed: int = 0
    ) -> tuple[ProxyIndex, ProxyIndex]:
        """``retrained`` for the vectors of ``parts`` (IVF indexes like this one, each less its dead ids)."""
        template, filled = ivf.retrain(parts, factory, self.metric, _FAISS_METRIC[self.metric], seed)
        return (
            ProxyIndex(self.index.d, self.metric, self.transform, index=template),
            ProxyIndex(self.index.d, self.metric, self.transform, index=filled, search_params=self.search_params),
        )

    def empty_like(self) -> ProxyIndex:
        """An empty index of the same kind (and training, and search parameters). An IVF one shares this
        one's coarse quantizer (not a copy): never train it, make a new template (``retrained``)."""
        out = ProxyIndex(
            self.index.d,
            self.metric,
            self.transform,
            index=faiss.clone_index(self.index),
            search_params=self.search_params,
        )
        out.index.reset()
        if self.is_ivf:  # this one's coarse quantizer, not a copy: one coarse search serves both (mapped.py)
            ivf.use_quantizer(out.index, self.index)
        return out

    @property
    def ids(self) -> np.ndarray:
        """Ids of the stored vectors (an ``IndexIDMap2`` or IVF index)."""
        if self.is_ivf:
            return ivf.list_ids(self.index)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def prepare(self, X: np.ndarray, what: str = "query") -> np.ndarray:
        """``X`` as the index stores and searches it (cosine: L2-normalised; Mahalanobis: mapped)."""
        if self.metric == "cosine":
            X = l2_normalize(X, what)
        elif self.transform is not None:
            X = X @ self.transform
        return np.ascontiguousarray(X, dtype=np.float32)

    def add(self, W: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Add proxies ``W`` ``(P, d)`` (with 64-bit ``ids`` when the index has them)."""
        W = self.prepare(W, "proxies")
        self._mirror = None
        with one_faiss_thread() if len(W) < SMALL_ADD else nullcontext():
            if ids is None:
                self.index.add(W)
            else:
                self.index.add_with_ids(W, np.ascontiguousarray(ids, dtype=np.int64))
            if self._half is not None and self._half[0] is not None:  # keep the float16 copy in step
                if max(W.max(), -W.min()) < _FP16_MAX:
                    self._half[0].add(W)
                    self._half = (self._half[0], max(self._half[1], _half_bound(W)))
                else:
                    self._half = (None, 0.0)

    def merge(self, other: faiss.Index) -> None:
        """Move every vector of ``other`` (a FAISS index of the same kind) into this one."""
        self._half = self._mirror = None
        self.index.merge_from(other, 0)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids; returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._remove(faiss.IDSelectorBatch(ids), lambda stored: np.isin(stored, ids))

    def _remove(self, selector: faiss.IDSelector, chosen: Callable[[np.ndarray], np.ndarray]) -> int:
        """Remove the selected ids; the float16 copy drops the same rows (FAISS keeps the order)."""
        self._mirror = None
        if self._half is not None and self._half[0] is not None:
            stored = self._row_ids()
            stored = np.arange(self.ntotal) if stored is None else stored
            self._half[0].remove_ids(faiss.IDSelectorBatch(np.flatnonzero(chosen(stored)).astype(np.int64)))
        elif self._half is not None:
            self._half = None
        return int(self.index.remove_ids(selector))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` ``(n, d)`` (as stored: after ``prepare``)."""
        if not len(ids):
            return np.zeros((0, self.index.d), np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def search(
        self, Q: np.ndarray, m: int = 1, params: dict[str, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``m`` closest proxies of each query: ``(similarity, distance, ids)``, each ``(n_q, m)``.

        ``params`` override ``search_params`` key by key for this call only (IVF indexes). Fewer than ``m``
        stored proxies: the missing columns have id -1.
        """
        D, ids = self._nearest(self.prepare(Q), m, params)
        if self.metric in ("ip", "cosine"):
            return D, np.maximum(1.0 - D, 0.0), ids
        if self.metric in ("euclidean", "mahalanobis"):
            D = np.sqrt(np.maximum(D, 0.0))
        return -D, D, ids

    def _nearest(self, Q: np.ndarray, m: int, params: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's answer for prepared queries: raw distances (inner products, squared L2, ...) and ids."""
        exact = isinstance(self.index, (faiss.IndexFlat, faiss.IndexIDMap2))
        device = current()
        if exact and device is not None and self.index.ntotal:
            X, X_sq = self._tensors(device)
            D, top = torch_search.top_k(to_device(Q, device), X, min(m, len(X)), self._kind, X_sq)
            return self._finish(to_numpy(D), to_numpy(top), m)
        if exact and self.metric in ("ip", "cosine") and self.index.ntotal:
            return self._gemv_search(Q, m)
        if exact:
            return self.index.search(Q, m)
        gpu = faiss_gpu(device)
        on_gpu = gpu is not None and device is not None
        index = self._on_device(device, lambda: (to_gpu(self.index, gpu), None))[0] if on_gpu else self.index  # type: ignore[arg-type]
        searched = ivf.with_quantizer_beam({**self.search_params, **(params or {})}, self.hnsw_quantized)
        return index.search(Q, m, params=ivf.search_parameters(self.index, searched))

    @property
    def _kind(self) -> str:
        return _TORCH_KIND[_FAISS_METRIC[self.metric]]

    def _on_device(self, device: str, make: Callable[[], tuple]) -> tuple:
        """This index's copy on ``device`` (``make()``: the torch tensors of ``_tensors``, or a
        FAISS GPU index), made on first use and dropped by every add or removal."""
        with self._copies_lock:
            mirror = self._mirror
            if mirror is None or mirror[:2] != (device, self.ntotal):
                self._mirror = mirror = (device, self.ntotal, *make())
        return mirror[2:]

    def _tensors(self, device: str) -> tuple:
        """The stored vectors of an exact index as a tensor on ``device`` (on the CPU a view of
        FAISS's storage), and their squared norms for L2; made once per version (``_on_device``)."""

        def make() -> tuple:
            X = to_device(self._stored(), device)
            return X, (X * X).sum(1) if self._kind == "l2" else None

        return self._on_device(device, make)

    def _row_ids(self) -> np.ndarray | None:
        """The id of each stored row, a view of ``IndexIDMap2``'s map (None: ids are row numbers)."""
        if not isinstance(self.index, faiss.IndexIDMap2):
            return None
        return faiss.rev_swig_ptr(self.index.id_map.data(), self.index.ntotal)

    def _stored(self) -> np.ndarray:
        """FAISS's own storage of an exact index as a ``(ntotal, d)`` float32 view (no copy)."""
        flat = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap2) else self.index
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def _gemv_search(self, Q: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-``m`` of queries over FAISS's own vector storage with numpy's BLAS
        (``gemm.py``: faster than FAISS's search here). From ``HALF_SCAN_MIN`` stored floats a
        float16 scan goes first for a few queries (``_half_scan``)."""
        xb = self._stored()
        k = min(m, len(xb))
        if len(Q) < SMALL_BATCH and k < len(xb) and xb.size >= HALF_SCAN_MIN:
            top, D, sure = self._half_scan(xb, Q, k)
            rows = np.flatnonzero(~sure)
            if len(rows):
                top[rows], D[rows] = gemm.top_k(xb, Q[rows], k)
        else:
            top, D = gemm.top_k(xb, Q, k)
        return self._finish(D, top, m)

    def _half_scan(self, xb: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-``k`` from a float16 scan (half the bytes of float32, and a single query is
        memory-bound) and an exact re-rank of its ``k + HALF_EXTRA`` best.

        Float16 rounding moves a score by at most ``bound * |q|`` (relative rounding 2^-11 per entry,
        plus float32 summation, plus the subnormal floor). If the k-th exact score among the
        candidates beats the last candidate's float16 score by more than that, no other vector can
        enter the top k: the row is ``sure``. Other rows fall back to the full float32 scan. The
        copy (0.5x the proxies' memory) is built on first use; adds and removals keep it in step.
        """
        with self._copies_lock:  # concurrent searches build the copy once
            if self._half is None or (self._half[0] is not None and self._half[0].ntotal != len(xb)):
                self._half = (None, 0.0)
                if max(xb.max(), -xb.min()) < _FP16_MAX:  # no |xb| temporary: that would double the memory
                    half = faiss.IndexScalarQuantizer(
                        xb.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
                    )
                    half.add(xb)
                    self._half = (half, _half_bound(xb))
            half, bound = self._half
        n_q = len(Q)
        if half is None:  # entries beyond float16's range: every row takes the float32 scan
            return np.zeros((n_q, k), np.int64), np.zeros((n_q, k), np.float32), np.zeros(n_q, bool)
        # FAISS splits this scan over queries: one query leaves the other threads of its team spinning, and they
        # take a core from the BLAS scan a blend makes next (benchmarks/speed.py's blend rows)
        with one_faiss_thread() if n_q == 1 else nullcontext():
            approx, cand = half.search(Q, min(k + HALF_EXTRA, len(xb)))
        exact = np.einsum("qcd,qd->qc", xb[cand], Q)
        order = np.lexsort((cand, -exact), axis=1)[:, :k]  # best first; equal scores: lowest row first
        top, D = np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)
        slack = 1.5 * (bound * np.linalg.norm(Q, axis=1) + 2.0**-25 * np.abs(Q).sum(1))
        return top, D, D[:, -1] > approx[:, -1] + slack

    def _finish(self, D: np.ndarray, top: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows -> ids, and padding to ``m`` columns as FAISS answers (missing neighbours: id -1)."""
        row_ids = self._row_ids()
        if row_ids is not None:
            top = row_ids[top]
        k = top.shape[1]
        if k < m:
            D = np.pad(D, ((0, 0), (0, m - k)), constant_values=-np.inf)
            top = np.pad(top, ((0, 0), (0, m - k)), constant_values=-1)
        return D, top.astype(np.int64)

    def similarity(self, Q: np.ndarray) -> np.ndarray:
        """Similarity of every query to every stored vector, ``(n_q, ntotal)`` in row order (the
        ids of the rows: ``row_ids``), as ``search`` reports it; exact indexes only."""
        flat_metric = _FAISS_METRIC[self.metric]
        device = current()
        if device is not None and self.ntotal:
            X, X_sq = self._tensors(device)
            D = to_numpy(torch_search.scores(to_device(self.prepare(Q), device), X, self._kind, X_sq))
        elif flat_metric == faiss.METRIC_INNER_PRODUCT:  # numpy's BLAS, as gemm.py says why
            D = self.prepare(Q) @ self._stored().T
        else:
            D = faiss.pairwise_distances(self.prepare(Q), self._stored(), flat_metric)
        if flat_metric == faiss.METRIC_INNER_PRODUCT:
            return D
        return -np.sqrt(np.maximum(D, 0.0)) if flat_metric == faiss.METRIC_L2 else -D

    def pair_similarity(self, Q: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Similarity ``(n_q, r)`` of each query ``Q[i]`` to the stored vectors ``X[i]`` ``(n_q, r, d)``
        (as this index stores them: ``stored_rows``, ``reconstruct``), as ``search`` computes it."""
        Qp = self.prepare(Q)[:, None, :]
        X = np.asarray(X, np.float32)
        if self.metric in ("ip", "cosine"):
            return np.einsum("qrd,qrd->qr", X, np.broadcast_to(Qp, X.shape)).astype(np.float64)
        diff = np.abs(X - Qp)
        if self.metric == "manhattan":
            return -diff.sum(-1, dtype=np.float64)
        return (
            -diff.max(-1).astype(np.float64)
            if self.metric == "chebyshev"
            else -np.sqrt((diff.astype(np.float64) ** 2).sum(-1))
        )

    def stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of an exact index by row number (any shape of ``rows``, then ``d``)."""
        return self._stored()[rows]

    def row_ids(self) -> np.ndarray:
        """The id of each stored row of an exact index (row numbers where it has no ids)."""
        ids = self._row_ids()
        return np.arange(self.ntotal) if ids is None else ids

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["index"] = faiss.serialize_index(self.index)
        del state["_half"], state["_copies_lock"], state["_mirror"]  # rebuilt on first use
        return state

    def __setstate__(self, state: dict) -> None:
        state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(
            {"search_params": {}, **state, "_half": None, "_copies_lock": threading.Lock(), "_mirror": None}
        )

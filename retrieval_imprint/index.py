"""The proxy index: proxies in a FAISS index, searched under any of the AGG metrics.

Max aggregation is a top-1 search of this index; m-NN is a top-m search. FAISS metrics cover inner
product (``ip``; ``cosine`` L2-normalises both sides first), ``euclidean`` (L2), ``manhattan``
(L1) and ``chebyshev`` (Linf). ``mahalanobis`` is Euclidean search after the linear map
``x -> x L`` with ``L L^T = VI = (cov(W) + 1e-6 I)^-1``. Searches return similarities (higher is
closer: the inner product, or minus the distance) and distances (``1 - ip`` for the inner-product
metrics, used by distance-weighted votes).

Without ids, row ``i`` has id ``i`` (the estimator); with ids (``IndexIDMap2``), ids are the
caller's 64-bit numbers and can be removed by range (collections).
"""

from __future__ import annotations

from typing import Callable, Iterator

import faiss
import numpy as np

from ._checks import check_choice
from .normalize import l2_normalize

METRICS = ("ip", "cosine", "euclidean", "manhattan", "chebyshev", "mahalanobis")
_FAISS_METRIC = {
    "ip": faiss.METRIC_INNER_PRODUCT,
    "cosine": faiss.METRIC_INNER_PRODUCT,
    "euclidean": faiss.METRIC_L2,
    "manhattan": faiss.METRIC_L1,
    "chebyshev": faiss.METRIC_Linf,
    "mahalanobis": faiss.METRIC_L2,
}
MAHALANOBIS_RIDGE = 1e-6
APPROXIMATE_METRICS = ("ip", "cosine", "euclidean", "mahalanobis")
SMALL_BATCH = 20  # below this many queries FAISS does not use BLAS; neither path for m > SMALL_M
SMALL_M = 64
SMALL_ADD = 1000  # vectors below which an add runs on one thread
HALF_SCAN_MIN = 1 << 22  # stored floats (16 MiB) from which few queries scan a float16 copy first
HALF_EXTRA = 16  # candidates beyond m that the float16 scan hands to the exact re-rank
_FP16_MAX = 65504.0
# SQ4/6/8 codes span each dimension's range in the first add's proxies; classes added later fall
# outside it and clip. Widening the range by a quarter each side costs resolution but clips less
# (raised recall@1 in a one-off test on benchmarks/scale.py data; not part of any benchmark).
SQ_RANGE_MARGIN = 0.25


def mahalanobis_map(W: np.ndarray) -> np.ndarray:
    """``L`` ``(d, d)`` with ``L L^T = (cov(W) + 1e-6 I)^-1``, so ``|(x - y) L|`` is the Mahalanobis distance."""
    if len(W) < 2:
        raise ValueError("metric='mahalanobis' needs at least 2 proxies to estimate their covariance; "
                         "got 1 proxy (one class with one proxy, or 1 sample)")
    cov = np.cov(W.astype(np.float64), rowvar=False) + MAHALANOBIS_RIDGE * np.eye(W.shape[1])
    return np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: about 2 sqrt(n), a power of two in [16, 65536]."""
    return int(2 ** np.clip(np.round(np.log2(2 * np.sqrt(max(n_vectors, 1)))), 4, 16))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: nlist / 64, at least 32 (IVF4096 -> 64; DESIGN §5 measured recall@1
    0.96 at nprobe 16 and 0.995 at 64 on 1M vectors, at well under the 5 ms query budget)."""
    return int(min(nlist, max(32, nlist // 64)))


def choose_index(n_vectors: int, d: int, memory_budget: int) -> str:
    """The most accurate index whose vectors (and ids) fit ``memory_budget`` bytes: exact ``Flat``,
    then ``IVF{nlist},SQfp16`` (2 bytes per dimension), ``IVF{nlist},SQ8`` (1 byte), then
    ``IVF{nlist},PQ{M}`` (M bytes)."""
    nlist = ivf_lists(n_vectors)
    if n_vectors * (4 * d + 8) <= memory_budget:
        return "Flat"
    for code, width in (("SQfp16", 2), ("SQ8", 1)):
        if n_vectors * (width * d + 8) + nlist * d * 4 <= memory_budget:
            return f"IVF{nlist},{code}"
    for m in (64, 48, 32, 24, 16, 8, 4):
        if d % m == 0 and n_vectors * (m + 8) + nlist * d * 4 + 256 * d * 4 <= memory_budget:
            return f"IVF{nlist},PQ{m}"
    raise ValueError(f"a memory budget of {memory_budget:,} bytes cannot hold {n_vectors:,} proxies of dimension {d}")


def parse_size(text: str | int) -> int:
    """Bytes from ``"8GB"``, ``"512MiB"``, ``"1.5G"`` or an int."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}
    value = str(text).strip().upper()
    number = value.rstrip("KMGTIB ")
    unit = value[len(number):].strip()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ValueError(f"memory budget {text!r} is not a size like 8GB or 512MiB") from None


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


class ProxyIndex:
    """An exact FAISS index of dimension ``d`` under ``metric`` (``transform``: the Mahalanobis map)."""

    def __init__(self, d: int, metric: str = "ip", transform: np.ndarray | None = None, *,
                 with_ids: bool = False, index: faiss.Index | None = None) -> None:
        self.metric = check_choice("metric", metric, METRICS)
        if metric == "mahalanobis" and transform is None:
            raise ValueError("metric='mahalanobis' needs its linear map (see mahalanobis_map)")
        self.transform = transform
        if index is None:
            index = _flat(d, _FAISS_METRIC[metric])
            if with_ids:
                index = faiss.IndexIDMap2(index)
        self.index = index
        # float16 copy and its error bound (copy None: entries beyond float16's range); see _half_scan
        self._half: tuple[faiss.Index | None, float] | None = None

    @classmethod
    def build(cls, W: np.ndarray, metric: str = "ip") -> "ProxyIndex":
        """Index of proxies ``W`` ``(P, d)``, row ``i`` with id ``i`` (Mahalanobis map fitted on ``W``)."""
        out = cls(W.shape[1], metric, mahalanobis_map(W) if metric == "mahalanobis" else None)
        out.add(W)
        return out

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @classmethod
    def trained(cls, factory: str, W: np.ndarray, metric: str, transform: np.ndarray | None,
                seed: int = 0, *, prepared: bool = False) -> "ProxyIndex":
        """An empty approximate index (a FAISS factory string, e.g. ``IVF4096,SQ8``) trained on ``W``.

        Training uses at most 40 points per inverted list (a seeded sample) and 10 k-means
        iterations: the proxies are k-means centroids already, and a full-size training of
        thousands of lists takes minutes on two cores (DESIGN §5). Scalar quantizers with trained
        ranges get a margin (``SQ_RANGE_MARGIN``) for the classes added later. ``prepared``: ``W``
        is already as the index stores it (decoded from another index), so ``prepare`` is skipped.
        """
        if metric not in APPROXIMATE_METRICS:
            raise ValueError(f"index={factory!r} supports metrics {', '.join(APPROXIMATE_METRICS)}; "
                             f"metric={metric!r} needs index='Flat'")
        out = cls(W.shape[1], metric, transform)
        try:
            out.index = faiss.index_factory(W.shape[1], factory, _FAISS_METRIC[metric])
        except RuntimeError as exc:
            raise ValueError(f"index={factory!r} is not a FAISS factory string FAISS accepts "
                             f"({str(exc).strip().splitlines()[-1]})") from None
        ivf = faiss.try_extract_index_ivf(out.index)
        if isinstance(out.index, faiss.IndexHNSW) or ivf is None:
            raise ValueError(f"index={factory!r}: collections support Flat and IVF indexes (IVF..., with Flat, "
                             "SQ or PQ codes); HNSW cannot remove vectors")
        if len(W) < ivf.nlist:
            raise ValueError(f"index={factory!r} needs at least {ivf.nlist} proxies to train its lists; the first "
                             f"add made {len(W)}: add more classes at once, or use fewer lists")
        sample = np.random.default_rng(seed).permutation(len(W))[: 40 * ivf.nlist]
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        sq = getattr(faiss.downcast_index(ivf), "sq", None)
        if sq is not None and sq.rangestat == faiss.ScalarQuantizer.RS_minmax:
            sq.rangestat_arg = SQ_RANGE_MARGIN
        train = W[np.sort(sample)]
        out.index.train(train if prepared else out.prepare(train, "proxies"))
        return out

    def retrainable(self) -> bool:
        """True for an IVF index whose codes decode to the stored vectors (IVF-Flat) or to within
        float16 precision (SQfp16), so re-encoding them under new lists loses nothing that matters.
        SQ8 or PQ codes would add a second quantisation error, and a pre-transform ("PCA64,IVF...")
        stores vectors in another space: those keep their first training."""
        ivf = faiss.downcast_index(self.index)
        return isinstance(ivf, faiss.IndexIVFFlat) or (
            isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16)

    def decoded_lists(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of each non-empty inverted list of an IVF index, decoded from its codes;
        only the sorted positions ``rows`` (counted across the lists in order) if given."""
        ivf = faiss.extract_index_ivf(self.index)
        lists, listno_bytes = ivf.invlists, ivf.coarse_code_size()
        start = 0
        for no in range(ivf.nlist):
            n = lists.list_size(no)
            if not n:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(no), n).astype(np.int64)
            codes = faiss.rev_swig_ptr(lists.get_codes(no), n * lists.code_size).reshape(n, lists.code_size)
            if rows is not None:
                lo, hi = np.searchsorted(rows, [start, start + n])
                ids, codes = ids[rows[lo:hi] - start], codes[rows[lo:hi] - start]
            start += n
            listno = np.frombuffer(np.int64(no).astype("<i8").tobytes()[:listno_bytes], np.uint8)
            yield ids, ivf.sa_decode(np.hstack([np.broadcast_to(listno, (len(ids), listno_bytes)), codes]))

    def retrained(self, factory: str, seed: int = 0) -> tuple["ProxyIndex", "ProxyIndex"]:
        """This IVF index's vectors under lists retrained on a sample of them: ``(template, filled)``,
        the new trained empty index and a copy holding every vector (same ids), re-encoded.

        Lists trained on a collection's first add fit classes added later poorly: their vectors
        crowd into a few lists, so recall at a given nprobe falls and queries slow down. Vectors
        are decoded list by list, never all at once.
        """
        if not self.retrainable():
            raise ValueError(f"index={factory!r}: only IVF-Flat and IVF-SQfp16 proxy indexes can be retrained "
                             "(other codes would be quantised twice)")
        nlist = faiss.extract_index_ivf(self.index).nlist
        sample = np.sort(np.random.default_rng(seed).permutation(self.ntotal)[: 40 * nlist])
        train = np.concatenate([X for _, X in self.decoded_lists(sample)])  # decodes only the sample
        template = ProxyIndex.trained(factory, train, self.metric, self.transform, seed, prepared=True)
        filled = template.empty_like()
        for ids, X in self.decoded_lists():  # a list at a time: ~2 sqrt(n) vectors, a GEMM-sized batch
            filled.index.add_with_ids(X, ids)
        return template, filled

    def empty_like(self) -> "ProxyIndex":
        """An empty index of the same kind (and training)."""
        out = ProxyIndex(self.index.d, self.metric, self.transform)
        out.index = faiss.clone_index(self.index)
        out.index.reset()
        return out

    def set_search(self, params: dict[str, int] | None) -> None:
        """Search parameters of an approximate index, e.g. ``{"nprobe": 16}``."""
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, ",".join(f"{k}={v}" for k, v in params.items()))

    @property
    def ids(self) -> np.ndarray:
        """Ids of the stored vectors (an ``IndexIDMap2`` or IVF index)."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is None:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

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
        threads = faiss.omp_get_max_threads()
        if len(W) < SMALL_ADD:  # OpenMP start-up costs more than a few vectors' work (DESIGN §5)
            faiss.omp_set_num_threads(1)
        try:
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
        finally:
            faiss.omp_set_num_threads(threads)

    def merge(self, other: faiss.Index) -> None:
        """Move every vector of ``other`` (a FAISS index of the same kind) into this one."""
        self._half = None
        self.index.merge_from(other, 0)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids; returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._remove(faiss.IDSelectorBatch(ids), lambda stored: np.isin(stored, ids))

    def remove_range(self, lo: int, hi: int) -> int:
        """Remove every id in ``[lo, hi)``; returns how many were removed."""
        return self._remove(faiss.IDSelectorRange(int(lo), int(hi)), lambda stored: (stored >= lo) & (stored < hi))

    def _remove(self, selector: faiss.IDSelector, chosen: Callable[[np.ndarray], np.ndarray]) -> int:
        """Remove the selected ids; the float16 copy drops the same rows (FAISS keeps the order)."""
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

    def search(self, Q: np.ndarray, m: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``m`` closest proxies of each query: ``(similarity, distance, ids)``, each ``(n_q, m)``.

        Fewer than ``m`` stored proxies: the missing columns have id -1.
        """
        Q = self.prepare(Q)
        exact = isinstance(self.index, (faiss.IndexFlat, faiss.IndexIDMap2))
        if exact and self.metric in ("ip", "cosine") and len(Q) < SMALL_BATCH and m <= SMALL_M and self.ntotal:
            D, ids = self._gemv_search(Q, m)
        else:
            D, ids = self.index.search(Q, m)
        if self.metric in ("ip", "cosine"):
            return D, np.maximum(1.0 - D, 0.0), ids
        if self.metric in ("euclidean", "mahalanobis"):
            D = np.sqrt(np.maximum(D, 0.0))
        return -D, D, ids

    def _row_ids(self) -> np.ndarray | None:
        """The id of each stored row, a view of ``IndexIDMap2``'s map (None: ids are row numbers)."""
        if not isinstance(self.index, faiss.IndexIDMap2):
            return None
        return faiss.rev_swig_ptr(self.index.id_map.data(), self.ntotal)

    def _stored(self) -> np.ndarray:
        """FAISS's own storage of an exact index as a ``(ntotal, d)`` float32 view (no copy)."""
        flat = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap2) else self.index
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def _gemv_search(self, Q: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-``m`` of a few queries with numpy over FAISS's own vector storage.

        FAISS searches fewer than 20 queries with per-vector SIMD loops; one BLAS GEMV over the
        same memory is about twice as fast here (benchmarks/speed.py), same results. From
        ``HALF_SCAN_MIN`` stored floats a float16 scan goes first (``_half_scan``).
        """
        xb = self._stored()
        k = min(m, len(xb))
        if k < len(xb) and xb.size >= HALF_SCAN_MIN:
            top, D, sure = self._half_scan(xb, Q, k)
            rows = np.flatnonzero(~sure)
            if len(rows):
                top[rows], D[rows] = self._gemv_top(xb, Q[rows], k)
        else:
            top, D = self._gemv_top(xb, Q, k)
        return self._finish(D, top, m)

    @staticmethod
    def _gemv_top(xb: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the exact top-``k`` stored vectors of each query, best first."""
        S = Q @ xb.T
        if k == 1:  # argmax is a single pass; argpartition copies and selects
            top = S.argmax(1)[:, None]
        else:
            top = (np.argpartition(S, S.shape[1] - k, axis=1)[:, -k:] if k < S.shape[1]
                   else np.tile(np.arange(k), (len(Q), 1)))
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, 1), axis=1, kind="stable"), 1)
        return top, np.take_along_axis(S, top, 1)

    def _half_scan(self, xb: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-``k`` from a float16 scan (half the bytes of float32, and a single query is
        memory-bound) and an exact re-rank of its ``k + HALF_EXTRA`` best.

        Float16 rounding moves a score by at most ``bound * |q|`` (relative rounding 2^-11 per entry,
        plus float32 summation, plus the subnormal floor). If the k-th exact score among the
        candidates beats the last candidate's float16 score by more than that, no other vector can
        enter the top k: the row is ``sure``. Other rows fall back to the full float32 scan. The
        copy (0.5x the proxies' memory) is built on first use; adds and removals keep it in step.
        """
        if self._half is None or (self._half[0] is not None and self._half[0].ntotal != len(xb)):
            self._half = (None, 0.0)
            if max(xb.max(), -xb.min()) < _FP16_MAX:  # no |xb| temporary: that would double the memory
                half = faiss.IndexScalarQuantizer(xb.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
                half.add(xb)
                self._half = (half, _half_bound(xb))
        half, bound = self._half
        n_q = len(Q)
        if half is None:  # entries beyond float16's range: every row takes the float32 scan
            return np.zeros((n_q, k), np.int64), np.zeros((n_q, k), np.float32), np.zeros(n_q, bool)
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
        """Similarity of every query to every proxy, ``(n_q, P)`` in id order (index without ids)."""
        sim, _, ids = self.search(Q, self.ntotal)
        out = np.empty_like(sim)
        np.put_along_axis(out, ids, sim, axis=1)
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["index"] = faiss.serialize_index(self.index)
        state["_half"] = None  # rebuilt on first use
        return state

    def __setstate__(self, state: dict) -> None:
        state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update({"_half": None, **state})

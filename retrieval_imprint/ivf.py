"""Approximate proxy indexes: which IVF index to build, how to train and retrain its lists, and
per-call search parameters.

Collections of millions of classes keep their proxies in a FAISS IVF index (``IVF{nlist},SQfp16``
and the like). The lists are trained once, on the first add's proxies, and retrained on a sample of
all live proxies when the collection has outgrown them. Search parameters (``nprobe``...) travel
with each search as a ``faiss.SearchParameters`` object: the shared index is never mutated, so
concurrent queries with different parameters cannot see each other's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist, get_invlist_sizes

from .device import current, faiss_gpu, to_gpu
from .errors import InvalidParameterError

APPROXIMATE_METRICS = ("ip", "cosine", "euclidean", "mahalanobis")
TRAIN_PER_LIST = 40  # training points per inverted list (a seeded sample)
TRAIN_ITERATIONS = 10
ADD_BATCH = 1 << 16  # vectors added per call: one GEMM-sized coarse assignment, not one per list
# SQ4/6/8 codes span each dimension's range in the first add's proxies; classes added later fall
# outside it and clip. Widening the range by a quarter each side costs resolution but clips less
# (raised recall@1 in a one-off test on benchmarks/scale.py data; not part of any benchmark).
SQ_RANGE_MARGIN = 0.25
SEARCH_KEYS = ("nprobe", "max_codes", "quantizer_efSearch", "k_factor")  # k_factor: refine.py's
# An HNSW coarse quantizer returns the nprobe nearest lists only if its beam (efSearch) is wider than
# nprobe: without a quantizer_efSearch of their own, searches use this many candidates per list probed
# (FAISS's guidance for IVF..._HNSW indexes: efSearch >= nprobe).
QUANTIZER_EF_PER_PROBE = 2
QUANTIZER_EF_MIN = 64
# dimensions per 4-bit code of a refined index's candidates (refined), finest first: at 100k realistic
# classes 8 dimensions a code needed 1,024 candidates re-ranked per result to clear recall 0.99, 4 far fewer
FAST_SCAN_DIMS = (4, 8)
HNSW_QUANTIZER_LISTS = 1 << 14  # from this many lists, choose_index finds them with an HNSW graph


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: about 2 sqrt(n), a power of two in [16, 65536]."""
    return int(2 ** np.clip(np.round(np.log2(2 * np.sqrt(max(n_vectors, 1)))), 4, 16))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query where no tuning applies (an index FAISS cannot decode list by
    list): nlist / 64, at least 32."""
    return int(min(nlist, max(32, nlist // 64)))


def refined(lists: str, d: int, dims: int = FAST_SCAN_DIMS[0]) -> str:
    """The refined index (refine.py) on ``lists`` (``IVF4096`` or ``IVF16384_HNSW32``) for ``d``-d
    vectors: 4-bit fast-scan PQ codes of about ``dims`` dimensions each, re-ranked from float16 codes."""
    return f"{lists},PQ{_fast_scan_codes(d, dims)}x4fs,Refine(SQfp16)"


def _fast_scan_codes(d: int, dims: int) -> int:
    """Codes per vector of about ``dims`` dimensions each: the largest divisor of ``d`` up to ``d / dims``."""
    return max(m for m in range(1, max(d // dims, 1) + 1) if d % m == 0)


def choose_index(n_vectors: int, d: int, memory_budget: int) -> str:
    """The most accurate index whose resident memory fits ``memory_budget`` bytes: exact ``Flat``
    (4 bytes per dimension and an id), else the refined index (``refined``: resident are its
    fast-scan candidates, half a byte per code of 4 dimensions, or of 8 where those do not fit, an
    id, and the coarse quantizer; its float16
    codes stay in a memory-mapped file and are read only for the candidates re-ranked, so it
    answers as IVF-SQfp16 does, many times faster), else ``IVF{nlist},PQ{M}`` (M bytes). From
    ``HNSW_QUANTIZER_LISTS`` lists an HNSW graph finds a vector's lists (``IVF{nlist}_HNSW32``,
    FAISS's advice for 10M vectors and more) instead of a comparison with every centroid."""
    nlist = ivf_lists(n_vectors)
    lists = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"
    if n_vectors * (4 * d + 8) <= memory_budget:
        return "Flat"
    for dims in FAST_SCAN_DIMS:
        if n_vectors * ((_fast_scan_codes(d, dims) + 1) // 2 + 8) + nlist * d * 4 <= memory_budget:
            return refined(lists, d, dims)
    for m in (64, 48, 32, 24, 16, 8, 4):
        if d % m == 0 and n_vectors * (m + 8) + nlist * d * 4 + 256 * d * 4 <= memory_budget:
            return f"{lists},PQ{m}"
    raise InvalidParameterError(
        f"a memory budget of {memory_budget:,} bytes cannot hold {n_vectors:,} proxies of dimension {d}"
    )


def train(
    factory: str,
    W: np.ndarray,
    metric: str,
    faiss_metric: int,
    seed: int = 0,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> faiss.Index:
    """An empty IVF index (a FAISS factory string, e.g. ``IVF4096,SQ8``) trained on ``W``, mapped
    by ``prepare`` to the space the index stores (None: ``W`` is stored as it is).

    Training uses at most ``TRAIN_PER_LIST`` points per list (a seeded sample) and
    ``TRAIN_ITERATIONS`` k-means iterations: the proxies are k-means centroids already, and a
    full-size training of thousands of lists takes minutes on two cores. Scalar quantizers with
    trained ranges get a margin (``SQ_RANGE_MARGIN``) for the classes added later.
    """
    if metric not in APPROXIMATE_METRICS:
        raise InvalidParameterError(
            f"index={factory!r} supports metrics {', '.join(APPROXIMATE_METRICS)}; metric={metric!r} needs index='Flat'"
        )
    try:
        index = faiss.index_factory(W.shape[1], factory, faiss_metric)
    except RuntimeError as exc:
        raise InvalidParameterError(
            f"index={factory!r} is not a FAISS factory string FAISS accepts ({str(exc).strip().splitlines()[-1]})"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(index, faiss.IndexHNSW) or ivf is None:
        raise InvalidParameterError(
            f"index={factory!r}: collections support Flat and IVF indexes (IVF..., with "
            "Flat, SQ or PQ codes); HNSW cannot remove vectors"
        )
    if len(W) < ivf.nlist:
        raise InvalidParameterError(
            f"index={factory!r} needs at least {ivf.nlist} proxies to train its lists; the "
            f"first add (or train) made {len(W)}: give it more classes at once, or use fewer lists"
        )
    sample = np.sort(np.random.default_rng(seed).permutation(len(W))[: TRAIN_PER_LIST * ivf.nlist])
    ivf.cp.niter = TRAIN_ITERATIONS
    ivf.cp.seed = seed
    sq = getattr(faiss.downcast_index(ivf), "sq", None)
    if sq is not None and sq.rangestat == faiss.ScalarQuantizer.RS_minmax:
        sq.rangestat_arg = SQ_RANGE_MARGIN
    gpu = faiss_gpu(current())
    if gpu is not None:  # the assignment step of training, on a GPU copy of a flat index (FAISS's way)
        ivf.clustering_index = to_gpu(faiss.IndexFlat(ivf.d, ivf.metric_type), gpu)
    index.train(np.ascontiguousarray(W[sample] if prepare is None else prepare(W[sample])))
    ivf.clustering_index = None
    return index


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def retrainable(index: faiss.Index) -> bool:
    """True for an IVF index whose codes decode to the stored vectors (IVF-Flat) or to within
    float16 precision (SQfp16), so re-encoding them under new lists loses nothing that matters.
    SQ8 or PQ codes would add a second quantisation error, and a pre-transform ("PCA64,IVF...")
    stores vectors in another space: those keep their first training."""
    ivf = faiss.downcast_index(index)
    return isinstance(ivf, faiss.IndexIVFFlat) or (
        isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    )


def list_ids(index: faiss.Index) -> np.ndarray:
    """Ids of every vector of an IVF index, list after list (the codes are not copied)."""
    lists = faiss.extract_index_ivf(index).invlists
    sizes = get_invlist_sizes(lists)
    parts = [faiss.rev_swig_ptr(lists.get_ids(int(no)), int(sizes[no])).copy() for no in np.flatnonzero(sizes)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def stored_list(invlists: Any, no: int) -> tuple[np.ndarray, np.ndarray]:
    """List ``no``'s ids and codes ``(n, code_size)`` as views of where they lie (a mapped file's pages)."""
    n = invlists.list_size(no)
    if not n:
        return np.zeros(0, np.int64), np.zeros((0, invlists.code_size), np.uint8)
    codes = faiss.rev_swig_ptr(invlists.get_codes(no), n * invlists.code_size).reshape(n, invlists.code_size)
    return faiss.rev_swig_ptr(invlists.get_ids(no), n), codes


def decoded_lists(index: faiss.Index, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` of each non-empty inverted list, decoded from its codes; only the sorted
    positions ``rows`` (counted across the lists in order) if given."""
    ivf = faiss.extract_index_ivf(index)
    listno_bytes = ivf.coarse_code_size()
    start = 0
    for no in np.flatnonzero(get_invlist_sizes(ivf.invlists)):
        ids, codes = get_invlist(ivf.invlists, int(no))
        n = len(ids)
        if rows is not None:
            lo, hi = np.searchsorted(rows, [start, start + n])
            ids, codes = ids[rows[lo:hi] - start], codes[rows[lo:hi] - start]
        start += n
        listno = np.frombuffer(np.int64(no).astype("<i8").tobytes()[:listno_bytes], np.uint8)
        yield ids, ivf.sa_decode(np.hstack([np.broadcast_to(listno, (len(ids), listno_bytes)), codes]))


def retrain(
    parts: Sequence[tuple[faiss.Index, np.ndarray | None]], factory: str, metric: str, faiss_metric: int, seed: int = 0
) -> tuple[faiss.Index, faiss.Index]:
    """The vectors of these IVF indexes, less each one's sorted ``dead`` ids, under lists retrained on
    a sample of them: ``(template, filled)``, the new trained empty index and one holding every live
    vector (same ids), re-encoded.

    Lists trained on a collection's first add fit classes added later poorly: their vectors crowd
    into a few lists, so recall at a given nprobe falls and queries slow down. Vectors are decoded
    list by list (no copy of the parts is made) and added ``ADD_BATCH`` at a time.
    """
    if not all(retrainable(index) for index, _ in parts):
        raise InvalidParameterError(
            f"index={factory!r}: only IVF-Flat and IVF-SQfp16 proxy indexes can be "
            "retrained (other codes would be quantised twice)"
        )
    nlist = faiss.extract_index_ivf(parts[0][0]).nlist
    total = sum(index.ntotal for index, _ in parts)
    sample = np.sort(np.random.default_rng(seed).permutation(total)[: TRAIN_PER_LIST * nlist])
    sampled, start = [], 0
    for index, dead in parts:  # decodes only the sample
        mine = sample[(sample >= start) & (sample < start + index.ntotal)] - start
        sampled += [X[alive(ids, dead)] for ids, X in decoded_lists(index, mine)]
        start += index.ntotal
    template = train(factory, np.concatenate(sampled), metric, faiss_metric, seed)
    filled = faiss.clone_index(template)
    pieces = ((X[live], ids[live]) for index, dead in parts for ids, X in decoded_lists(index)
              for live in [alive(ids, dead)])  # fmt: skip
    add_batched(filled, pieces)
    return template, filled


def add_batched(index: faiss.Index, pieces: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Add ``(vectors, ids)`` pieces (a list's worth each) to ``index`` ``ADD_BATCH`` vectors at a
    time: one GEMM-sized coarse assignment per call instead of one small one per list."""
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    for piece in itertools.chain(pieces, [None]):  # lazily: a piece is decoded when it is added
        if piece is not None:
            batch.append(piece)
        if batch and (piece is None or sum(len(ids) for _, ids in batch) >= ADD_BATCH):
            index.add_with_ids(np.concatenate([X for X, _ in batch]), np.concatenate([ids for _, ids in batch]))
            batch.clear()


def alive(ids: np.ndarray, dead: np.ndarray | None) -> np.ndarray:
    """Which ``ids`` are not in the sorted ``dead``."""
    if dead is None or not len(dead):
        return np.ones(len(ids), bool)
    return dead[np.minimum(np.searchsorted(dead, ids), len(dead) - 1)] != ids


Assignment = tuple[np.ndarray, np.ndarray]  # a coarse search's (distances, list numbers), each (n, nprobe)
Verify = Callable[[np.ndarray | None], None]  # checks lists before they are read (verified.ListVerifier.ensure)


def assign(index: faiss.Index, Q: np.ndarray, params: dict[str, int] | None) -> Assignment:
    """The lists IVF ``index`` probes for queries ``Q`` under ``params`` (``nprobe``, an HNSW beam): one
    coarse search, which every index sharing the quantizer reuses (``search_assigned``, ``use_quantizer``)."""
    ivf = _ivf(index)
    nprobe = min(int((params or {}).get("nprobe", ivf.nprobe)), ivf.nlist)
    searched: Any = search_parameters(index, {**(params or {}), "nprobe": nprobe})
    return ivf.quantizer.search(np.ascontiguousarray(Q, np.float32), nprobe, params=searched.quantizer_params)


def _ivf(index: faiss.Index) -> Any:
    """``index`` if it is an IVF index (a mapped part's: downcast once), else the IVF inside it, downcast (10 us), or None."""
    if isinstance(index, faiss.IndexIVF):
        return index
    inner = faiss.try_extract_index_ivf(index)
    return faiss.downcast_index(inner) if inner is not None else None


def search_assigned(
    index: faiss.Index,
    Q: np.ndarray,
    k: int,
    assigned: Assignment,
    params: dict[str, int] | None,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` of the lists ``assigned`` (``assign``) only, with ``params``' other settings."""
    ivf = _ivf(index)
    # called directly, search_preassigned splits a batch over threads only in mode 3 (else 1.5 s, not 0.9 s, dev probe)
    if ivf.parallel_mode != 3:
        ivf.parallel_mode = 3
    if isinstance(ivf, faiss.IndexIVFFastScan):  # fewer queries than threads: split the lists probed over them
        # (FAISS's implem 14; 0 lets it choose, which scans one query's lists on one thread). A setting of the
        # index: a concurrent search of another size may run with this one's, which changes speed, not answers
        ivf.implem = 14 if len(Q) < faiss.omp_get_max_threads() else 0
    Dq, Iq = assigned
    searched = search_parameters(index, {**(params or {}), "nprobe": Iq.shape[1]}, selector)
    Q = np.ascontiguousarray(Q, np.float32)
    D, ids = np.empty((len(Q), k), np.float32), np.empty((len(Q), k), np.int64)
    pointers = [faiss.swig_ptr(a) for a in (Q, Iq, Dq, D, ids)]  # the Python wrapper takes no parameters
    ivf.search_preassigned_c(len(Q), pointers[0], k, *pointers[1:], False, searched)
    return D, ids


def use_quantizer(index: faiss.Index, owner: faiss.Index) -> faiss.Index:
    """IVF ``index`` finding its lists with ``owner``'s coarse quantizer: the same object, not a copy;
    its own is freed and ``owner`` kept alive."""
    ivf = faiss.extract_index_ivf(index)
    own = faiss.downcast_index(ivf.quantizer)
    ivf.own_fields = False
    ivf.quantizer = faiss.extract_index_ivf(owner).quantizer
    type(own).__swig_destroy__(own)  # nothing else points to it
    index.referenced_objects = [owner]  # FAISS holds a raw pointer to its quantizer
    return index


def search_verified(
    index: faiss.Index,
    Q: np.ndarray,
    k: int,
    params: dict[str, int] | None,
    selector: faiss.IDSelector | None,
    verify: Verify,
    assigned: Assignment | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` calling ``verify(lists)`` on the lists it will scan (those ``assigned``, or found
    here) first; an index that is not a plain IVF (in a transform) calls ``verify(None)``: every list."""
    if not isinstance(_ivf(index), faiss.IndexIVF):
        verify(None)
        return index.search(Q, k, params=search_parameters(index, params, selector))
    assigned = assigned if assigned is not None else assign(index, Q, params)
    verify(assigned[1])
    return search_assigned(index, Q, k, assigned, params, selector)


def hnsw_quantized(index: faiss.Index) -> bool:
    """Whether the IVF ``index`` finds its lists with an HNSW graph (``IVF{nlist}_HNSW32,...``)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


def with_quantizer_beam(params: dict[str, int] | None, hnsw: bool) -> dict[str, int] | None:
    """``params`` with the beam of an HNSW coarse quantizer (``hnsw``: ``hnsw_quantized``, known once
    per index, not looked up per query) widened to the lists probed, unless they set it; as they are
    for a flat quantizer."""
    if not hnsw or not params or "nprobe" not in params or "quantizer_efSearch" in params:
        return params
    return {**params, "quantizer_efSearch": max(QUANTIZER_EF_MIN, QUANTIZER_EF_PER_PROBE * int(params["nprobe"]))}


def search_parameters(
    index: faiss.Index, params: dict[str, int] | None, selector: faiss.IDSelector | None = None
) -> faiss.SearchParameters | None:
    """``params`` (``nprobe``, ``max_codes``, ``quantizer_efSearch``; ``k_factor`` is refine.py's) as the object FAISS takes with
    one search call, searching only the ids ``selector`` accepts if given; None for neither."""
    if not params and selector is None:
        return None
    params = params or {}
    unknown = [key for key in params if key not in SEARCH_KEYS]
    if unknown:
        raise InvalidParameterError(f"search parameter {unknown[0]!r} is not known; expected " + ", ".join(SEARCH_KEYS))
    out = faiss.SearchParametersIVF()
    if selector is not None:
        out.sel = selector  # a raw pointer too: the caller keeps the selector alive
    for key in ("nprobe", "max_codes"):
        if key in params:
            setattr(out, key, int(params[key]))
    if "quantizer_efSearch" in params:
        hnsw = faiss.SearchParametersHNSW()
        hnsw.efSearch = int(params["quantizer_efSearch"])
        out.quantizer_params, out.referenced = hnsw, hnsw  # FAISS holds a raw pointer: keep it alive
    if isinstance(index, faiss.IndexPreTransform):
        wrapped = faiss.SearchParametersPreTransform()
        wrapped.index_params, wrapped.referenced = out, out  # FAISS holds a raw pointer: keep it alive
        return wrapped
    return out

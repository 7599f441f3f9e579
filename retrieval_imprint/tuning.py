"""Tuning an IVF index's search: the smallest nprobe (and a refined index's k_factor) at which its
top-1 equals exact search's for ``RECALL_TARGET`` of the queries, measured on held-out proxies, or on
the queries a caller gives (a streaming ls head's mapped samples: its class means are not what it is
asked, lshead.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import faiss
import numpy as np

from .ivf import decoded_lists, hnsw_quantized, search_parameters, with_quantizer_beam

RECALL_TARGET = 0.99  # recall@1 against exact search that the tuned nprobe reaches (tune_nprobe)
# held-out proxies it is measured on (+-0.0031 at 0.99, one binomial s.e.); the tuned search must clear the
# target by that s.e., so that other queries reach it too (at 1M realistic classes, a search tuned to 0.990
# on 500 proxies gave 0.987 on held-out queries in one run, 0.994 in another)
TUNE_QUERIES = 1000


Searcher = Callable[[np.ndarray, int, dict[str, int]], np.ndarray]  # (queries, k, params) -> ids


def tune_nprobe(
    index: faiss.Index,
    target: float = RECALL_TARGET,
    n_queries: int = TUNE_QUERIES,
    seed: int = 0,
    refined: Searcher | None = None,
    k_factors: Sequence[int] = (),
    queries: np.ndarray | None = None,
) -> dict[str, float | int] | None:
    """The smallest nprobe at which the approximate top-1 of held-out proxies equals the exact
    top-1 for at least ``target`` of them, by a margin of one binomial standard error of the measured
    recall: ``{"nprobe", "recall", "target", "queries", "proxies"}``;
    None for an index that cannot be decoded list by list (a pre-transform) or holds < 2 vectors.

    Each query is a proxy of the index, decoded, with its own entry left out of both searches
    (leave-one-out): the other proxies are what it must find. Exact search runs over the decoded
    vectors list by list, so memory stays at one list. nprobe doubles until the target is met,
    then bisects down to the smallest that meets it on the same queries.

    ``refined``: the search queries run instead (refine.py's candidates re-ranked), which also takes
    a ``k_factor``. The nprobe at which it meets the target with the largest of ``k_factors`` comes
    first (about where the index's own codes would); then the smallest k_factor that meets it there
    (``"k_factor"`` in the result); then the smallest nprobe for that k_factor.

    ``queries``: measure on these (at most ``n_queries``), nothing left out, instead of held-out proxies.
    """
    if isinstance(index, faiss.IndexPreTransform) or index.ntotal < 2:
        return None
    ivf = faiss.extract_index_ivf(index)
    if queries is None:
        rows = np.sort(np.random.default_rng(seed).permutation(index.ntotal)[:n_queries])
        parts = list(decoded_lists(index, rows))
        own = np.concatenate([ids for ids, _ in parts])
        Q = np.ascontiguousarray(np.concatenate([X for _, X in parts]), np.float32)
    else:  # no id is -1: nothing is left out
        Q = np.ascontiguousarray(queries[:n_queries], np.float32)
        own = np.full(len(Q), -1, np.int64)
    larger_is_better = index.metric_type == faiss.METRIC_INNER_PRODUCT
    heap = faiss.ResultHeap(len(Q), 2, keep_max=larger_is_better)
    for ids, X in decoded_lists(index):
        k = min(2, len(X))
        D, at = faiss.knn(Q, np.ascontiguousarray(X, np.float32), k, index.metric_type)
        if k < 2:  # a list of one vector: pad with a result that never wins
            D = np.hstack([D, np.full_like(D, -np.inf if larger_is_better else np.inf)])
            at = np.hstack([at, np.full_like(at, -1)])
        heap.add_result(np.ascontiguousarray(D, np.float32), np.where(at >= 0, ids[np.maximum(at, 0)], -1))
    heap.finalize()
    exact = _other(heap.I, own)

    hnsw = hnsw_quantized(index)

    def recall(nprobe: int, k_factor: int | None = None) -> float:
        params = with_quantizer_beam({"nprobe": nprobe}, hnsw) or {}
        if refined is not None and k_factor is not None:
            found = refined(Q, 2, {**params, "k_factor": k_factor})
        else:
            _, found = index.search(Q, 2, params=search_parameters(index, params))
        return float(np.mean(_other(found, own) == exact))

    def clears(found: float) -> bool:  # the target, by one binomial standard error of the measured recall
        return found - np.sqrt(found * (1 - found) / len(Q)) >= target

    def smallest(meets: Callable[[int], bool]) -> int:
        hi = 1
        while not meets(hi) and hi < ivf.nlist:
            hi = min(ivf.nlist, hi * 2)
        lo = hi // 2  # fails (or is 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        return hi

    if refined is not None and k_factors:  # every search refined: scanning the codes themselves costs 10x
        at = smallest(lambda n: clears(recall(n, k_factors[-1])))
        k_factor = next((k for k in k_factors if clears(recall(at, k))), k_factors[-1])
        nprobe = smallest(lambda n: clears(recall(n, k_factor)))
        out: dict[str, float | int] = {"nprobe": nprobe, "k_factor": k_factor}
    else:
        nprobe = smallest(lambda n: clears(recall(n)))
        out = {"nprobe": nprobe}
    chosen = out.get("k_factor")
    return out | {
        "recall": round(recall(nprobe, int(chosen) if chosen is not None else None), 4),
        "target": target,
        "queries": len(Q),
        "proxies": int(index.ntotal),
    }


def _other(found: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The best id of each row of ``found`` ``(n, 2)`` that is not the query's own id."""
    return np.where(found[:, 0] == own, found[:, 1], found[:, 0])

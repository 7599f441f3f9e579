"""Exact inner-product top-k with numpy's BLAS, in blocks: what an exact index searches with.

Why not FAISS's own search: it scans fewer than 20 queries with per-vector SIMD loops, where one
GEMV over the same memory is about twice as fast, and more with the OpenBLAS its wheel bundles
(0.3.15 in faiss-cpu 1.15), which predates recent CPUs: on a Sapphire Rapids-class Xeon its GEMM
ran several times slower than numpy's (benchmarks/speed.py's raw faiss column). As in FAISS's
own blocking, the scores are held ``BLOCK_SCORES`` at a time and the stored vectors read once per
``QUERY_BLOCK`` queries; each block's best are merged into a running top-k.
"""

from __future__ import annotations

import numpy as np

QUERY_BLOCK = 1024
BLOCK_SCORES = 1 << 24  # query x vector scores (64 MiB of float32) a block holds


def top_k(xb: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``xb`` ``(n, d)`` with the ``k`` (at most ``n``) largest inner products with each
    query of ``Q`` ``(q, d)``, best first, and those products: ``(q, k)`` each. Equal products keep
    the lower row first where ``k`` is 1, in any order otherwise (a tie either way is exact)."""
    tops, scores = [], []
    for i in range(0, len(Q), QUERY_BLOCK):
        q = Q[i : i + QUERY_BLOCK]
        step = max(k, BLOCK_SCORES // len(q))  # stored rows a block scores
        top, D = _block(q, xb[:step], k, 0)
        for j in range(step, len(xb), step):
            more, more_D = _block(q, xb[j : j + step], k, j)
            top, D = np.hstack([top, more]), np.hstack([D, more_D])
            best = _best(D, k)
            top, D = np.take_along_axis(top, best, 1), np.take_along_axis(D, best, 1)
        tops.append(top)
        scores.append(D)
    return np.concatenate(tops), np.concatenate(scores)


def _block(q: np.ndarray, xb: np.ndarray, k: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` (or all, if fewer) of one block of stored rows, numbered from ``first``."""
    S = q @ xb.T
    best = _best(S, k)
    return best + first, np.take_along_axis(S, best, 1)


def _best(S: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's ``k`` (at most all) largest entries of ``S``, best first."""
    k = min(k, S.shape[1])
    if k == 1:  # argmax is a single pass and keeps the first of equal entries
        return S.argmax(1)[:, None]
    top = np.argpartition(S, S.shape[1] - k, axis=1)[:, -k:] if k < S.shape[1] else np.tile(np.arange(k), (len(S), 1))
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, 1), axis=1, kind="stable"), 1)

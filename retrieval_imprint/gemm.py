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
GROUP = 32  # columns a group of _candidates holds


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
    if k * GROUP * 4 <= S.shape[1]:
        columns = _candidates(S, k)
        picked = np.argpartition(np.take_along_axis(S, columns, 1), columns.shape[1] - k, axis=1)[:, -k:]
        top = np.take_along_axis(columns, picked, 1)
    elif k < S.shape[1]:
        top = np.argpartition(S, S.shape[1] - k, axis=1)[:, -k:]
    else:
        top = np.tile(np.arange(k), (len(S), 1))
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, 1), axis=1, kind="stable"), 1)


def _candidates(S: np.ndarray, k: int) -> np.ndarray:
    """Per row, columns holding its ``k`` largest entries (but for ties): the ``k`` groups of ``GROUP``
    columns (every ``n // GROUP``-th) with the largest maxima, and the columns no group takes. The
    ``k``-th largest group maximum ``T`` is a lower bound of the ``k``-th largest entry (those ``k``
    groups hold ``k`` entries of at least ``T``), and no other group holds an entry above ``T``.
    Why: ``argpartition`` over every column was most of a shallow search of many queries; this reads
    ``S`` once in a vectorised ``max`` over whole rows and partitions ``n / GROUP`` maxima and
    ``k x GROUP`` candidates instead (speed.py's blend rows search 9 deep)."""
    q, n = S.shape
    width = n // GROUP
    maxima = S[:, : width * GROUP].reshape(q, GROUP, width).max(1)
    groups = np.argpartition(maxima, width - k, axis=1)[:, -k:]
    columns = (groups[:, :, None] + np.arange(GROUP) * width).reshape(q, -1)
    return np.hstack([columns, np.broadcast_to(np.arange(width * GROUP, n), (q, n - width * GROUP))])

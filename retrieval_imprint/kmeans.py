"""Batched k-means: Lloyd's algorithm for many classes at once, with greedy k-means++ seeding.

Imprinting runs one small k-means per class (tens to hundreds of points, k <= 20). Calling a
library once per class is dominated by per-call and thread start-up overhead (DESIGN §5), so this
module stacks classes into zero-padded ``(B, n_pad, d)`` blocks and does every step for the whole
block with one batched matmul. Each class keeps its own random stream (see ``_groups.uniforms``),
its own convergence test (scikit-learn's: centre shift <= tol * mean feature variance) and its own
empty-cluster repair, so its result does not depend on which other classes share the block.
"""

from __future__ import annotations

import numpy as np

from ._groups import Grouped, uniforms


def _sq_dists(P: np.ndarray, sq: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Squared distances ``(B, m, n_pad)`` from centres ``C`` ``(B, m, d)`` to points ``P``."""
    d2 = np.matmul(C, P.transpose(0, 2, 1))
    d2 *= -2.0
    d2 += sq[:, None, :]
    d2 += np.einsum("bmd,bmd->bm", C, C)[:, :, None]
    return np.maximum(d2, 0.0, out=d2)


def kmeans_pp(P: np.ndarray, mask: np.ndarray, k: int, keys: np.ndarray, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding of each padded class block; returns row indices ``(B, k)``.

    As in scikit-learn, each step draws ``2 + ln k`` candidates with probability proportional to
    the squared distance to the nearest chosen centre and keeps the one that lowers the potential
    most. Classes whose points are all identical get repeated indices (the potential is zero).
    """
    B, n_pad, _ = P.shape
    n = mask.sum(1)
    rows = np.arange(B)
    sq = np.einsum("bnd,bnd->bn", P, P)
    trials = 2 + int(np.log(k))
    chosen = np.empty((B, k), np.int64)
    chosen[:, 0] = np.minimum((uniforms(keys, seed, 0) * n).astype(np.int64), n - 1)
    D = _sq_dists(P, sq, P[rows, chosen[:, 0]][:, None, :])[:, 0]
    D[~mask] = 0.0
    for t in range(1, k):
        cum = np.cumsum(D, axis=1, dtype=np.float64)
        target = uniforms(keys[:, None], seed, t, np.arange(trials)) * cum[:, -1:]
        cand = (cum[:, None, :] < target[:, :, None]).sum(-1)
        cand = np.minimum(cand, (n - 1)[:, None])
        Dc = np.minimum(D[:, None, :], _sq_dists(P, sq, P[rows[:, None], cand]))
        Dc[~np.broadcast_to(mask[:, None, :], Dc.shape)] = 0.0
        best = np.argmin(Dc.sum(-1, dtype=np.float64), axis=1)
        chosen[:, t] = cand[rows, best]
        D = Dc[rows, best]
    return chosen


def lloyd(
    P: np.ndarray,
    mask: np.ndarray,
    centers: np.ndarray,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> np.ndarray:
    """Run Lloyd iterations on padded class blocks from ``centers`` ``(B, k, d)``; returns centres.

    A class stops when its centres move less than ``tol`` times its mean feature variance (squared
    shift, summed), or its assignment no longer changes; finished classes leave the batch. An empty
    cluster takes the class's point farthest from its centre, as scikit-learn does.
    """
    B, n_pad, d = P.shape
    k = centers.shape[1]
    centers = centers.astype(np.float32, copy=True)
    n = mask.sum(1)
    mean = (P.sum(1, dtype=np.float64) / n[:, None])
    var = (np.einsum("bnd,bnd->b", P, P, dtype=np.float64) / n - (mean**2).sum(1)) / d
    tol_b = tol * np.maximum(var, 0.0)
    sq = np.einsum("bnd,bnd->bn", P, P)
    active = np.arange(B)
    prev = np.full((B, n_pad), -1, np.int64)
    for _ in range(max_iter):
        Pa, ma, Ca = P[active], mask[active], centers[active]
        D = _sq_dists(Pa, sq[active], Ca)  # (b, k, n_pad)
        labels = np.argmin(D, axis=1)
        onehot = (labels[:, None, :] == np.arange(k)[None, :, None]) & ma[:, None, :]
        counts = onehot.sum(-1)
        sums = np.matmul(onehot.astype(np.float32), Pa)
        new = sums / np.maximum(counts, 1)[:, :, None]
        empty = counts == 0
        for b in np.flatnonzero(empty.any(1)):  # rare: only classes that lost a cluster
            own = np.where(ma[b], D[b, labels[b], np.arange(n_pad)], -1.0)
            js = np.flatnonzero(empty[b])
            new[b, js] = Pa[b, np.argsort(-own, kind="stable")[: len(js)]]
        shift = ((new - Ca) ** 2).sum((1, 2), dtype=np.float64)
        same = ((labels == prev[active]) | ~ma).all(1)
        centers[active] = new
        prev[active] = labels
        done = (shift <= tol_b[active]) | same
        active = active[~done]
        if not len(active):
            break
    return centers


def batched_kmeans(
    groups: Grouped, k: int, seed: int, *, max_iter: int = 300, tol: float = 1e-4
) -> np.ndarray:
    """k-means centroids ``(C, k, d)`` of every class in ``groups`` (each must have n_c > k)."""
    out = np.empty((groups.n_classes, k, groups.X.shape[1]), np.float32)
    for classes, P, mask in groups.padded():
        init = kmeans_pp(P, mask, k, groups.keys[classes], seed)
        start = P[np.arange(len(classes))[:, None], init]
        out[classes] = lloyd(P, mask, start, max_iter=max_iter, tol=tol)
    return out

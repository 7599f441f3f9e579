"""Batched k-means: Lloyd's algorithm for many classes at once, with greedy k-means++ seeding.

Imprinting runs one small k-means per class (tens to hundreds of points, k <= 20). Calling a
library once per class is dominated by per-call and thread start-up overhead (docs/performance.md), so this
module stacks classes into zero-padded ``(B, n_pad, d)`` blocks and does each step for the whole
block with batched matmuls, blocks spread over the cores.

Centres are kept as weights over their class's points (a centre is ``W_j @ X``: one point at
seeding, the mean of its cluster after). Distances then come either from the points (cost
``n d`` per centre) or, while classes have fewer points than dimensions, from the Gram matrix
``X X^T`` (cost ``n^2`` per centre): the same Lloyd iterations, several times cheaper for
few-shot classes. Each class keeps its own random stream (``_groups.uniforms``), its own
convergence test (scikit-learn's: squared centre shift <= tol * mean feature variance, or an
unchanged assignment) and its own empty-cluster repair (the farthest point), so its result does
not depend on which other classes share the block.
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


class Points:
    """Distances computed from the points ``P`` ``(B, n_pad, d)``."""

    def __init__(self, P: np.ndarray) -> None:
        self.P = P
        self.sq = np.einsum("bnd,bnd->bn", P, P)

    def take(self, rows: np.ndarray) -> "Points":
        return Points(self.P[rows])

    def point_dists(self, idx: np.ndarray) -> np.ndarray:
        """Squared distances ``(B, L, n_pad)`` from the points ``idx`` ``(B, L)`` to all points."""
        return _sq_dists(self.P, self.sq, self.P[np.arange(len(idx))[:, None], idx])

    def dots(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For centres ``weights^T @ P`` (weights ``(B, n_pad, k)``): point-centre dots ``(B, n_pad, k)``
        and squared centre norms ``(B, k)``."""
        C = np.matmul(np.ascontiguousarray(weights.transpose(0, 2, 1)), self.P)
        return np.matmul(self.P, C.transpose(0, 2, 1)), np.einsum("bkd,bkd->bk", C, C)


class Gram(Points):
    """Distances computed from the Gram matrix ``G = P P^T`` ``(B, n_pad, n_pad)``."""

    def __init__(self, P: np.ndarray, G: np.ndarray | None = None) -> None:
        self.P = P
        self.G = np.matmul(P, P.transpose(0, 2, 1)) if G is None else G
        self.sq = np.einsum("bnn->bn", self.G).copy()

    def take(self, rows: np.ndarray) -> "Gram":
        return Gram(self.P[rows], self.G[rows])

    def point_dists(self, idx: np.ndarray) -> np.ndarray:
        rows = np.arange(len(idx))[:, None]
        d2 = self.G[rows, idx] * -2.0
        d2 += self.sq[rows, idx][:, :, None]
        d2 += self.sq[:, None, :]
        return np.maximum(d2, 0.0, out=d2)

    def dots(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        XC = np.matmul(self.G, weights)
        return XC, np.einsum("bnk,bnk->bk", weights, XC)


def space(P: np.ndarray) -> Points:
    """The cheaper distance source for this block: the Gram matrix while ``n_pad < d``."""
    return Gram(P) if P.shape[1] < P.shape[2] else Points(P)


def kmeans_pp(sp: Points, mask: np.ndarray, k: int, keys: np.ndarray, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding of each padded class block; returns row indices ``(B, k)``.

    As in scikit-learn, each step draws ``2 + ln k`` candidates with probability proportional to
    the squared distance to the nearest chosen centre and keeps the one that lowers the potential
    most. Classes whose points are all identical get repeated indices (the potential is zero).
    """
    B = len(mask)
    n = mask.sum(1)
    rows = np.arange(B)
    trials = 2 + int(np.log(k))
    chosen = np.empty((B, k), np.int64)
    chosen[:, 0] = np.minimum((uniforms(keys, seed, 0) * n).astype(np.int64), n - 1)
    D = sp.point_dists(chosen[:, :1])[:, 0]
    D[~mask] = 0.0
    for t in range(1, k):
        cum = np.cumsum(D, axis=1, dtype=np.float64)
        target = uniforms(keys[:, None], seed, t, np.arange(trials)) * cum[:, -1:]
        cand = (cum[:, None, :] < target[:, :, None]).sum(-1)
        cand = np.minimum(cand, (n - 1)[:, None])
        Dc = np.minimum(D[:, None, :], sp.point_dists(cand))
        Dc[~np.broadcast_to(mask[:, None, :], Dc.shape)] = 0.0
        best = np.argmin(Dc.sum(-1, dtype=np.float64), axis=1)
        chosen[:, t] = cand[rows, best]
        D = Dc[rows, best]
    return chosen


def lloyd(sp: Points, mask: np.ndarray, start: np.ndarray, *, max_iter: int = 300,
          tol: float = 1e-4) -> np.ndarray:
    """Lloyd iterations from the seed points ``start`` ``(B, k)``; returns centres ``(B, k, d)``.

    A class stops when its centres move less than ``tol`` times its mean feature variance
    (squared shift, summed), or its assignment no longer changes; once half the block has stopped,
    the rest continue in a smaller block. An empty cluster takes the class's point farthest from
    its centre, as scikit-learn does.
    """
    B, n_pad = mask.shape
    k = start.shape[1]
    P = sp.P
    n = mask.sum(1)
    mean = P.sum(1) / n[:, None]
    var = (sp.sq.sum(1, dtype=np.float64) / n - np.einsum("bd,bd->b", mean, mean)) / P.shape[2]
    W = np.zeros((B, n_pad, k), np.float32)  # centre j = sum_i W[i, j] x_i
    np.put_along_axis(W, start[:, None, :], 1.0, axis=1)
    final = W.copy()
    idx, alive, cur, m = np.arange(B), np.ones(B, bool), sp, mask
    tol_b = tol * np.maximum(var, 0.0)
    prev = np.full((B, n_pad), -1, np.int64)
    XC, CC = cur.dots(W)
    for _ in range(max_iter):
        D = XC * -2.0
        D += cur.sq[:, :, None]
        D += CC[:, None, :]
        labels = np.argmin(D, axis=2)
        new = np.zeros(D.shape, np.float32)
        np.put_along_axis(new, labels[:, :, None], 1.0, axis=2)
        new *= m[:, :, None]
        counts = new.sum(1)
        for b in np.flatnonzero((counts == 0).any(1)):  # rare: a class lost a cluster
            own = np.where(m[b], D[b, np.arange(n_pad), labels[b]], -1.0)
            js = np.flatnonzero(counts[b] == 0)
            new[b][:, js] = 0.0
            new[b, np.argsort(-own, kind="stable")[: len(js)], js] = 1.0
            counts[b, js] = 1.0
        new /= counts[:, None, :]
        same = ((labels == prev) | ~m).all(1)
        cross = np.einsum("bnk,bnk->bk", new, XC)  # new centre . old centre
        XC, CC_new = cur.dots(new)
        done = alive & (same | ((CC_new + CC - 2.0 * cross).sum(1) <= tol_b))
        W, CC, prev = new, CC_new, labels
        final[idx[done]] = W[done]
        alive &= ~done
        if not alive.any():
            break
        if alive.sum() * 2 <= len(alive):  # continue with the classes still moving
            idx, W, XC, CC, prev, m, tol_b = (a[alive] for a in (idx, W, XC, CC, prev, m, tol_b))
            cur = cur.take(alive)
            alive = np.ones(len(idx), bool)
    else:
        final[idx[alive]] = W[alive]
    return np.matmul(np.ascontiguousarray(final.transpose(0, 2, 1)), P)  # BLAS needs contiguous blocks


def batched_kmeans(groups: Grouped, k: int, seed: int, *, max_iter: int = 300, tol: float = 1e-4) -> np.ndarray:
    """k-means centroids ``(C, k, d)`` of every class in ``groups`` (each must have n_c > k)."""

    def block(classes: np.ndarray, P: np.ndarray, mask: np.ndarray) -> np.ndarray:
        sp = space(P)
        return lloyd(sp, mask, kmeans_pp(sp, mask, k, groups.keys[classes], seed), max_iter=max_iter, tol=tol)

    return groups.map_blocks(block, k)

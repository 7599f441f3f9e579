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

One code serves numpy arrays and torch tensors (``array_api_compat`` gives both one namespace):
the torch backend of ``device.py`` runs these very functions on a CPU or a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of

from ._groups import Grouped, uniforms
from .device import current

Array = Any  # a numpy array or a torch tensor


def _contiguous(a: Array) -> Array:
    """``a`` in contiguous memory: batched GEMMs need it (a transpose is a strided view)."""
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a.contiguous()


def _rows(a: Array) -> Array:
    """``(B, 1)`` row numbers of ``a``'s first axis, for pairing with ``(B, L)`` column indices."""
    return array_namespace(a).arange(a.shape[0], device=device_of(a))[:, None]


def _sq_dists(P: Array, sq: Array, C: Array) -> Array:
    """Squared distances ``(B, m, n_pad)`` from centres ``C`` ``(B, m, d)`` to points ``P``."""
    xp = array_namespace(P)
    d2 = C @ P.mT
    d2 *= -2.0
    d2 += sq[:, None, :]
    d2 += xp.vecdot(C, C)[:, :, None]
    return xp.clip(d2, min=0.0)


class Points:
    """Distances computed from the points ``P`` ``(B, n_pad, d)``."""

    def __init__(self, P: Array) -> None:
        self.P = P
        self.sq = array_namespace(P).vecdot(P, P)

    def take(self, rows: Array) -> Points:
        return Points(self.P[rows])

    def point_dists(self, idx: Array) -> Array:
        """Squared distances ``(B, L, n_pad)`` from the points ``idx`` ``(B, L)`` to all points."""
        return _sq_dists(self.P, self.sq, self.P[_rows(idx), idx])

    def dots(self, weights: Array) -> tuple[Array, Array]:
        """For centres ``weights^T @ P`` (weights ``(B, n_pad, k)``): point-centre dots ``(B, n_pad, k)``
        and squared centre norms ``(B, k)``."""
        C = _contiguous(weights.mT) @ self.P
        return self.P @ C.mT, array_namespace(C).vecdot(C, C)


class Gram(Points):
    """Distances computed from the Gram matrix ``G = P P^T`` ``(B, n_pad, n_pad)``."""

    def __init__(self, P: Array, G: Array | None = None) -> None:
        xp = array_namespace(P)
        self.P = P
        self.G = P @ P.mT if G is None else G
        self.sq = xp.asarray(xp.linalg.diagonal(self.G), copy=True)

    def take(self, rows: Array) -> Gram:
        return Gram(self.P[rows], self.G[rows])

    def point_dists(self, idx: Array) -> Array:
        rows = _rows(idx)
        d2 = self.G[rows, idx] * -2.0
        d2 += self.sq[rows, idx][:, :, None]
        d2 += self.sq[:, None, :]
        return array_namespace(d2).clip(d2, min=0.0)

    def dots(self, weights: Array) -> tuple[Array, Array]:
        XC = self.G @ weights
        return XC, array_namespace(XC).vecdot(weights, XC, axis=1)


def space(P: Array) -> Points:
    """The cheaper distance source for this block: the Gram matrix while ``n_pad < d``."""
    return Gram(P) if P.shape[1] < P.shape[2] else Points(P)


def kmeans_pp(sp: Points, mask: Array, k: int, keys: np.ndarray, seed: int) -> Array:
    """Greedy k-means++ seeding of each padded class block; returns row indices ``(B, k)``.

    As in scikit-learn, each step draws ``2 + ln k`` candidates with probability proportional to
    the squared distance to the nearest chosen centre and keeps the one that lowers the potential
    most. Classes whose points are all identical get repeated indices (the potential is zero).
    The draws are made on the host (``uniforms``), so every device sees the same ones.
    """
    xp, dev = array_namespace(sp.P), device_of(sp.P)
    n = xp.sum(xp.astype(mask, xp.int64), axis=1)
    rows = _rows(mask)[:, 0]
    trials = 2 + int(np.log(k))
    chosen = xp.empty((mask.shape[0], k), dtype=xp.int64, device=dev)
    first = xp.asarray(uniforms(keys, seed, 0), device=dev) * xp.astype(n, xp.float64)
    chosen[:, 0] = xp.minimum(xp.astype(first, xp.int64), n - 1)
    D = xp.where(mask, sp.point_dists(chosen[:, :1])[:, 0], 0.0)
    for t in range(1, k):
        cum = xp.cumulative_sum(D, axis=1, dtype=xp.float64)
        target = xp.asarray(uniforms(keys[:, None], seed, t, np.arange(trials)), device=dev) * cum[:, -1:]
        cand = xp.minimum(xp.sum(xp.astype(cum[:, None, :] < target[:, :, None], xp.int64), axis=-1), (n - 1)[:, None])
        Dc = xp.where(mask[:, None, :], xp.minimum(D[:, None, :], sp.point_dists(cand)), 0.0)
        best = xp.argmin(xp.sum(Dc, axis=-1, dtype=xp.float64), axis=1)
        chosen[:, t] = cand[rows, best]
        D = Dc[rows, best]
    return chosen


def _repair_empty(new: Array, counts: Array, D: Array, labels: Array, m: Array) -> None:
    """Give each empty cluster the point of its class farthest from its own centre (in place)."""
    xp = array_namespace(new)
    for b in map(int, xp.nonzero(xp.any(counts == 0, axis=1))[0]):  # rare: a class lost a cluster
        own = xp.where(m[b], xp.take_along_axis(D[b], labels[b][:, None], axis=1)[:, 0], -1.0)
        js = xp.nonzero(counts[b] == 0)[0]
        new[b][:, js] = 0.0
        new[b, xp.argsort(-own, stable=True)[: js.shape[0]], js] = 1.0
        counts[b, js] = 1.0


def lloyd(sp: Points, mask: Array, start: Array, *, max_iter: int = 300, tol: float = 1e-4) -> Array:
    """Lloyd iterations from the seed points ``start`` ``(B, k)``; returns centres ``(B, k, d)``.

    A class stops when its centres move less than ``tol`` times its mean feature variance
    (squared shift, summed), or its assignment no longer changes; once half the block has stopped,
    the rest continue in a smaller block. An empty cluster takes the class's point farthest from
    its centre, as scikit-learn does.
    """
    xp, dev = array_namespace(sp.P), device_of(sp.P)
    B, n_pad = mask.shape
    P = sp.P
    n = xp.astype(xp.sum(xp.astype(mask, xp.int64), axis=1), xp.float64)
    mean = xp.astype(xp.sum(P, axis=1), xp.float64) / n[:, None]
    var = (xp.sum(sp.sq, axis=1, dtype=xp.float64) / n - xp.vecdot(mean, mean)) / P.shape[2]
    clusters = xp.arange(start.shape[1], device=dev)
    # centre j = sum_i W[i, j] x_i: one-hot on the seed points
    W = xp.astype(xp.arange(n_pad, device=dev)[None, :, None] == start[:, None, :], xp.float32)
    final = xp.asarray(W, copy=True)
    idx, alive, cur, m = xp.arange(B, device=dev), xp.ones(B, dtype=xp.bool, device=dev), sp, mask
    tol_b = tol * xp.clip(var, min=0.0)
    prev = xp.full((B, n_pad), -1, dtype=xp.int64, device=dev)
    XC, CC = cur.dots(W)
    for _ in range(max_iter):
        D = XC * -2.0
        D += cur.sq[:, :, None]
        D += CC[:, None, :]
        labels = xp.argmin(D, axis=2)
        new = xp.astype((labels[:, :, None] == clusters) & m[:, :, None], xp.float32)
        counts = xp.sum(new, axis=1)
        _repair_empty(new, counts, D, labels, m)
        new /= counts[:, None, :]
        same = xp.all((labels == prev) | ~m, axis=1)
        cross = xp.vecdot(new, XC, axis=1)  # new centre . old centre
        XC, CC_new = cur.dots(new)
        done = alive & (same | (xp.sum(CC_new + CC - 2.0 * cross, axis=1) <= tol_b))
        W, CC, prev = new, CC_new, labels
        final[idx[done]] = W[done]
        alive = alive & ~done
        if not xp.any(alive):
            break
        if int(xp.sum(xp.astype(alive, xp.int64))) * 2 <= alive.shape[0]:  # continue with the classes still moving
            idx, W, XC, CC, prev, m, tol_b = (a[alive] for a in (idx, W, XC, CC, prev, m, tol_b))
            cur = cur.take(alive)
            alive = xp.ones(idx.shape[0], dtype=xp.bool, device=dev)
    else:
        final[idx[alive]] = W[alive]
    return _contiguous(final.mT) @ P


def block_kmeans(
    P: Array, mask: Array, keys: np.ndarray, k: int, seed: int, *, max_iter: int = 300, tol: float = 1e-4
) -> Array:
    """k-means centres ``(B, k, d)`` of one padded block (``Grouped.padded``) of classes with
    these ``keys``, on the device ``P`` lies on: k-means++ seeding, then Lloyd."""
    sp = space(P)
    return lloyd(sp, mask, kmeans_pp(sp, mask, k, keys, seed), max_iter=max_iter, tol=tol)


def batched_kmeans(groups: Grouped, k: int, seed: int, *, max_iter: int = 300, tol: float = 1e-4) -> np.ndarray:
    """k-means centroids ``(C, k, d)`` of every class in ``groups`` (each must have n_c > k), on
    the current device (``device.py``)."""
    return groups.map_blocks(
        lambda classes, P, mask: block_kmeans(P, mask, groups.keys[classes], k, seed, max_iter=max_iter, tol=tol),
        k,
        device=current(),
    )

"""AGG: turn query-proxy similarities into per-class scores and a predicted class.

``max``: ``s_c(x) = max_j sim(w_cj, x)``, so the prediction is the owner of the top-1 proxy.
``mnn``: the ``m`` closest proxies vote, ``uniform`` or ``distance`` weighted (``1/(dist + 1e-10)``);
a class's score is its share of the vote, and ties go to the lowest class index.
``blend``: ``s_c(x) = alpha sim(mean_c, x) + (1 - alpha) max_j sim(w_cj, x)``: the class mean and the
best proxy together (``blend_rank`` finds the best classes exactly from a shallow proxy search).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

AGGREGATIONS = ("max", "mnn", "blend")
VOTES = ("uniform", "distance")
BLEND_EXTRA = 16  # proxies beyond a class's count that a blend's first search looks at
BLEND_SLACK = 1e-5  # relative margin a blend bound must clear: float32 dot products may differ by this
DISTANCE_EPS = 1e-10


def max_scores(sim: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-class max ``(n_q, C)`` of similarities ``sim`` ``(n_q, P)`` whose proxies are sorted by
    class, class ``c`` starting at column ``starts[c]``."""
    return np.maximum.reduceat(sim, starts, axis=1)


def vote_weights(dist: np.ndarray, vote: str) -> np.ndarray:
    """Weight of each neighbour's vote ``(n_q, m)``."""
    if vote == "distance":
        return 1.0 / (dist.astype(np.float64) + DISTANCE_EPS)
    return np.ones(dist.shape, np.float64)


def _class_totals(owner: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """For each neighbour, the summed weight of all neighbours of its class, summed in rank order."""
    total = np.zeros(owner.shape, np.float64)
    for j in range(owner.shape[1]):
        total += weights[:, j : j + 1] * (owner == owner[:, j : j + 1])
    return total


def rank_classes(owner: np.ndarray, values: np.ndarray, top: int, *, vote: bool = False,
                 ties: str = "lowest") -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best distinct classes ``(n_q, top)`` and their scores from ranked neighbours.

    ``owner`` ``(n_q, r)``: class of each neighbour, best first (-1: no neighbour). Without
    ``vote`` (max aggregation), ``values`` are similarities and a class scores its best neighbour's.
    With ``vote``, ``values`` are vote weights, a class scores its share of the total weight, and
    classes rank by share; equal shares go to the lowest class (``ties="lowest"``, the estimator,
    whose classes are sorted labels) or to the class with the nearer neighbour (``ties="nearest"``,
    collections, whose class numbers follow insertion order). Missing ranks are class -1, NaN score.
    """
    n_q, r = owner.shape
    valid = owner >= 0
    if vote:
        weights = np.where(valid, values, 0.0)
        score = _class_totals(owner, weights) / weights.sum(axis=1, keepdims=True)
        tie = owner if ties == "lowest" else np.argmax(owner[:, :, None] == owner[:, None, :], axis=2)
        order = np.lexsort((tie, -score, ~valid), axis=-1)
        owner, score, valid = (np.take_along_axis(a, order, 1) for a in (owner, score, valid))
    else:
        score = values
    keep = _first_of_class(owner) & valid
    rank = np.cumsum(keep, axis=1) - 1
    keep &= rank < top
    classes = np.full((n_q, top), -1, np.int64)
    scores = np.full((n_q, top), np.nan)
    rows = np.broadcast_to(np.arange(n_q)[:, None], owner.shape)
    classes[rows[keep], rank[keep]] = owner[keep]
    scores[rows[keep], rank[keep]] = score[keep]
    return classes, scores


def vote_scores(owner: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's share of the vote ``(n_q, C)`` (zeros for classes with no neighbour)."""
    total = _class_totals(owner, weights)
    out = np.zeros((owner.shape[0], n_classes), np.float64)
    np.put_along_axis(out, owner, total, axis=1)
    return out / weights.sum(axis=1, keepdims=True)


Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def blend_rank(n_q: int, mean_search: Search, mean_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
               proxy_search: Search, alpha: float, top: int, n_classes: int, n_proxies: int,
               depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best classes ``(n_q, top)`` by blended score and their scores, exactly, from two
    shallow searches instead of scoring every class.

    ``mean_search(rows, n)`` and ``proxy_search(rows, m)`` give, for those query rows, the ``n``
    most similar class means and the ``m`` most similar proxies: similarities and class numbers
    (-1 past the end); ``mean_score(rows, classes)`` the mean similarity of given classes. A
    class's first proxy in the proxy ranking is its best, so a listed class's blended score is
    exact. An unlisted class has every proxy below the m-th proxy similarity, and a mean at most
    the best mean similarity among the mean-listed classes that are not proxy-listed, or else the
    n-th; a row is settled when its ``top``-th exact score beats that bound (by more than float32
    rounding). Other rows are searched 4x deeper, up to every proxy. Equal scores go to the lower
    class number; missing ranks are class -1, NaN score.
    """
    classes, scores = np.full((n_q, top), -1, np.int64), np.full((n_q, top), np.nan)
    todo = np.arange(n_q)
    while len(todo):
        m, n = min(depth, n_proxies), min(depth, n_classes)
        sim, cls = proxy_search(todo, m)
        sim = sim.astype(np.float64)
        listed = _first_of_class(cls) & (cls >= 0)
        cand = np.where(listed, cls, n_classes)  # n_classes: no class, sorts last
        exact = np.where(listed, alpha * mean_score(todo, np.where(listed, cls, 0)) + (1 - alpha) * sim, -np.inf)
        order = np.lexsort((cand, -exact), axis=1)[:, :top]
        best, best_score = np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)
        if m >= n_proxies:  # every class is listed
            done = np.ones(len(todo), bool)
        else:
            a_sim, a_cls = mean_search(todo, n)
            a_sim = a_sim.astype(np.float64)
            unlisted = ~(a_cls[:, :, None] == np.where(listed, cls, -2)[:, None, :]).any(2) & (a_cls >= 0)
            a_bound = np.where(unlisted, a_sim, -np.inf).max(1)
            if n < n_classes:
                a_bound = np.maximum(a_bound, a_sim[:, -1])
            bound = (alpha * a_bound if alpha > 0 else 0.0) + ((1 - alpha) * sim[:, -1] if alpha < 1 else 0.0)
            kth = best_score[:, -1] if best_score.shape[1] == top else np.full(len(todo), -np.inf)
            finite = np.isfinite(bound)
            done = kth > bound + np.where(finite, BLEND_SLACK * (1 + np.abs(np.where(finite, bound, 0.0))), 0.0)
        rows = todo[done]
        found = np.isfinite(best_score[done])
        classes[rows, : best.shape[1]] = np.where(found, best[done], -1)
        scores[rows, : best.shape[1]] = np.where(found, best_score[done], np.nan)
        todo, depth = todo[~done], depth * 4
    return classes, scores


def _first_of_class(owner: np.ndarray) -> np.ndarray:
    """Per row, True at each class's first (best-ranked) entry."""
    r = owner.shape[1]
    by_class = np.lexsort((np.broadcast_to(np.arange(r), owner.shape), owner), axis=-1)
    grouped = np.take_along_axis(owner, by_class, 1)
    first = np.ones(owner.shape, bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    out = np.empty_like(first)
    np.put_along_axis(out, by_class, first, 1)
    return out

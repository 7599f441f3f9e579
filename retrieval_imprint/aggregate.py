"""AGG: turn query-proxy similarities into per-class scores and a predicted class.

``max``: ``s_c(x) = max_j sim(w_cj, x)``, so the prediction is the owner of the top-1 proxy.
``mnn``: the ``m`` closest proxies vote, ``uniform`` or ``distance`` weighted (``1/(dist + 1e-10)``);
a class's score is its share of the vote, and ties go to the lowest class index.
"""

from __future__ import annotations

import numpy as np

AGGREGATIONS = ("max", "mnn")
VOTES = ("uniform", "distance")
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
    by_class = np.lexsort((np.broadcast_to(np.arange(r), owner.shape), owner), axis=-1)
    grouped = np.take_along_axis(owner, by_class, 1)
    first = np.ones(owner.shape, bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    is_first = np.empty_like(first)
    np.put_along_axis(is_first, by_class, first, 1)
    keep = is_first & valid
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

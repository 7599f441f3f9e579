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


def vote_winner(owner: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Winning class ``(n_q,)`` of neighbours' classes ``owner`` ``(n_q, m)``; ties: lowest class."""
    total = _class_totals(owner, weights)
    best = total.max(axis=1, keepdims=True)
    return np.where(total == best, owner, np.iinfo(owner.dtype).max).min(axis=1)


def vote_scores(owner: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's share of the vote ``(n_q, C)`` (zeros for classes with no neighbour)."""
    total = _class_totals(owner, weights)
    out = np.zeros((owner.shape[0], n_classes), np.float64)
    np.put_along_axis(out, owner, total, axis=1)
    return out / weights.sum(axis=1, keepdims=True)

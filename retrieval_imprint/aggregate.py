"""AGG: turn query-proxy similarities into per-class scores and a predicted class.

``max``: ``s_c(x) = max_j sim(w_cj, x)``, so the prediction is the owner of the top-1 proxy.
``mnn``: the ``m`` closest proxies vote, ``uniform`` or ``distance`` weighted (``1/(dist + 1e-10)``);
a class's score is its share of the vote, and ties go to the lowest class index.
``blend``: ``s_c(x) = alpha sim(mean_c, x) + (1 - alpha) max_j sim(w_cj, x)``: the class mean and the
best proxy together (``blend_rank`` finds the best classes exactly from a shallow proxy search).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Class means and proxies a blend's first searches look at, beyond top: a few queries are answered by
# a scan of every vector whatever the depth (index.SMALL_BATCH), so a deep first list costs nothing
# there, while a batch's search keeps a heap per query, which a shallow list keeps cheap.
BLEND_DEPTH, BLEND_DEPTH_BATCH = 32, 8
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


def rank_classes(
    owner: np.ndarray, values: np.ndarray, top: int, *, vote: bool = False, ties: str = "lowest"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best distinct classes ``(n_q, top)`` and their scores from ranked neighbours.

    ``owner`` ``(n_q, r)``: class of each neighbour, best first (-1: no neighbour). Without
    ``vote`` (max aggregation), ``values`` are similarities and a class scores its best neighbour's.
    With ``vote``, ``values`` are vote weights, a class scores its share of the total weight, and
    classes rank by share; equal shares go to the lowest class (``ties="lowest"``, the estimator,
    whose classes are sorted labels) or to the class with the nearer neighbour (``ties="nearest"``,
    collections, whose class numbers follow insertion order). Missing ranks are class -1, NaN score.
    """
    n_q, _r = owner.shape
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
Score = Callable[[np.ndarray, np.ndarray], np.ndarray]


def blend_rank(
    n_q: int,
    mean_search: Search,
    mean_score: Score,
    proxy_search: Search,
    proxy_score: Score,
    alpha: float,
    top: int,
    n_classes: int,
    n_proxies: int,
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` best classes ``(n_q, top)`` by blended score and their scores, exactly, from two
    shallow searches instead of scoring every class.

    ``mean_search(rows, n)`` and ``proxy_search(rows, m)`` give, for those query rows, the ``n``
    most similar class means and the ``m`` most similar proxies: similarities, and class numbers
    (-1 past the end). Every class either list names is scored exactly: the list gives one term (a
    class's first proxy in the proxy ranking is its best), and ``mean_score(rows, classes)`` or
    ``proxy_score(rows, classes)`` the other (its mean's, its best proxy's similarity) unless the
    other list names it too.
    A class neither names has its mean below the n-th mean similarity and every proxy below the
    m-th proxy similarity, so its blended score is below ``alpha a_n + (1 - alpha) p_m``. A row is
    settled when its ``top``-th exact score beats that bound by more than float32 rounding; other
    rows are searched 4x deeper, up to every class. Equal scores go to the lower class number;
    missing ranks are class -1, NaN score.
    """
    classes, scores = np.full((n_q, top), -1, np.int64), np.full((n_q, top), np.nan)
    todo = np.arange(n_q)
    while len(todo):
        m, n = min(depth, n_proxies), min(depth, n_classes)
        p_sim, p_cls = proxy_search(todo, m)
        a_sim, a_cls = mean_search(todo, n)
        named = np.hstack([p_cls, a_cls])
        first = _first_of_class(named) & (named >= 0)
        named = np.where(first, named, n_classes)  # n_classes: none, sorts last
        # a listed class's own similarity comes from its list; the other term is looked up
        from_proxies = np.arange(named.shape[1]) < m
        safe = np.minimum(named, n_classes - 1)
        a = np.hstack([np.zeros_like(p_sim, np.float64), a_sim.astype(np.float64)])
        b = np.hstack([p_sim.astype(np.float64), np.zeros_like(a_sim, np.float64)])
        a_missing, b_missing = first & from_proxies, first & ~from_proxies
        in_means = _named_in(named, a_cls, n_classes)  # a proxy-listed class the mean list names too
        in_proxies = _named_in(named, p_cls, n_classes)
        a = np.where(a_missing & ~in_means, _lookup(mean_score, todo, safe, a_missing & ~in_means), a)
        a = np.where(a_missing & in_means, _value_in(named, a_cls, a_sim, n_classes), a)
        b = np.where(b_missing & ~in_proxies, _lookup(proxy_score, todo, safe, b_missing & ~in_proxies), b)
        exact = np.where(first, alpha * a + (1 - alpha) * b, -np.inf)
        order = np.lexsort((named, -exact), axis=1)[:, :top]
        best, best_score = np.take_along_axis(named, order, 1), np.take_along_axis(exact, order, 1)
        if m >= n_proxies or n >= n_classes:  # every class is named by one list
            done = np.ones(len(todo), bool)
        else:
            bound = (alpha * a_sim[:, -1].astype(np.float64) if alpha > 0 else 0.0) + (
                (1 - alpha) * p_sim[:, -1].astype(np.float64) if alpha < 1 else 0.0
            )
            kth = best_score[:, -1] if best_score.shape[1] == top else np.full(len(todo), -np.inf)
            done = kth > bound + BLEND_SLACK * (1 + np.abs(bound))
        rows = todo[done]
        found = np.isfinite(best_score[done])
        classes[rows, : best.shape[1]] = np.where(found, best[done], -1)
        scores[rows, : best.shape[1]] = np.where(found, best_score[done], np.nan)
        todo, depth = todo[~done], depth * 4
    return classes, scores


def _named_in(named: np.ndarray, listed: np.ndarray, n_classes: int) -> np.ndarray:
    """Per row, whether each entry of ``named`` also stands in that row of ``listed``."""
    row = np.arange(len(named))[:, None] * (n_classes + 1)
    return np.isin(row + named, row + np.where(listed >= 0, listed, n_classes))


def _value_in(named: np.ndarray, listed: np.ndarray, values: np.ndarray, n_classes: int) -> np.ndarray:
    """Per row, the value ``listed`` gives each entry of ``named`` (its first occurrence; 0 if absent)."""
    out = np.zeros(named.shape)
    for j in range(listed.shape[1] - 1, -1, -1):  # last to first: the first occurrence wins
        out = np.where(named == listed[:, j : j + 1], values[:, j : j + 1].astype(np.float64), out)
    return out


def _lookup(score: Score, rows: np.ndarray, classes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``score(rows, classes)`` for the wanted entries only (0 elsewhere), asked as a padded block."""
    counts = wanted.sum(1)
    out = np.zeros(classes.shape)
    if not counts.max():
        return out
    width = int(counts.max())
    slot = np.cumsum(wanted, 1) - 1
    asked = np.zeros((len(rows), width), np.int64)  # each row's wanted classes, padded with its first
    asked[np.nonzero(wanted)[0], slot[wanted]] = classes[wanted]
    pad = np.arange(width)[None, :] >= counts[:, None]
    asked = np.where(pad, asked[:, :1], asked)
    got = score(rows, asked)
    out[wanted] = got[np.nonzero(wanted)[0], slot[wanted]]
    return out


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

"""Answering queries against one committed version of a collection: the best classes for each
query under the collection's aggregation, as class ids and scores.

``max`` searches just deep enough for ``top`` distinct classes (deeper where it finds fewer);
``mnn`` votes over the m nearest proxies (equal shares to the class of the nearer proxy, since
class numbers follow insertion order); ``blend`` ranks by ``aggregate.blend_rank`` over the class
means and the proxies, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import labels as lab
from . import params as spec
from .aggregate import BLEND_DEPTH, BLEND_DEPTH_BATCH, blend_rank, rank_classes, vote_weights
from .errors import DataError, InvalidParameterError
from .index import SMALL_BATCH
from .openset import filled
from .segments import CLASS_SHIFT, class_of
from .snapshot import Snapshot

BLOCK = 256  # query rows whose candidate classes' proxies are gathered at a time


def rank(
    s: Snapshot, Q: np.ndarray, top: int, params: dict[str, int] | None, mapped: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids ``(n_q, top)`` (-1: none) and their scores; ``Q`` after NORMinf, ``params`` the
    IVF search parameters of this call (None: the stored ones); ``mapped``: ``Q`` is ``z(q)`` already,
    a sharded collection's (shardhead.py)."""
    cfg, index = s.params, s.searched
    if s.head is not None and not mapped:  # a streaming ls head: the query mapped to z(q) (lshead.py)
        Q = s.head.queries(Q, index.ntotal)  # one mean a class: C without reading the class count
    if cfg["aggregation"] == "blend":
        return _blend(s, Q, top, params, cfg["alpha"])
    if cfg["aggregation"] == "max":
        depth = top if top == 1 else min(index.ntotal, top * (cfg["k"] if cfg["k"] > 0 else 4))
        while True:
            sim, _, ids = index.search(Q, depth, params)
            owner, scores = rank_classes(class_of(ids), sim.astype(np.float64), top)
            if depth >= index.ntotal or (owner >= 0).all():
                return owner, scores
            depth = min(index.ntotal, depth * 4)
    _, dist, ids = neighbours(s, Q, params)
    return rank_classes(class_of(ids), vote_weights(dist, cfg["vote"]), top, vote=True, ties="nearest")


def neighbours(s: Snapshot, Q: np.ndarray, params: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``m`` proxies nearest each query that an ``mnn`` vote counts: similarity, distance, ids."""
    return s.searched.search(Q, min(s.params["m"], s.searched.ntotal), params)


def _blend(
    s: Snapshot, Q: np.ndarray, top: int, params: dict[str, int] | None, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    table, proxies, means = s.table, s.searched, s.means
    assert means is not None, "a blend's collection keeps its class means"

    def positions(ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, table.positions(class_of(np.maximum(ids, 0))), -1)

    def search_proxies(rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        sim, _, ids = proxies.search(Q[rows], m, params)
        return sim, positions(ids)

    def search_means(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        sim, _, ids = means.search(Q[rows], n)
        return sim, positions(ids)

    def mean_similarity(rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        vectors = means.reconstruct(table.mean_ids(table.ids[pos]).ravel()).reshape(*pos.shape, -1)
        return means.pair_similarity(Q[rows], vectors)

    def best_proxy(rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Each class's best proxy similarity, its proxies gathered (a class's last one repeated to
        the largest count)."""
        lo, count = table.proxy_lo[pos], table.n_proxies[pos]
        j = lo[..., None] + np.minimum(np.arange(count.max()), count[..., None] - 1)
        ids = (table.ids[pos][..., None] << CLASS_SHIFT) + j
        out = np.empty(pos.shape)
        for r in range(0, len(rows), BLOCK):  # bounded memory: BLOCK rows of gathered proxies at a time
            block = ids[r : r + BLOCK]
            vectors = proxies.reconstruct(block.ravel()).reshape(*block.shape, -1)
            out[r : r + BLOCK] = (
                proxies.pair_similarity(
                    np.repeat(Q[rows[r : r + BLOCK]], block.shape[1], axis=0),
                    vectors.reshape(-1, block.shape[2], vectors.shape[-1]),
                )
                .max(1)
                .reshape(block.shape[:2])
            )
        return out

    depth = top + (BLEND_DEPTH if len(Q) < SMALL_BATCH else BLEND_DEPTH_BATCH)
    best, scores = blend_rank(
        len(Q), search_means, mean_similarity, search_proxies, best_proxy, alpha, top, len(table), proxies.ntotal, depth
    )
    return np.where(best >= 0, table.ids[np.maximum(best, 0)], -1), scores


@dataclass(frozen=True)
class QueryResult:
    """Per query, the ``top`` best classes, best first. ``labels`` ``(n_q, top)``: None where there
    is no further class or it was rejected; ``scores``: the aggregated class scores (best-proxy
    similarity, blended score or vote share; NaN there). Why: ``candidates``, the labels before
    rejection; ``rejection_scores``, what was compared with ``thresholds`` (NaN: no threshold)."""

    labels: np.ndarray
    scores: np.ndarray
    candidates: np.ndarray
    rejection_scores: np.ndarray
    thresholds: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> QueryResult:
        """The answers to queries ``start`` to ``stop`` (a batch's share of one request)."""
        return QueryResult(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    def records(self, names: Sequence[object] | None = None) -> list[dict[str, object]]:
        """One plain record per query (``query``: its name, default its row number), as the CLI's
        ``--json`` and the HTTP API give them: lists of labels and numbers, None for NaN."""

        def floats(row: np.ndarray) -> list[float | None]:
            return [float(v) if np.isfinite(v) else None for v in row]

        return [
            {
                "query": name,
                "labels": list(labels),
                "scores": floats(scores),
                "candidates": list(candidates),
                "rejection_scores": floats(why),
                "thresholds": floats(limits),
                "rejected": rejected.tolist(),
            }
            for name, labels, scores, candidates, why, limits, rejected in zip(
                range(len(self)) if names is None else names,
                self.labels,
                self.scores,
                self.candidates,
                self.rejection_scores,
                self.thresholds,
                self.rejected,
            )
        ]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, object]]) -> QueryResult:
        """The result ``records`` describe (NaN for None): what an HTTP client gets back."""

        def table(name: str, dtype: Any) -> np.ndarray:
            rows = [[np.nan if v is None and dtype is not object else v for v in r[name]] for r in records]  # type: ignore[attr-defined]
            out = np.empty((len(rows), len(rows[0]) if rows else 0), dtype)
            out[...] = rows if rows else out
            return out

        return cls(
            table("labels", object),
            table("scores", np.float32),
            table("candidates", object),
            table("rejection_scores", np.float64),
            table("thresholds", np.float64),
        )

    @property
    def rejected(self) -> np.ndarray:
        """``(n_q, top)``: True where a class was found and rejected."""
        return np.array(
            [
                [c is not None and label is None for c, label in zip(cs, ls)]
                for cs, ls in zip(self.candidates, self.labels)
            ],
            bool,
        ).reshape(self.labels.shape)


def _shift_of(s: Snapshot, owner: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each class id's entry of ``shift`` (table order; NaN read as 0), 0 where the id is -1."""
    found = owner >= 0
    out = np.zeros(owner.shape)
    out[found] = filled(shift)[s.table.positions(owner[found])]
    return out


def answer(s: Snapshot, owner: np.ndarray, scores: np.ndarray, threshold: float | None) -> QueryResult:
    """Labels of ranked class ids, with open-set rejection: a class whose rejection score is below
    its threshold (``threshold`` if given, else the class's own, else the collection's) is None."""
    return judge(scores, *class_terms(s, owner, threshold))


def class_terms(s: Snapshot, owner: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``judge`` needs of each class id in ``owner`` (-1: none), whatever its score: its label
    (None for -1), the shift its rejection score subtracts (0 under rule max) and its threshold
    (``threshold`` if given, else the class's own, else the collection's; NaN: none)."""
    found = owner >= 0
    rows = s.rows_of(owner[found], exist=True)  # the rows of these classes only: no read of the whole table
    at = rows.positions(owner[found])
    limit = np.full(owner.shape, np.nan if threshold is None else float(threshold))
    if threshold is None:
        own = rows.threshold[at]
        stored = s.config["threshold"]
        limit[found] = np.where(np.isnan(own), np.nan if stored is None else stored, own)
    candidates = np.full(owner.shape, None, object)
    candidates[found] = rows.labels[at]
    shift = np.zeros(owner.shape)
    if s.params["rejection"] == "shift":
        shift[found] = rows.shift[at]
        if np.isnan(shift).any():  # a class without a shift takes the median of all (openset.filled)
            shift = _shift_of(s, owner, s.table.shift)
    return candidates, shift, np.where(found, limit, np.nan)


def judge(scores: np.ndarray, candidates: np.ndarray, shift: np.ndarray, limit: np.ndarray) -> QueryResult:
    """The answer from class scores and ``class_terms``: a class is rejected (its label None) where
    its rejection score, score minus shift, is below its limit (a NaN limit rejects nothing)."""
    found = candidates != None  # noqa: E711 (elementwise)
    reject = np.where(found, scores - shift, np.nan)
    accepted = found & ~(reject < limit)
    return QueryResult(
        np.where(accepted, candidates, None),  # type: ignore[call-overload]
        np.where(accepted, scores, np.nan).astype(np.float32),
        candidates,
        reject,
        limit,
    )


def rejection_inputs(
    found: QueryResult,
    labels: Sequence[object],
    oos: QueryResult | None,
    shift_of: Callable[[np.ndarray], np.ndarray] | None,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """For ``openset.calibrate``: per rule the collection can use, shift (the stronger prior) first
    where classes have shifts (``shift_of``: each label's shift, or None), the rejection scores of
    in-scope queries ``found`` (unthresholded top-1), whether their class is ``labels``, and the
    out-of-scope queries' rejection scores."""
    truth = [lab.entry(label) for label in labels]
    if len(truth) != len(found):
        raise DataError(f"X has {len(found)} rows but labels has {len(truth)}")
    correct = np.array([c is not None and lab.entry(c) == t for c, t in zip(found.candidates[:, 0], truth)])

    def scores(result: QueryResult, rule: str) -> np.ndarray:
        top = result.scores[:, 0].astype(np.float64)
        return top - shift_of(result.candidates[:, 0]) if rule == "shift" and shift_of is not None else top

    return {
        rule: (scores(found, rule), correct, None if oos is None else scores(oos, rule))
        for rule in (["shift", "max"] if shift_of is not None else ["max"])
    }


def label_shifts(s: Snapshot, labels: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The entry of ``shift`` (table order; NaN read as ``filled``) of each class label (None: 0)."""
    return _shift_of(s, s.table.ids_of(labels), shift)


def search_params(s: Snapshot, params: dict[str, int] | None) -> dict[str, int] | None:
    """A query's ``search_params``, checked: they apply to IVF indexes only."""
    if params and s.proxies is not None and not s.searched.is_ivf:
        raise InvalidParameterError(
            "search_params apply to approximate (IVF) indexes; this collection's index is exact"
        )
    return spec.check_search_params("search_params", params)

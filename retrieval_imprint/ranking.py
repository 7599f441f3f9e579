"""Answering queries against one committed version of a collection: the best classes for each
query under the collection's aggregation, as class ids and scores.

``max`` searches just deep enough for ``top`` distinct classes (deeper where it finds fewer);
``mnn`` votes over the m nearest proxies (equal shares to the class of the nearer proxy, since
class numbers follow insertion order); ``blend`` ranks by ``aggregate.blend_rank`` over the class
means and the proxies, exactly.
"""

from __future__ import annotations

import numpy as np

from .aggregate import BLEND_DEPTH, BLEND_DEPTH_BATCH, blend_rank, rank_classes, vote_weights
from .index import SMALL_BATCH
from .segments import CLASS_SHIFT, class_of
from .snapshot import Snapshot

BLOCK = 256  # query rows whose candidate classes' proxies are gathered at a time


def rank(s: Snapshot, Q: np.ndarray, top: int, params: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Class ids ``(n_q, top)`` (-1: none) and their scores; ``Q`` after NORMinf, ``params`` the
    IVF search parameters of this call (None: the stored ones)."""
    cfg, index = s.params, s.proxies
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
    _, dist, ids = index.search(Q, min(cfg["m"], index.ntotal), params)
    return rank_classes(class_of(ids), vote_weights(dist, cfg["vote"]), top, vote=True, ties="nearest")


def _blend(s: Snapshot, Q: np.ndarray, top: int, params: dict[str, int] | None, alpha: float
           ) -> tuple[np.ndarray, np.ndarray]:
    table, proxies, means = s.table, s.proxies, s.means

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
            out[r : r + BLOCK] = proxies.pair_similarity(
                np.repeat(Q[rows[r : r + BLOCK]], block.shape[1], axis=0), vectors.reshape(-1, block.shape[2],
                                                                                          vectors.shape[-1])
            ).max(1).reshape(block.shape[:2])
        return out

    depth = top + (BLEND_DEPTH if len(Q) < SMALL_BATCH else BLEND_DEPTH_BATCH)
    best, scores = blend_rank(len(Q), search_means, mean_similarity, search_proxies, best_proxy, alpha, top,
                              len(table), proxies.ntotal, depth)
    return np.where(best >= 0, table.ids[np.maximum(best, 0)], -1), scores

"""The cross-shard merge: each shard answers a batch of queries with its ``Part`` (its best classes,
or nearest proxies for m-NN, with what judging them needs), and ``merge`` makes from the parts
the answer one collection of all the classes gives: in process (``sharded.py``) or in the Ray
ingress (``distributed.py``), one round trip per shard.

Global class numbers are ``local * S + shard``: unique, and in each shard's insertion order, so
equal scores break the same way within a shard and in the merge.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ranking
from .aggregate import rank_classes, vote_weights
from .ranking import QueryResult
from .segments import CLASS_SHIFT, class_of
from .shards import MANIFEST
from .snapshot import Snapshot


@dataclass(frozen=True)
class Part:
    """One shard's share of the answers to a batch of queries: all a merge needs, so a shard held
    by another process (a Ray actor) answers in one round trip. Rows are queries; columns the
    shard's best classes (max, blend) or nearest proxies (mnn), best first."""

    ids: np.ndarray  # global class numbers (max, blend) or proxy numbers (mnn); -1: none
    values: np.ndarray  # class scores (max, blend) or proxy similarities (mnn); -inf: none
    distances: np.ndarray | None  # mnn: proxy distances, for distance-weighted votes
    candidates: np.ndarray  # ranking.class_terms of each entry's class: label,
    shift: np.ndarray  # rejection shift
    limit: np.ndarray  # and threshold


def part(
    s: Snapshot,
    search_params: dict[str, int] | None,
    shard: int,
    n_shards: int,
    Q: np.ndarray,
    top: int,
    threshold: float | None,
    mapped: bool = False,
) -> Part:
    """Shard ``shard``'s ``Part`` of the answers to queries ``Q`` (after NORMinf; ``mapped``: the
    whole's ``z(q)``, shardhead.py), from its snapshot ``s`` (one version for the whole part,
    whatever a concurrent refresh() does)."""
    params = search_params  # checked by the caller (ranking.search_params)
    if s.params["aggregation"] == "mnn":
        sim, dist, ids = ranking.neighbours(s, Q, params)
        found = ids >= 0
        owner = np.where(found, class_of(ids), -1)
        gid = np.where(found, ((owner * n_shards + shard) << CLASS_SHIFT) + (ids & ((1 << CLASS_SHIFT) - 1)), -1)
        return Part(gid, np.where(found, sim, -np.inf), dist, *ranking.class_terms(s, owner, threshold))
    owner, scores = ranking.rank(s, Q, top, params, mapped)
    found = owner >= 0
    return Part(
        np.where(found, owner * n_shards + shard, -1),
        np.where(found, scores, -np.inf),
        None,
        *ranking.class_terms(s, owner, threshold),
    )


def merge(parts: Sequence[Part], top: int, params: dict[str, Any]) -> QueryResult:
    """The answers of one collection holding every shard's classes, from the shards' ``Part``s
    (``params``: the concrete GEN/NORM/AGG settings). max, blend: the ``top`` best entries by
    score; mnn: the m nearest proxies, then the vote. Equal values go to the lower global number."""

    def cat(name: str) -> np.ndarray:
        return np.hstack([getattr(p, name) for p in parts])

    ids, values = cat("ids"), cat("values")
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -values), axis=1)
    if params["aggregation"] == "mnn":
        near = order[:, : params["m"]]
        owner = np.where(np.take_along_axis(ids, near, 1) >= 0, class_of(np.take_along_axis(ids, near, 1)), -1)
        classes, scores = rank_classes(
            owner,
            vote_weights(np.take_along_axis(cat("distances"), near, 1), params["vote"]),
            top,
            vote=True,
            ties="nearest",
        )
        pick = np.take_along_axis(near, np.argmax(owner[:, None, :] == classes[:, :, None], axis=2), 1)
    else:
        pick = order[:, :top]
        classes = np.take_along_axis(ids, pick, 1)
        scores = np.where(classes >= 0, np.take_along_axis(values, pick, 1), np.nan)
    found = classes >= 0
    terms = [
        np.where(found, np.take_along_axis(cat(name), pick, 1), fill)  # type: ignore[arg-type]
        for name, fill in (("candidates", None), ("shift", 0.0), ("limit", np.nan))
    ]
    short = top - classes.shape[1]  # fewer entries than top in all: pad
    if short:
        pad = np.full((len(classes), short), np.nan)
        scores, terms = (
            np.hstack([scores, pad]),
            [
                np.hstack([terms[0], np.full(pad.shape, None, object)]),
                np.hstack([terms[1], pad]),
                np.hstack([terms[2], pad]),
            ],
        )
    return ranking.judge(scores, *terms)


def combined_info(
    path: str | os.PathLike, parts: Sequence[dict[str, Any]], auto_choice: dict[str, Any] | None
) -> dict[str, Any]:
    """A sharded collection's ``info()`` from its shards' own (``parts``, in shard order): what
    ``ShardedCollection.info`` and the Ray engine's ``/info`` give."""
    return {
        "path": str(path),
        "shards": len(parts),
        "classes": sum(p["classes"] for p in parts),
        "proxies": sum(p["proxies"] for p in parts),
        "samples": sum(p["samples"] for p in parts),
        "version": sum(p["version"] for p in parts),
        "config": parts[0]["config"],
        "auto_choice": auto_choice,
        "embedder": parts[0]["embedder"],
        "bytes_on_disk": sum(p["bytes_on_disk"] for p in parts) + (Path(path) / MANIFEST).stat().st_size,
        "shard_info": [
            {
                "shard": i,
                **{key: p[key] for key in ("classes", "proxies", "samples", "version", "trained_on", "index_tuning")},
                "search_params": p["config"]["search_params"],
            }
            for i, p in enumerate(parts)
        ],
    }

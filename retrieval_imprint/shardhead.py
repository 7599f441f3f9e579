"""The least-squares head of a sharded collection (``generator="ls"``): one ridge over the samples
of every shard.

Each shard is an ordinary streaming ls collection (lshead.py): its ``G`` sums its own samples, and
its own ``lambda`` serves it opened alone. A class's score ``m_c . z(q)`` compares across shards
only under one ``z`` of the whole, ``z = (n / C) (sum_i G_i + lambda I)^-1 phi(q)`` with every
shard's ``n``, ``C`` and ``G``: the query is mapped once here and the same ``z`` searched in every
shard, so the answers are those of one collection of all the classes. ``lambda`` is the whole's,
kept in the manifest (``ridge``: ``lam`` and the ``rows`` it was chosen on): set by the first add
on its rows, as one collection's first add sets it, and again on every shard's kept samples
whenever they double or halve since, and by ``tune``. The whole's ``A`` is factored anew
(``O(M^3)`` for ``M`` features) when a query first meets a changed shard, then kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .lshead import LSHead
from .normalize import normalize
from .params import AUTO
from .shards import pooled
from .snapshot import Snapshot


def entry(lam: float, rows: int) -> dict[str, Any]:
    """The manifest's ``ridge``: ``lambda`` and the samples it was chosen on."""
    return {"lam": float(lam), "rows": int(rows)}


def first(cfg: dict[str, Any], X: np.ndarray, codes: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
    """The manifest's ``ridge`` from a first add's rows ``X`` (before NORMpre) in classes ``codes`` (label
    ``keys`` per class), as a collection's first add sets it."""
    if cfg["ls_reg"] != AUTO:
        return entry(len(X) * float(cfg["ls_reg"]), len(X))
    head = LSHead.first({**cfg, "dimension": X.shape[1]}, normalize(X, cfg["pre_norm"], what="X"), codes, keys)
    return entry(head.lam, head.chosen_on)


def rechosen(snaps: Sequence[Snapshot], paths: Sequence[Path], ridge: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``ridge`` chosen again on all the shards' samples (the shards' snapshots, and their
    directories): ``n rho``, ``rho`` the setting ``ls_reg`` or by leave-one-out on every kept sample."""
    live = [(s, path) for s, path in zip(snaps, paths) if s.head is not None]
    cfg = live[0][0].config
    kept = pooled([s.kept_samples(path) for s, path in live]) if cfg["ls_reg"] == AUTO else None
    whole = LSHead.combined(cfg, heads(snaps), ridge["lam"], ridge["rows"])
    head = whole.rechosen(cfg["ls_reg"], kept)
    return entry(head.lam, head.chosen_on)


def outgrown(snaps: Sequence[Snapshot], ridge: dict[str, Any]) -> bool:
    """Whether the shards' samples have doubled or halved since ``lambda`` was chosen (``LSHead.outgrown``)."""
    return LSHead.outgrows(ridge["rows"], sum(head.n_rows for head in heads(snaps)))


def heads(snaps: Sequence[Snapshot]) -> list[LSHead]:
    """The streaming heads of these shards' snapshots (none in a shard that has had no add)."""
    return [head for s in snaps if (head := s.head) is not None]


class WholeHead:
    """The whole's head, made from the shards' snapshots and kept while none of them changes."""

    def __init__(self) -> None:
        self._made: tuple[tuple, LSHead] | None = None

    def of(self, snaps: Sequence[Snapshot], ridge: dict[str, Any]) -> LSHead:
        """The head of the shards at these versions, for the manifest's ``ridge``."""
        live = [s for s in snaps if s.head is not None]
        key = (tuple(s.version for s in snaps), ridge["lam"], ridge["rows"])
        if self._made is None or self._made[0] != key:
            self._made = (key, LSHead.combined(live[0].config, heads(live), ridge["lam"], ridge["rows"]))
        return self._made[1]

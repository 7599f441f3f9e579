"""The estimator's ls head (GEN ``ls``: RanPAC's ridge regression, usually on random ReLU features)
fitted once, with what its own leave-one-out knows.

Choosing the ridge scores every grid point by closed-form leave-one-out (``generate.LeftOut``). The
same pass gives, at the chosen ridge, the head's held-out accuracy and held-out class scores for
free: ``auto`` weighs the ls head against the imprinted ones by that accuracy (``auto.choose_head``),
and the estimator fits its temperature to those scores rather than to a second fit of the whole
head without a fold (which doubled an ls fit: one eigendecomposition of the ``width x width``
second moment, 4000 wide by default). The collections' streaming ls head is ``lshead.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._groups import Grouped
from .generate import LeftOut, Spectrum, best_ridge, class_means, ls_head
from .imprint import grouped, seed_of
from .params import AUTO
from .temperature import FALLBACK
from .temperature import fit as fit_temperature


@dataclass(frozen=True)
class LSFit:
    """An ls head on samples ``X`` (raw, in the head's space) and ``groups`` (the same after NORMpre):
    ``W`` ``(C, d)`` before NORMpost, its ``ridge`` and leave-one-out ``accuracy``, and ``held_scores``
    ``(rows, C)`` of the rows of ``groups`` left out (``held``, classes of two samples or more) as the
    head scores a query, or None where queries are normalised otherwise than the samples (NORMinf is
    not NORMpre) or proxies are not L2-normalised. ``map``: the random features ``auto`` added, if any."""

    X: np.ndarray
    groups: Grouped
    W: np.ndarray
    ridge: float
    accuracy: float
    held: np.ndarray
    held_scores: np.ndarray | None
    map: np.ndarray | None = None

    def temperature(self) -> float | None:
        """The temperature fitted to ``held_scores`` (``temperature.py``; its fallback where no row is
        held out), or None where there are none."""
        if self.held_scores is None:
            return None
        return fit_temperature(self.held_scores, self.groups.owner[self.held]) if len(self.held) else FALLBACK


def fit(X: np.ndarray, codes: np.ndarray, keys: np.ndarray, params: dict[str, Any]) -> LSFit:
    """The ls head of raw samples ``X`` of classes ``codes`` (label ``keys``) under ``params``: its ridge
    the ``ls_reg`` setting, or under ``"auto"`` the grid's best by leave-one-out (as ``generate.ls``)."""
    groups = grouped(X, codes, keys, params["pre_norm"])
    spectrum, M = Spectrum.of(groups.X), class_means(groups)
    left = LeftOut(groups.X, spectrum, groups.owner, M, seed_of(params["random_state"]))
    classes, l2 = np.arange(groups.n_classes), params["post_norm"] == "l2"
    if params["ls_reg"] == AUTO:
        ridge, accuracy = best_ridge(*left.grid(classes, l2))
    else:
        ridge = float(params["ls_reg"])
        accuracy = left.accuracy(ridge, classes, l2)
    held = left.rows[groups.sizes[groups.owner[left.rows]] >= 2]
    as_queried = l2 and params["pre_norm"] == params["inf_norm"]
    scores = left.scores(ridge, True)[np.isin(left.rows, held)] if as_queried else None
    if scores is not None and np.isnan(scores).any():  # rows the head interpolates: no held-out score
        scores = None
    return LSFit(X, groups, ls_head(spectrum, M, ridge), ridge, accuracy, held, scores)

"""Imprinting: NORMpre -> GEN -> NORMpost, the one pipeline behind the estimator and collections.

What the first fit fixes is kept in ``Fixed``: the quantile targets of NORMpost ``quantile`` and
the linear map of metric ``mahalanobis``, both computed from the first fit's proxies. A collection
stores them and passes them back for every later add, so adding a class never moves another's
proxies, and a fit does not depend on class order (docs/framework.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._groups import Grouped
from .generate import class_means, generate
from .index import mahalanobis_map
from .normalize import normalize, quantile_targets


@dataclass(frozen=True)
class Fixed:
    """What the first fit fixes for later ones: quantile targets ``(d,)`` and Mahalanobis map ``(d, d)``."""

    targets: np.ndarray | None = None
    transform: np.ndarray | None = None


def seed_of(random_state: Any) -> int:
    """An int seed from ``random_state`` (int, None or a ``RandomState``, as scikit-learn takes)."""
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    from sklearn.utils import check_random_state  # here: scikit-learn takes a second to import

    return int(check_random_state(random_state).randint(2**31))


def grouped(X: np.ndarray, codes: np.ndarray, keys: np.ndarray, pre_norm: str) -> Grouped:
    """Samples ``X`` grouped by class code after NORMpre, copying ``X`` at most once."""
    groups = Grouped.from_codes(X, codes, keys)
    owned = groups.X is not X and not np.shares_memory(groups.X, X)  # sorted into a copy of ours
    return Grouped(normalize(groups.X, pre_norm, what="X", copy=not owned), groups.offsets, groups.keys)


def imprint(
    groups: Grouped, params: dict[str, Any], fixed: Fixed | None = None
) -> tuple[np.ndarray, np.ndarray, Fixed]:
    """Proxies ``W`` ``(P, d)`` after NORMpost, the class index of each row, and what is fixed.

    ``groups`` hold NORMpre'd samples; ``params`` concrete GEN/NORM/AGG parameters (``params.py``,
    after ``auto.choose``); ``fixed`` what an earlier fit fixed (None: this is the first, so compute
    it from ``W``).
    """
    extra = {"ls_reg": params["ls_reg"], "post_norm": params["post_norm"]} if "ls_reg" in params else {}
    W, owner = generate(params["generator"], groups, params["k"], seed_of(params["random_state"]), **extra)
    return finished(W, owner, params, fixed)


def finished(
    W: np.ndarray, owner: np.ndarray, params: dict[str, Any], fixed: Fixed | None = None
) -> tuple[np.ndarray, np.ndarray, Fixed]:
    """``imprint``'s last steps on generated proxies ``W`` of classes ``owner``: NORMpost, and what
    the first fit fixes (for a head generated elsewhere: ``lsfit.py``'s)."""
    fixed = fixed or Fixed()
    targets = fixed.targets
    if params["post_norm"] == "quantile" and targets is None:
        targets = quantile_targets(W)
    W = normalize(W, params["post_norm"], targets=targets, what="proxies", copy=False)
    transform = fixed.transform
    if params["metric"] == "mahalanobis" and transform is None:
        transform = mahalanobis_map(W)
    return W, owner, Fixed(targets, transform)


def means(groups: Grouped, params: dict[str, Any], fixed: Fixed) -> np.ndarray:
    """Class means ``(C, d)`` after NORMpost (with the fit's fixed targets): the first term of a blend."""
    return normalize(
        class_means(groups).astype(np.float32), params["post_norm"], targets=fixed.targets, what="proxies", copy=False
    )

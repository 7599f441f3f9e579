"""Neural collapse NC1: how tightly a frozen model's embeddings cluster around their class means.

On L2-normalised embeddings, with class means ``mu_c`` and global mean ``mu_G``::

    Sigma_B = 1/C sum_c (mu_c - mu_G)(mu_c - mu_G)^T
    Sigma_W = 1/C sum_c 1/n_c sum_{x in c} (x - mu_c)(x - mu_c)^T
    NC1     = tr(Sigma_W Sigma_B^+) / C

The paper's reference code centres within-class deviations on ``mu_c - mu_G`` instead of ``mu_c``,
which inflates NC1; ``paper_compatible=True`` reproduces that. The paper finds the gain of k > 1
proxies over the mean grows with NC1 (split at NC1 = 1), and k = 1 tends to win few-shot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_X_y

from . import labels as lab
from .errors import DataError
from .normalize import l2_normalize

FEW_SHOT = 20  # median samples per class at or below which the paper sees k = 1 win
MAX_USEFUL_K = 20  # accuracy saturates near k = 10-20 in the paper


@dataclass(frozen=True)
class CollapseReport:
    """NC1 of a labelled set, per-class figures and the k it suggests for ``kmeans`` proxies."""

    nc1: float
    classes: np.ndarray  # (C,) sorted labels
    per_class_nc1: np.ndarray  # (C,) tr(Sigma_W^c Sigma_B^+) / C; their mean is nc1
    per_class_spread: np.ndarray  # (C,) mean squared distance of a class's samples to its centre
    class_sizes: np.ndarray  # (C,)
    paper_compatible: bool
    recommended_k: int
    reason: str


def _recommend(nc1: float, median_n: float) -> tuple[int, str]:
    if median_n <= FEW_SHOT:
        return 1, (
            f"few-shot: median {median_n:g} samples per class (<= {FEW_SHOT}); the class mean (k = 1) tends to win here"
        )
    if nc1 < 1.0:
        return 1, f"NC1 = {nc1:.3g} < 1: classes are collapsed, one mean per class captures them"
    k = int(min(MAX_USEFUL_K, median_n // 2))
    return k, (
        f"NC1 = {nc1:.3g} >= 1: classes are spread out, several proxies help; k = {k} "
        f"(accuracy saturates near 10-20, and each centroid keeps >= 2 samples)"
    )


def neural_collapse(X: np.ndarray, y: np.ndarray, *, paper_compatible: bool = False) -> CollapseReport:
    """NC1 of embeddings ``X`` ``(n, d)`` with labels ``y`` ``(n,)`` (L2-normalised here first)."""
    X, y = check_X_y(X, y, dtype=np.float32)  # scikit-learn's messages for bad shapes and values
    lab.check_targets(y)
    X = l2_normalize(X).astype(np.float64)
    classes, codes = np.unique(y, return_inverse=True)
    C = len(classes)
    if C < 2:
        raise DataError(f"NC1 needs at least 2 classes; y has {C}")
    sizes = np.bincount(codes)
    means = np.zeros((C, X.shape[1]))
    np.add.at(means, codes, X)
    means /= sizes[:, None]
    mu_g = X.mean(0)
    centred = means - mu_g
    sigma_b = centred.T @ centred / C
    centre = (means - mu_g) if paper_compatible else means
    dev = X - centre[codes]
    sigma_b_pinv = np.linalg.pinv(sigma_b, hermitian=True)
    quad = np.einsum("nd,nd->n", dev @ sigma_b_pinv, dev)  # (x - centre) Sigma_B^+ (x - centre)^T
    per_class = np.bincount(codes, quad) / sizes / C
    spread = np.bincount(codes, np.einsum("nd,nd->n", dev, dev)) / sizes
    nc1 = float(per_class.mean())
    k, reason = _recommend(nc1, float(np.median(sizes)))
    return CollapseReport(nc1, classes, per_class, spread, sizes, paper_compatible, k, reason)

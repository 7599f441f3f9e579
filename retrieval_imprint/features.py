"""Random ReLU features: a fixed nonlinear map of the embeddings, so that a linear head can bend.

``phi(x) = max(0, x R)`` with ``R`` a ``(d, width)`` standard Gaussian matrix drawn from the seed:
``width`` random features of the first-order arc-cosine kernel (Cho & Saul, 2009), which has no
bandwidth to tune. RanPAC (McDonnell et al., NeurIPS 2023) puts such a map between a frozen model
and a least-squares head; here it is the estimator's ``features`` setting, and it turns GEN ``ls``
(with its ridge chosen by leave-one-out) into the most accurate head on full data (docs/results.md).
``phi`` is positively homogeneous (``phi(c x) = c phi(x)`` for ``c > 0``), so an L2 NORMpre or
NORMinf gives the same unit vectors whether the embeddings were normalised before the map or not.
"""

from __future__ import annotations

import numpy as np

_STREAM = 0x5EED_F0A7  # the map's own random stream, apart from the generators' draws

BLOCK_ROWS = 8192  # rows mapped at a time: bounds the float32 scratch of X @ R


def feature_map(dim: int, width: int, seed: int) -> np.ndarray:
    """The seeded Gaussian matrix ``R`` ``(dim, width)`` float32 of ``phi``: the same on every machine."""
    return np.random.default_rng([seed, _STREAM]).standard_normal((dim, width), dtype=np.float32)


def relu_features(X: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``max(0, X R)`` ``(n, width)`` float32, a block of rows at a time."""
    out = np.empty((len(X), R.shape[1]), np.float32)
    for lo in range(0, len(X), BLOCK_ROWS):
        np.matmul(X[lo : lo + BLOCK_ROWS], R, out=out[lo : lo + BLOCK_ROWS])
        np.maximum(out[lo : lo + BLOCK_ROWS], 0.0, out=out[lo : lo + BLOCK_ROWS])
    return out

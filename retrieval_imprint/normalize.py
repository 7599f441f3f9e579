"""NORM: L2 and quantile normalisation of samples (pre), proxies (post) and queries (inference).

Quantile post-norm (Hosoda et al.) maps each proxy's r-th smallest entry to a fixed target value
``y_r``, the ``(r + 1/2)/d`` quantile of a reference set R of proxies. The reference code uses "all
proxies already in the head" as R, so the first class is never normalised and results depend on
insertion order. Here R is every proxy the *first fit* generates (before post-norm): the targets
are computed once from all of them, stored, and reused for every later add. A fit is therefore
independent of class order, and incremental adds never move existing proxies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import DataError

_PARALLEL_ELEMENTS = 1 << 23  # below this many entries one thread is faster than a pool


def l2_normalize(X: np.ndarray, what: str = "X", *, copy: bool = True) -> np.ndarray:
    """Rows of ``X`` ``(n, d)`` scaled to unit L2 norm; a zero row is an error, never a NaN.

    ``copy=False`` divides a float32 ``X`` in place (for arrays the caller owns). Large arrays are
    done in row blocks on all cores (the work is memory-bound, so threads help only a little).
    """
    X = X if X.dtype == np.float32 else X.astype(np.float32)
    out = np.empty_like(X) if copy else X
    norms = np.empty((len(X), 1), np.float32)

    def measure(lo: int, hi: int) -> None:
        np.sqrt(np.einsum("ij,ij->i", X[lo:hi], X[lo:hi]), out=norms[lo:hi, 0])

    def divide(lo: int, hi: int) -> None:
        np.divide(X[lo:hi], norms[lo:hi], out=out[lo:hi])

    _over_rows(measure, len(X), X.shape[1])
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        raise DataError(f"cannot L2-normalise {what}: row {zero[0]} is a zero vector ({len(zero)} zero row(s) in all)")
    _over_rows(divide, len(X), X.shape[1])
    return out


def _over_rows(fn: Callable[[int, int], None], n: int, d: int) -> None:
    """``fn(lo, hi)`` over row blocks covering ``range(n)``: in threads when the array is large."""
    if n * d < _PARALLEL_ELEMENTS:
        fn(0, n)
        return
    step = max(1, _PARALLEL_ELEMENTS // (4 * d))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda lo: fn(lo, min(lo + step, n)), range(0, n, step)))


def quantile_targets(R: np.ndarray) -> np.ndarray:
    """Target values ``y_i`` ``(d,)``: quantile of flattened reference proxies ``R`` at ``(i + 1/2)/d``."""
    d = R.shape[1]
    return np.quantile(R.astype(np.float64).ravel(), (np.arange(d) + 0.5) / d).astype(np.float32)


def quantile_normalize(W: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row keeps its rank order; its r-th smallest entry becomes ``targets[r]`` (ties: by position)."""
    order = np.argsort(W, axis=1, kind="stable")
    out = np.empty(W.shape, np.float32)
    np.put_along_axis(out, order, np.broadcast_to(targets.astype(np.float32), W.shape), axis=1)
    return out


def normalize(
    X: np.ndarray, method: str, *, targets: np.ndarray | None = None, what: str = "X", copy: bool = True
) -> np.ndarray:
    """Apply ``method`` (``none``, ``l2`` or ``quantile`` with its ``targets``) to the rows of ``X``."""
    if method == "l2":
        return l2_normalize(X, what, copy=copy)
    if method == "quantile":
        if targets is None:
            raise RuntimeError("quantile normalisation needs reference targets (see quantile_targets)")
        return quantile_normalize(X, targets)
    return X

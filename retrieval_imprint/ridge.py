"""The least-squares head grown one class at a time: its ridge regression moved to the query side.

GEN ``ls`` (``generate.ls_head``) is ridge regression onto class indicators, each row weighted
``n / (C n_c)``; its head is ``W = (1/C) M^T (G/n + rho I)^-1`` with ``G = X^T X`` over all ``n``
training rows (random features, NORMpre'd) and ``M`` the ``C`` class means. Every class's row of ``W``
depends on every sample, so a class added there means a head rebuilt. Written as

    score_c(q) = m_c . z(q),    z(q) = (n / C) A x_q,    A = (G + lambda I)^-1,    lambda = n rho

the class side holds only its own mean ``m_c`` (what a collection's index stores, and top-1 inner
product search ranks), and everything shared is the query transform ``z``: adding or removing a
class of ``k`` rows changes ``G`` by ``+-U U^T`` (``U = X_c^T``) and ``A`` by a rank-``k`` update
(Woodbury), ``O(M^2 k)`` instead of the ``O(M^3)`` of a new inverse. The scores are the estimator's
(``post_norm="none"``) for the same ``lambda``: exact under any history of adds and removes, up to
float64 rounding, which ``refactor`` (from ``G``, kept exactly as sums) clears.

``lambda`` is absolute: the leave-one-out choice (``generate.loo_ridge``, relative to ``G / n``) is
made into ``n rho`` when the head is created, tuned or has outgrown it (lshead.py), and kept
between, so an add regularises as a Bayesian ridge with a fixed prior would.
"""

from __future__ import annotations

import numpy as np

WOODBURY_SHARE = 0.25  # rows of an update, as a share of the width, up to which A is updated, not refactored
BLOCK_ROWS = 4096  # rows of a float64 block of the Gram matrix's sum


class RidgeHead:
    """The shared state of a streaming least-squares head of ``width`` features: ``G`` (``gram_``),
    ``n`` (``n_rows_``) and ``A`` (``inverse_``) in float64, for a ridge ``lam``."""

    def __init__(self, width: int, lam: float) -> None:
        if not lam > 0:
            raise ValueError(f"ridge {lam!r} is not valid; expected a positive number")
        self.width, self.lam = width, float(lam)
        self.gram_ = np.zeros((width, width))
        self.n_rows_ = 0
        self.inverse_ = np.eye(width) / self.lam
        self._query: tuple[np.ndarray, np.ndarray] | None = None  # (the A it was made from, A in float32)

    @classmethod
    def from_gram(cls, gram: np.ndarray, n_rows: int, lam: float) -> RidgeHead:
        """The head of a stored ``G`` over ``n_rows`` rows (a checkpoint), factored anew."""
        head = cls(len(gram), lam)
        head.gram_, head.n_rows_ = np.array(gram, np.float64), int(n_rows)
        return head.refactor()

    def refactor(self) -> RidgeHead:
        """``A`` computed anew from ``G``: drops the rounding that rank updates accumulate."""
        system = self.gram_ + self.lam * np.eye(self.width)
        lower = np.linalg.cholesky(system)
        inv_lower = np.linalg.solve(lower, np.eye(self.width))
        self.inverse_ = inv_lower.T @ inv_lower
        return self

    def add(self, X: np.ndarray) -> RidgeHead:
        """Rows ``X`` ``(k, width)`` joined the training set."""
        return self._update(X, 1.0)

    def remove(self, X: np.ndarray) -> RidgeHead:
        """Rows ``X`` ``(k, width)``, added before, left the training set."""
        if len(X) > self.n_rows_:
            raise ValueError(f"{len(X)} rows removed from a head of {self.n_rows_}")
        return self._update(X, -1.0)

    def _update(self, X: np.ndarray, sign: float) -> RidgeHead:
        # new arrays, never changed in place: a shallow copy of the head taken before keeps its own
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.width:
            raise ValueError(f"rows of {X.shape[-1]} features for a head of {self.width}")
        self.gram_ = self.gram_ + sign * gram_of(X)
        self.n_rows_ += int(sign) * len(X)
        if len(X) > WOODBURY_SHARE * self.width:
            return self.refactor()
        # (G +- U U^T + lam I)^-1 = A - A U (+-I + U^T A U)^-1 U^T A, A symmetric
        U = np.asarray(X, np.float64).T
        AU = self.inverse_ @ U
        core = U.T @ AU
        core[np.diag_indices_from(core)] += sign
        self.inverse_ = self.inverse_ - AU @ np.linalg.solve(core, AU.T)
        return self

    def transform(self, X: np.ndarray, n_classes: int) -> np.ndarray:
        """``z(x) = (n / C) A x`` of each row of ``X`` ``(q, width)`` float32: the query whose inner
        product with a class mean is that class's score. Computed with a float32 copy of ``A`` (half
        the bytes a query reads), made on first use after each change."""
        pair = self._query
        if pair is None or pair[0] is not self.inverse_:  # A changed since (or a copy's A): made again once
            pair = self._query = (self.inverse_, self.inverse_.astype(np.float32))
        return np.asarray(X, np.float32) @ pair[1] * np.float32(self.n_rows_ / n_classes)


def gram_of(X: np.ndarray) -> np.ndarray:
    """``X^T X`` in float64, a block of ``BLOCK_ROWS`` rows at a time (no float64 copy of all of ``X``)."""
    out = np.zeros((X.shape[1], X.shape[1]))
    for lo in range(0, len(X), BLOCK_ROWS):
        part = np.asarray(X[lo : lo + BLOCK_ROWS], np.float64)
        out += part.T @ part
    return out

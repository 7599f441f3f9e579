"""NORM: L2 and quantile normalisation against references; zero vectors are errors, not NaNs."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import ImprintClassifier
from retrieval_imprint.normalize import l2_normalize, quantile_normalize, quantile_targets


def test_l2_matches_reference():
    X, _ = blobs(3, 10, 7)
    np.testing.assert_allclose(l2_normalize(X), ref.l2(X), rtol=1e-6)


def test_l2_of_a_zero_row_is_an_error_naming_the_row():
    X = np.ones((4, 3), np.float32)
    X[2] = 0
    with pytest.raises(ValueError, match="row 2 is a zero vector"):
        l2_normalize(X)
    with pytest.raises(ValueError, match="zero vector"):
        ImprintClassifier().fit(X, [0, 0, 1, 1])
    clf = ImprintClassifier().fit(np.eye(3) + 0.1, [0, 1, 2])
    with pytest.raises(ValueError, match="cannot L2-normalise X: row 0"):
        clf.predict(np.zeros((1, 3)))


def test_quantile_matches_reference_and_keeps_rank_order():
    rng = np.random.default_rng(0)
    R = rng.standard_normal((20, 9)).astype(np.float32)
    W = rng.standard_normal((5, 9)).astype(np.float32)
    out = quantile_normalize(W, quantile_targets(R))
    np.testing.assert_allclose(out, ref.quantile_norm(W, R), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.argsort(out, 1), np.argsort(W, 1))


def test_quantile_post_norm_is_order_independent_and_normalises_every_class():
    """R is every proxy of the fit: permuting classes changes nothing, the first class included."""
    X, y = blobs(6, 15, 5, seed=4)
    a = ImprintClassifier.from_preset("hosoda").fit(X, y)
    perm = np.random.default_rng(1).permutation(len(y))
    b = ImprintClassifier.from_preset("hosoda").fit(X[perm], y[perm])
    np.testing.assert_allclose(a.proxies_, b.proxies_, rtol=1e-6)
    means = np.stack([X[y == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(a.proxies_, ref.quantile_norm(means, means), rtol=1e-4, atol=1e-5)
    # every proxy is a permutation of the same target values, the first class's too
    np.testing.assert_allclose(np.sort(a.proxies_, 1), np.sort(a.proxies_, 1)[[0] * 6], rtol=1e-6)

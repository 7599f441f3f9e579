"""NC1 against the explicit per-class sums, the paper-compatible variant, and the k advice."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import neural_collapse
from retrieval_imprint.errors import DataError


@pytest.mark.parametrize("paper_compatible", [False, True])
def test_nc1_matches_reference(paper_compatible):
    X, y = blobs(7, 15, 6, seed=11)
    keep = ~((y == 2) & (np.arange(len(y)) % 3 == 0))  # unequal class sizes
    X, y = X[keep], y[keep]
    report = neural_collapse(X, y, paper_compatible=paper_compatible)
    assert report.nc1 == pytest.approx(ref.nc1(X, y, paper_compatible), rel=1e-6)
    assert report.per_class_nc1.mean() == pytest.approx(report.nc1, rel=1e-9)
    assert report.class_sizes.tolist() == [int((y == c).sum()) for c in report.classes]


def test_paper_variant_inflates_nc1():
    X, y = blobs(6, 40, 5, seed=12)
    assert neural_collapse(X, y, paper_compatible=True).nc1 > neural_collapse(X, y).nc1


def test_collapsed_classes_get_k_1_and_spread_classes_get_more():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 8)) * 10
    y = np.repeat(np.arange(5), 60)
    tight = centres[y] + 0.01 * rng.standard_normal((300, 8))
    report = neural_collapse(tight, y)
    assert report.nc1 < 1 and report.recommended_k == 1 and "collapsed" in report.reason
    wide = rng.standard_normal((300, 8))
    report = neural_collapse(wide, y)
    assert report.nc1 > 1 and report.recommended_k == 20 and "NC1" in report.reason
    few_rows = np.concatenate([np.flatnonzero(y == c)[:4] for c in range(5)])
    few = neural_collapse(wide[few_rows], y[few_rows])
    assert few.recommended_k == 1 and "few-shot" in few.reason


def test_nc1_needs_two_classes():
    with pytest.raises(DataError, match="at least 2 classes"):
        neural_collapse(np.ones((4, 3)), [0, 0, 0, 0])

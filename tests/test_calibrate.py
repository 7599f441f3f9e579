"""Open-set rejection: threshold calibration against an exhaustive search, stored with a collection."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import blobs
from retrieval_imprint.collection import Collection
from retrieval_imprint.calibrate import calibrate


def brute(in_scores, correct, oos, target=None):
    best = None
    for t in sorted(set(in_scores) | set(oos) | {-np.inf}):
        acc = np.mean(correct & (in_scores >= t))
        rec = np.mean(oos < t) if len(oos) else None
        if target is not None:
            if acc >= target and (best is None or t > best[0]):
                best = (t, acc, rec)
        elif best is None or (acc + rec) / 2 > (best[1] + best[2]) / 2:
            best = (t, acc, rec)
    return best


@pytest.mark.parametrize("target", [None, 0.4, 0.6])
def test_calibrate_matches_exhaustive_search(target):
    rng = np.random.default_rng(0)
    in_scores = rng.uniform(0.3, 1.0, 200).round(3)
    correct = rng.uniform(size=200) < in_scores  # confident answers are right more often
    oos = rng.uniform(0.0, 0.7, 150).round(3)
    got = calibrate(in_scores, correct, oos, target_accuracy=target)
    t, acc, rec = brute(in_scores, correct, oos, target)
    assert got.threshold == t and got.in_scope_accuracy == pytest.approx(acc) and got.oos_recall == pytest.approx(rec)


def test_calibrate_needs_a_criterion():
    with pytest.raises(ValueError, match="without out-of-scope queries, give target_accuracy"):
        calibrate(np.ones(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="target_accuracy=1.5 is not valid"):
        calibrate(np.ones(3), np.ones(3, bool), target_accuracy=1.5)
    unreachable = calibrate(np.ones(3), np.array([True, False, False]), target_accuracy=0.9)
    assert unreachable.threshold == -np.inf and "unreachable" in unreachable.criterion


def test_collection_calibration_is_stored_and_rejects_out_of_scope(tmp_path):
    X, y = blobs(5, 30, 8, seed=2)
    col = Collection.create(tmp_path / "c", model=None, k=3)
    col.add(X[::2], y[::2])
    oos = np.random.default_rng(5).standard_normal((60, 8)).astype(np.float32) * 3
    result = col.calibrate(X[1::2], y[1::2], oos)
    reopened = Collection.open(tmp_path / "c")
    assert reopened.config["threshold"] == pytest.approx(result.threshold)
    pred_in, pred_oos = reopened.predict(X[1::2]), reopened.predict(oos)
    assert np.mean(pred_in == y[1::2]) == pytest.approx(result.in_scope_accuracy)
    assert np.mean([p is None for p in pred_oos]) == pytest.approx(result.oos_recall)

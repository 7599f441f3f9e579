"""Open-set rejection: rules, calibration against an exhaustive search, without out-of-scope data,
per-class thresholds, and what a collection keeps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs

from retrieval_imprint import Collection, ImprintClassifier
from retrieval_imprint.auto import folds
from retrieval_imprint.errors import CalibrationError
from retrieval_imprint.openset import auroc, calibrate, calibrate_without_oos


def brute(in_scores, correct, oos, target=None, target_recall=None, margin=0.0):
    """Every threshold tried; a target must be cleared by ``margin`` binomial standard errors."""
    if target is not None:
        target += margin * np.sqrt(target * (1 - target) / len(in_scores))
    if target_recall is not None:
        target_recall += margin * np.sqrt(target_recall * (1 - target_recall) / len(oos))
    best = None
    for t in sorted(set(in_scores) | set(oos) | {-np.inf}):
        acc = np.mean(correct & (in_scores >= t))
        rec = np.mean(oos < t) if len(oos) else None
        if target is not None:
            if acc >= target and (best is None or t > best[0]):
                best = (t, acc, rec)
        elif target_recall is not None:
            if rec >= target_recall and (best is None or t < best[0]):
                best = (t, acc, rec)
        elif best is None or (acc + rec) / 2 > (best[1] + best[2]) / 2:
            best = (t, acc, rec)
    return best


def scored(seed=0):
    rng = np.random.default_rng(seed)
    in_scores = rng.uniform(0.3, 1.0, 200).round(3)
    correct = rng.uniform(size=200) < in_scores  # confident answers are right more often
    return in_scores, correct, rng.uniform(0.0, 0.7, 150).round(3)


@pytest.mark.parametrize("margin", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("target,target_recall", [(None, None), (0.4, None), (0.6, None), (None, 0.5), (None, 0.9)])
def test_calibrate_matches_exhaustive_search(target, target_recall, margin):
    in_scores, correct, oos = scored()
    best = brute(in_scores, correct, oos, target, target_recall, margin)
    if best is None:
        with pytest.raises(CalibrationError, match="no threshold reaches"):
            calibrate(
                {"max": (in_scores, correct, oos)},
                target_accuracy=target,
                target_oos_recall=target_recall,
                margin=margin,
            )
        return
    got = calibrate(
        {"max": (in_scores, correct, oos)}, target_accuracy=target, target_oos_recall=target_recall, margin=margin
    )
    t, acc, rec = best
    assert got.threshold == t and got.in_scope_accuracy == pytest.approx(acc) and got.oos_recall == pytest.approx(rec)
    assert got.rule == "max" and got.curve["max"][0]["threshold"] == -np.inf


def test_calibration_picks_the_rule_that_does_best_at_the_target():
    in_scores, correct, oos = scored()
    better = (in_scores + 0.2 * correct, correct, oos)  # a score that separates better
    got = calibrate({"max": (in_scores, correct, oos), "shift": better}, target_accuracy=0.5)
    assert got.rule == "shift" and got.auroc["shift"] > got.auroc["max"]
    assert got.oos_recall == pytest.approx(brute(*better, 0.5, margin=1.0)[2])


def test_auroc_matches_the_pairwise_definition():
    a, b = np.array([0.5, 0.7, 0.7, 0.9]), np.array([0.1, 0.7, 0.3])
    pairs = [(x > y) + 0.5 * (x == y) for x in a for y in b]
    assert auroc(a, b) == pytest.approx(np.mean(pairs))


def test_calibration_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="without out-of-scope queries, give target_accuracy"):
        calibrate({"max": (np.ones(3), np.ones(3, bool), None)})
    with pytest.raises(ValueError, match="target_accuracy=1.5 is not valid"):
        calibrate({"max": (np.ones(3), np.ones(3, bool), None)}, target_accuracy=1.5)
    with pytest.raises(CalibrationError, match="no threshold reaches in-scope accuracy 0.9"):
        calibrate({"max": (np.ones(3), np.array([True, False, False]), None)}, target_accuracy=0.9)
    with pytest.raises(ValueError, match="margin=-1 is not valid"):
        calibrate({"max": (np.ones(3), np.ones(3, bool), None)}, target_accuracy=0.5, margin=-1)
    with pytest.raises(ValueError, match="target_false_rejection=1.5 is not valid"):
        calibrate_without_oos("max", np.ones(3), 1.5)


def test_without_out_of_scope_data_the_threshold_is_a_quantile_of_left_out_scores():
    own = np.array([np.nan, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert calibrate_without_oos("max", own, 0.25).threshold == pytest.approx(np.quantile(own[1:], 0.25))


def test_the_estimators_shift_is_each_class_mean_score_of_its_own_samples_left_out():
    X, y = blobs(4, 15, 6, seed=3)  # rows grouped by class, as the folds are dealt
    settings = dict(generator="kmeans", k=2, aggregation="max")
    clf = ImprintClassifier(**settings, rejection="shift").fit(X, y)
    fold = folds(_grouped(X, y), 0)
    for c in range(4):
        scores = []
        for f in range(5):
            held = np.flatnonzero((y == c) & (fold == f))
            head = ImprintClassifier(**settings).fit(X[(y != c) | (fold != f)], y[(y != c) | (fold != f)])
            scores += list(head.decision_function(X[held])[:, c])
        assert clf.class_shift_[c] == pytest.approx(np.mean(scores), abs=1e-5)
    scores = clf.decision_function(X)
    np.testing.assert_allclose(clf.rejection_score(X), scores.max(1) - clf.class_shift_[scores.argmax(1)], rtol=1e-6)
    assert ImprintClassifier(generator="mean").fit(X, y).class_shift_ is None  # max: no statistics to pay for


def _grouped(X, y):
    from retrieval_imprint._groups import Grouped
    from retrieval_imprint.labels import label_keys

    classes, codes = np.unique(y, return_inverse=True)
    return Grouped.from_codes(X, codes, label_keys(classes))


def collection(tmp_path, **settings):
    X, y = blobs(5, 30, 8, seed=2)
    col = Collection.create(tmp_path / "c", model=None, generator="kmeans", k=3, aggregation="max", **settings)
    col.add(X[::2], y[::2])
    oos = np.random.default_rng(5).standard_normal((60, 8)).astype(np.float32) * 3
    return col, X, y, oos


def test_a_collections_calibration_is_stored_and_explained(tmp_path):
    col, X, y, oos = collection(tmp_path)
    result = col.calibrate(X[1::2], y[1::2], oos)
    reopened = Collection.open(tmp_path / "c")
    assert reopened.config["threshold"] == pytest.approx(result.threshold)
    assert reopened.config["rejection"] == result.rule and set(result.auroc) == {"max", "shift"}
    pred_in, pred_oos = reopened.predict(X[1::2]), reopened.predict(oos)
    assert np.mean(pred_in == y[1::2]) == pytest.approx(result.in_scope_accuracy)
    assert np.mean([p is None for p in pred_oos]) == pytest.approx(result.oos_recall)
    why = reopened.query(oos, 1)
    assert (why.rejected[:, 0] == (why.rejection_scores[:, 0] < why.thresholds[:, 0])).all()
    assert all(c is not None for c in why.candidates[:, 0])
    reopened.compact()
    assert Collection.open(tmp_path / "c").predict(oos).tolist() == pred_oos.tolist()  # survives compaction


def test_a_class_added_to_a_calibrated_collection_is_scored_like_the_others(tmp_path):
    col, X, y, oos = collection(tmp_path)
    assert all(r["shift"] is None for r in col.class_table())  # rule max until calibration weighs shift
    col.calibrate(X[1::2], y[1::2], oos, target_accuracy=0.8, rule="shift")
    assert all(r["shift"] is not None for r in col.class_table()) and col.config["rejection"] == "shift"
    extra = np.random.default_rng(9).standard_normal((12, 8)).astype(np.float32) + 6
    col.add(extra, [99] * 12)
    row = next(r for r in Collection.open(tmp_path / "c").class_table() if r["label"] == 99)
    assert row["shift"] is not None  # its statistics came with its imprint
    own = ImprintClassifier(generator="kmeans", k=3, aggregation="max", rejection="shift").fit(
        np.concatenate([X[::2], extra]), np.concatenate([y[::2], [99] * 12])
    )
    late = list(own.classes_).index(99)
    assert row["shift"] == pytest.approx(own.class_shift_[late], abs=1e-5)


def test_per_class_thresholds_and_calibration_without_out_of_scope_data(tmp_path):
    col, X, y, _oos = collection(tmp_path)
    result = col.calibrate(target_false_rejection=0.1)
    assert result.oos_recall is None and "0.1 of the training samples" in result.criterion
    assert result.rule == "shift" and col.config["rejection"] == "shift"
    rejected = np.mean([p is None for p in col.predict(X[::2])])
    assert 0.0 < rejected < 0.3  # about the target on the training data itself
    col.set_threshold(10.0, label=int(y[0]))  # nothing passes for this class
    assert all(p != y[0] for p in Collection.open(tmp_path / "c").predict(X))
    col.set_threshold(None, label=int(y[0]))
    assert Collection.open(tmp_path / "c").class_table()[0]["threshold"] is None
    with pytest.raises(ValueError, match="no class 'nope'"):
        col.set_threshold(0.5, label="nope")
    col.set_threshold(0.9)
    with pytest.raises(CalibrationError):
        col.calibrate(X[1::2], y[1::2], target_accuracy=1.0)
    assert Collection.open(tmp_path / "c").config["threshold"] == 0.9  # a failed calibration changes nothing

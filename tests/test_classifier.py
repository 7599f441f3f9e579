"""ImprintClassifier: the scikit-learn contract, presets, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs
from sklearn.utils.estimator_checks import parametrize_with_checks

from retrieval_imprint import PRESETS, ImprintClassifier, temperature
from retrieval_imprint._groups import Grouped
from retrieval_imprint.auto import class_fold
from retrieval_imprint.labels import label_keys
from retrieval_imprint.normalize import l2_normalize

ZERO_ROW = (
    "int-valued test data truncates a row to all zeros, and L2 of a zero vector is an error "
    "by design (docs/framework.md); test_every_input_dtype covers the dtypes on data without zero rows"
)


SUBSET = (
    "predict_proba divides float32 scores by the temperature (~0.05): BLAS sums a batch in another order "
    "than a subset, which moves the last float32 bit, ~1e-6 after the softmax, over this check's 1e-7; "
    "test_predict_proba_is_subset_invariant_at_float32_precision checks it at the precision computed in"
)


def _expected_failures(estimator):
    failures = {"check_methods_subset_invariance": SUBSET}
    return {**failures, "check_estimators_dtypes": ZERO_ROW} if estimator.pre_norm == "l2" else failures


@parametrize_with_checks(
    [
        ImprintClassifier(),
        ImprintClassifier(generator="mean"),
        ImprintClassifier(generator="all", aggregation="mnn", m=3, vote="distance", metric="euclidean"),
        ImprintClassifier(
            generator="kmedoids",
            k=3,
            pre_norm="none",
            post_norm="none",
            inf_norm="none",
            aggregation="mnn",
            m=2,
            metric="manhattan",
        ),
        ImprintClassifier(
            generator="random", k=8, pre_norm="none", post_norm="none", inf_norm="none", metric="chebyshev"
        ),
        ImprintClassifier(generator="ls", aggregation="max", features=64),
    ],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_contract(estimator, check):
    check(estimator)


def test_the_zero_row_failure_is_our_documented_error():
    X = (3 * np.random.RandomState(0).uniform(size=(20, 5))).astype(np.int64)
    assert (X == 0).all(1).any()
    with pytest.raises(ValueError, match="zero vector"):
        ImprintClassifier().fit(X, [1, 2] * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_every_input_dtype(dtype):
    X = (1 + 3 * np.random.RandomState(0).uniform(size=(20, 5))).astype(dtype)
    y = np.array([1, 2] * 10)
    clf = ImprintClassifier().fit(X, y)
    assert clf.proxies_.dtype == np.float32
    assert set(clf.predict(X)) <= {1, 2} and clf.decision_function(X).shape == (20,)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_set_the_published_settings(name):
    clf = ImprintClassifier.from_preset(name)
    for key, value in PRESETS[name].items():
        assert clf.get_params()[key] == value
    assert ImprintClassifier.from_preset(name, random_state=3).random_state == 3
    X, y = blobs(4, 20, 6)
    assert clf.fit(X, y).score(X, y) > 0.5


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(generator="mean"),
        dict(generator="kmeans", aggregation="mnn", m=5, vote="distance"),
        dict(generator="kmeans", k=3, aggregation="blend", alpha=0.6, metric="euclidean"),
        dict(generator="all", aggregation="mnn", m=3, metric="mahalanobis"),
        dict(generator="kls", k=3),
        dict(generator="cov_max", k=2, post_norm="quantile"),
    ],
)
def test_predict_is_the_argmax_of_decision_function(params):
    X, y = blobs(6, 25, 5, seed=9)
    clf = ImprintClassifier(**params).fit(X, y)
    Q, _ = blobs(6, 10, 5, seed=10)
    np.testing.assert_array_equal(clf.predict(Q), clf.classes_[np.argmax(clf.decision_function(Q), 1)])


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='nope' is not valid; expected one of"):
        ImprintClassifier.from_preset("nope")


X_OK, Y_OK = blobs(3, 6, 4)


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(generator="median"), r"generator='median' is not valid; expected one of 'auto', 'all', 'mean'"),
        (dict(k=0), r"k=0 is not valid; expected a positive integer, -1 for every sample, or None"),
        (dict(k=2.5), r"k=2.5 is not valid"),
        (dict(pre_norm="quantile"), r"pre_norm='quantile' is not valid; expected one of 'none', 'l2'"),
        (dict(post_norm="max"), r"post_norm='max' is not valid; expected one of 'none', 'l2', 'quantile'"),
        (dict(inf_norm="zscore"), r"inf_norm='zscore' is not valid"),
        (dict(aggregation="mean"), r"aggregation='mean' is not valid; expected one of 'auto', 'max', 'mnn', 'blend'"),
        (dict(aggregation="blend", alpha=1.5), r"alpha=1.5 is not valid; expected a number in \[0, 1\]"),
        (dict(aggregation="max", alpha=0.5), r"alpha=0.5 is only used with aggregation='blend' or 'auto'"),
        (dict(aggregation="mnn"), r"generator='auto' chooses k for aggregation max or blend"),
        (dict(aggregation="mnn", m=0), r"m=0 is not valid; expected an integer >= 1"),
        (dict(m=3), r"m=3 is only used with aggregation='mnn'"),
        (dict(metric="hamming"), r"metric='hamming' is not valid; expected one of 'ip', 'cosine'"),
        (dict(aggregation="mnn", vote="rank"), r"vote='rank' is not valid; expected one of 'uniform', 'distance'"),
        (dict(generator="ls", ls_reg=-1.0), r"ls_reg=-1.0 is not valid"),
        (dict(features=0), r"features=0 is not valid; expected an integer >= 1"),
        (dict(features=2.5), r"features=2.5 is not valid"),
    ],
)
def test_bad_parameters_name_the_argument_and_the_allowed_values(params, match):
    with pytest.raises(ValueError, match=match):
        ImprintClassifier(**params).fit(X_OK, Y_OK)


@pytest.mark.parametrize(
    "X,y,match",
    [
        (X_OK[:, 0], Y_OK, "Expected 2D array"),
        (X_OK, Y_OK[:-1], "inconsistent numbers of samples"),
        (np.where(np.arange(X_OK.size).reshape(X_OK.shape) == 5, np.nan, X_OK), Y_OK, "NaN"),
        (np.where(np.arange(X_OK.size).reshape(X_OK.shape) == 5, np.inf, X_OK), Y_OK, "infinity"),
        (np.zeros((0, 4)), np.zeros(0), "0 sample"),
        (X_OK, np.linspace(0, 1, len(Y_OK)), "Unknown label type"),
    ],
)
def test_bad_training_data(X, y, match):
    with pytest.raises(ValueError, match=match):
        ImprintClassifier().fit(X, y)


def test_bad_queries():
    clf = ImprintClassifier().fit(X_OK, Y_OK)
    with pytest.raises(ValueError, match="X has 3 features, but ImprintClassifier is expecting 4"):
        clf.predict(X_OK[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="0 sample"):
        clf.predict(np.zeros((0, 4)))


def test_public_api_imports_from_the_package():
    import retrieval_imprint

    for name in ("ImprintClassifier", "Collection", "Embedder", "neural_collapse", "PRESETS", "GENERATORS"):
        assert hasattr(retrieval_imprint, name)


def test_predict_proba_is_the_softmax_of_the_class_scores():
    from sklearn.calibration import CalibratedClassifierCV

    X, y = blobs(4, 20, 8, seed=3)
    clf = ImprintClassifier(generator="kmeans", k=2, aggregation="max", temperature=0.1).fit(X, y)
    Q = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    P = clf.predict_proba(Q)
    scores = clf.decision_function(Q) / 0.1
    want = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(P, want / want.sum(1, keepdims=True), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(P.sum(1), 1.0)
    top = np.sort(scores, 1)
    clear = top[:, -1] - top[:, -2] > 1e-4  # float32 ties may break either way
    np.testing.assert_array_equal(clf.classes_[P.argmax(1)][clear], clf.predict(Q)[clear])
    calibrated = CalibratedClassifierCV(ImprintClassifier(generator="mean"), cv=3).fit(X, y)
    np.testing.assert_allclose(calibrated.predict_proba(Q).sum(1), 1.0)
    with pytest.raises(ValueError, match="temperature=0 is not valid"):
        ImprintClassifier(temperature=0).fit(X, y).predict_proba(Q)


def test_the_fitted_temperature_minimises_the_held_out_log_loss():
    S = np.random.default_rng(0).uniform(-1, 1, (400, 12))
    truth = np.where(np.arange(400) % 3 == 0, np.random.default_rng(1).integers(0, 12, 400), S.argmax(1))
    grid = np.exp(np.linspace(np.log(1e-3), np.log(10), 4001))
    brute = grid[np.argmin([temperature.nll(S, truth, T) for T in grid])]
    assert temperature.fit(S, truth) == pytest.approx(brute, rel=5e-3)
    assert temperature.fit(S[:0], truth[:0]) == temperature.FALLBACK


@pytest.mark.parametrize(
    "setting",
    [
        dict(generator="kmeans", k=3, aggregation="max"),
        dict(generator="kmeans", k=2, aggregation="blend", alpha=0.5),
        dict(generator="all", aggregation="mnn", m=3),
        dict(generator="ls", aggregation="max", ls_reg=0.1),  # all classes at once: fitted anew
    ],
)
def test_the_temperature_scores_held_out_rows_as_a_fit_without_them_would(setting):
    """The temperature's held-out rows (whole classes' first fold, a seeded sample of classes) are
    scored by this head with those classes imprinted again without them: the scores a fit on the
    other rows gives, though only the touched classes are imprinted again."""
    X, y = blobs(12, 15, 6, seed=5, modes=2)
    clf = ImprintClassifier(**setting, temperature=0.05).fit(X, y)
    raw = Grouped.from_codes(X, np.searchsorted(clf.classes_, y), label_keys(clf.classes_))
    rows = class_fold(raw, 0, 20)
    assert 0 < len(rows) <= 20 and len(np.unique(raw.owner[rows])) < 12  # some classes, not all
    held = np.zeros(len(X), bool)
    held[rows] = True
    Q = l2_normalize(raw.X[rows])
    refit = ImprintClassifier(**setting, temperature=0.05).fit(raw.X[~held], clf.classes_[raw.owner[~held]])
    got = clf._scores_without(raw, held, Q)
    np.testing.assert_allclose(got, refit._class_scores(Q), rtol=1e-5, atol=1e-6)


def test_the_temperature_fit_is_few_steps_wherever_its_minimum_lies(monkeypatch):
    """Scores that separate the classes perfectly want T -> 0: the lower bound, from one look at
    the slope there (Newton alone crept toward it a step of about 1.3 in 1/T at a time, 50 steps
    of 10M scores at 10k classes). Inside the bounds a few safeguarded steps find the minimum
    wherever it lies: T scales with the scores."""
    calls = []
    slope = temperature._slope
    monkeypatch.setattr(temperature, "_slope", lambda *a: calls.append(1) or slope(*a))
    rng = np.random.default_rng(0)
    S, truth = rng.uniform(-0.2, 0.6, (300, 500)), rng.integers(0, 500, 300)
    separated = S.copy()
    separated[np.arange(300), truth] = 1.0 + S.max()  # every true class far ahead
    assert temperature.fit(separated, truth) == temperature.BOUNDS[0] and len(calls) == 1
    S[np.arange(300), truth] += 0.3
    base = temperature.fit(S, truth)
    for scale in (0.02, 1.0, 40.0):
        calls.clear()
        fitted = temperature.fit(scale * S, truth)
        assert fitted == pytest.approx(scale * base, rel=1e-4) and len(calls) <= 15, scale


def test_auto_temperature_calibrates_held_out_probabilities():
    """Overlapping classes: the fitted temperature gives new data a lower log loss and a top
    probability nearer the accuracy than the fixed 0.05; a given temperature is used as is."""
    X, y = blobs(8, 80, 16, seed=5, modes=2)
    train = np.arange(len(y)) % 2 == 0
    auto = ImprintClassifier().fit(X[train], y[train])
    fixed = ImprintClassifier(temperature=0.05).fit(X[train], y[train])
    assert fixed.temperature_ == 0.05 and auto.temperature_ != 0.05
    truth = np.searchsorted(auto.classes_, y[~train])
    S = auto._class_scores(auto._queries(X[~train]))
    assert temperature.nll(S, truth, auto.temperature_) < temperature.nll(S, truth, 0.05)
    accuracy = np.mean(auto.predict(X[~train]) == y[~train])
    gap = {T: abs(np.exp(temperature.log_softmax(S, T)).max(1).mean() - accuracy) for T in (auto.temperature_, 0.05)}
    assert gap[auto.temperature_] < gap[0.05], gap
    np.testing.assert_allclose(auto.predict_proba(X[~train]), np.exp(temperature.log_softmax(S, auto.temperature_)))


def test_one_shot_data_keeps_the_fallback_temperature():
    X, y = blobs(6, 1, 8, seed=2)
    assert ImprintClassifier().fit(X, y).temperature_ == temperature.FALLBACK


def test_predict_proba_is_subset_invariant_at_float32_precision():
    X, y = blobs(5, 20, 16, seed=4)
    clf = ImprintClassifier(generator="kmeans", k=3, aggregation="max").fit(X, y)
    Q = np.random.default_rng(2).standard_normal((300, 16)).astype(np.float32)
    whole = clf.predict_proba(Q)
    parts = np.concatenate([clf.predict_proba(Q[i : i + 7]) for i in range(0, len(Q), 7)])
    eps = np.finfo(np.float32).eps * np.abs(clf.decision_function(Q)).max() / clf.temperature_
    np.testing.assert_allclose(parts, whole, rtol=0, atol=8 * eps)

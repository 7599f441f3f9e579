"""ImprintClassifier: the scikit-learn contract, presets, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from conftest import blobs
from retrieval_imprint import PRESETS, ImprintClassifier

ZERO_ROW = ("int-valued test data truncates a row to all zeros, and L2 of a zero vector is an error "
            "by design (docs/framework.md); test_every_input_dtype covers the dtypes on data without zero rows")


def _expected_failures(estimator):
    return {"check_estimators_dtypes": ZERO_ROW} if estimator.pre_norm == "l2" else {}


@parametrize_with_checks(
    [
        ImprintClassifier(),
        ImprintClassifier(generator="mean"),
        ImprintClassifier(generator="all", aggregation="mnn", m=3, vote="distance", metric="euclidean"),
        ImprintClassifier(generator="kmedoids", k=3, pre_norm="none", post_norm="none", inf_norm="none",
                          aggregation="mnn", m=2, metric="manhattan"),
        ImprintClassifier(generator="random", k=8, pre_norm="none", post_norm="none", inf_norm="none",
                          metric="chebyshev"),
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
    [dict(), dict(generator="mean"), dict(generator="kmeans", aggregation="mnn", m=5, vote="distance"),
     dict(generator="kmeans", k=3, aggregation="blend", alpha=0.6, metric="euclidean"),
     dict(generator="all", aggregation="mnn", m=3, metric="mahalanobis"), dict(generator="kls", k=3),
     dict(generator="cov_max", k=2, post_norm="quantile")],
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

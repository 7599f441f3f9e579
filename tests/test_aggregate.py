"""AGG: max and m-NN over every metric, against brute-force scoring with scipy's cdist."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import ImprintClassifier

METRICS = ["ip", "cosine", "euclidean", "manhattan", "chebyshev", "mahalanobis"]


@pytest.fixture(scope="module")
def data():
    X, y = blobs(5, 24, 4, seed=5)
    Q, _ = blobs(5, 8, 4, seed=6)
    return X, y, Q


@pytest.mark.parametrize(
    "metric,aggregation,m,vote",
    [(mt, "max", 1, "uniform") for mt in METRICS]
    + [(mt, "mnn", m, v) for mt, m, v in itertools.product(METRICS, [1, 3, 7], ["uniform", "distance"])],
)
def test_scores_and_predictions_match_brute_force(data, metric, aggregation, m, vote):
    X, y, Q = data
    clf = ImprintClassifier(
        generator="kmeans",
        k=3,
        aggregation=aggregation,
        m=m,
        metric=metric,
        vote=vote,
        pre_norm="none",
        post_norm="none",
        inf_norm="none",
    ).fit(X, y)
    expected, pred = ref.scores(Q, clf.proxies_, clf.proxy_class_index_, 5, metric, aggregation, m, vote)
    np.testing.assert_allclose(clf.decision_function(Q), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(clf.predict(Q), clf.classes_[pred])


def test_mnn_ties_go_to_the_lowest_class():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    y = np.array(["b", "a", "a", "b"])
    clf = ImprintClassifier(generator="all", aggregation="mnn", m=4, metric="euclidean").fit(X, y)
    q = np.array([[1.0, 1.0]], np.float32)  # equidistant from both classes, two votes each
    assert clf.predict(q)[0] == "a"
    np.testing.assert_allclose(clf.decision_function(q), [0.0])


def test_m_larger_than_the_number_of_proxies_uses_them_all(data):
    X, y, Q = data
    clf = ImprintClassifier(generator="mean", aggregation="mnn", m=50).fit(X, y)
    np.testing.assert_allclose(clf.decision_function(Q), 0.2)  # five proxies, one vote each
    assert (clf.predict(Q) == clf.classes_[0]).all()

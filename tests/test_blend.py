"""AGG blend: alpha x the class mean + (1 - alpha) x the best proxy, exact against brute force in
the estimator and in collections, ties included, however shallow the first search."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import Collection, ImprintClassifier
from retrieval_imprint.aggregate import blend_rank

METRICS = ["ip", "cosine", "euclidean", "manhattan", "chebyshev", "mahalanobis"]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_the_estimators_blend_matches_brute_force(metric, alpha):
    X, y = blobs(7, 20, 5, seed=11)
    clf = ImprintClassifier(
        generator="kmeans",
        k=3,
        aggregation="blend",
        alpha=alpha,
        metric=metric,
        pre_norm="none",
        post_norm="none",
        inf_norm="none",
    ).fit(X, y)
    Q, _ = blobs(7, 6, 5, seed=12)
    expected = ref.blend(Q, clf.proxies_, clf.proxy_class_index_, clf.means_, alpha, metric)
    np.testing.assert_allclose(clf.decision_function(Q), expected, rtol=1e-4, atol=1e-4)
    means = np.stack([X[y == c].mean(0) for c in clf.classes_])  # NORMs none: the plain class means
    np.testing.assert_allclose(clf.means_, means, rtol=1e-5, atol=1e-5)
    best = expected.max(1, keepdims=True)
    tied = np.abs(expected - best) <= 1e-5 * (1 + np.abs(best))  # float32 ties: any member will do
    assert tied[np.arange(len(Q)), np.searchsorted(clf.classes_, clf.predict(Q))].all()


def brute_rank(a, b_best, alpha, top):
    s = alpha * a + (1 - alpha) * b_best
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :top]
    return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.6, 1.0])
@pytest.mark.parametrize("depth", [1, 3, 50])
def test_blend_rank_is_exact_from_any_first_depth_with_ties(alpha, depth):
    rng = np.random.default_rng(3)
    n_classes, per_class, n_q = 9, 4, 12
    A = rng.integers(0, 5, (n_q, n_classes)).astype(np.float64) / 4  # coarse values: many exact ties
    P = rng.integers(0, 5, (n_q, n_classes * per_class)).astype(np.float64) / 4
    owner = np.repeat(np.arange(n_classes), per_class)
    P[:, owner == 4] = P[:, owner == 2]  # classes 2 and 4 tie everywhere on the proxy side
    A[:, 4] = A[:, 2]

    def proxies(rows, m):
        order = np.lexsort((np.broadcast_to(np.arange(P.shape[1]), P[rows].shape), -P[rows]), axis=1)[:, :m]
        return np.take_along_axis(P[rows], order, 1), owner[order]

    def means(rows, n):
        order = np.argsort(-A[rows], axis=1, kind="stable")[:, :n]
        return np.take_along_axis(A[rows], order, 1), order

    b_best = np.stack([P[:, owner == c].max(1) for c in range(n_classes)], 1)
    for top in (1, 3, n_classes + 2):
        got, scores = blend_rank(
            n_q,
            means,
            lambda rows, cls: A[rows[:, None], cls],
            proxies,
            lambda rows, cls: b_best[rows[:, None], cls],
            alpha,
            top,
            n_classes,
            len(owner),
            depth,
        )
        want, want_scores = brute_rank(A, b_best, alpha, min(top, n_classes))
        np.testing.assert_array_equal(got[:, : want.shape[1]], want)
        np.testing.assert_allclose(scores[:, : want.shape[1]], want_scores)
        assert (got[:, want.shape[1] :] == -1).all() and np.isnan(scores[:, want.shape[1] :]).all()


@pytest.mark.parametrize("alpha", [0.25, 0.75])
def test_a_flat_collections_blend_matches_brute_force_with_ties(tmp_path, alpha):
    X, y = blobs(8, 12, 6, seed=5)
    labels = np.array([f"c{v}" for v in y])
    twin = X[labels == "c3"]
    X, labels = np.concatenate([X, twin]), np.concatenate([labels, np.full(len(twin), "twin")])  # a tie
    col = Collection.create(tmp_path / "c", model=None, generator="kmeans", k=3, aggregation="blend", alpha=alpha)
    col.add(X[:60], labels[:60])
    col.add(X[60:], labels[60:])
    Q = np.concatenate([blobs(8, 5, 6, seed=6)[0], twin[:3]])
    result = col.query(Q, top=4)
    clf = ImprintClassifier(generator="kmeans", k=3, aggregation="blend", alpha=alpha).fit(X, labels)
    expected = ref.blend(ref.l2(Q), clf.proxies_, clf.proxy_class_index_, clf.means_, alpha)
    for q in range(len(Q)):
        got = [list(clf.classes_).index(label) for label in result.labels[q]]
        assert len(set(got)) == 4
        # the k-th label scores the k-th best score, to float32 precision (near-ties may come either way)
        np.testing.assert_allclose(expected[q, got], np.sort(expected[q])[::-1][:4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.scores[q], expected[q, got], rtol=1e-5, atol=1e-5)
        labels_q = list(result.labels[q])
        if "c3" in labels_q and "twin" in labels_q:  # an exact tie goes to the class added first
            assert labels_q.index("c3") < labels_q.index("twin")
    assert {"c3", "twin"} <= set(result.labels[-1])  # the twins' own samples rank both first
    assert Collection.open(tmp_path / "c").query(Q, top=4).labels.tolist() == result.labels.tolist()
    assert col.check().ok


def test_blend_needs_an_exact_index(tmp_path):
    with pytest.raises(ValueError, match="aggregation='blend' needs index='Flat'"):
        Collection.create(tmp_path / "c", model=None, aggregation="blend", index="IVF16,Flat")

"""GEN: every generator against a brute-force reference, plus the shared k rule and seeding."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import blobs
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans

from retrieval_imprint import ImprintClassifier
from retrieval_imprint import generate as generate_module
from retrieval_imprint._groups import Grouped
from retrieval_imprint.features import BLOCK_ROWS, feature_map, relu_features
from retrieval_imprint.generate import GENERATORS, generate
from retrieval_imprint.labels import label_keys
from retrieval_imprint.params import GENERATOR_KINDS

RAW = dict(pre_norm="none", post_norm="none", inf_norm="none")


def fit(X, y, **params):
    return ImprintClassifier(**{**RAW, **params}).fit(X, y)


def per_class(clf, c):
    return clf.proxies_[clf.proxy_labels_ == c]


@pytest.fixture(scope="module")
def data():
    X, y = blobs(12, 30, 6, seed=1)
    keep = np.ones(len(y), bool)
    keep[(y == 3)] = False  # class 3: a single sample, class 5: four samples (n_c <= k)
    keep[np.flatnonzero(y == 3)[0]] = True
    keep[np.flatnonzero(y == 5)[4:]] = False
    return X[keep], y[keep]


def test_mean_is_the_class_mean(data):
    X, y = data
    clf = fit(X, y, generator="mean")
    for c in np.unique(y):
        np.testing.assert_allclose(per_class(clf, c)[0], ref.class_mean(X[y == c]), rtol=1e-5, atol=1e-6)
    assert len(clf.proxies_) == len(np.unique(y))


def test_all_keeps_every_sample(data):
    X, y = data
    clf = fit(X, y, generator="all")
    for c in np.unique(y):
        np.testing.assert_array_equal(per_class(clf, c), X[y == c])


@pytest.mark.parametrize("generator", ["kmeans", "kmedoids", "random", "fps", "cov_max"])
def test_shared_k_rule(data, generator):
    """n_c <= k keeps every sample; k = -1 keeps every sample; otherwise exactly k proxies."""
    X, y = data
    clf = fit(X, y, generator=generator, k=5)
    for c in np.unique(y):
        Xc, W = X[y == c], per_class(clf, c)
        if len(Xc) <= 5:
            np.testing.assert_array_equal(W, Xc)
        else:
            assert W.shape == (5, X.shape[1])
    clf = fit(X, y, generator=generator, k=-1)
    assert len(clf.proxies_) == len(X)


@pytest.mark.parametrize("generator", ["kmedoids", "random", "fps", "cov_max"])
def test_sample_generators_return_distinct_samples(data, generator):
    X, y = data
    clf = fit(X, y, generator=generator, k=4)
    for c in np.unique(y):
        Xc, W = X[y == c], per_class(clf, c)
        rows = [np.flatnonzero((Xc == w).all(1)) for w in W]
        assert all(len(r) == 1 for r in rows), "every proxy is one of the class's samples"
        assert len({int(r[0]) for r in rows}) == len(W), "drawn without replacement"


@pytest.mark.parametrize("block_bytes", [None, 8 * 6 * 7])  # the samples in float64 at once, or 7 rows at a time
def test_cov_max_matches_reference(data, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(generate_module, "F64_BLOCK_BYTES", block_bytes)
    X, y = data
    clf = fit(X, y, generator="cov_max", k=4)
    for c in np.unique(y):
        Xc = X[y == c]
        np.testing.assert_array_equal(per_class(clf, c), ref.cov_max(Xc, 4) if len(Xc) > 4 else Xc)


def test_fps_matches_reference(data):
    X, y = data
    clf = fit(X, y, generator="fps", k=5)
    for c in np.unique(y):
        Xc, W = X[y == c], per_class(clf, c)
        if len(Xc) > 5:
            first = int(np.flatnonzero((Xc == W[0]).all(1))[0])
            np.testing.assert_array_equal(W, ref.fps(Xc, 5, first))


def test_kmeans_converges_to_a_lloyd_fixed_point():
    """With tol = 0 Lloyd runs until assignments stop changing: each centroid is its points' mean."""
    X, y = blobs(40, 60, 8, seed=2)
    groups = Grouped.from_codes(X, y, label_keys(np.unique(y)))
    W, owner = generate("kmeans", groups, 6, 0, tol=0.0)
    for c in np.unique(y):
        Xc, Wc = X[y == c].astype(np.float64), W[owner == c].astype(np.float64)
        assign = np.argmin(cdist(Xc, Wc, "sqeuclidean"), axis=1)
        assert len(np.unique(assign)) == 6, "no empty cluster"
        for j in range(6):
            np.testing.assert_allclose(Wc[j], Xc[assign == j].mean(0), atol=1e-4)


def test_kmeans_inertia_matches_sklearn():
    X, y = blobs(40, 60, 8, seed=2)
    clf = fit(X, y, generator="kmeans", k=6)
    ours = theirs = 0.0
    for c in np.unique(y):
        Xc, W = X[y == c].astype(np.float64), per_class(clf, c).astype(np.float64)
        ours += np.min(cdist(Xc, W, "sqeuclidean"), axis=1).sum()
        theirs += KMeans(6, n_init=1, random_state=int(c)).fit(Xc).inertia_
    assert ours <= 1.02 * theirs, f"inertia {ours:.1f} vs scikit-learn {theirs:.1f}"


def test_kmedoids_medoids_minimise_their_cluster_cost():
    X, y = blobs(10, 25, 4, seed=3)
    clf = fit(X, y, generator="kmedoids", k=3)
    for c in np.unique(y):
        Xc, W = X[y == c], per_class(clf, c)
        D = cdist(Xc, Xc)
        medoids = [int(np.flatnonzero((Xc == w).all(1))[0]) for w in W]
        assign = np.argmin(D[:, medoids], axis=1)
        for j, med in enumerate(medoids):
            members = np.flatnonzero(assign == j)
            cost = D[np.ix_(members, members)].sum(1)
            assert D[med, members].sum() <= cost.min() + 1e-4


@pytest.mark.parametrize("block_bytes", [None, 8 * 6 * 7])  # the samples in float64 at once, or 7 rows at a time
@pytest.mark.parametrize("generator", ["ls", "kls"])
def test_ls_heads_match_the_closed_form(data, generator, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(generate_module, "F64_BLOCK_BYTES", block_bytes)
    X, y = data
    clf = fit(X, y, generator=generator, k=3, ls_reg=0.1)
    if generator == "ls":
        np.testing.assert_allclose(clf.proxies_, ref.ls(X, y, 0.1), rtol=1e-4, atol=1e-6)
    else:  # pseudo-classes: the k-means clusters of each class (all samples when n_c <= k)
        km = fit(X, y, generator="kmeans", k=3)
        pseudo = np.argmin(
            np.stack([cdist(X[i : i + 1], km.proxies_)[0] + 1e9 * (km.proxy_labels_ != y[i]) for i in range(len(X))]),
            axis=1,
        )
        expected = ref.ls(X, pseudo, 0.1, classes=np.arange(len(km.proxies_)))
        np.testing.assert_allclose(clf.proxies_, expected, rtol=2e-3, atol=1e-6)
        np.testing.assert_array_equal(clf.proxy_labels_, km.proxy_labels_)


@pytest.mark.parametrize("block_bytes", [None, 1])  # the samples in float64 at once, or a column at a time
@pytest.mark.parametrize("reg", [0.1, 0.0])
def test_ls_with_fewer_samples_than_dimensions_matches_the_closed_form(reg, block_bytes, monkeypatch):
    """Fewer rows than dimensions: the head comes from the n x n Gram matrix; with no ridge it is the
    minimum-norm solution (the closed form's pseudo-inverse), not a singular-matrix error."""
    if block_bytes:
        monkeypatch.setattr(generate_module, "F64_BLOCK_BYTES", block_bytes)
    X, y = blobs(3, 4, 30, seed=2)
    clf = fit(X, y, generator="ls", ls_reg=reg)
    if reg:
        np.testing.assert_allclose(clf.proxies_, ref.ls(X, y, reg), rtol=1e-4, atol=1e-6)
    else:
        X64 = np.asarray(X, np.float64)
        M = np.stack([X64[y == c].mean(0) for c in range(3)])
        W = M @ np.linalg.pinv(X64.T @ X64 / len(X)) / 3
        np.testing.assert_allclose(clf.proxies_, W, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("generator", ["kmeans", "kmedoids", "random", "fps"])
def test_seeded_and_independent_of_other_classes(data, generator):
    """Same seed, same proxies; a class's proxies do not depend on which other classes are fitted."""
    X, y = data
    a = fit(X, y, generator=generator, k=4, random_state=7)
    b = fit(X, y, generator=generator, k=4, random_state=7)
    np.testing.assert_array_equal(a.proxies_, b.proxies_)
    sub = np.isin(y, [0, 7, 9])
    alone = fit(X[sub], y[sub], generator=generator, k=4, random_state=7)
    for c in (0, 7, 9):
        np.testing.assert_allclose(per_class(alone, c), per_class(a, c), rtol=1e-6, atol=1e-6)
    other = fit(X, y, generator=generator, k=4, random_state=8)
    assert not np.array_equal(other.proxies_, a.proxies_)


def test_registry_adds_a_generator_with_one_function(data):
    X, y = data

    from retrieval_imprint import register

    @register("first_sample_test")
    def first_sample(groups, k, seed, **_):
        return groups.X[groups.offsets[:-1]], np.arange(groups.n_classes)

    try:
        clf = fit(X, y, generator="first_sample_test", k=1)
        for c in np.unique(y):
            np.testing.assert_array_equal(per_class(clf, c)[0], X[y == c][0])
    finally:
        GENERATORS.pop("first_sample_test")
        GENERATOR_KINDS.pop("first_sample_test")


def test_generate_on_grouped_data_directly():
    X, y = blobs(3, 10, 4)
    groups = Grouped.from_codes(X, y, label_keys([0, 1, 2]))
    W, owner = generate("mean", groups, 1, 0)
    assert W.dtype == np.float32 and owner.tolist() == [0, 1, 2]


def test_random_features_are_seeded_and_the_same_in_blocks():
    R = feature_map(5, 40, seed=3)
    assert R.shape == (5, 40) and R.dtype == np.float32
    np.testing.assert_array_equal(R, feature_map(5, 40, seed=3))
    assert not np.array_equal(R, feature_map(5, 40, seed=4))
    X = np.random.default_rng(0).standard_normal((BLOCK_ROWS + 7, 5)).astype(np.float32)
    np.testing.assert_allclose(relu_features(X, R), np.maximum(X.astype(np.float64) @ R, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [8, 200])  # fewer features than samples, and more
def test_ls_on_random_features_is_the_closed_form_on_the_mapped_samples(width):
    """features=M: NORMpre, GEN, NORMpost and NORMinf act on max(0, x R), for fit and queries alike."""
    X, y = blobs(5, 12, 6, seed=4)
    clf = ImprintClassifier(generator="ls", aggregation="max", ls_reg=0.05, features=width, random_state=9).fit(X, y)
    R = feature_map(6, width, seed=9).astype(np.float64)
    phi = lambda A: ref.l2(np.maximum(np.asarray(A, np.float64) @ R, 0))  # noqa: E731
    W = ref.l2(ref.ls(phi(X), y, 0.05))
    np.testing.assert_allclose(clf.proxies_, W, rtol=1e-4, atol=1e-5)
    Q, _ = blobs(5, 8, 6, seed=5)
    scores = phi(Q) @ W.T
    top = np.sort(scores, 1)
    clear = top[:, -1] - top[:, -2] > 1e-5  # float32 near-ties may go either way
    np.testing.assert_array_equal(clf.predict(Q)[clear], clf.classes_[scores.argmax(1)][clear])
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(clf.predict(3 * Q), clf.predict(Q))  # phi is positively homogeneous
    assert clf.auto_choice_["k"] == 1 and clf.proxies_.shape == (5, width)  # one row per class

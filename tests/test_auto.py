"""auto: what the settings leave open is chosen by cross-validation on the training data alone."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import Collection, ImprintClassifier, auto, generate, lsfit, temperature
from retrieval_imprint._groups import Grouped
from retrieval_imprint.generate import RIDGE_GRID, Spectrum, loo_accuracy
from retrieval_imprint.labels import label_keys
from retrieval_imprint.params import DEFAULTS, check_params


def params(**given):
    return check_params({**DEFAULTS, **given})


def test_candidates_are_whatever_the_settings_leave_open():
    everything = auto.candidates(params())
    assert len(everything) == 1 + 6 * 5  # the mean; k in 2..20 and all, each under max or 4 blends
    assert auto.Candidate("mean", 1, "max") in everything and auto.Candidate("all", -1, "blend", 0.5) in everything
    assert auto.candidates(params(k=5)) == [auto.Candidate("kmeans", 5, "max")] + [
        auto.Candidate("kmeans", 5, "blend", a) for a in auto.ALPHA_GRID
    ]
    assert auto.candidates(params(aggregation="max")) == [
        auto.Candidate({1: "mean", -1: "all"}.get(k, "kmeans"), k, "max") for k in auto.K_GRID
    ]
    assert auto.candidates(params(generator="kmeans", aggregation="blend", alpha=0.3)) == [
        auto.Candidate("kmeans", 20, "blend", 0.3)
    ]  # nothing open: the paper's k
    assert auto.candidates(params(generator="mean", aggregation="auto")) == [auto.Candidate("mean", 1, "max")]
    assert len(auto.candidates(params(generator="kmeans", k=4, aggregation="max"))) == 1


def grouped(n_classes=6, n=12, seed=0):
    X, y = blobs(n_classes, n, 5, seed=seed)
    classes, codes = np.unique(y, return_inverse=True)
    return Grouped.from_codes(X, codes, label_keys(classes)), X, y


def test_folds_are_stratified_and_keyed_by_the_label():
    groups, _, _ = grouped()
    sizes = np.array([12, 7, 1, 5, 2, 9])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    uneven = Grouped(groups.X[: offsets[-1]], offsets, groups.keys)
    fold = auto.folds(uneven, seed=3)
    for c, n in enumerate(sizes):
        mine = fold[offsets[c] : offsets[c + 1]]
        if n == 1:
            assert (mine == -1).all()  # the only sample of a class is never held out
        else:
            counts = np.bincount(mine, minlength=auto.FOLDS)
            assert counts.max() - counts.min() <= 1 and counts.sum() == n
    alone = Grouped(uneven.X[offsets[1] : offsets[2]], np.array([0, 7]), uneven.keys[1:2])
    np.testing.assert_array_equal(auto.folds(alone, seed=3), fold[offsets[1] : offsets[2]])  # others don't matter


def test_large_data_is_cross_validated_on_a_sample_of_whole_classes(monkeypatch):
    """Past CV_CLASSES classes (or CV_ROWS rows) the folds hold a seeded sample of whole classes,
    the same classes in any class order; the rows say how many; the head still has every class."""
    X, y = blobs(30, 8, 5, seed=3)
    labels = np.array([f"c{v}" for v in y])
    classes, codes = np.unique(labels, return_inverse=True)
    groups = Grouped.from_codes(X, codes, label_keys(classes))
    assert auto.cv_sample(groups, 0) is groups  # small data: every class
    monkeypatch.setattr(auto, "CV_CLASSES", 7)
    sample = auto.cv_sample(groups, 0)
    assert sample.n_classes == 7 and len(sample.X) == 7 * 8
    for c, key in enumerate(sample.keys):  # whole classes, rows as they were
        mine = int(np.flatnonzero(groups.keys == key)[0])
        np.testing.assert_array_equal(sample.X[sample.offsets[c] : sample.offsets[c + 1]], X[codes == mine])
    order = np.random.default_rng(1).permutation(30)  # the classes renamed in another order: same sample
    renamed = Grouped.from_codes(X, np.argsort(order)[codes], groups.keys[order])
    assert set(auto.cv_sample(renamed, 0).keys) == set(sample.keys) != set(auto.cv_sample(groups, 1).keys)
    monkeypatch.setattr(auto, "CV_CLASSES", 100)
    monkeypatch.setattr(auto, "CV_ROWS", 20)
    assert auto.cv_sample(groups, 0).n_classes == 2  # 20 rows hold two classes of 8
    monkeypatch.setattr(auto, "CV_ROWS", 60)
    clf = ImprintClassifier(aggregation="max").fit(X, labels)
    assert {r["classes"] for r in clf.cv_results_} == {7} and len(clf.classes_) == 30


def test_the_temperature_fold_is_the_first_fold_of_seeded_whole_classes():
    """``class_fold``: every first-fold row (``folds`` over all the data) of classes taken in a seeded
    order while their first-fold rows total at most ``max_rows`` (one class at least)."""
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 12, 40)
    groups = Grouped(rng.standard_normal((sizes.sum(), 3)), np.concatenate([[0], np.cumsum(sizes)]), np.arange(40) * 7)
    first = auto.folds(groups, 3) == 0
    for max_rows in (1, 7, 30, 10**6):
        rows = auto.class_fold(groups, 3, max_rows)
        classes = np.unique(groups.owner[rows])
        np.testing.assert_array_equal(rows, np.flatnonzero(first & np.isin(groups.owner, classes)))
        assert len(rows) <= max_rows or len(classes) == 1
    assert len(auto.class_fold(groups, 3, 10**6)) == first.sum()


def test_cross_validation_scores_fewer_rows_past_its_cell_budget(monkeypatch):
    """Where the held-out rows would meet more than CV_CELLS candidate proxies in all, fewer rows are
    scored (not fewer than MIN_CELL_ROWS), and the similarities computed stay within the budget."""
    X, y = blobs(30, 8, 5, seed=3)
    groups = Grouped.from_codes(X, y, label_keys([f"c{v}" for v in range(30)]))
    p = params()
    cands = auto.candidates(p)
    assert auto.cv_proxies(groups, cands) == 30 * (1 + 2 + 3 + 5 + 6 + 6 + 6)  # 6 training rows a class
    cells = []
    similarity = auto.ProxyIndex.similarity

    def counted(index, Q):
        cells.append(len(Q) * index.ntotal)
        return similarity(index, Q)

    monkeypatch.setattr(auto.ProxyIndex, "similarity", counted)
    every = auto.cross_validate(groups, p, cands)
    unbounded, cells[:] = sum(cells), []
    monkeypatch.setattr(auto, "CV_CELLS", 100 * auto.cv_proxies(groups, cands))
    monkeypatch.setattr(auto, "MIN_CELL_ROWS", 50)
    bounded = auto.cross_validate(groups, p, cands)
    assert every[0]["scored"] == 240 and 100 <= bounded[0]["scored"] <= 100 + auto.FOLDS
    assert sum(cells) <= 1.1 * auto.CV_CELLS < unbounded
    monkeypatch.setattr(auto, "MIN_CELL_ROWS", 150)
    assert auto.cross_validate(groups, p, cands)[0]["scored"] >= 150


@pytest.mark.parametrize("given", [dict(), dict(k=3), dict(generator="all", aggregation="auto", metric="euclidean")])
def test_cross_validation_counts_what_a_refit_would_predict(given):
    groups, _X, _y = grouped(seed=4)
    p = params(**given)
    cands = auto.candidates(p)
    rows = auto.cross_validate(groups, p, cands)
    fold, owner = auto.folds(groups, 0), groups.owner
    for cand, row in zip(cands, rows):
        correct = 0
        for f in range(auto.FOLDS):
            test = fold == f
            clf = ImprintClassifier(**{**p, **cand.params()}).fit(groups.X[~test], owner[~test])
            correct += int(np.sum(clf.predict(groups.X[test]) == owner[test]))
        assert row["correct"] == correct and row["scored"] == len(owner), cand


def test_ties_go_to_the_cheapest_and_one_shot_data_gets_the_mean():
    X = np.repeat(np.eye(4, dtype=np.float32) * 10, 6, axis=0) + 0.01 * np.arange(24, dtype=np.float32)[:, None]
    y = np.repeat(np.arange(4), 6)
    clf = ImprintClassifier().fit(X, y)  # every candidate is perfect on these four far-apart classes
    assert all(r["accuracy"] == 1.0 for r in clf.cv_results_)
    assert clf.auto_choice_ == {"generator": "mean", "k": 1, "aggregation": "max", "alpha": None}
    one_shot = ImprintClassifier().fit(X[::6], y[::6])
    assert one_shot.auto_choice_ == {"generator": "mean", "k": 1, "aggregation": "max", "alpha": None}


def test_the_estimator_fits_the_candidate_with_the_best_held_out_accuracy():
    X, y = blobs(8, 30, 6, seed=7, modes=3)
    clf = ImprintClassifier(random_state=2).fit(X, y)
    best = max(r["correct"] for r in clf.cv_results_)
    chosen = [r for r in clf.cv_results_ if all(r[k] == v for k, v in clf.auto_choice_.items())]
    assert chosen[0]["correct"] == best
    fixed = ImprintClassifier(**{**clf.get_params(), **clf.auto_choice_}).fit(X, y)
    np.testing.assert_array_equal(fixed.proxies_, clf.proxies_)
    assert fixed.cv_results_ == []  # nothing left open: no cross-validation


def buried(n_per: int, seed: int, d: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Four classes apart in two quiet dimensions, buried in loud ones with a common offset: their
    means (and any imprinted proxies) are swamped by the noise; a least-squares head finds the quiet ones."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n_per)
    X = rng.standard_normal((len(y), d)) * np.r_[0.1, 0.1, np.full(d - 2, 3.0)]
    X[:, :2] += np.array([[0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]])[y]
    X[:, 2:] += 5.0
    return X.astype(np.float32), y


def test_the_estimator_takes_the_ls_head_where_it_beats_every_candidate_held_out(monkeypatch):
    monkeypatch.setattr(auto, "LS_FEATURES", 256)
    X, y = buried(60, seed=0)
    clf = ImprintClassifier().fit(X, y)
    ls = [r for r in clf.cv_results_ if r["generator"] == "ls"]
    assert len(ls) == 1 and ls[0]["features"] == 256 and ls[0]["held_out"] == "leave-one-out"
    assert ls[0]["accuracy"] > max(r["accuracy"] for r in clf.cv_results_ if r["generator"] != "ls")
    assert clf.auto_choice_ == {"generator": "ls", "k": 1, "aggregation": "max", "alpha": None, "features": 256}
    assert clf.feature_map_.shape == (20, 256) and clf.proxies_.shape == (4, 256)
    by_hand = ImprintClassifier(**{**clf.get_params(), **clf.auto_choice_}).fit(X, y)  # the same head, chosen by hand
    assert by_hand.cv_results_ == [] and by_hand.temperature_ == clf.temperature_
    Q, truth = buried(100, seed=1)
    np.testing.assert_array_equal(clf.predict(Q), by_hand.predict(Q))
    np.testing.assert_allclose(clf.predict_proba(Q), by_hand.predict_proba(Q), rtol=1e-5, atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(auto, "LS_ROWS", len(X) - 1)  # past it, not weighed: auto's choice among the imprinted heads
        imprinted = ImprintClassifier().fit(X, y)
    assert all(r["generator"] != "ls" for r in imprinted.cv_results_)
    assert clf.score(Q, truth) > imprinted.score(Q, truth) + 0.1  # and on new data the ls head is the better
    on_features = ImprintClassifier(features=64).fit(X, y)  # features given: the ls head on them, none added
    assert [r["features"] for r in on_features.cv_results_ if r["generator"] == "ls"] == [64]
    assert "features" not in on_features.auto_choice_ and on_features.feature_map_.shape == (20, 64)
    for given in (dict(k=5), dict(aggregation="max"), dict(generator="kmeans")):  # not all left open: not weighed
        assert all(r["generator"] != "ls" for r in ImprintClassifier(**given).fit(X, y).cv_results_)


def test_a_collection_chooses_at_its_first_add_and_keeps_the_choice(tmp_path):
    X, y = blobs(8, 30, 6, seed=7, modes=3)
    labels = np.array([f"c{v}" for v in y])
    col = Collection.create(tmp_path / "c", model=None, random_state=2)
    assert col.auto_choice is None
    col.add(X[: 6 * 30], labels[: 6 * 30])
    first = col.auto_choice
    clf = ImprintClassifier(random_state=2).fit(X[: 6 * 30], labels[: 6 * 30])
    assert {k: first[k] for k in clf.auto_choice_} == clf.auto_choice_  # the same choice on the same data
    assert first["cv_results"] == [r for r in clf.cv_results_ if r["generator"] != "ls"]  # the estimator's alone
    col.add(X[6 * 30 :], labels[6 * 30 :])  # later classes: the recorded setting, no new choice
    reopened = Collection.open(tmp_path / "c")
    assert reopened.auto_choice == first and reopened.config["generator"] == "auto"
    per_class = {"mean": 1, "all": 30}.get(first["generator"], first["k"])
    assert {r["proxies"] for r in reopened.class_table()} == {min(per_class, 30)}
    one_go = ImprintClassifier(**{**clf.get_params(), **clf.auto_choice_}).fit(X, labels)
    Q, _ = blobs(8, 5, 6, seed=8, modes=3)
    np.testing.assert_array_equal(reopened.predict(Q), one_go.predict(Q))


def test_an_ivf_collection_chooses_k_under_max(tmp_path):
    X, y = blobs(40, 8, 6, seed=1)
    col = Collection.create(tmp_path / "c", model=None, index="IVF16,Flat")
    col.add(X, y)
    assert col.auto_choice["aggregation"] == "max" and {r["aggregation"] for r in col.auto_choice["cv_results"]} == {
        "max"
    }


@pytest.mark.parametrize("block_bytes", [None, 1])  # the samples in float64 at once, or a row (column) at a time
@pytest.mark.parametrize("dim", [5, 60])  # more rows than dimensions, and fewer (the n x n Gram matrix)
def test_the_closed_form_leave_one_out_equals_refitting(dim, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(generate, "F64_BLOCK_BYTES", block_bytes)
    X, y = blobs(4, 9, dim, seed=3)
    X = ref.l2(X)
    classes, codes = np.unique(y, return_inverse=True)
    means = np.stack([X[codes == c].mean(0) for c in range(len(classes))])
    ridges, accuracy = loo_accuracy(
        X, Spectrum.of(X), codes, means, np.arange(len(classes)), seed=0, normalize_rows=True
    )
    assert len(ridges) == len(RIDGE_GRID)
    for reg, acc in zip(ridges, accuracy):
        assert round(acc * len(X)) == ref.ridge_loo_correct(X, y, reg), reg


@pytest.mark.parametrize("ls_reg", ["auto", 0.05])
def test_the_ls_fit_scores_its_left_out_rows_as_refitting_does(ls_reg):
    """The ls fit's leave-one-out, at its ridge: the accuracy auto weighs it by, and the held-out scores
    its temperature is fitted to, equal the head refitted without each row (float64 reference); a
    class of one sample is not held out."""
    X, y = blobs(4, 9, 6, seed=3)
    X, y = np.vstack([X, X[:1] + 0.5]), np.append(y, 99)  # class 99: one sample
    classes, codes = np.unique(y, return_inverse=True)
    fit = lsfit.fit(X, codes, label_keys(classes), params(generator="ls", ls_reg=ls_reg))
    if ls_reg != "auto":
        assert fit.ridge == ls_reg
    reference = ref.ridge_loo_scores(ref.l2(X), y, fit.ridge)
    assert round(fit.accuracy * len(X)) == int(np.sum(classes[reference.argmax(1)] == y))
    assert fit.ridge in generate.ridge_grid(Spectrum.of(fit.groups.X)) or ls_reg != "auto"
    kept = np.sort(fit.held)  # rows of fit.groups: grouped by class, as y sorted is
    order = np.argsort(codes, kind="stable")
    assert len(kept) == len(X) - 1 and 99 not in y[order][kept]
    np.testing.assert_allclose(fit.held_scores, reference[order][kept], rtol=1e-5, atol=1e-6)  # float32 samples
    assert fit.temperature() == temperature.fit(fit.held_scores, codes[order][kept])
    assert lsfit.fit(X, codes, label_keys(classes), params(generator="ls", inf_norm="none")).held_scores is None
    wide, of = blobs(3, 3, 20, seed=1)  # fewer rows than dimensions and no ridge: every row interpolated
    bare = lsfit.fit(wide, of, label_keys(np.unique(of)), params(generator="ls", ls_reg=0.0))
    assert bare.held_scores is None and bare.accuracy == 0.0  # no held-out score: the temperature refits
    clf = ImprintClassifier(generator="ls", ls_reg=0.0).fit(wide, of)
    assert np.isfinite(clf.temperature_) and np.isfinite(clf.predict_proba(wide)).all()


def test_ls_with_its_ridge_chosen_beats_a_bad_fixed_ridge():
    """Classes apart in two quiet dimensions, buried in 18 loud ones: least squares finds the quiet
    ones with a small ridge; a large one shrinks the head towards the class means, which the noise swamps."""
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), 60)
    X = rng.standard_normal((len(y), 20)) * np.r_[0.1, 0.1, np.full(18, 3.0)]
    X[:, :2] += np.array([[0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]])[y]
    X[:, 2:] += 5.0  # a common offset
    train = np.arange(len(y)) % 4 != 0
    raw = dict(generator="ls", aggregation="max", pre_norm="none", post_norm="none", inf_norm="none")
    chosen = ImprintClassifier(**raw).fit(X[train], y[train])
    too_much = ImprintClassifier(**raw, ls_reg=1e3).fit(X[train], y[train])
    assert chosen.score(X[~train], y[~train]) > too_much.score(X[~train], y[~train]) + 0.2


def test_tune_chooses_again_on_every_kept_sample_in_one_write(tmp_path):
    X, y = blobs(8, 30, 6, seed=7, modes=3)
    labels = np.array([f"c{v}" for v in y])
    rows = np.arange(len(y))
    early = rows[np.isin(labels, ["c0", "c1"]) & (rows % 10 == 0)]  # a small first add: a poor basis
    late = np.setdiff1d(rows[np.isin(labels, ["c0", "c1"])], early)
    col = Collection.create(tmp_path / "c", model=None, random_state=2)
    for part in (early, rows[~np.isin(labels, ["c0", "c1"])], late):
        col.add(X[part], labels[part])
    choice = col.tune()
    kept = np.concatenate(
        [
            early[labels[early] == "c0"],
            late[labels[late] == "c0"],  # class by class,
            early[labels[early] == "c1"],
            late[labels[late] == "c1"],  # oldest first
            rows[~np.isin(labels, ["c0", "c1"])],
        ]
    )
    clf = ImprintClassifier(random_state=2).fit(X[kept], labels[kept])
    assert {k: choice[k] for k in clf.auto_choice_} == clf.auto_choice_
    assert choice["cv_results"] == [r for r in clf.cv_results_ if r["generator"] != "ls"]  # the estimator's alone
    reopened = Collection.open(tmp_path / "c")
    assert reopened.check().ok and reopened.auto_choice == choice
    assert len(reopened.info()["segments"]) == 4 + (choice["aggregation"] == "blend")  # 1 proxies, 3 samples
    Q, _ = blobs(8, 5, 6, seed=8, modes=3)
    np.testing.assert_array_equal(reopened.predict(Q), clf.predict(Q))


def test_the_choice_does_not_depend_on_the_order_of_the_classes(tmp_path):
    X, y = blobs(30, 200, 6, seed=9, modes=3)  # 6,000 rows: the held-out rows are sampled
    labels = np.array([f"c{v:02d}" for v in y])
    order = np.argsort(-y, kind="stable")  # a collection numbers classes as they come: here in reverse
    clf = ImprintClassifier(random_state=1).fit(X, labels)  # sorted classes
    col = Collection.create(tmp_path / "c", model=None, random_state=1)
    col.add(X[order], labels[order])
    assert {k: col.auto_choice[k] for k in clf.auto_choice_} == clf.auto_choice_
    assert col.auto_choice["cv_results"] == [r for r in clf.cv_results_ if r["generator"] != "ls"]

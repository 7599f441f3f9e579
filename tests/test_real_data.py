"""On BANKING77 (precomputed MiniLM embeddings): the paper's main finding and exact 1-NN."""

from __future__ import annotations

import numpy as np
import reference as ref

from retrieval_imprint import ImprintClassifier, neural_collapse


def test_kmeans_k20_beats_mean_imprinting(banking77):
    Xtr, ytr, Xte, yte = (banking77[k] for k in ("train_X", "train_y", "test_X", "test_y"))
    mean = ImprintClassifier.from_preset("qi").fit(Xtr, ytr).score(Xte, yte)
    best = ImprintClassifier.from_preset("imprint").fit(Xtr, ytr).score(Xte, yte)
    assert best > mean + 0.02, f"kmeans k=20 {best:.4f} vs mean {mean:.4f}"


def test_all_samples_max_is_exact_cosine_1nn(banking77):
    Xtr, ytr, Xte = banking77["train_X"], banking77["train_y"], banking77["test_X"][:500]
    clf = ImprintClassifier(generator="all", aggregation="max").fit(Xtr, ytr)
    sim = ref.l2(Xte) @ ref.l2(Xtr).T
    nearest = np.argmax(sim, axis=1)
    margin = np.sort(sim, 1)[:, -1] - np.sort(sim, 1)[:, -2]
    clear = margin > 1e-5  # float32 search vs float64 reference: compare where the winner is clear
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(clf.predict(Xte)[clear], ytr[nearest][clear])
    expected, _ = ref.scores(ref.l2(Xte[:50]), clf.proxies_, clf.proxy_class_index_, len(clf.classes_))
    np.testing.assert_allclose(clf.decision_function(Xte[:50]), expected, atol=1e-5)


def test_banking77_nc1_is_reported(banking77):
    report = neural_collapse(banking77["train_X"], banking77["train_y"])
    assert np.isfinite(report.nc1) and report.nc1 > 0 and len(report.classes) == 77

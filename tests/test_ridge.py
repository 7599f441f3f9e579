"""ridge.py: the streaming least-squares head equals the estimator's closed form under any history."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

from retrieval_imprint import ridge
from retrieval_imprint.ridge import RidgeHead


def classes(n_classes: int, width: int, seed: int) -> list[np.ndarray]:
    """Unit rows of ``width`` features (non-negative, as ReLU features are), 3 to 30 per class."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_classes):
        X = np.maximum(rng.normal(rng.normal(size=width), 1.0, (int(rng.integers(3, 31)), width)), 0)
        out.append(ref.l2(X + 1e-3))
    return out


def scores(head: RidgeHead, members: list[np.ndarray], Q: np.ndarray) -> np.ndarray:
    """Every class's score of each query: its mean's inner product with ``z``."""
    means = np.stack([X.mean(0) for X in members])
    return head.transform(Q, len(members)).astype(np.float64) @ means.T


def closed_form(members: list[np.ndarray], rho: float, Q: np.ndarray) -> np.ndarray:
    X = np.concatenate(members)
    y = np.repeat(np.arange(len(members)), [len(m) for m in members])
    return Q @ ref.ls(X, y, rho).T


@pytest.mark.parametrize("width", [12, 60])  # updates of more rows than a quarter of the width refactor
def test_adds_and_removes_in_any_order_equal_the_closed_form(width):
    """Classes added one by one, some removed, one re-added with other rows: the scores equal
    ``reference.ls`` on the classes left, with ``lambda = n rho`` of the final rows."""
    pool = classes(9, width, seed=width)
    Q = ref.l2(np.abs(np.random.default_rng(1).normal(size=(7, width))))
    lam = 0.7
    head = RidgeHead(width, lam)
    for X in pool:
        head.add(X)
    head.remove(pool[2]).remove(pool[6])
    replaced = classes(1, width, seed=99)[0]
    head.remove(pool[4]).add(replaced)
    members = [pool[0], pool[1], pool[3], replaced, pool[5], pool[7], pool[8]]
    n = sum(len(m) for m in members)
    assert head.n_rows_ == n
    expected = closed_form(members, lam / n, Q)
    np.testing.assert_allclose(scores(head, members, Q), expected, rtol=1e-5, atol=1e-6)
    # the rank updates agree with a fresh factorisation of the same sums
    np.testing.assert_allclose(head.inverse_, RidgeHead.from_gram(head.gram_, n, lam).inverse_, rtol=0, atol=1e-9)


def test_rank_updates_are_taken_below_a_quarter_of_the_width(monkeypatch):
    """A small class is a Woodbury update (no factorisation), a large one a refactor."""
    calls = []
    monkeypatch.setattr(RidgeHead, "refactor", lambda self: calls.append(1) or self)
    head = RidgeHead(40, 1.0)
    head.add(classes(1, 40, seed=3)[0][:10])
    assert calls == []
    head.add(np.ones((11, 40)))
    assert calls == [1]
    assert ridge.WOODBURY_SHARE * 40 == 10


def test_a_head_rebuilt_from_its_checkpoint_scores_the_same():
    pool = classes(5, 30, seed=5)
    head = RidgeHead(30, 0.3)
    for X in pool:
        head.add(X)
    again = RidgeHead.from_gram(head.gram_.copy(), head.n_rows_, 0.3)
    Q = ref.l2(np.abs(np.random.default_rng(2).normal(size=(4, 30))))
    np.testing.assert_allclose(scores(again, pool, Q), scores(head, pool, Q), rtol=1e-6, atol=1e-7)


def test_bad_updates_are_refused():
    head = RidgeHead(8, 1.0).add(np.ones((2, 8)))
    with pytest.raises(ValueError, match="3 rows removed from a head of 2"):
        head.remove(np.ones((3, 8)))
    with pytest.raises(ValueError, match="rows of 5 features for a head of 8"):
        head.add(np.ones((1, 5)))
    with pytest.raises(ValueError, match="ridge 0.0 is not valid"):
        RidgeHead(8, 0.0)

"""The streaming least-squares head of a collection (``generator="ls"``): RanPAC's ridge regression
over random ReLU features, grown one class at a time.

The estimator's GEN ``ls`` refits every class's weights from all the data (``generate.ls_head``).
Here its ridge sits on the query side (``ridge.RidgeHead``): the index holds each class's mean
feature vector (unnormalised), and a query is mapped to ``z = (n / C) A phi(q)`` before the top-1
inner-product search, with ``A = (G + lambda I)^-1`` over every kept sample's features. An add
updates ``G`` by its new rows (a rank-k update of ``A``), a removal or an upsert takes the old
class's kept samples out again, and nothing else is rewritten. The scores are the estimator's ls
with ``post_norm="none"`` for the same ``lambda``, under any history (tests/test_lshead.py).

``lambda = n rho`` is set by the first add, with ``rho`` its ``ls_reg`` or chosen there by
leave-one-out (``generate.loo_ridge``), and kept while the samples in ``G`` stay within a factor
``RECHOOSE`` of those it was chosen on (``ridge_rows``): between, an add regularises as a ridge with
a fixed prior and changes ``A`` by a rank update; past it (``outgrown``), the next write chooses
``lambda`` again on every kept sample (``rechosen``; ``G`` and the class means stay as they are), so
a collection grown from a tenth of its data ends near the ridge a build from all of it chooses, at
an amortised cost of a few choices over all the samples. ``G`` (float64, ``width^2 x 8`` bytes) is
written as a ``gram`` segment, in a write's atomic commit (``writes.py``), by the first add,
removals, upserts, ``tune``, compactions that merge sample files, and an add past ``REPLAY_MAX``
samples since the last; an open (``snapshot.read``) sums into it the kept samples of the sample
files written since: a small add writes its samples and class means, not the 32 MB of ``G`` at 2,000
features.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from ._groups import Grouped, single_threaded_blas
from .features import feature_map, relu_features
from .generate import Spectrum, class_means, loo_ridge
from .imprint import seed_of
from .index import SMALL_BATCH
from .normalize import normalize
from .params import AUTO
from .ridge import RidgeHead, gram_of
from .tuning import TUNE_QUERIES

REPLAY_MAX = 4096  # samples added since G was last written beyond which an add writes it (an open sums them)
RECHOOSE = 2  # lambda is chosen again once G's samples are this factor more, or fewer, than it was chosen on


def in_key_order(X: np.ndarray, codes: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``X`` and its rows' classes ``codes``, the rows ordered by their class's label key (``keys``, per
    class), each class's as they were: the leave-one-out scores a sample of rows drawn by position
    (``generate.LOO_ROWS``), and the order samples are stored in is the layout's (a sharded collection
    pools its shards'), so the ridge is chosen on them in this order: the same however they are stored."""
    order = np.argsort(keys[codes], kind="stable")
    return X[order], codes[order]


class LSHead:
    """The feature map ``phi`` and the ridge of one committed version. Writes make changed copies
    (``grown``): a reader holding this one keeps its answers."""

    def __init__(self, cfg: dict[str, Any], ridge: RidgeHead) -> None:
        width, self.seed = cfg["features"], seed_of(cfg["random_state"])
        self.map = None if width is None else feature_map(cfg["dimension"], width, self.seed)
        self.pre_norm, self.inf_norm, self.ridge = cfg["pre_norm"], cfg["inf_norm"], ridge
        self.pending = 0  # samples in G since it was last written (``REPLAY_MAX``)
        self.chosen_on = cfg["ridge_rows"] or 0  # the samples lambda was chosen on (0: unknown, made before 0016)

    @classmethod
    def first(cls, cfg: dict[str, Any], X: np.ndarray, codes: np.ndarray, keys: np.ndarray) -> LSHead:
        """The head of a first add (or ``tune``) of NORMpre'd ``X`` in classes ``codes`` (label ``keys``
        per class), its rows in: ``lambda = n rho``, ``rho`` the ``ls_reg`` setting or chosen by
        leave-one-out on ``X`` (``in_key_order``), whose spectrum comes from the same ``G`` (one sum
        over the rows, not two)."""
        X, codes = in_key_order(X, codes, keys)
        head = cls(cfg, RidgeHead(cfg["features"] or X.shape[1], 1.0))
        F = head.features(X)
        gram = gram_of(F)
        rho = head._rho(cfg["ls_reg"], F, codes, gram if len(F) >= len(gram) else None)  # few rows: X X^T's
        head.ridge = RidgeHead.from_gram(gram, len(X), len(X) * rho)
        head.chosen_on = head.pending = len(X)
        return head

    @property
    def outgrown(self) -> bool:
        """Whether ``G`` sums ``RECHOOSE`` times more, or fewer, samples than ``lambda`` was chosen on."""
        return self.outgrows(self.chosen_on, self.n_rows)

    @staticmethod
    def outgrows(chosen_on: int, n_rows: int) -> bool:
        """Whether ``n_rows`` samples (some) are ``RECHOOSE`` times more, or fewer, than ``chosen_on``."""
        return n_rows > 0 and not chosen_on / RECHOOSE < n_rows < chosen_on * RECHOOSE

    def rechosen(self, ls_reg: float | str, kept: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> LSHead:
        """A copy with ``lambda = n rho`` chosen again on all ``n`` samples in ``G``: ``rho`` the setting
        ``ls_reg``, or by leave-one-out on ``kept`` (the NORMpre'd samples ``G`` sums, their classes and
        the classes' label keys: ``Snapshot.kept_samples``; ``in_key_order``), its spectrum taken from
        ``G`` itself."""
        X, codes = (None, None) if kept is None else in_key_order(*kept)
        F = None if X is None else self.features(X)
        return self.with_ridge(self.n_rows * self._rho(ls_reg, F, codes, self.ridge.gram_), self.n_rows)

    def with_ridge(self, lam: float, chosen_on: int) -> LSHead:
        """A copy whose ``lambda`` is ``lam``, as chosen on ``chosen_on`` samples (``G`` as it is)."""
        out = copy.copy(self)
        out.ridge = RidgeHead.from_gram(self.ridge.gram_, self.n_rows, lam)
        out.chosen_on = chosen_on
        return out

    def _rho(
        self, ls_reg: float | str, F: np.ndarray | None, codes: np.ndarray | None, gram: np.ndarray | None
    ) -> float:
        """``rho``: the setting, or the leave-one-out choice on features ``F`` of classes ``codes``
        (``gram``: their ``F^T F``, where summed already)."""
        if ls_reg not in (None, AUTO):
            return float(ls_reg)
        assert F is not None and codes is not None
        C = int(codes.max()) + 1
        means = class_means(Grouped.from_codes(F, codes, np.arange(C)))
        spectrum = Spectrum.of(F) if gram is None else Spectrum.of_gram(gram, len(F))
        return loo_ridge(F, spectrum, codes, means, np.arange(C), self.seed, False)

    @classmethod
    def from_gram(cls, cfg: dict[str, Any], gram: np.ndarray, n_rows: int, replayed: np.ndarray) -> LSHead:
        """The head of a stored ``G`` (a ``gram`` segment) over ``n_rows`` samples, with the NORMpre'd samples
        ``replayed`` (those added since it was written) summed in, factored anew."""
        head = cls(cfg, RidgeHead(len(gram), cfg["ridge"]))
        head.ridge = RidgeHead.from_gram(gram + gram_of(head.features(replayed)), n_rows + len(replayed), head.lam)
        head.pending = len(replayed)
        return head

    @classmethod
    def combined(cls, cfg: dict[str, Any], heads: Sequence[LSHead], lam: float, chosen_on: int) -> LSHead:
        """The head of all of ``heads``' samples (a sharded collection's, each shard's ``G`` its own):
        ``G`` and ``n`` summed, ``A`` factored anew for ``lambda = lam``, chosen on ``chosen_on`` samples."""
        gram = np.sum([head.ridge.gram_ for head in heads], axis=0)
        head = cls(cfg, RidgeHead.from_gram(gram, sum(head.n_rows for head in heads), lam))
        head.chosen_on = chosen_on
        return head

    @property
    def lam(self) -> float:
        """The absolute ridge ``lambda`` (``n rho``, ``n`` the ``chosen_on`` samples)."""
        return self.ridge.lam

    @property
    def n_rows(self) -> int:
        """The samples ``G`` sums."""
        return self.ridge.n_rows_

    def features(self, X: np.ndarray) -> np.ndarray:
        """``NORMpre(phi(x))`` of NORMpre'd samples: what ``G`` sums and the class means average."""
        return X if self.map is None else normalize(relu_features(X, self.map), self.pre_norm, what="X", copy=False)

    def queries(self, Q: np.ndarray, n_classes: int) -> np.ndarray:
        """``z(q)`` of queries after NORMinf: whose inner product with a class mean is its score. A few
        queries' products run on one BLAS thread: in a throwaway probe, BLAS's threads, still spinning
        after them, about doubled the time of the FAISS search that follows."""
        with single_threaded_blas() if len(Q) < SMALL_BATCH else nullcontext():
            F = Q if self.map is None else normalize(relu_features(Q, self.map), self.inf_norm, what="Q", copy=False)
            return self.ridge.transform(F, n_classes)

    def tuning_queries(self, X: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
        """``z`` of up to ``TUNE_QUERIES`` of the NORMpre'd samples ``X`` (a seeded choice): what an IVF index
        of the class means is tuned on (``tuning.tune_nprobe``), its class means not being what it is asked."""
        rows = np.sort(np.random.default_rng(seed).permutation(len(X))[:TUNE_QUERIES])
        return self.queries(X[rows], n_classes)

    def proxies(self, groups: Grouped) -> tuple[np.ndarray, np.ndarray]:
        """Each class's mean feature vector ``(C, width)`` float32 and its class: the index's vectors."""
        F = Grouped(self.features(groups.X), groups.offsets, groups.keys)
        return class_means(F).astype(np.float32), np.arange(groups.n_classes)

    def grown(self, added: np.ndarray, removed: np.ndarray | None = None) -> LSHead:
        """A copy with NORMpre'd samples ``added`` in ``G`` and ``removed`` (added before) out."""
        out = copy.copy(self)
        out.ridge = copy.copy(self.ridge)
        if removed is not None and len(removed):
            out.ridge.remove(self.features(removed))
        if len(added):
            out.ridge.add(self.features(added))
        out.pending += len(added)
        return out

    def checkpoint(self, due: bool) -> bool:
        """Whether this version's write writes ``G`` (``due``: it must; or ``REPLAY_MAX`` samples since the
        last); if so its samples count as written."""
        if due or self.pending > REPLAY_MAX:
            self.pending = 0
            return True
        return False

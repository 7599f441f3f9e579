"""``ImprintClassifier``: the IMPRINT framework as a scikit-learn estimator.

fit:      X -> NORMpre -> GEN (per class) -> NORMpost -> proxies in a FAISS index
predict:  x -> NORMinf -> AGG over the proxies (max = top-1 search, mnn = top-m vote)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._checks import check_choice, check_int
from ._groups import Grouped, label_keys
from .aggregate import AGGREGATIONS, VOTES, max_scores, rank_classes, vote_scores, vote_weights
from .generate import check_generator, check_k, generate
from .index import METRICS, ProxyIndex
from .normalize import INF_NORMS, POST_NORMS, PRE_NORMS, normalize, quantile_targets

# The published methods in IMPRINT terms (DESIGN §1): NORMpre/GEN/NORMpost/NORMinf/AGG.
PRESETS: dict[str, dict[str, Any]] = {
    # Qi et al. 2018: L2/mean/L2/L2/max
    "qi": dict(pre_norm="l2", generator="mean", post_norm="l2", inf_norm="l2", aggregation="max"),
    # Hosoda et al.: none/mean/quantile/none/max
    "hosoda": dict(pre_norm="none", generator="mean", post_norm="quantile", inf_norm="none",
                   aggregation="max"),
    # Janson et al.: none/mean/none/none/1-NN Euclidean, distance-weighted
    "janson": dict(pre_norm="none", generator="mean", post_norm="none", inf_norm="none",
                   aggregation="mnn", m=1, metric="euclidean", vote="distance"),
    # The paper's best: L2/k-means k=20/L2/L2/max
    "imprint": dict(pre_norm="l2", generator="kmeans", k=20, post_norm="l2", inf_norm="l2",
                    aggregation="max"),
}


def check_params(params: dict[str, Any]) -> None:
    """Validate GEN/NORM/AGG parameters (those of ``ImprintClassifier``); a ``ValueError`` names the
    first bad argument and its allowed values. Shared by the estimator and ``Collection``."""
    check_generator(params["generator"])
    check_k(params["k"])
    check_choice("pre_norm", params["pre_norm"], PRE_NORMS)
    check_choice("post_norm", params["post_norm"], POST_NORMS)
    check_choice("inf_norm", params["inf_norm"], INF_NORMS)
    check_choice("aggregation", params["aggregation"], AGGREGATIONS)
    check_int("m", params["m"], 1)
    if params["aggregation"] == "max" and params["m"] != 1:
        raise ValueError(f"m={params['m']!r} is only used with aggregation='mnn'; max uses the top-1 proxy")
    check_choice("metric", params["metric"], METRICS)
    check_choice("vote", params["vote"], VOTES)
    reg = params["ls_reg"]
    if not isinstance(reg, (int, float)) or not np.isfinite(reg) or reg < 0:
        raise ValueError(f"ls_reg={reg!r} is not valid; expected a finite number >= 0")


class ImprintClassifier(ClassifierMixin, BaseEstimator):
    """A classifier head imprinted from frozen embeddings: no gradient step, one pass over the data.

    Parameters (names from the paper, DESIGN §1)
    ----------
    generator : GEN, one of ``generate.GENERATORS`` (mean, kmeans, kmedoids, random, fps, cov_max,
        all, ls, kls).
    k : proxies per class; -1 keeps every sample. Classes with ``n_c <= k`` keep every sample.
    pre_norm, post_norm, inf_norm : NORM of samples, proxies, queries ("none", "l2", "quantile").
    aggregation : "max" (top-1 proxy) or "mnn" (the ``m`` nearest proxies vote).
    m : neighbours that vote with ``aggregation="mnn"``.
    metric : "ip", "cosine", "euclidean", "manhattan", "chebyshev" or "mahalanobis".
    vote : "uniform" or "distance" (weights ``1/(dist + 1e-10)``), for ``mnn``.
    random_state : seed of the per-class random draws (int, None, or a RandomState).
    ls_reg : ridge ``lambda`` of the ``ls`` / ``kls`` heads.

    Fitted attributes
    -----------------
    classes_ : sorted class labels. proxies_ : ``(P, d)`` proxies after NORMpost, grouped by class.
    proxy_labels_ : ``(P,)`` class label of each proxy. quantile_targets_ : ``(d,)`` or None.
    index_ : the ``ProxyIndex`` searched at prediction time.
    """

    def __init__(
        self,
        generator: str = "kmeans",
        k: int = 20,
        pre_norm: str = "l2",
        post_norm: str = "l2",
        inf_norm: str = "l2",
        aggregation: str = "max",
        m: int = 1,
        metric: str = "ip",
        vote: str = "uniform",
        random_state: int | None = 0,
        ls_reg: float = 1e-3,
    ) -> None:
        self.generator = generator
        self.k = k
        self.pre_norm = pre_norm
        self.post_norm = post_norm
        self.inf_norm = inf_norm
        self.aggregation = aggregation
        self.m = m
        self.metric = metric
        self.vote = vote
        self.random_state = random_state
        self.ls_reg = ls_reg

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ImprintClassifier":
        """A classifier set up as a published method: ``qi``, ``hosoda``, ``janson`` or ``imprint``."""
        return cls(**{**PRESETS[check_choice("preset", name, tuple(PRESETS))], **overrides})

    def _seed(self) -> int:
        if isinstance(self.random_state, (int, np.integer)) and not isinstance(self.random_state, bool):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(2**31))

    def fit(self, X: Any, y: Any) -> "ImprintClassifier":
        """Imprint one set of proxies per class from embeddings ``X`` ``(n, d)`` and labels ``y``."""
        check_params(self.get_params())
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        groups = Grouped.from_codes(X, codes, label_keys(self.classes_))
        owned = groups.X is not X and not np.shares_memory(groups.X, X)  # sorted into a copy of ours
        groups = Grouped(normalize(groups.X, self.pre_norm, what="X", copy=not owned), groups.offsets, groups.keys)
        W, owner = generate(self.generator, groups, self.k, self._seed(), ls_reg=self.ls_reg)
        self.quantile_targets_ = quantile_targets(W) if self.post_norm == "quantile" else None
        self.proxies_ = normalize(W, self.post_norm, targets=self.quantile_targets_, what="proxies", copy=False)
        self.proxy_labels_ = self.classes_[owner]
        self.proxy_class_index_ = owner
        self.index_ = ProxyIndex.build(self.proxies_, self.metric)
        return self

    def _queries(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return normalize(X, self.inf_norm, what="X")

    def decision_function(self, X: Any) -> np.ndarray:
        """Per-class aggregated score ``(n, C)`` (``(n,)`` for two classes: score of ``classes_[1]``
        minus ``classes_[0]``). ``max``: best proxy similarity; ``mnn``: share of the m-NN vote."""
        Q = self._queries(X)
        if self.aggregation == "max":
            starts = np.searchsorted(self.proxy_class_index_, np.arange(len(self.classes_)))
            scores = max_scores(self.index_.similarity(Q), starts)
        else:
            _, dist, ids = self.index_.search(Q, min(self.m, self.index_.ntotal))
            owner = self.proxy_class_index_[ids]
            scores = vote_scores(owner, vote_weights(dist, self.vote), len(self.classes_))
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict(self, X: Any) -> np.ndarray:
        """The class of the top-1 proxy (``max``) or the winner of the m-NN vote (``mnn``)."""
        Q = self._queries(X)
        _, dist, ids = self.index_.search(Q, 1 if self.aggregation == "max" else min(self.m, self.index_.ntotal))
        owner = self.proxy_class_index_[ids]
        if self.aggregation == "max":
            return self.classes_[owner[:, 0]]
        return self.classes_[rank_classes(owner, vote_weights(dist, self.vote), 1, vote=True)[0][:, 0]]

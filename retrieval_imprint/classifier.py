"""``ImprintClassifier``: the IMPRINT framework as a scikit-learn estimator.

fit:      X -> NORMpre -> GEN (per class) -> NORMpost -> proxies in a FAISS index
predict:  x -> NORMinf -> AGG over the proxies (max = top-1 search, mnn = top-m vote)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .aggregate import max_scores, rank_classes, vote_scores, vote_weights
from .imprint import grouped, imprint
from .index import ProxyIndex
from .labels import label_keys
from .normalize import normalize
from .params import DEFAULTS, check_params, preset


class ImprintClassifier(ClassifierMixin, BaseEstimator):
    """A classifier head imprinted from frozen embeddings: no gradient step, one pass over the data.

    Parameters: the GEN/NORM/AGG settings of ``params.IMPRINT``, named as in the paper, where each
    is declared with its default, its allowed values and its meaning (docs/design.md lists them).
    ``from_preset`` starts from a published method.

    Fitted attributes
    -----------------
    classes_ : sorted class labels. proxies_ : ``(P, d)`` proxies after NORMpost, grouped by class.
    proxy_labels_ : ``(P,)`` class label of each proxy. quantile_targets_ : ``(d,)`` or None.
    index_ : the ``ProxyIndex`` searched at prediction time.
    """

    def __init__(
        self,
        generator: str = DEFAULTS["generator"],
        k: int = DEFAULTS["k"],
        pre_norm: str = DEFAULTS["pre_norm"],
        post_norm: str = DEFAULTS["post_norm"],
        inf_norm: str = DEFAULTS["inf_norm"],
        aggregation: str = DEFAULTS["aggregation"],
        m: int = DEFAULTS["m"],
        metric: str = DEFAULTS["metric"],
        vote: str = DEFAULTS["vote"],
        random_state: Any = DEFAULTS["random_state"],
        ls_reg: float = DEFAULTS["ls_reg"],
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
        return cls(**{**preset(name), **overrides})

    def fit(self, X: Any, y: Any) -> "ImprintClassifier":
        """Imprint one set of proxies per class from embeddings ``X`` ``(n, d)`` and labels ``y``."""
        params = check_params(self.get_params())
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        groups = grouped(X, codes, label_keys(self.classes_), params["pre_norm"])
        self.proxies_, owner, fixed = imprint(groups, params)
        self.quantile_targets_ = fixed.targets
        self.proxy_labels_ = self.classes_[owner]
        self.proxy_class_index_ = owner
        self.index_ = ProxyIndex(X.shape[1], self.metric, fixed.transform)
        self.index_.add(self.proxies_)
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

"""``ImprintClassifier``: the IMPRINT framework as a scikit-learn estimator.

fit:      X -> [features] -> NORMpre -> GEN (per class) -> NORMpost -> proxies in a FAISS index
predict:  x -> [features] -> NORMinf -> AGG over the proxies (max = top-1 search, mnn = top-m vote)
"""

from __future__ import annotations

import copy
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from . import lsfit, temperature
from ._groups import Grouped
from .aggregate import max_scores, rank_classes, vote_scores, vote_weights
from .auto import choose_head, class_fold, folds
from .device import use_device
from .features import feature_map, relu_features
from .imprint import Fixed, finished, grouped, imprint, means, seed_of
from .index import ProxyIndex
from .labels import check_targets, label_keys
from .normalize import normalize
from .openset import class_shift, filled, own_scores
from .params import AUTO, DEFAULTS, GENERATOR_KINDS, IMPRINT, RUNTIME, check_params, preset

BLOCK = 1024  # queries scored at a time by a blend's predict: (BLOCK, proxies) similarities in memory


def _on_device(method: Callable) -> Callable:
    """Run ``method`` with the estimator's ``device`` (``device.py``; None: the process's)."""

    @functools.wraps(method)
    def run(self: ImprintClassifier, *args: Any, **kwargs: Any) -> Any:
        with use_device(self.device):  # resolve checks the value
            return method(self, *args, **kwargs)

    return run


class ImprintClassifier(ClassifierMixin, BaseEstimator):
    """A classifier head imprinted from frozen embeddings: no gradient step, one pass over the data.

    The parameters are the GEN/NORM/AGG settings of ``params.IMPRINT``, named as in the paper, and
    ``device``; the Parameters section below is written from their declarations there. By default ``generator`` and ``aggregation`` are ``auto``: k and max-or-blend are chosen by
    cross-validation on the training data (``auto.py``), and on data of up to ``auto.LS_ROWS`` rows
    so is the ls head on ``auto.LS_FEATURES`` random features (scored by its leave-one-out accuracy,
    ``auto.choose_head``). ``from_preset`` starts from a published
    method. ``features`` (a width, e.g. 2000) maps the embeddings through fixed random ReLU features
    first (``features.py``): with ``generator="ls"`` the most accurate head on full data, at the
    cost of a wider index. ``device`` is where k-means and exact search run, not a setting of the
    head: None (numpy and FAISS, or the process's ``device.set_device``), ``"cpu"`` / ``"cuda"``
    (the torch backend) or ``"auto"`` (``device.py``); the fitted head is the same.

    PARAMETERS

    Fitted attributes
    -----------------
    classes_ : sorted class labels. proxies_ : ``(P, d)`` proxies after NORMpost, grouped by class.
    proxy_labels_ : ``(P,)`` class label of each proxy. quantile_targets_ : ``(d,)`` or None.
    auto_choice_ : the concrete generator, k, aggregation and alpha used (and ``features`` where
    auto chose the ls head on random features). cv_results_ : the held-out accuracy of each candidate
    (empty when nothing was left to choose; the ls head's row is a leave-one-out one). means_ : ``(C, d)`` class
    means of a blend, else None. index_ : the ``ProxyIndex`` searched at prediction time.
    feature_map_ : ``(d, features)`` matrix of the random features, or None; proxies then live in
    the feature space.
    """

    def __init__(
        self,
        generator: str = DEFAULTS["generator"],
        k: int | None = DEFAULTS["k"],
        pre_norm: str = DEFAULTS["pre_norm"],
        post_norm: str = DEFAULTS["post_norm"],
        inf_norm: str = DEFAULTS["inf_norm"],
        aggregation: str = DEFAULTS["aggregation"],
        alpha: float | None = DEFAULTS["alpha"],
        m: int = DEFAULTS["m"],
        metric: str = DEFAULTS["metric"],
        vote: str = DEFAULTS["vote"],
        random_state: Any = DEFAULTS["random_state"],
        rejection: str = DEFAULTS["rejection"],
        ls_reg: float | str = DEFAULTS["ls_reg"],
        features: int | None = DEFAULTS["features"],
        temperature: float = DEFAULTS["temperature"],
        device: str | None = DEFAULTS["device"],
    ) -> None:
        self.generator = generator
        self.k = k
        self.pre_norm = pre_norm
        self.post_norm = post_norm
        self.inf_norm = inf_norm
        self.aggregation = aggregation
        self.alpha = alpha
        self.m = m
        self.metric = metric
        self.vote = vote
        self.random_state = random_state
        self.rejection = rejection
        self.ls_reg = ls_reg
        self.features = features
        self.temperature = temperature
        self.device = device

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ImprintClassifier:
        """A classifier set up as a named method: ``auto``, ``qi``, ``hosoda``, ``janson`` or ``imprint``."""
        return cls(**{**preset(name), **overrides})

    @_on_device
    def fit(self, X: Any, y: Any) -> ImprintClassifier:
        """Imprint one set of proxies per class from embeddings ``X`` ``(n, d)`` and labels ``y``
        (after choosing what ``auto`` leaves open, on the same data)."""
        params = check_params(self.get_params())
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        keys = label_keys(self.classes_)
        self.feature_map_ = (
            None
            if params["features"] is None
            else feature_map(X.shape[1], params["features"], seed_of(params["random_state"]))
        )
        X = self._mapped(X)
        choice, self.cv_results_, ls = choose_head(X, codes, keys, params)
        self.auto_choice_ = choice.params()
        params.update(self.auto_choice_)
        if ls is None and params["generator"] == "ls":
            ls = lsfit.fit(X, codes, keys, params)
        if ls is None:
            groups = grouped(X, codes, keys, params["pre_norm"])
            self.proxies_, owner, fixed = imprint(groups, params)
        else:  # an ls head (auto's, if it chose one: then also the features it maps to)
            self.feature_map_ = ls.map if ls.map is not None else self.feature_map_
            X, groups = ls.X, ls.groups
            self.proxies_, owner, fixed = finished(ls.W, np.arange(len(ls.W)), params)
        self.quantile_targets_ = fixed.targets
        self.proxy_labels_ = self.classes_[owner]
        self.proxy_class_index_ = owner
        self.index_ = ProxyIndex(X.shape[1], self.metric, fixed.transform)
        self.index_.add(self.proxies_)
        self.means_ = means(groups, params, fixed) if params["aggregation"] == "blend" else None
        if self.means_ is not None:
            self.means_index_ = ProxyIndex(X.shape[1], self.metric, fixed.transform)
            self.means_index_.add(self.means_)
        self.class_shift_ = None
        shift, auto_t = params["rejection"] == "shift", params["temperature"] == AUTO
        ls_t = ls.temperature() if auto_t and ls is not None else None  # from the ls fit's own held-out scores
        # the samples (after the random features) in the order of ``groups``, not NORMpre'd
        raw = Grouped.from_codes(X, codes, keys) if shift or (auto_t and ls_t is None) else None
        if raw is not None and shift:
            own = own_scores(
                groups,
                normalize(raw.X, params["inf_norm"], what="X"),
                params,
                folds(groups, seed_of(params["random_state"])),
            )
            self.class_shift_ = filled(class_shift(groups.owner, own, len(self.classes_)))
        if ls_t is not None:
            self.temperature_ = ls_t
        else:
            self.temperature_ = self._fitted_temperature(raw) if raw is not None and auto_t else params["temperature"]
        return self

    def _fitted_temperature(self, raw: Grouped) -> float:
        """The temperature fitted to held-out class scores of training samples ``raw`` (after the
        random features, if any): ``temperature.SCORED`` rows of a seeded sample of classes
        (``auto.class_fold``), scored against every class by this head with those classes
        imprinted again without them (``_scores_without``)."""
        max_scored = max(1, min(temperature.SCORED, temperature.MAX_CELLS // len(self.classes_)))
        rows = class_fold(raw, seed_of(self.random_state), max_scored)
        if not len(rows):
            return temperature.FALLBACK
        held = np.zeros(len(raw.X), bool)
        held[rows] = True
        Q = normalize(raw.X[rows], self.inf_norm, what="X")
        return temperature.fit(self._scores_without(raw, held, Q), raw.owner[rows])

    def _scores_without(self, raw: Grouped, held: np.ndarray, Q: np.ndarray) -> np.ndarray:
        """Class scores of ``Q`` by this head fitted without the ``held`` rows of ``raw``. A per-class
        generator's classes without held rows keep their proxies (a class's proxies are its own
        samples' alone) and so their scores; only the others are imprinted again and scored (max,
        blend); an m-NN vote runs over them all. A generator of all classes at once (ls, kls) fits anew."""
        params = {**check_params(self.get_params()), **self.auto_choice_}
        if not GENERATOR_KINDS[params["generator"]].per_class:
            concrete = {**params, "temperature": 1.0, "rejection": "max", "features": None}
            refit = ImprintClassifier(**concrete).fit(raw.X[~held], self.classes_[raw.owner[~held]])
            return refit._class_scores(Q)  # noqa: SLF001 (its own class)
        owner = raw.owner
        touched = np.unique(owner[held])
        rest = raw.rows(touched)
        rest = rest[~held[rest]]
        groups = grouped(raw.X[rest], np.searchsorted(touched, owner[rest]), raw.keys[touched], self.pre_norm)
        fixed = Fixed(self.quantile_targets_, self.index_.transform)
        W, of, _ = imprint(groups, params, fixed)
        if params["aggregation"] == "mnn":  # the vote's neighbours come from every class's proxies
            kept = ~np.isin(self.proxy_class_index_, touched)
            owners = np.concatenate([self.proxy_class_index_[kept], touched[of]])
            order = np.argsort(owners, kind="stable")
            part = copy.copy(self)
            part.proxies_, part.proxy_class_index_ = np.concatenate([self.proxies_[kept], W])[order], owners[order]
            part.index_ = ProxyIndex(W.shape[1], self.metric, fixed.transform)
            part.index_.add(part.proxies_)
            return part._class_scores(Q)  # noqa: SLF001 (its own class)
        order = np.argsort(of, kind="stable")
        index = ProxyIndex(W.shape[1], self.metric, fixed.transform)
        index.add(W[order])
        best = max_scores(index.similarity(Q), np.searchsorted(of[order], np.arange(len(touched))))
        if params["aggregation"] == "blend":
            class_means = ProxyIndex(W.shape[1], self.metric, fixed.transform)
            class_means.add(means(groups, params, fixed))
            best = params["alpha"] * class_means.similarity(Q) + (1 - params["alpha"]) * best
        scores = self._class_scores(Q)  # every other class scores as in this head
        scores[:, touched] = best
        return scores

    @_on_device
    def rejection_score(self, X: Any) -> np.ndarray:
        """The open-set score of each query ``(n,)``: its best class's aggregated score, minus that
        class's shift under ``rejection="shift"`` (``openset.py``); low scores suggest no class fits."""
        scores = self._class_scores(self._queries(X))
        best = scores.argmax(1)
        out = scores[np.arange(len(scores)), best]
        return out - self.class_shift_[best] if self.class_shift_ is not None else out

    def _mapped(self, X: np.ndarray) -> np.ndarray:
        return X if self.feature_map_ is None else relu_features(X, self.feature_map_)

    def _queries(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return normalize(self._mapped(X), self.inf_norm, what="X", copy=self.feature_map_ is None)

    @_on_device
    def decision_function(self, X: Any) -> np.ndarray:
        """Per-class aggregated score ``(n, C)`` (``(n,)`` for two classes: score of ``classes_[1]``
        minus ``classes_[0]``). ``max``: best proxy similarity; ``blend``: alpha x mean similarity +
        (1 - alpha) x best proxy similarity; ``mnn``: share of the m-NN vote."""
        scores = self._class_scores(self._queries(X))
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def _class_scores(self, Q: np.ndarray) -> np.ndarray:
        choice = self.auto_choice_
        if choice["aggregation"] == "mnn":
            _, dist, ids = self.index_.search(Q, min(self.m, self.index_.ntotal))
            scores = vote_scores(self.proxy_class_index_[ids], vote_weights(dist, self.vote), len(self.classes_))
        elif choice["aggregation"] == "blend":
            scores = self._blend_scores(Q)
        else:
            scores = max_scores(self.index_.similarity(Q), self._starts())
        return scores

    def _starts(self) -> np.ndarray:
        return np.searchsorted(self.proxy_class_index_, np.arange(len(self.classes_)))

    def _blend_scores(self, Q: np.ndarray) -> np.ndarray:
        alpha = self.auto_choice_["alpha"]
        return alpha * self.means_index_.similarity(Q) + (1 - alpha) * max_scores(
            self.index_.similarity(Q), self._starts()
        )

    @_on_device
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, C)``: the softmax of the per-class scores divided by
        ``temperature_`` (``temperature``, or under ``"auto"`` the one fitted to out-of-fold scores
        of the training data: calibrated probabilities, ``temperature.py``)."""
        return np.exp(temperature.log_softmax(self._class_scores(self._queries(X)), self.temperature_))

    @_on_device
    def predict(self, X: Any) -> np.ndarray:
        """The class of the top-1 proxy (``max``), of the best blended score (``blend``), or the
        winner of the m-NN vote (``mnn``)."""
        Q = self._queries(X)
        choice, owner_of = self.auto_choice_, self.proxy_class_index_
        if choice["aggregation"] == "blend":  # every class's score, a block of queries at a time
            return self.classes_[
                np.concatenate([self._blend_scores(Q[lo : lo + BLOCK]).argmax(1) for lo in range(0, len(Q), BLOCK)])
            ]
        _, dist, ids = self.index_.search(Q, 1 if choice["aggregation"] == "max" else min(self.m, self.index_.ntotal))
        if choice["aggregation"] == "max":
            return self.classes_[owner_of[ids[:, 0]]]
        return self.classes_[rank_classes(owner_of[ids], vote_weights(dist, self.vote), 1, vote=True)[0][:, 0]]


def _numpydoc_parameters(names: list[str]) -> str:
    """A numpydoc ``Parameters`` section for these estimator parameters, written from their
    declarations (``ImprintClassifier``'s docstring is made with it, so the two cannot drift)."""
    lines = ["Parameters", "----------"]
    for name in names:
        p = (IMPRINT | RUNTIME)[name]
        kind = "{" + ", ".join(repr(c) for c in p.choices()) + "}" if p.choices else p.type.__name__
        if not p.choices and p.default in (None, AUTO):
            kind += f" or {p.default!r}"
        if name == "random_state":
            kind += ", RandomState or None"
        lines += [f"{name} : {kind}, default={p.default!r}", *textwrap.wrap(p.help, 92, initial_indent="    ",
                                                                            subsequent_indent="    ")]  # fmt: skip
    return "\n".join(lines)


ImprintClassifier.__doc__ = (ImprintClassifier.__doc__ or "").replace(
    "PARAMETERS",
    textwrap.indent(_numpydoc_parameters(list(inspect.signature(ImprintClassifier).parameters)), "    ")[4:],
)

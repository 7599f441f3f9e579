"""Open-set rejection: saying "none of these" when a query belongs to no class.

A query's *rejection score* is its best class's score (rule ``max``), or that score minus the
class's *shift* (rule ``shift``): the mean score the class gives its own training samples when each
is left out of the class's imprint (the folds of ``auto.folds``). A class whose samples all sit
close to its proxies gets a high shift, a spread-out one a low shift, so one threshold on the
shifted score behaves like a threshold per class learned from its own samples. A query is rejected
when its rejection score is below the threshold (a class's own threshold where one is set).

Thresholds come from labelled validation queries: with out-of-scope examples, for a target in-scope
accuracy (rejections count as errors, as in Larson et al. 2019), a target out-of-scope recall, or
the balanced point; without any, for a target rate of in-scope queries falsely rejected, from the
out-of-fold scores of the training samples alone (``own_scores``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._groups import Grouped
from .auto import folds
from .errors import CalibrationError, DataError, InvalidParameterError
from .imprint import imprint, means, seed_of
from .index import ProxyIndex
from .normalize import normalize
from .params import MARGIN

CURVE_POINTS = 200  # thresholds a reported trade-off curve keeps


def own_scores(groups: Grouped, queries: np.ndarray, params: dict[str, Any], fold: np.ndarray) -> np.ndarray:
    """Each sample's score for its own class, from the class imprinted without the sample's fold
    (``fold``: -1 never held out, then NaN). ``groups`` hold NORMpre'd samples, ``queries`` the same
    rows after NORMinf, ``params`` a concrete setting. Only the own class is scored, so a class's
    figures never depend on the other classes."""
    out = np.full(len(queries), np.nan)
    owner = groups.owner
    for f in np.unique(fold[fold >= 0]):
        train = fold != f
        counts = np.bincount(owner[train], minlength=groups.n_classes)
        part = Grouped(groups.X[train], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), groups.keys)
        W, proxy_owner, fixed = imprint(part, params)
        space = ProxyIndex(W.shape[1], params["metric"], fixed.transform)  # scores as the search computes them
        rows = np.flatnonzero(fold == f)
        c = owner[rows]
        start = np.searchsorted(proxy_owner, np.arange(groups.n_classes))
        count = np.bincount(proxy_owner, minlength=groups.n_classes)
        slots = start[c][:, None] + np.minimum(np.arange(count.max()), count[c][:, None] - 1)
        score = space.pair_similarity(queries[rows], space.prepare(W, "proxies")[slots]).max(1)
        if params["aggregation"] == "blend":
            M = space.prepare(means(part, params, fixed), "proxies")
            score = (
                params["alpha"] * space.pair_similarity(queries[rows], M[c][:, None, :])[:, 0]
                + (1 - params["alpha"]) * score
            )
        out[rows] = score
    return out


def class_shift(owner: np.ndarray, own: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean out-of-fold own score of each class (NaN for a class with no such score)."""
    known = np.isfinite(own)
    total = np.bincount(owner[known], own[known], minlength=n_classes)
    count = np.bincount(owner[known], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def filled(shift: np.ndarray) -> np.ndarray:
    """``shift`` with the classes that have none (a single sample) given the median of the others."""
    known = np.isfinite(shift)
    return np.where(known, shift, np.median(shift[known]) if known.any() else 0.0)


def auroc(in_scores: np.ndarray, oos_scores: np.ndarray) -> float:
    """Probability that an in-scope query outscores an out-of-scope one (ties count half)."""
    both = np.concatenate([in_scores, oos_scores])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)])
    ranks = (starts[inverse] + starts[inverse + 1] + 1) / 2  # average rank of each tie group
    n_in = len(in_scores)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * len(oos_scores)))


@dataclass(frozen=True)
class Calibration:
    """A rejection rule and threshold, what they gave on the calibration data, and the trade-off
    curve and AUROC of each rule that was weighed."""

    rule: str
    threshold: float
    in_scope_accuracy: float | None  # correct and accepted, over all in-scope queries
    oos_recall: float | None  # rejected, over all out-of-scope queries (None without them)
    criterion: str
    auroc: dict[str, float] = field(default_factory=dict)
    curve: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _curve(
    scores: np.ndarray, correct: np.ndarray, oos: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """In-scope accuracy and out-of-scope recall at every candidate threshold (accept: score >= t)."""
    candidates = np.unique(np.concatenate([scores, [] if oos is None else oos, [-np.inf]]))
    kept = np.sort(scores[correct])
    accuracy = (len(kept) - np.searchsorted(kept, candidates, side="left")) / len(scores)
    recall = np.searchsorted(np.sort(oos), candidates, side="left") / len(oos) if oos is not None else None
    return candidates, accuracy, recall


def calibrate(
    rules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    *,
    target_accuracy: float | None = None,
    target_oos_recall: float | None = None,
    margin: float = MARGIN,
) -> Calibration:
    """Choose a rule and the threshold below which a query gets "no class", on validation data.

    ``rules`` maps each rule weighed, the preferred first, to ``(scores, correct, oos_scores)``:
    the rejection score of each in-scope query, whether its class was right, and the rejection score
    of each out-of-scope query (or None). With ``target_accuracy``: the threshold keeping in-scope
    accuracy at least that, rejecting as much out-of-scope traffic as it allows; with
    ``target_oos_recall``: the threshold rejecting at least that share of out-of-scope queries,
    keeping as much in-scope accuracy as it allows; otherwise the threshold maximising the mean of
    in-scope accuracy and out-of-scope recall. A target must be cleared on these queries by
    ``margin`` binomial standard errors (``sqrt(t (1 - t) / n)``): a threshold that only just
    reaches it on validation data falls short on new data about half the time. A later rule
    replaces the preferred one only where it
    does better by more than one standard error of the difference: a hundred out-of-scope examples
    cannot tell two rules a few points apart (on CLINC150 the rule validation preferred by less did
    worse on test; docs/results.md). Raises ``CalibrationError`` if no rule reaches the target.
    """
    for name, target in (("target_accuracy", target_accuracy), ("target_oos_recall", target_oos_recall)):
        if target is not None and (isinstance(target, bool) or not 0 < target <= 1):
            raise InvalidParameterError(f"{name}={target!r} is not valid; expected a fraction in (0, 1]")
    if target_accuracy is not None and target_oos_recall is not None:
        raise InvalidParameterError("give target_accuracy or target_oos_recall, not both")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 10:
        raise InvalidParameterError(f"margin={margin!r} is not valid; expected standard errors in [0, 10)")
    has_oos = all(oos is not None and len(oos) for _, _, oos in rules.values())
    if not has_oos and target_accuracy is None:
        raise InvalidParameterError(
            "without out-of-scope queries, give target_accuracy (or calibrate from the "
            "training samples with target_false_rejection)"
        )
    best: tuple | None = None
    curves, aurocs = {}, {}
    for rule, (scores, correct, oos) in rules.items():
        scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
        if not len(scores) or len(scores) != len(correct):
            raise DataError("calibration needs in-scope scores and correctness flags of equal, non-zero length")
        candidates, accuracy, recall = _curve(scores, correct, oos)
        if has_oos:
            aurocs[rule] = auroc(scores, np.asarray(oos, np.float64))
        curves[rule] = _thin(candidates, accuracy, recall)
        if target_accuracy is not None:
            ok = np.flatnonzero(
                accuracy >= target_accuracy + margin * _binomial_se(target_accuracy, len(scores)) - 1e-12
            )
            i = ok[-1] if len(ok) else None  # the highest threshold that keeps the target
            value = recall[i] if i is not None and recall is not None else 0.0  # no OOS: the first rule
        elif target_oos_recall is not None:
            assert recall is not None and oos is not None  # has_oos: checked above
            ok = np.flatnonzero(
                recall >= target_oos_recall + margin * _binomial_se(target_oos_recall, len(oos)) - 1e-12
            )
            i = ok[0] if len(ok) else None  # the lowest threshold that reaches the target
            value = accuracy[i] if i is not None else 0
        else:
            assert recall is not None  # the balanced point: has_oos, checked above
            i = int(np.argmax((accuracy + recall) / 2))
            value = (accuracy[i] + recall[i]) / 2
        n = len(oos) if target_oos_recall is None and has_oos and oos is not None else len(scores)
        if i is not None and (best is None or value > best[0] + _standard_error(value, best[0], n)):
            best = (value, rule, candidates[i], accuracy[i], None if recall is None else recall[i])
    if best is None:
        reached = (
            f"in-scope accuracy {target_accuracy:g}"
            if target_accuracy is not None
            else f"out-of-scope recall {target_oos_recall:g}"
        )
        raise CalibrationError(
            f"no threshold reaches {reached} on these queries (without rejection the in-scope "
            f"accuracy is {max(np.mean(c) for _, c, _ in rules.values()):.4f}); nothing was changed"
        )

    def cleared(t: float, n: int) -> str:
        return f" + {margin:g} standard error ({margin * _binomial_se(t, n):.4f} on {n:,} queries)" if margin else ""

    n_oos = next(len(oos) for _, _, oos in rules.values() if oos is not None) if has_oos else 0
    criterion = (
        f"highest threshold keeping in-scope accuracy >= {target_accuracy:g}"
        + cleared(target_accuracy, len(next(iter(rules.values()))[0]))
        if target_accuracy is not None
        else f"lowest threshold rejecting >= {target_oos_recall:g}"
        + cleared(target_oos_recall, n_oos)
        + " of out-of-scope queries"
        if target_oos_recall is not None
        else "maximise (in-scope accuracy + out-of-scope recall) / 2"
    )
    _, rule, threshold, accuracy, recall = best
    return Calibration(
        rule,
        float(threshold),
        float(accuracy),
        None if recall is None else float(recall),
        criterion + (f" (rule {rule}, best of {', '.join(rules)})" if len(rules) > 1 else ""),
        aurocs,
        curves,
    )


def _standard_error(a: float, b: float, n: int) -> float:
    """Standard error of the difference of two rates measured on ``n`` queries each."""
    return float(np.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1)))


def _binomial_se(p: float, n: int) -> float:
    """The standard error of a proportion ``p`` measured on ``n`` trials."""
    return float(np.sqrt(p * (1 - p) / max(n, 1)))


def calibrate_without_oos(rule: str, own: np.ndarray, target_false_rejection: float) -> Calibration:
    """The threshold that rejects ``target_false_rejection`` of in-scope queries, estimated from
    the out-of-fold rejection scores ``own`` of the training samples (NaN: none)."""
    if isinstance(target_false_rejection, bool) or not 0 < target_false_rejection < 1:
        raise InvalidParameterError(
            f"target_false_rejection={target_false_rejection!r} is not valid; expected a fraction in (0, 1)"
        )
    own = own[np.isfinite(own)]
    if not len(own):
        raise CalibrationError("no class has two samples, so no sample can be scored left out; nothing was changed")
    threshold = float(np.quantile(own, target_false_rejection))
    return Calibration(
        rule,
        threshold,
        None,
        None,
        f"rejects {target_false_rejection:g} of the training samples scored left out ({len(own)} samples, rule {rule})",
    )


def _thin(candidates: np.ndarray, accuracy: np.ndarray, recall: np.ndarray | None) -> list[dict[str, float]]:
    """At most ``CURVE_POINTS`` points of a trade-off curve, evenly spaced along it."""
    keep = np.unique(np.linspace(0, len(candidates) - 1, min(CURVE_POINTS, len(candidates))).astype(int))
    return [
        {
            "threshold": float(candidates[i]),
            "in_scope_accuracy": float(accuracy[i]),
            **({"oos_recall": float(recall[i])} if recall is not None else {}),
        }
        for i in keep
    ]


def class_shifts(groups: Grouped, params: dict[str, Any]) -> np.ndarray:
    """Each class's rejection shift under rule shift (NaN otherwise, and for a single sample)."""
    if params["rejection"] != "shift":
        return np.full(groups.n_classes, np.nan)
    return class_shift(groups.owner, own_scores_of(groups, params), groups.n_classes)


def own_scores_of(groups: Grouped, params: dict[str, Any]) -> np.ndarray:
    """``own_scores`` of NORMpre'd samples, on the folds ``auto`` uses."""
    fold = folds(groups, seed_of(params["random_state"]))
    return own_scores(groups, normalize(groups.X, params["inf_norm"], what="X"), params, fold)

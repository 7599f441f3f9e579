"""Evaluation of predictions: accuracy, macro-F1 (scikit-learn's definitions), per-class figures
and the most frequent confusions. Labels may be str or int; a rejected prediction is None."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction in [0, 1]
    macro_f1: float  # fraction in [0, 1], unweighted mean over the true classes
    n: int
    per_class: list[dict[str, Any]] = field(default_factory=list)  # label, precision, recall, f1, support
    confusions: list[dict[str, Any]] = field(default_factory=list)  # true, predicted, count; most first

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "n": self.n, "correct":
                round(self.accuracy * self.n), "per_class": self.per_class, "confusions": self.confusions}


def _key(label: Any) -> tuple[str, str]:
    return (type(label).__name__, str(label))


def evaluate(y_true: Sequence[Any], y_pred: Sequence[Any], *, max_confusions: int = 10) -> Evaluation:
    """Score ``y_pred`` against ``y_true`` (macro-F1 over the classes present in ``y_true``)."""
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must be equal and non-empty")
    codes: dict[tuple[str, str], int] = {}
    labels: list[Any] = []
    for label in y_true + y_pred:
        if _key(label) not in codes:
            codes[_key(label)] = len(codes)
            labels.append(label)
    t = np.array([codes[_key(v)] for v in y_true])
    p = np.array([codes[_key(v)] for v in y_pred])
    present = np.unique(t)
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=present, zero_division=0)
    per_class = [{"label": labels[c], "precision": float(pr), "recall": float(r), "f1": float(f), "support": int(s)}
                 for c, pr, r, f, s in zip(present, prec, rec, f1, support)]
    wrong = Counter((a, b) for a, b in zip(t.tolist(), p.tolist()) if a != b)
    confusions = [{"true": labels[a], "predicted": labels[b], "count": n}
                  for (a, b), n in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:max_confusions]]
    return Evaluation(float((t == p).mean()), float(f1.mean()), len(t), per_class, confusions)


def few_shot(y: Sequence[Any], shots: int, seed: int) -> np.ndarray:
    """Row indices keeping ``shots`` random samples per class (all of a smaller class; 0 = all rows)."""
    y = np.asarray(y)
    if shots == 0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def sweep(X_train: np.ndarray, y_train: Sequence[Any], X_test: np.ndarray, y_test: Sequence[Any],
          configs: Sequence[dict[str, Any]], shots: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Accuracy (mean and std over seeds) of each ``ImprintClassifier`` config at each shots setting.

    Seed s draws the few-shot subset and seeds the generator. One row per (shots, config).
    """
    from .classifier import ImprintClassifier

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    rows = []
    for n_shots in shots:
        subsets = {seed: few_shot(y_train, n_shots, seed) for seed in seeds}
        for config in configs:
            accuracy, seconds = [], []
            for seed, rows_ in subsets.items():
                clf = ImprintClassifier(**{**config, "random_state": seed})
                t = time.perf_counter()
                clf.fit(X_train[rows_], y_train[rows_])
                seconds.append(time.perf_counter() - t)
                accuracy.append(float(np.mean(clf.predict(X_test) == y_test)))
            rows.append({"shots": n_shots, **config, "accuracy": float(np.mean(accuracy)),
                         "accuracy_std": float(np.std(accuracy)), "seeds": len(accuracy),
                         "fit_seconds": float(np.mean(seconds))})
    return rows


@dataclass(frozen=True)
class Calibration:
    """A rejection threshold and what it gave on the calibration data."""

    threshold: float
    in_scope_accuracy: float  # correct and accepted, over all in-scope queries
    oos_recall: float | None  # rejected, over all out-of-scope queries (None without them)
    criterion: str


def calibrate(in_scores: np.ndarray, in_correct: np.ndarray, oos_scores: np.ndarray | None = None, *,
              target_accuracy: float | None = None) -> Calibration:
    """Choose the score below which a query gets "no class", on validation data.

    ``in_scores`` / ``in_correct``: top-1 score of each in-scope query and whether its class was
    right; ``oos_scores``: top-1 score of each out-of-scope query. With ``target_accuracy``, the
    highest threshold whose in-scope accuracy (rejections count as errors, as in Larson et al.
    2019) stays >= the target, which rejects as much out-of-scope traffic as that allows. Without
    it, the threshold maximising the mean of in-scope accuracy and out-of-scope recall.
    """
    in_scores, in_correct = np.asarray(in_scores, np.float64), np.asarray(in_correct, bool)
    if not len(in_scores) or len(in_scores) != len(in_correct):
        raise ValueError("calibration needs in-scope scores and correctness flags of equal, non-zero length")
    if target_accuracy is None and (oos_scores is None or not len(oos_scores)):
        raise ValueError("without out-of-scope queries, give target_accuracy")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy={target_accuracy!r} is not valid; expected a fraction in (0, 1]")
    candidates = np.unique(np.concatenate([in_scores, [] if oos_scores is None else oos_scores, [-np.inf]]))
    # accepted in-scope correct / rejected oos, for every candidate threshold t (accept: score >= t)
    order = np.sort(in_scores[in_correct])
    accuracy = (len(order) - np.searchsorted(order, candidates, side="left")) / len(in_scores)
    recall = (np.searchsorted(np.sort(oos_scores), candidates, side="left") / len(oos_scores)
              if oos_scores is not None and len(oos_scores) else None)
    if target_accuracy is not None:
        ok = np.flatnonzero(accuracy >= target_accuracy - 1e-12)
        if not len(ok):
            best, criterion = 0, f"target in-scope accuracy {target_accuracy:g} unreachable: no rejection"
        else:
            best, criterion = ok[-1], f"highest threshold keeping in-scope accuracy >= {target_accuracy:g}"
    else:
        best = int(np.argmax((accuracy + recall) / 2))
        criterion = "maximise (in-scope accuracy + out-of-scope recall) / 2"
    return Calibration(float(candidates[best]), float(accuracy[best]),
                       None if recall is None else float(recall[best]), criterion)


def plot_accuracy_vs_k(rows: Sequence[dict[str, Any]], ax: Any) -> None:
    """Draw accuracy (%) against k on a matplotlib ``ax``: one line per (generator, shots) of the
    max-aggregation rows of a ``sweep``."""
    for shots in dict.fromkeys(r["shots"] for r in rows):
        for gen in dict.fromkeys(r["generator"] for r in rows):
            pts = sorted((r["k"], 100 * r["accuracy"]) for r in rows
                         if r["shots"] == shots and r["generator"] == gen and r["aggregation"] == "max")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{gen}, {'all data' if shots == 0 else f'{shots} shots'}")
    ax.set_xlabel("k (proxies per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)

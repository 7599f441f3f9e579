"""Evaluation of predictions: accuracy, macro-F1 (scikit-learn's definitions), per-class figures
and the most frequent confusions. Labels may be str or int; a rejected prediction is None."""

from __future__ import annotations

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
    import time

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

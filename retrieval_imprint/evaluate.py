"""Evaluation of predictions: accuracy, macro-F1 (scikit-learn's definitions), per-class figures
and the most frequent confusions. Labels are compared by their ``labels.entry`` (so ``np.str_`` and
``str``, ``np.int64`` and ``int`` agree, as in ``ImprintClassifier.score``); a rejected prediction
is None."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from . import labels as lab
from .errors import DataError


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction in [0, 1]
    macro_f1: float  # fraction in [0, 1], unweighted mean over the true classes
    n: int
    per_class: list[dict[str, Any]] = field(default_factory=list)  # label, precision, recall, f1, support
    confusions: list[dict[str, Any]] = field(default_factory=list)  # true, predicted, count; most first

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "n": self.n,
            "correct": round(self.accuracy * self.n),
            "per_class": self.per_class,
            "confusions": self.confusions,
        }


def evaluate(y_true: Sequence[Any], y_pred: Sequence[Any], *, max_confusions: int = 10) -> Evaluation:
    """Score ``y_pred`` against ``y_true`` (macro-F1 over the classes present in ``y_true``)."""
    y_true, y_pred = lab.as_sequence(y_true, "y_true"), lab.as_sequence(y_pred, "y_pred")
    if len(y_true) != len(y_pred) or not y_true:
        raise DataError(f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must be equal and non-empty")
    codes, _ = lab.factorize(y_true + y_pred)
    first = np.unique(codes, return_index=True)[1]
    labels = [(y_true + y_pred)[i] for i in first]
    t, p = codes[: len(y_true)], codes[len(y_true) :]
    present = np.unique(t)
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=present, zero_division=0)
    per_class = [
        {"label": labels[c], "precision": float(pr), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, pr, r, f, s in zip(present, prec, rec, f1, support)
    ]
    wrong = Counter((a, b) for a, b in zip(t.tolist(), p.tolist()) if a != b)
    confusions = [
        {"true": labels[a], "predicted": labels[b], "count": n}
        for (a, b), n in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0]))[:max_confusions]
    ]
    return Evaluation(float((t == p).mean()), float(f1.mean()), len(t), per_class, confusions)


def open_set(found: Any, oos: np.ndarray) -> dict[str, Any]:
    """Open-set figures of a ``QueryResult`` (top 1) whose rows ``oos`` belong to no class: how many
    there are, the share of them rejected (out-of-scope recall), the share of the others rejected,
    and the AUROC of the rejection scores, in-scope against out-of-scope."""
    from .openset import auroc

    rejected = np.array([label is None for label in found.labels[:, 0]])
    scores = found.rejection_scores[:, 0]
    return {
        "oos": int(oos.sum()),
        "oos_recall": float(rejected[oos].mean()),
        "in_scope_rejected": float(rejected[~oos].mean()),
        "auroc": auroc(scores[~oos & np.isfinite(scores)], scores[oos & np.isfinite(scores)]),
    }

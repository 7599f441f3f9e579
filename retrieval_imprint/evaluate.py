"""Evaluation of predictions: accuracy and macro-F1 (scikit-learn's definitions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # fraction in [0, 1]
    macro_f1: float  # fraction in [0, 1], unweighted mean over the true classes
    n: int


def evaluate(y_true: np.ndarray, y_pred: np.ndarray) -> Evaluation:
    """Accuracy and macro-F1 of ``y_pred`` against ``y_true`` (F1 averaged over true classes)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or not len(y_true):
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty 1-D")
    f1 = f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    return Evaluation(float(accuracy_score(y_true, y_pred)), float(f1), len(y_true))

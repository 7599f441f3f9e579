"""Open-set rejection: the score below which a query gets "no class", chosen on validation data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError, InvalidParameterError


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
        raise DataError("calibration needs in-scope scores and correctness flags of equal, non-zero length")
    if target_accuracy is None and (oos_scores is None or not len(oos_scores)):
        raise InvalidParameterError("without out-of-scope queries, give target_accuracy")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise InvalidParameterError(f"target_accuracy={target_accuracy!r} is not valid; expected a fraction in (0, 1]")
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

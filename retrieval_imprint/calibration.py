"""Open-set calibration over the classes of one collection or of a sharded one's shards: the
threshold (and rule) that meets a target, chosen once for all and stored in each, every writer lock
held throughout (``openset.py`` has the rules and the statistics). ``Calibrated`` is the
``calibrate`` method both kinds of collection have.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import labels as lab
from . import params as spec
from . import ranking, writes
from ._groups import Grouped
from .errors import CollectionStateError, InvalidParameterError
from .interface import writing_all
from .openset import Calibration, calibrate, calibrate_without_oos, class_shift, filled, own_scores_of
from .params import MARGIN, RULES
from .snapshot import Snapshot


def calibrate_over(
    collections: Sequence[Any],
    query: Any,
    owner_of: Any,
    X: Any,
    labels: Any,
    X_oos: Any,
    *,
    target_accuracy: float | None,
    target_oos_recall: float | None,
    target_false_rejection: float | None,
    rule: str | None,
    margin: float,
) -> Calibration:
    """``Collection.calibrate`` of the classes of ``collections`` answered together by ``query``
    (one collection, or a sharded one's shards; ``owner_of``: the index of the collection holding
    each label). Every writer lock is held throughout; the result is stored in each, in order.
    A class's shift and its samples' left-out scores are its own class's, so each collection
    computes those of its classes; a threshold is one for all."""
    if rule is not None:
        spec.check_choice("rule", rule, RULES)
    if target_false_rejection is not None and X is not None:
        raise InvalidParameterError("target_false_rejection calibrates from the training samples: give no X")
    if target_false_rejection is None and (X is None or labels is None):
        raise InvalidParameterError("give validation queries X and their labels, or target_false_rejection")
    if collections[0].params["generator"] == "ls":  # the streaming head scores no sample left out (lshead.py)
        if target_false_rejection is not None or rule not in (None, "max"):
            raise InvalidParameterError(
                "a streaming ls collection calibrates rule max on validation queries (X and labels): it has no "
                "left-out scores of its samples, which target_false_rejection and rule shift rest on"
            )
        rule = "max"
    with writing_all(collections):  # the shifts, the scores and the stored result belong to one version
        fresh = target_false_rejection is not None or (
            rule != "max"
            and collections[0].config["keep_samples"]
            and any(not np.isfinite(col.snapshot.table.shift).all() for col in collections)
        )
        # the shift rule's statistics, computed now where they are missing
        parts = [
            left_out_scores(col.snapshot, col.path)
            if fresh and len(col)
            else (np.zeros(0), np.zeros(0, np.int64), col.snapshot.table.shift)
            for col in collections
        ]
        shifts = [shift for _, _, shift in parts]
        has_shift = any(np.isfinite(shift).any() for shift in shifts)
        if target_false_rejection is not None:
            rule = rule or ("shift" if has_shift else "max")
            scores = np.concatenate(
                [own - filled(shift)[owner] if rule == "shift" else own for own, owner, shift in parts]
            )
            result = calibrate_without_oos(rule, scores, target_false_rejection)
        else:

            def shift_of(found: np.ndarray) -> np.ndarray:
                out, known = np.zeros(len(found)), np.flatnonzero(found != None)  # noqa: E711 (elementwise)
                where = owner_of(found[known].tolist())
                for i in np.unique(where):
                    rows = known[where == i]
                    out[rows] = ranking.label_shifts(collections[i].snapshot, found[rows], shifts[i])
                return out

            rules = ranking.rejection_inputs(
                query(X, 1, threshold=-np.inf),
                lab.as_sequence(labels),
                None if X_oos is None else query(X_oos, 1, threshold=-np.inf),
                shift_of if has_shift else None,
            )
            rules = {r: v for r, v in rules.items() if rule in (None, r)}
            if not rules:
                raise CollectionStateError(
                    f"rule {rule!r} needs each class's shift, and collection "
                    f"{collections[0].path} keeps no samples to compute it from"
                )
            result = calibrate(
                rules, target_accuracy=target_accuracy, target_oos_recall=target_oos_recall, margin=margin
            )
        for col, shift in zip(collections, shifts):
            writes.set_rejection(col.engine, col.snapshot, result.threshold, result.rule, shift if fresh else None)
    return result


class Calibrated:
    """``calibrate`` for a collection (its own classes) or a sharded one (its shards'): each kind
    says which collections hold its classes (``members``) and which of them holds a label
    (``member_of``)."""

    query: Any
    members: Any  # the plain collections holding the classes
    member_of: Any  # the position among them of each label's class

    def calibrate(
        self,
        X: Any = None,
        labels: Sequence[object] | None = None,
        X_oos: Any = None,
        *,
        target_accuracy: float | None = None,
        target_oos_recall: float | None = None,
        target_false_rejection: float | None = None,
        rule: str | None = None,
        margin: float = MARGIN,
    ) -> Calibration:
        """Choose and store the rejection rule and threshold (``openset.py``): from validation
        queries ``X`` with their true ``labels`` and, optionally, out-of-scope queries ``X_oos``, for
        a target in-scope accuracy or out-of-scope recall (or the balanced point) cleared by
        ``margin`` standard errors, weighing every rule the collection can use (or only ``rule``);
        or, with ``target_false_rejection`` and no queries, from the kept training samples scored
        left out (the collection's rule, or ``rule``). A sharded collection answers the queries
        with every shard together and stores the result in each. A target no threshold reaches
        raises ``CalibrationError`` and changes nothing."""
        return calibrate_over(
            self.members,
            self.query,
            self.member_of,
            X,
            labels,
            X_oos,
            target_accuracy=target_accuracy,
            target_oos_recall=target_oos_recall,
            target_false_rejection=target_false_rejection,
            rule=rule,
            margin=margin,
        )


def left_out_scores(s: Snapshot, directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each kept sample's own-class score when left out of its class's imprint, the class (table
    position) of each, and each class's shift: what calibration without out-of-scope data, and
    the rule shift, rest on."""
    if not s.config["keep_samples"]:
        raise CollectionStateError(
            f"collection {directory} keeps no samples, so it cannot score them left out; calibrate it on "
            "validation queries instead"
        )
    X, _, keys = s.kept_samples(directory)
    groups = Grouped(X, np.concatenate([[0], np.cumsum(s.table.n_samples)]).astype(np.int64), keys)
    own = own_scores_of(groups, s.params)
    return own, groups.owner, class_shift(groups.owner, own, len(s.table))

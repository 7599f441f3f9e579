"""Class labels: one codec for every module.

A label is identified by its *entry* ``(kind, text)``: ``("str", "card_arrival")`` or
``("int", "7")``. Python and numpy scalars of the same value have the same entry (``np.str_`` as
``str``, ``np.int64`` and an integral ``float`` as ``int``), so labels read from a CSV, an NPZ file
or an estimator's ``classes_`` compare equal wherever they meet. Collections store the entry and
accept only str and int labels; the estimator and ``evaluate`` take any label scikit-learn takes
(other kinds are keyed by ``repr``). The stable 64-bit ``label_key`` of a label seeds its class's
random draws, so it must never change for a given entry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f]")  # control characters but the tab: never in a label
MAX_LABEL_BYTES = 1024  # a stored label's UTF-8 bytes (an int label's digits): a name, not a document

Entry = tuple[str, str]


def entry(label: object) -> Entry:
    """``(kind, text)`` of any label (``kind``: str, int, bool, float, none, or repr for the rest)."""
    if isinstance(label, (str, np.str_)):
        return "str", str(label)
    if isinstance(label, (bool, np.bool_)):
        return "bool", str(bool(label))
    if isinstance(label, (int, np.integer)):
        return "int", str(int(label))
    if isinstance(label, (float, np.floating)):
        return ("int", str(int(label))) if float(label).is_integer() else ("float", repr(float(label)))
    if label is None:
        return "none", "None"
    return "repr", repr(label)


def stored_entry(label: object, where: str = "") -> Entry:
    """The entry of a label a collection can store (a non-blank str, or an int); else a
    ``DataError`` naming ``where`` (e.g. ``"row 3"``)."""
    at = f" at {where}" if where else ""
    if isinstance(label, (str, np.str_)):
        if not label.strip():
            raise DataError(f"label{at} is blank")
        if _CONTROL.search(label):
            raise DataError(f"label{at} {str(label)[:40]!r} holds a control character (a NUL or a line break)")
        return "str", _sized(str(label), at)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return "int", _sized(str(int(label)), at)
    raise DataError(f"label{at} is {type(label).__name__} {label!r}: labels must be str or int")


def _sized(text: str, at: str) -> str:
    size = len(text.encode("utf-8"))
    if size > MAX_LABEL_BYTES:
        raise DataError(
            f"label{at} {text[:40]!r}... is {size:,} bytes long; a label may hold at most "
            f"{MAX_LABEL_BYTES:,} bytes (UTF-8)"
        )
    return text


def value(kind: str, text: str) -> object:
    """The Python label of a stored entry."""
    return int(text) if kind == "int" else text


def label_key(label: object) -> int:
    """A stable 64-bit key of a label: the same across processes and for Python and numpy scalars."""
    kind, text = entry(label)
    tag = {"str": b"s", "int": b"i", "bool": b"b"}.get(kind, b"r")
    raw = tag + text.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def distinct(values: Sequence[object] | np.ndarray) -> tuple[list[object], np.ndarray]:
    """The distinct ``values`` in order of first appearance, and each one's index into them; keyed
    by type too, since True == 1 == 1.0 while their labels differ (an unhashable value is its own)."""
    slots: dict[tuple[type, object], int] = {}
    uniq: list[object] = []
    index = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        try:
            j = slots.setdefault((type(v), v), len(uniq))
        except TypeError:
            j = len(uniq)
        if j == len(uniq):
            uniq.append(v)
        index[i] = j
    return uniq, index


def label_keys(labels: Sequence[object] | np.ndarray) -> np.ndarray:
    """:func:`label_key` of every label, as a uint64 array; each distinct label is hashed once
    (rows of one class repeat its label)."""
    uniq, index = distinct(labels)
    return np.fromiter((label_key(u) for u in uniq), dtype=np.uint64, count=len(uniq))[index]


def entry_keys(entries: Sequence[tuple[str, str]]) -> np.ndarray:
    """``label_keys`` of stored label entries ``(kind, text)``."""
    return label_keys([value(*e) for e in entries])


def as_sequence(labels: Any, what: str = "labels") -> list:
    """``labels`` as a list, refusing a bare string (it would be read as one label per character)."""
    if isinstance(labels, (str, bytes, np.str_)):
        raise DataError(f"{what} is a single string {str(labels)[:40]!r}; pass a list of labels")
    return labels.tolist() if isinstance(labels, np.ndarray) else list(labels)


def factorize(labels: Sequence[object]) -> tuple[np.ndarray, list[Entry]]:
    """Codes ``(n,)`` and the distinct entries in first-appearance order, for any labels."""
    seen: dict[Entry, int] = {}
    codes = np.fromiter((seen.setdefault(entry(v), len(seen)) for v in labels), np.int64, len(labels))
    return codes, list(seen)


def encode_stored(labels: Sequence[object]) -> tuple[np.ndarray, list[Entry]]:
    """:func:`factorize` for labels a collection stores, each checked by :func:`stored_entry`.

    All-str or all-int labels are checked once per distinct label (numpy does the grouping);
    anything else row by row, so that an error names the first bad row either way.
    """
    values = as_sequence(labels)
    kinds = set(map(type, values))
    nul_ended = kinds == {str} and any(v.endswith("\0") for v in values)  # numpy would strip the NULs
    if (kinds == {str} and not nul_ended) or (kinds == {int} and -(2**63) <= min(values) and max(values) < 2**63):
        uniq, first, codes = np.unique(np.array(values), return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        return rank[codes.ravel()], [stored_entry(uniq[i].item(), f"row {first[i]}") for i in order]
    seen: dict[Entry, int] = {}
    codes = np.fromiter(
        (seen.setdefault(stored_entry(v, f"row {row}"), len(seen)) for row, v in enumerate(values)),
        np.int64,
        len(values),
    )
    return codes, list(seen)


def check_kind(entries: Sequence[Entry], existing: str | None) -> None:
    """One kind of label per collection, fixed by its first add: ``int`` labels from an NPZ file and
    ``str`` labels from a CSV would otherwise make classes "1" and 1 that print alike."""
    kinds = dict.fromkeys(kind for kind, _ in entries)
    wanted = existing or next(iter(kinds), None)
    other = next((e for e in entries if e[0] != wanted), None)
    if other is not None:
        raise DataError(
            f"this collection's labels are {wanted}, but label {other[1]!r} is {other[0]}: a collection "
            f"holds one kind of label (convert the labels, e.g. read them as {wanted})"
        )


def check_targets(y: Any) -> None:
    """scikit-learn's ``check_classification_targets``, without its "could represent a regression
    problem" warning: it fires when labels outnumber half the samples, which is every few-shot
    data set (at 1 shot each label is unique)."""
    import warnings

    from sklearn.utils.multiclass import check_classification_targets

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        check_classification_targets(y)

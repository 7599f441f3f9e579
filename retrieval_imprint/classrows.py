"""The ``classes`` table's SQL: the whole class table as columns, the rows of a few classes by
id or by label, and the inserts and updates writers make (the rest of the SQL is store.py's).

A collection never needs the whole table to answer (snapshot.py): a query reads its classes' rows
by primary key, a write finds its labels in the unique index; only operations over most classes
read it all, as a few long strings SQLite builds in C.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, distinct, func, insert, or_, select, update

from . import labels as lab
from .errors import CollectionDamagedError, DataError
from .schema import classes
from .store import SQL_CHUNK

INT_COLUMNS = ("id", "n_samples", "proxy_lo", "proxy_hi")


def class_columns(conn: Connection) -> dict[str, Any]:
    """The class table as columns in id order: int64 arrays ``INT_COLUMNS``, float64 arrays ``shift``
    and ``threshold`` (NaN for NULL) and the list ``label`` (str or int).

    Fetched as a few long strings that SQLite builds in C (``group_concat``; ``json_group_array``
    for str labels, which may hold any character; int labels are JSON numbers as stored, of any
    size), because a million row tuples cost seconds in Python. The floats, exact only as SQLite
    values, come as rows of the classes that have one (set by ``calibrate``)."""
    c = classes.c
    kinds_text = conn.execute(select(func.group_concat(distinct(c.label_kind)))).scalar_one()
    kinds = set(kinds_text.split(",")) if kinds_text else set()
    labels_sql = (
        [func.group_concat(c.label)]
        if kinds == {"int"}
        else [func.json_group_array(c.label)] + ([func.json_group_array(c.label_kind)] if kinds - {"str"} else [])
    )
    row = conn.execute(select(*(func.group_concat(c[name]) for name in INT_COLUMNS), *labels_sql)).one()
    out: dict[str, Any] = {
        name: np.fromstring(text, np.int64, sep=",") if text else np.zeros(0, np.int64)
        for name, text in zip(INT_COLUMNS, row)
    }
    labels = json.loads(f"[{row[len(INT_COLUMNS)] or ''}]" if kinds == {"int"} else row[len(INT_COLUMNS)])
    if len(row) > len(INT_COLUMNS) + 1:  # mixed kinds: a collection made before 0.2
        labels = [lab.value(kind, text) for kind, text in zip(json.loads(row[-1]), labels)]
    if {len(values) for values in out.values()} | {len(labels)} != {len(labels)}:
        raise CollectionDamagedError("the classes table holds a value that is not an integer where one must be")
    ids = out["id"]
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # the aggregate's row order is SQLite's to choose
        order = np.argsort(ids, kind="stable")
        out = {name: values[order] for name, values in out.items()}
        labels = [labels[i] for i in order]
        ids = out["id"]
    out["label"] = labels
    out["shift"], out["threshold"] = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    found = conn.execute(
        select(c.id, c.shift, c.threshold).where(or_(c.shift.is_not(None), c.threshold.is_not(None)))
    ).all()
    if found:
        at = np.searchsorted(ids, [r[0] for r in found])
        for k, name in ((1, "shift"), (2, "threshold")):
            out[name][at] = [np.nan if r[k] is None else r[k] for r in found]
    return out


_ROW_COLUMNS = ("id", "label_kind", "label", "n_samples", "proxy_lo", "proxy_hi", "shift", "threshold", "changed")


def class_rows(conn: Connection, ids: np.ndarray) -> dict[str, Any]:
    """The rows of the classes ``ids`` (sorted, distinct) that exist, as ``class_columns`` gives the
    whole table, and ``changed``, the version that last wrote each: what one answer needs, read by
    primary key. Sent as the driver's SQL with one placeholder an id: a query answers with it, and
    building the statement through SQLAlchemy's expression layer cost half a millisecond a query."""
    found: list[Any] = []
    for i in range(0, len(ids), SQL_CHUNK):
        part = ids[i : i + SQL_CHUNK].tolist()
        found += conn.exec_driver_sql(
            f"SELECT {', '.join(_ROW_COLUMNS)} FROM classes WHERE id IN ({', '.join('?' * len(part))}) ORDER BY id",
            tuple(part),
        ).all()
    columns = dict(zip(_ROW_COLUMNS, zip(*found, strict=True), strict=True)) if found else {k: () for k in _ROW_COLUMNS}
    out: dict[str, Any] = {name: np.array(columns[name], np.int64).reshape(-1) for name in INT_COLUMNS}
    for name in ("shift", "threshold"):
        out[name] = np.array([np.nan if v is None else v for v in columns[name]], float)
    out["label"] = [lab.value(kind, text) for kind, text in zip(columns["label_kind"], columns["label"], strict=True)]
    out["changed"] = np.array([v or 0 for v in columns["changed"]], np.int64)  # 0: before migration 0012
    return out


def find_classes(conn: Connection, entries: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """Existing class rows for ``(kind, text)`` label entries, keyed by entry.

    One query per label kind, ``label_kind = ? AND label IN (...)``: SQLite looks each label up
    in the unique index, where the row-value form ``(label_kind, label) IN (VALUES ...)`` scans the
    whole index per query (each add then cost time in proportion to the collection's classes).
    """
    c = classes.c
    by_kind: dict[str, list[str]] = {}
    for kind, text in entries:
        by_kind.setdefault(kind, []).append(text)
    found = {}
    for kind, values in by_kind.items():
        for i in range(0, len(values), SQL_CHUNK):
            for row in conn.execute(
                select(c.id, c.label_kind, c.label, c.n_samples, c.proxy_hi, c.sample_hi).where(
                    c.label_kind == kind, c.label.in_(values[i : i + SQL_CHUNK])
                )
            ):
                found[(row.label_kind, row.label)] = row
    return found


def insert_classes(conn: Connection, rows: Sequence[dict[str, Any]], version: int) -> None:
    """New class rows (dicts of ``classes``' columns), written by the write that makes ``version``."""
    if rows:
        conn.execute(insert(classes), [{**row, "changed": version} for row in rows])


def update_classes(conn: Connection, rows: Sequence[dict[str, Any]], version: int) -> None:
    """Set columns of existing classes (each row a dict of ``id`` and the same columns to set) in
    the write that makes ``version``."""
    if not rows:
        return
    rows = [{**row, "changed": version} for row in rows]
    columns = [name for name in rows[0] if name != "id"]
    statement = update(classes).where(classes.c.id == bindparam("b_id"))
    statement = statement.values({name: bindparam(f"b_{name}") for name in columns})
    conn.execute(statement, [{f"b_{name}": value for name, value in row.items()} for row in rows])


def class_ids(conn: Connection, labels: Sequence[object], collection: object) -> np.ndarray:
    """The class id of each label (``find_classes``), or a ``DataError`` naming the first that is
    no class of ``collection``."""
    entries = [lab.entry(label) for label in labels]
    found = find_classes(conn, entries)
    missing = [label for label, e in zip(labels, entries) if e not in found]
    if missing:
        raise DataError(f"no class {missing[0]!r} in collection {collection}")
    return np.array([found[e].id for e in entries], np.int64)

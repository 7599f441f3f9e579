"""Readers for labelled data: CSV/TSV, JSONL, Parquet (texts or vectors) and NPZ/NPY (vectors).

Every reader returns a ``Dataset``; a problem is a ``DataError`` naming the file, and the row and
column where there is one. CSV goes through the ``csv`` module (real data has quoted newlines);
values are stripped of surrounding whitespace.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from . import labels as lab
from .errors import DataError

TEXT_COLUMNS = ("text", "sentence", "utterance", "query")
REF_COLUMNS = ("ref",)  # an exported collection's row references; others are named with --id-column
LABEL_COLUMNS = ("label", "category", "intent", "class")
VECTOR_COLUMNS = ("vector", "embedding")
FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
    ".npy": "npy",
}
_CHECK_ROWS = 65536  # rows of vectors checked at a time
EXPORT_KEY = b"retrieval_imprint"  # Parquet schema metadata of `imprint export`: model and settings


@dataclass
class Dataset:
    """Rows of one file: ``texts`` (n) or ``vectors`` (n, d) or both (the vectors are used, the
    texts kept as provenance), ``labels`` (n) and ``refs`` (n; the user's row ids) when present.
    ``model`` and ``settings``: what made the vectors and the collection they came from, where
    the file says (``imprint export`` writes them); ``state``: what that collection reached beyond
    its settings (``threshold``, ``auto_choice``, and by label each class's own ``(threshold,
    shift)`` where it had one), for ``ingest`` to restore."""

    source: str
    texts: list[str] | None = None
    vectors: np.ndarray | None = None
    labels: list[Any] | None = None
    refs: list[str | None] | None = None
    model: str | None = None
    settings: dict[str, Any] | None = None
    state: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.need("texts"))

    def need(self, column: str) -> list[Any]:
        """The ``texts``, ``labels`` or ``refs`` of the rows, or a ``DataError`` naming the file
        that has none."""
        values = getattr(self, column)
        if values is None:
            raise DataError(f"{self.source}: no {column} in this file")
        return values

    def part(self, lo: int, hi: int) -> Dataset:
        """Rows ``lo:hi``."""
        return self.take(slice(lo, hi))

    def take(self, rows: slice | np.ndarray) -> Dataset:
        """The rows ``rows`` (a slice, or row numbers in the order wanted)."""

        def cut(v: Any) -> Any:
            if v is None or isinstance(v, np.ndarray) or isinstance(rows, slice):
                return None if v is None else v[rows]
            return [v[i] for i in rows]

        return Dataset(
            self.source,
            cut(self.texts),
            cut(self.vectors),
            cut(self.labels),
            cut(self.refs),
            self.model,
            self.settings,
            self.state,
        )


def _pick(
    columns: list[str], asked: str | None, defaults: tuple[str, ...], role: str, file: Path, required: bool
) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise DataError(f"{file}: no {role} column {asked!r}; columns found: {', '.join(columns)}")
        return asked
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise DataError(
            f"{file}: no {role} column (looked for {', '.join(defaults)}; use --{role}-column); "
            f"columns found: {', '.join(columns)}"
        )
    return found


class _Refused(ValueError):
    """A value a reader refuses; the caller adds the file and the row (found only when needed)."""


def _label(value: Any, column: str) -> Any:
    """A label as collections store it (``labels.stored_entry``), stripped of white space."""
    value = value.strip() if isinstance(value, str) else value
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        raise _Refused(f"label column {column!r} is blank")
    try:
        return lab.value(*lab.stored_entry(value))
    except DataError as exc:
        if isinstance(value, (str, int)) and not isinstance(value, bool):  # a control character, or too long
            raise _Refused(f"{exc} (column {column!r})") from None
        raise _Refused(f"label {value!r} in column {column!r} must be text or an integer") from None


def _vector(value: Any, column: str) -> np.ndarray:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Refused(f"column {column!r} is not a JSON list of numbers") from None
    try:
        out = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        raise _Refused(f"column {column!r} is not a list of numbers") from None
    if out.ndim != 1 or not len(out):
        raise _Refused(f"column {column!r} is not a non-empty list of numbers")
    return out


@dataclass(frozen=True)
class _Rows:
    """A file's rows column by column: ``values(name)`` lists each row's value (None where a row
    lacks it), ``distinct(name)`` gives ``labels.distinct`` of them, ``where(i)`` names row ``i`` (from 0)
    in an error. Column by column, a million rows cost no dict and no row name each."""

    columns: list[str]
    n: int
    values: Callable[[str], list[Any]]
    where: Callable[[int], str]
    distinct: Callable[[str], tuple[list[Any], np.ndarray]]

    @classmethod
    def of_records(cls, records: list[tuple[str, dict]], columns: list[str]) -> _Rows:
        """Rows parsed one by one (CSV, JSONL): ``(name, record)`` pairs."""

        def values(name: str) -> list[Any]:
            return [rec.get(name) for _, rec in records]

        return cls(columns, len(records), values, lambda i: records[i][0], lambda name: lab.distinct(values(name)))

    @classmethod
    def of_arrow(cls, table: Any, first_row: int) -> _Rows:
        """An Arrow table's columns; distinct values by Arrow's dictionary encoding (one type per
        column), or in Python for types it cannot encode (lists, structs: refused as labels)."""
        import pyarrow as pa

        def distinct(name: str) -> tuple[list[Any], np.ndarray]:
            try:
                encoded = table.column(name).combine_chunks().dictionary_encode(null_encoding="encode")
            except pa.ArrowNotImplementedError:
                return lab.distinct(table.column(name).to_pylist())
            return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)

        return cls(
            table.column_names,
            len(table),
            lambda name: table.column(name).to_pylist(),
            lambda i: f"row {i + first_row}",
            distinct,
        )

    @classmethod
    def of_list(cls, name: str, values: list[Any]) -> _Rows:
        """One column of values (the labels of an .npz file); rows named from 1."""
        return cls([name], len(values), lambda _: values, lambda i: f"row {i + 1}", lambda _: lab.distinct(values))


def _each(values: list[Any], check: Callable[[Any], Any], rows: _Rows, file: Path) -> list[Any]:
    """``check`` of every value; a refusal names the file and the row."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(check(v))
        except _Refused as exc:
            raise DataError(f"{file}: {rows.where(i)}: {exc}") from None
    return out


def _from_rows(
    rows: _Rows,
    file: Path,
    *,
    text_column: str | None,
    label_column: str | None,
    vector_column: str | None,
    id_column: str | None,
    need_labels: bool,
    column_vectors: dict[str, np.ndarray] | None = None,
) -> Dataset:
    if not rows.n:
        raise DataError(f"{file}: no rows")
    columns = rows.columns
    vcol = (
        _pick(columns, vector_column, VECTOR_COLUMNS, "vector", file, False)
        if (vector_column or text_column is None)
        else None
    )
    tcol = _pick(columns, text_column, TEXT_COLUMNS, "text", file, not vcol)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", file, need_labels)
    rcol = _pick(columns, id_column, REF_COLUMNS, "id", file, False)
    out = Dataset(str(file))
    if rcol:
        out.refs = [None if v is None else str(v) for v in rows.values(rcol)]
    if vcol and column_vectors and vcol in column_vectors:
        out.vectors = column_vectors[vcol]
    elif vcol:
        vectors = _each(rows.values(vcol), lambda v: _vector(v, vcol), rows, file)
        lengths = np.array([len(v) for v in vectors])
        if (lengths != lengths[0]).any():
            raise DataError(
                f"{file}: {rows.where(int(np.argmax(lengths != lengths[0])))}: column {vcol!r} has "
                f"{len(set(lengths.tolist()))} different vector lengths"
            )
        out.vectors = np.stack(vectors)
    if vcol and tcol:  # texts beside vectors: provenance, kept as they are (None where missing)
        out.texts = [None if v is None else str(v) for v in rows.values(tcol)]  # type: ignore[misc]  # provenance only
    elif tcol:
        out.texts = _each(rows.values(tcol), lambda v: _text(v, tcol), rows, file)
    if lcol:
        out.labels = _labels(rows, file, lcol)
    return out


def _text(value: Any, column: str) -> str:
    if value is None or not str(value).strip():
        raise _Refused(f"text column {column!r} is blank")
    return str(value).strip()


def _labels(rows: _Rows, file: Path, column: str) -> list[Any]:
    """``_label`` of each row's label, checked once per distinct value (a class repeats its label
    on each of its rows); a refusal names the first row with that value."""
    uniq, index = rows.distinct(column)
    checked = np.empty(len(uniq), object)
    for j, raw in enumerate(uniq):
        try:
            checked[j] = _label(raw, column)
        except _Refused as exc:
            raise DataError(f"{file}: {rows.where(int(np.argmax(index == j)))}: {exc}") from None
    return checked[index].tolist()


def read(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    vector_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    need_labels: bool = True,
) -> Dataset:
    """Read a data file by its extension (``FORMATS``)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    fmt = FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise DataError(f"{file}: unknown format {file.suffix!r}; expected one of {', '.join(FORMATS)}")
    if file.stat().st_size == 0:
        raise DataError(f"{file}: the file is empty")
    options: dict[str, Any] = dict(
        text_column=text_column,
        label_column=label_column,
        vector_column=vector_column,
        id_column=id_column,
        need_labels=need_labels,
    )
    if fmt in ("csv", "tsv", "jsonl"):
        files.check_utf8(file)
    if fmt in ("csv", "tsv"):
        with file.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            # strict: a quote left open is an error where it opens, not a row swallowing the rest of the file
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",", strict=True)
            records, end = [], 0
            try:
                columns = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = columns
                end = reader.line_num
                for i, rec in enumerate(reader, 1):  # a quoted field may span lines: name where its row starts
                    start, end = end + 1, reader.line_num
                    records.append(
                        (f"row {i} (line {start})" if start == end else f"row {i} (lines {start}-{end})", rec)
                    )
            except csv.Error as exc:
                raise DataError(f"{file}: line {end + 1}: {files.csv_problem(exc, fmt)}") from None
        return _from_rows(_Rows.of_records(records, columns), file, **options)
    if fmt == "jsonl":
        records, columns = [], []
        with file.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}: line {line_no} is not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{file}: line {line_no} is not a JSON object")
                columns += [c for c in rec if c not in columns]
                records.append((f"line {line_no}", rec))
        return _from_rows(_Rows.of_records(records, columns), file, **options)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DataError(f"{file}: unreadable Parquet file ({str(exc).splitlines()[0]})") from None
        return from_arrow(table, file, **options)
    return _read_numpy(file, fmt, split, need_labels)


def from_arrow(
    table: Any,
    file: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    vector_column: str | None = None,
    id_column: str | None = None,
    need_labels: bool = True,
    first_row: int = 1,
) -> Dataset:
    """The rows of an Arrow table (a Parquet file, or a block of one that Ray Data read), checked as
    ``read`` checks a file; errors name ``file`` and the row (counted from ``first_row``)."""
    file = Path(file)
    out = _from_rows(
        _Rows.of_arrow(table, first_row),
        file,
        column_vectors=files.arrow_vectors(table),
        text_column=text_column,
        label_column=label_column,
        vector_column=vector_column,
        id_column=id_column,
        need_labels=need_labels,
    )
    exported = json.loads((table.schema.metadata or {}).get(EXPORT_KEY, b"{}"))
    if out.vectors is not None:
        out.model, out.settings = exported.get("model"), exported.get("settings")
    if out.vectors is not None and "state" in exported and out.labels is not None:
        out.state = {**exported["state"], "classes": _class_state(table, out.labels)}
    return out


def _class_state(table: Any, labels: list[Any]) -> dict[Any, tuple[float | None, float | None]]:
    """By label, the ``(threshold, shift)`` an export's rows carry for their class, where either is set."""
    columns = [
        table.column(name).to_pylist() if name in table.column_names else [None] * len(labels)
        for name in ("class_threshold", "class_shift")
    ]
    return {label: (th, sh) for label, th, sh in zip(labels, *columns) if th is not None or sh is not None}


def _read_numpy(file: Path, fmt: str, split: str | None, need_labels: bool) -> Dataset:
    """Vectors (and labels) of an .npy or .npz file; the vectors memory-mapped where the file
    stores them raw (.npy, or an .npz written by ``np.savez``), so a chunked ``imprint index``
    reads one chunk of them at a time instead of the whole array."""
    try:
        loaded = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{file}: unreadable {fmt.upper()} file ({exc})") from None
    if (fmt == "npz") != hasattr(loaded, "files"):
        raise DataError(
            f"{file}: the file holds {'an .npz archive' if hasattr(loaded, 'files') else 'one .npy array'}"
            f", not what its name ({file.suffix}) says"
        )
    if fmt == "npy":
        if need_labels:
            raise DataError(f"{file}: an .npy file holds vectors only; labels need an .npz (X and y) or a table")
        X, y = loaded, None
    else:
        with loaded:
            keys = list(loaded.files)
            if split is not None:
                x_key, y_key = f"{split}_X", f"{split}_y"
            elif "X" in keys:
                x_key, y_key = "X", "y"
            else:
                found = [k[:-2] for k in keys if k.endswith("_X")]
                if len(found) != 1:
                    raise DataError(f"{file}: choose a split with --split (arrays found: {', '.join(keys)})")
                x_key, y_key = f"{found[0]}_X", f"{found[0]}_y"
            if x_key not in keys:
                raise DataError(f"{file}: no array {x_key!r} (arrays found: {', '.join(keys)})")
            X = files.npz_member_mapped(file, x_key)
            X = loaded[x_key] if X is None else X
            y = loaded[y_key] if y_key in keys else None
            if y is None and need_labels:
                raise DataError(f"{file}: no label array {y_key!r} (arrays found: {', '.join(keys)})")
    if X.ndim != 2 or not len(X):
        raise DataError(f"{file}: vectors must be a non-empty (n, d) array; got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise DataError(f"{file}: vectors must hold real numbers; got dtype {X.dtype}")
    for lo in range(0, len(X), _CHECK_ROWS):  # block by block: a mapped file is never read whole
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, reported below
            bad = np.flatnonzero(~np.isfinite(np.asarray(X[lo : lo + _CHECK_ROWS], np.float32)).all(1))
        if len(bad):
            raise DataError(f"{file}: row {lo + bad[0] + 1} of the vectors holds NaN or infinity (as float32)")
    out = Dataset(str(file), vectors=X)
    if y is not None:
        if len(y) != len(X):
            raise DataError(f"{file}: {len(X)} vectors but {len(y)} labels")
        out.labels = _labels(_Rows.of_list("y", [v.item() if hasattr(v, "item") else v for v in y]), file, "y")
    return out


def load_demo(split: str = "train") -> Dataset:
    """The packaged demo intents (8 banking and assistant classes, written for this project):
    ``train`` (12 per class), ``test`` (5 per class) or ``oos`` (out-of-scope queries, no labels)."""
    from importlib import resources

    if split not in ("train", "test", "oos"):
        raise DataError(f"split={split!r} is not valid; expected train, test or oos")
    return read(
        Path(str(resources.files("retrieval_imprint") / "data" / f"demo_{split}.csv")), need_labels=split != "oos"
    )

"""Provenance: which training examples a class holds and which ones an answer rests on.

A collection that keeps its samples also keeps, per sample, the text it was embedded from and the
user's reference of the row (``store.texts``). ``examples`` lists a class's; ``explain`` finds,
for each query, the kept samples of its answer nearest to it, scored as the proxies are (the
evidence a proxy summarises); ``export`` writes every kept sample with its label, text and
reference to Parquet, which ``imprint index`` reads back into an equal collection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from . import labels as lab
from . import store
from .errors import CollectionStateError
from .readers import EXPORT_KEY
from .segments import class_of
from .snapshot import Snapshot


def _need_samples(s: Snapshot, path: Path) -> None:
    if not s.config["keep_samples"]:
        raise CollectionStateError(f"collection {path} keeps no samples (keep_samples=False): it has no examples")


def examples(engine: Engine, s: Snapshot, path: Path, class_id: int) -> list[dict[str, Any]]:
    """The kept samples of one class in the order they were added: ``sample`` (its index in the
    class), ``text`` and ``ref`` (None where the sample came as a vector)."""
    _need_samples(s, path)
    one = np.array([class_id], np.int64)
    ids = s.rows_of(one).sample_ids(one)
    with engine.connect() as conn:
        found = store.texts_of(conn, ids.tolist())
    return [
        {"sample": j, "text": found.get(i, (None, None))[0], "ref": found.get(i, (None, None))[1]}
        for j, i in enumerate(ids.tolist())
    ]


def explain(
    engine: Engine, s: Snapshot, path: Path, Q: np.ndarray, owner: np.ndarray, n: int
) -> list[list[dict[str, Any]]]:
    """For each query (after NORMinf) and its answer's class id ``owner`` (-1: none), the ``n``
    kept samples of that class most similar to it, best first, with text, ref and score."""
    _need_samples(s, path)
    out: list[list[dict[str, Any]]] = []
    with engine.connect() as conn:
        for q, cid in zip(Q, owner.tolist()):
            if cid < 0:
                out.append([])
                continue
            one = np.array([cid], np.int64)
            ids = s.rows_of(one).sample_ids(one)
            X = s.searched.prepare(s.sample_index(path).reconstruct(ids), "samples")  # as proxies are scored
            sim = s.searched.pair_similarity(q[None], X[None])[0]
            best = np.argsort(-sim, kind="stable")[:n]
            found = store.texts_of(conn, ids[best].tolist())
            out.append(
                [
                    {
                        "sample": int(j),
                        "score": float(sim[j]),
                        "text": found.get(int(ids[j]), (None, None))[0],
                        "ref": found.get(int(ids[j]), (None, None))[1],
                    }
                    for j in best
                ]
            )
    return out


def export(engine: Engine, s: Snapshot, path: Path) -> Any:
    """Every kept sample (as stored: after NORMpre) with its label, text and ref, and its class's
    own threshold and rejection shift (null where none), as an Arrow table (``write_export``
    writes it)."""
    import pyarrow as pa

    _need_samples(s, path)
    ids = s.table.sample_ids(s.table.ids)
    X = s.sample_index(path).reconstruct(ids) if len(ids) else np.zeros((0, s.dimension or 0), np.float32)
    with engine.connect() as conn:
        found = store.texts_of(conn, ids.tolist())
    labels = s.table.labels_of(class_of(ids)) if len(ids) else np.array([], object)
    kinds = {kind for kind, _ in map(lab.entry, labels)}
    at = s.table.positions(class_of(ids)) if len(ids) else np.zeros(0, np.int64)

    def per_class(values: np.ndarray) -> Any:
        return pa.array(values[at], pa.float64(), mask=np.isnan(values[at]))

    return pa.table(
        {
            "label": pa.array(
                [lab.value(*lab.entry(v)) for v in labels], pa.int64() if kinds == {"int"} else pa.string()
            ),
            "text": pa.array([found.get(i, (None, None))[0] for i in ids.tolist()], pa.string()),
            "ref": pa.array([found.get(i, (None, None))[1] for i in ids.tolist()], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), X.shape[1]),
            "class_threshold": per_class(s.table.threshold),
            "class_shift": per_class(s.table.shift),
        }
    )


def write_export(
    tables: list[Any], out: Path, model: str | None, settings: dict[str, Any], state: dict[str, Any]
) -> int:
    """Write the ``export`` tables (one per collection, or per shard) to the Parquet file ``out``,
    with the model, the ``settings`` a collection is created with and the ``state`` it reached
    (its threshold, what auto chose) in its metadata; returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(tables)
    meta = {"model": model, "settings": settings, "state": state}
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")  # an interrupted export leaves no half file
    try:
        pq.write_table(table.replace_schema_metadata({EXPORT_KEY: json.dumps(meta).encode()}), partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return len(table)

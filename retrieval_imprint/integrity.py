"""Integrity checks: do a collection's database and its segment files agree?"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import Engine

from . import schema, segments, snapshot, store
from .errors import CollectionDamagedError
from .ridge import gram_of
from .verified import ListVerifier


@dataclass(frozen=True)
class CheckReport:
    ok: bool
    problems: list[str]


def check(directory: Path, engine: Engine) -> CheckReport:
    """Verify, from disk, one committed version of the collection in ``directory``: every named
    file is a plain file inside it, matches its recorded checksum and loads with the right
    dimension (each damaged one is listed), and the files hold, once each, every live vector id
    the classes' ranges name (proxies; samples, where kept; a blend's class means). Safe beside a
    writer: rows and files are read as one snapshot."""
    problems: list[str] = []
    with engine.connect() as conn:
        current, head, _ = schema.schema_revision(conn)
    if current != head:
        problems.append(f"schema revision {current} is not the head {head}")
    problems += damaged_files(directory, engine)
    if problems:
        return CheckReport(False, problems)
    try:
        snap = snapshot.read(directory, engine, samples=True, table=True)
    except CollectionDamagedError as exc:
        return CheckReport(False, problems + [str(exc)])
    table = snap.table
    named = {"proxies": segments.range_ids(table.ids, table.proxy_lo, table.proxy_hi)}
    loaded = {"proxies": snap.proxies.ids if snap.proxies is not None else np.zeros(0, np.int64)}
    if snap.samples is not None:
        named["samples"] = segments.range_ids(table.ids, np.zeros_like(table.ids), table.n_samples)
        loaded["samples"] = snap.samples.ids
    if snap.means is not None or snap.params["aggregation"] == "blend":
        named["means"] = table.mean_ids(table.ids) if len(table) else np.zeros(0, np.int64)
        loaded["means"] = snap.means.ids if snap.means is not None else np.zeros(0, np.int64)
    for kind, ids in loaded.items():
        if len(ids) != len(np.unique(ids)):
            problems.append(f"{kind}: duplicate ids in the index files")
        if not np.array_equal(np.sort(ids), np.sort(named[kind])):
            problems.append(
                f"{kind}: the index files hold {len(ids)} live vectors and the classes' ranges name "
                f"{len(named[kind])}, and their ids differ"
            )
    if snap.head is not None:
        problems += _head_differs(directory, snap)
    counted = {
        "live proxies": (snap.config["live_proxies"], len(named["proxies"])),
        "classes": (snap.config["n_classes"], len(table)),
    }
    for what, (kept, actual) in counted.items():  # the counts open trusts (schema.py's triggers)
        if kept != actual:
            problems.append(f"the collection row counts {kept} {what}, the classes table {actual}")
    return CheckReport(not problems, problems)


def _head_differs(directory: Path, snap: snapshot.Snapshot) -> list[str]:
    """Whether a streaming ls head's Gram matrix sums the features of exactly the kept samples (lshead.py)."""
    X, _, _ = snap.kept_samples(directory)
    head = snap.head
    assert head is not None
    if head.n_rows != len(X):
        return [f"gram: the Gram matrix sums {head.n_rows} samples, the classes keep {len(X)}"]
    expected = gram_of(head.features(X))
    if not np.allclose(head.ridge.gram_, expected, rtol=1e-9, atol=1e-9 * max(1, len(X))):
        return ["gram: the Gram matrix is not the sum of the kept samples' features"]
    return []


def damaged_files(directory: Path, engine: Engine) -> list[str]:
    """What is wrong with each segment file the committed version names, file by file."""
    problems = []
    with ExitStack() as stack:
        with segments.reading(directory):
            with engine.connect() as conn, conn.begin():
                cfg, _, _, segs = store.read_state(conn)
            opened = {}
            for _, name, *_ in segs:
                try:
                    opened[name] = stack.enter_context(segments.open_segment(directory, name))
                except CollectionDamagedError as exc:
                    problems.append(str(exc))
        for kind, name, checksum, n_vectors, lists in segs:
            if name in opened and cfg["dimension"] is not None:
                width = segments.width(cfg, kind)
                try:
                    if kind == "gram":
                        segments.read_array(directory, name, opened[name], checksum)
                    else:
                        segments.read_segment(directory, name, opened[name], width, checksum)
                except CollectionDamagedError as exc:
                    problems.append(str(exc) + _lists_differing(directory, name, opened[name], width, n_vectors, lists))
    return problems


def _lists_differing(
    directory: Path, name: str, file: BinaryIO, dimension: int, n_vectors: int, lists: bytes | None
) -> str:
    """Which inverted lists of a damaged IVF proxy file differ from their recorded checksums, in
    words ("" where none are recorded, or the file does not even map)."""
    if lists is None or not segments.can_map():
        return ""
    try:
        found = ListVerifier(
            directory, name, segments.map_segment(directory, name, file, dimension, n_vectors), lists
        ).mismatches()
    except CollectionDamagedError:
        return ""
    return (
        f" (inverted list{'s' if len(found) != 1 else ''} {', '.join(map(str, found[:10]))}"
        f"{' ...' if len(found) > 10 else ''} differ{'s' if len(found) == 1 else ''})"
        if found
        else ""
    )

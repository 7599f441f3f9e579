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
from .segments import CLASS_SHIFT
from .verified import ListVerifier


@dataclass(frozen=True)
class CheckReport:
    ok: bool
    problems: list[str]


def check(directory: Path, engine: Engine) -> CheckReport:
    """Verify, from disk, one committed version of the collection in ``directory``: every named
    file is a plain file inside it, matches its recorded checksum and loads with the right
    dimension (each damaged one is listed), the live vector ids equal the database's id rows, and
    each id row names the class its id encodes and a segment that exists. Safe beside a writer:
    rows and files are read as one snapshot."""
    problems: list[str] = []
    with engine.connect() as conn:
        current, head, _ = schema.schema_revision(conn)
        if store.orphan_rows(conn):
            problems.append("proxy or sample rows name a segment that does not exist")
    if current != head:
        problems.append(f"schema revision {current} is not the head {head}")
    problems += damaged_files(directory, engine)
    if problems:
        return CheckReport(False, problems)
    try:
        snap = snapshot.read(directory, engine, samples=True, vector_rows=True)
    except CollectionDamagedError as exc:
        return CheckReport(False, problems + [str(exc)])
    loaded = {"proxies": snap.proxies.ids if snap.proxies is not None else np.zeros(0, np.int64)}
    if snap.samples is not None:
        loaded["samples"] = snap.samples.ids
    assert snap.vector_rows is not None  # read with vector_rows=True above
    for kind, ids in loaded.items():
        rows = snap.vector_rows[kind]
        if len(ids) != len(np.unique(ids)):
            problems.append(f"{kind}: duplicate ids in the index files")
        if not np.array_equal(np.sort(ids), np.sort(rows[:, 0])):
            problems.append(
                f"{kind}: the index files hold {len(ids)} live vectors and the database "
                f"{len(rows)} id rows, and their ids differ"
            )
        if (rows[:, 0] >> CLASS_SHIFT != rows[:, 1]).any():
            problems.append(f"{kind}: an id row names another class than its id encodes")
    if snap.means is not None or snap.params["aggregation"] == "blend":
        means = snap.means.ids if snap.means is not None else np.zeros(0, np.int64)
        if len(snap.table) and not np.array_equal(np.sort(means), np.sort(snap.table.mean_ids(snap.table.ids))):
            problems.append(
                f"means: the index files hold {len(means)} class means for {len(snap.table)} classes, "
                "and their ids differ"
            )
    expected = int(snap.table.n_proxies.sum())
    if expected != len(loaded["proxies"]):
        problems.append(f"proxies: the class ranges count {expected}, the index holds {len(loaded['proxies'])}")
    counted = {
        "live proxies": (snap.config["live_proxies"], expected),
        "classes": (snap.config["n_classes"], len(snap.table)),
    }
    for what, (kept, actual) in counted.items():  # the counts open trusts (schema.py's triggers)
        if kept != actual:
            problems.append(f"the collection row counts {kept} {what}, the classes table {actual}")
    return CheckReport(not problems, problems)


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
        for _, name, checksum, n_vectors, lists in segs:
            if name in opened and cfg["dimension"] is not None:
                try:
                    segments.read_segment(directory, name, opened[name], cfg["dimension"], checksum)
                except CollectionDamagedError as exc:
                    problems.append(
                        str(exc) + _lists_differing(directory, name, opened[name], cfg["dimension"], n_vectors, lists)
                    )
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

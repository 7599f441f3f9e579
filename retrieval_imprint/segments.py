"""A collection directory's files: immutable FAISS segment files, the two lock files, and the id scheme.

**Ids.** A vector's 64-bit id is ``class_id << CLASS_SHIFT | j``: the class is ``id >> 24``, so
mapping search results to classes is arithmetic on arrays, never SQL. A class's live proxies are
``j`` in ``[proxy_lo, proxy_hi)``, its samples ``j`` in ``[0, sample_hi)``.

**Segments** are written once (to ``.tmp``, fsynced, renamed, directory fsynced) and never changed;
the database names the live ones. **Locks**: ``writer.lock`` is held exclusively by the one writing
process; ``readers.lock`` is held shared by readers while they list and open segments, and a writer
deletes superseded segment files only while it can hold it exclusively (collections.md).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import faiss
import numpy as np

from .errors import CollectionDamagedError

DB_NAME = "imprint.db"
WRITER_LOCK = "writer.lock"
READERS_LOCK = "readers.lock"
CLASS_SHIFT = 24
MAX_PER_CLASS = 1 << CLASS_SHIFT


def class_of(ids: np.ndarray) -> np.ndarray:
    """The class id of each vector id."""
    return ids >> CLASS_SHIFT


def range_ids(class_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every id ``class << 24 | j`` with ``lo <= j < hi``, class by class."""
    counts = hi - lo
    base = np.repeat((class_ids << CLASS_SHIFT) + lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return base + np.arange(int(counts.sum()), dtype=np.int64)


def live(class_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which ``ids`` are live: their class is in ``class_ids`` (sorted) and ``j`` in its ``[lo, hi)``."""
    if not len(class_ids):
        return np.zeros(len(ids), bool)
    cls, j = ids >> CLASS_SHIFT, ids & (MAX_PER_CLASS - 1)
    pos = np.minimum(np.searchsorted(class_ids, cls), len(class_ids) - 1)
    return (class_ids[pos] == cls) & (lo[pos] <= j) & (j < hi[pos])


def crash_point(name: str) -> None:
    """A named step of a write where crash tests kill the process (they replace this function)."""


@contextmanager
def flock(path: Path, *, exclusive: bool, wait: bool = True, optional: bool = False) -> Iterator[int | None]:
    """Hold an advisory lock on ``path`` (created if missing) until the block ends. Yields the open
    descriptor, or None where ``wait`` is False and another process holds the lock, or where
    ``optional`` and the file cannot be opened (a read-only directory made before it existed)."""
    try:
        fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT, 0o644)
    except OSError:
        if not optional:
            raise
        yield None
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
        else:
            yield fd
    finally:
        os.close(fd)  # releases the lock


def reading(directory: Path):
    """Hold ``readers.lock`` shared, so that no writer deletes a segment file meanwhile."""
    return flock(directory / READERS_LOCK, exclusive=False, optional=True)


def write_segment(directory: Path, kind: str, version: int, index: faiss.Index) -> str:
    """Durably write ``index`` as a new segment file of ``kind``; returns its name."""
    name = f"{kind}-{version:08d}.faiss"
    tmp = directory / f"{name}.tmp"
    faiss.write_index(index, str(tmp))
    crash_point("segment: tmp written")
    _fsync(tmp)
    os.replace(tmp, directory / name)
    _fsync(directory)
    return name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_segment(directory: Path, name: str) -> Iterator[BinaryIO]:
    """Segment file ``name``, open for reading (an open file outlives its deletion)."""
    try:
        file = open(directory / name, "rb")
    except FileNotFoundError:
        raise CollectionDamagedError(f"collection {directory}: index file {name} is missing") from None
    with file:
        yield file


def read_segment(directory: Path, name: str, file: BinaryIO, dimension: int) -> faiss.Index:
    """The FAISS index in segment file ``name``, read from its open ``file``."""
    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(file.read))
    except RuntimeError as exc:
        raise CollectionDamagedError(f"collection {directory}: index file {name} is unreadable or truncated "
                                     f"({str(exc).strip().splitlines()[0]})") from None
    if index.d != dimension:
        raise CollectionDamagedError(f"collection {directory}: index file {name} holds {index.d}-d vectors, "
                                     f"expected {dimension}")
    return index


def delete_unlisted(directory: Path, keep: set[str]) -> None:
    """Delete segment files not in ``keep`` (superseded by a compaction, or left by a crashed
    writer) if no reader is opening segments now; else a later write will."""
    with flock(directory / READERS_LOCK, exclusive=True, wait=False) as fd:
        if fd is None:
            return
        for file in directory.iterdir():
            if file.suffix in (".faiss", ".tmp") and file.name not in keep:
                file.unlink(missing_ok=True)


def lock_holder(directory: Path) -> str:
    """The pid the writer lock's holder wrote into it ("?" if unknown)."""
    try:
        return (directory / WRITER_LOCK).read_text(errors="replace").strip()[:32] or "?"
    except OSError:
        return "?"

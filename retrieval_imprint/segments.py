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

import errno
import fcntl
import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO, NamedTuple

import faiss
import numpy as np

from .errors import CollectionDamagedError, CollectionIOError, CollectionLockedError
from .ivf import use_quantizer
from .verified import block_checksums

DB_NAME = "imprint.db"
WRITER_LOCK = "writer.lock"
READERS_LOCK = "readers.lock"
CLASS_SHIFT = 24
MAX_PER_CLASS = 1 << CLASS_SHIFT
SEGMENT_NAME = re.compile(r"(proxies|samples|template|means|candidates)-\d{8}\.faiss|gram-\d{8}\.npy")
_CHUNK = 1 << 20
MAP_MIN = 1 << 26  # bytes from which an IVF proxy segment is memory-mapped at open, not read and hashed
_limit_lock = threading.Lock()  # FAISS's size limit for one array is a process-wide setting (map_segment)


def candidates_of(proxies: str) -> str:
    """The name of the fast-scan candidates file written beside proxy segment ``proxies`` (refine.py)."""
    return "candidates-" + proxies.removeprefix("proxies-")


def version_of(name: str) -> int:
    """The version whose write made segment file ``name`` (``kind-VVVVVVVV.ext``)."""
    return int(name.rpartition("-")[2].partition(".")[0])


def width(cfg: dict, kind: str) -> int:
    """The dimension of segment ``kind``'s vectors under the collection row ``cfg`` (with a dimension):
    a streaming ls head's proxies, means and template are its features, its samples the embeddings."""
    return cfg["features"] or cfg["dimension"] if kind != "samples" else cfg["dimension"]


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


def _open_regular(path: Path, flags: int) -> int:
    """``os.open`` that never follows a symbolic link and accepts only a regular file: a collection
    folder from elsewhere (a tarball, a network drive) must not make us write outside it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CollectionDamagedError(
                f"{path} is a symbolic link; a collection's files must be plain files inside it"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CollectionDamagedError(f"{path} is not a plain file")
    return fd


@contextmanager
def flock(path: Path, *, exclusive: bool, wait: bool = True, optional: bool = False) -> Iterator[int | None]:
    """Hold an advisory lock on ``path`` (created if missing) until the block ends. Yields the open
    descriptor, or None where ``wait`` is False and another process holds the lock, or where
    ``optional`` and the file cannot be opened (a read-only directory made before it existed)."""
    try:
        fd = _open_regular(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT)
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


@contextmanager
def writer_lock(directory: Path, timeout: float = 0.0) -> Iterator[int]:
    """Hold ``writer.lock``, waiting up to ``timeout`` seconds for another writer to finish, with
    our pid written in it; ``CollectionLockedError`` names the holder if it does not finish."""
    try:
        fd = _open_regular(directory / WRITER_LOCK, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CollectionIOError(
                f"collection {directory} is read-only here (cannot open {WRITER_LOCK} for "
                "writing): it can be queried, not changed"
            ) from None
        raise
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CollectionLockedError(
                        f"collection {directory} is locked by pid {lock_holder(directory)} "
                        "(another process is writing to it)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock


class Segment(NamedTuple):
    """A segment file written: its name, the checksum of its bytes and, for an IVF proxy file, the
    checksums of its inverted lists' blocks (``verified.block_checksums``)."""

    name: str
    checksum: str
    lists: bytes | None = None


def write_segment(directory: Path, kind: str, version: int, index: faiss.Index) -> Segment:
    """Durably write ``index`` as a new segment file of ``kind`` (an IVF proxy index without its
    coarse quantizer: ``without_quantizer``)."""
    ivf_proxies = kind == "proxies" and faiss.try_extract_index_ivf(index) is not None
    lists = block_checksums(index) if ivf_proxies else None  # what a mapped copy is verified against

    def write(tmp: Path) -> str:
        with without_quantizer(index) if ivf_proxies else nullcontext():
            faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as written:
            return _checksum(written)

    return Segment(*durably(directory, f"{kind}-{version:08d}.faiss", write), lists)


def write_array(directory: Path, kind: str, version: int, array: np.ndarray) -> Segment:
    """Durably write ``array`` as a new ``.npy`` segment file of ``kind`` (a streaming ls head's Gram matrix)."""

    def write(tmp: Path) -> str:
        with open(tmp, "wb") as out:
            np.save(out, array, allow_pickle=False)
        with open(tmp, "rb") as written:
            return _checksum(written)

    return Segment(*durably(directory, f"{kind}-{version:08d}.npy", write))


def read_array(directory: Path, name: str, file: BinaryIO, checksum: str | None) -> np.ndarray:
    """The array in ``.npy`` segment file ``name``, read from its open ``file`` once its bytes hash to ``checksum``."""
    _verify(directory, name, file, checksum)
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CollectionDamagedError(f"collection {directory}: file {name} cannot be read ({exc})") from None


def durably(directory: Path, name: str, write: Callable[[Path], str]) -> tuple[str, str]:
    """Write file ``name`` with ``write(tmp)`` (which returns the checksum of what it wrote) to
    ``name.tmp``, fsync it, rename it into place and fsync the directory: ``(name, checksum)``, or a
    ``CollectionIOError`` (and no file) if any step fails."""
    tmp = directory / f"{name}.tmp"
    try:
        checksum = write(tmp)
        crash_point("segment: tmp written")
        _fsync(tmp)
        os.replace(tmp, directory / name)
        _fsync(directory)
    except (OSError, RuntimeError) as exc:  # a full disk, a read-only folder: FAISS raises RuntimeError
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1]
        raise CollectionIOError(
            f"collection {directory}: could not write {name} ({reason}); nothing was changed"
        ) from None
    except BaseException:  # a damaged list found while merging, an interrupt: no half-written file stays
        tmp.unlink(missing_ok=True)
        raise
    return name, checksum


@contextmanager
def without_quantizer(index: faiss.Index) -> Iterator[None]:
    """An IVF ``index`` with an empty coarse quantizer while it is written: every proxy segment of a
    collection uses the template file's (``share_quantizer``), so a small add writes kilobytes,
    not the quantizer's megabytes (6 MiB at 4,096 lists of 384-d). Not to be searched meanwhile."""
    ivf = faiss.extract_index_ivf(index)
    quantizer = ivf.quantizer
    empty = faiss.IndexFlat(quantizer.d, quantizer.metric_type)  # held here: FAISS keeps a raw pointer
    ivf.quantizer = empty
    try:
        yield
    finally:
        ivf.quantizer = quantizer


def share_quantizer(
    directory: Path, name: str, index: faiss.Index, template: faiss.Index, *, same: bool = True
) -> faiss.Index:
    """A segment read without its coarse quantizer (``write_segment``, listfiles.py) given the
    ``template``'s: the same object, not a copy, so one quantizer is in memory however many files
    use it (29 MiB each at 16,384 lists of 384-d) and one coarse search serves them all
    (mapped.py). ``same``: the segment must be an index of the template's kind (a proxy segment;
    fast-scan candidates need only its lists). One written with its own quantizer (schema before
    0010) keeps it. The index keeps the template alive."""
    ivf = faiss.try_extract_index_ivf(index)
    shared = faiss.extract_index_ivf(template).quantizer
    if (same and not same_kind(index, template)) or (
        ivf is not None and (ivf.nlist, ivf.d, ivf.metric_type) != (shared.ntotal, shared.d, shared.metric_type)
    ):
        raise CollectionDamagedError(
            f"collection {directory}: index file {name} does not hold lists of the collection's trained template"
        )
    if ivf is None or ivf.quantizer.ntotal or not ivf.nlist:
        return index
    return use_quantizer(index, template)


def same_kind(index: faiss.Index, like: faiss.Index) -> bool:
    """Whether FAISS ``index`` is of the kind (class, dimension, metric, lists, code size) of ``like``."""
    a, b = faiss.downcast_index(index), faiss.downcast_index(like)
    return (
        type(a) is type(b)
        and a.d == b.d
        and a.metric_type == b.metric_type
        and all(getattr(a, key, None) == getattr(b, key, None) for key in ("nlist", "code_size"))
    )


def _checksum(file: BinaryIO) -> str:
    """The hex digest of what is left to read in ``file``."""
    digest = hashlib.blake2b(digest_size=16)
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_name(directory: Path, name: str) -> str:
    """``name`` if it is a segment file name this code writes; a damaged database may say anything."""
    if not SEGMENT_NAME.fullmatch(name):
        raise CollectionDamagedError(
            f"collection {directory}: the database names a segment file {name[:80]!r}, "
            "which is not a segment name (kind-00000000.faiss)"
        )
    return name


@contextmanager
def open_segment(directory: Path, name: str) -> Iterator[BinaryIO]:
    """Segment file ``name``, open for reading (an open file outlives its deletion)."""
    try:
        fd = _open_regular(directory / check_name(directory, name), os.O_RDONLY)
    except FileNotFoundError:
        raise CollectionDamagedError(f"collection {directory}: index file {name} is missing") from None
    with os.fdopen(fd, "rb") as file:
        yield file


def read_segment(
    directory: Path, name: str, file: BinaryIO, dimension: int, checksum: str | None = None
) -> faiss.Index:
    """The FAISS index in segment file ``name``, read from its open ``file``, whose bytes must first
    hash to ``checksum`` (the one recorded when it was written; None for segments written before
    0.1.0 recorded them). Hashing comes first because FAISS trusts the sizes in a file: a damaged
    one can make it allocate without bound. The second pass reads from the page cache."""
    _verify(directory, name, file, checksum)
    try:
        with _limit_lock:  # not while map_segment has lowered the limit to a smaller file's size
            index = faiss.read_index(faiss.PyCallbackIOReader(file.read))
    except (RuntimeError, MemoryError) as exc:
        raise _unreadable(directory, name, exc) from None
    return _checked(directory, name, index, dimension)


def can_map() -> bool:
    """Whether an open file can be handed to FAISS's memory-mapping reader by name (``/dev/fd``)."""
    return os.path.isdir("/dev/fd")


def map_segment(directory: Path, name: str, file: BinaryIO, dimension: int, n_vectors: int) -> faiss.Index:
    """The FAISS index in segment file ``name``, memory-mapped from its open ``file``: opening
    costs no reads and no resident memory, whatever its size, and the mapping outlives the file's
    deletion as an open file does. It is **read-only**: FAISS aborts the process on an add or a
    removal to a mapped list (``mapped.MappedProxyIndex`` never makes one).

    Not hashed, since that reads every byte (seconds per GB); ``check`` and compaction verify the
    checksum. What a damaged file could do is bounded instead: FAISS checks that each array it maps
    lies inside the file, no array may claim more bytes than the file has, and the index must
    hold the ``n_vectors`` recorded when it was written."""
    size = os.fstat(file.fileno()).st_size
    with _limit_lock:
        limit = faiss.get_deserialization_vector_byte_limit()
        faiss.set_deserialization_vector_byte_limit(size)
        try:
            index = faiss.read_index(f"/dev/fd/{file.fileno()}", faiss.IO_FLAG_MMAP_IFC)
        except (RuntimeError, MemoryError) as exc:
            raise _unreadable(directory, name, exc) from None
        finally:
            faiss.set_deserialization_vector_byte_limit(limit)
    if index.ntotal != n_vectors:
        raise CollectionDamagedError(
            f"collection {directory}: index file {name} holds {index.ntotal} vectors; {n_vectors} were written to it"
        )
    return _checked(directory, name, index, dimension)


def _unreadable(directory: Path, name: str, exc: Exception) -> CollectionDamagedError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectionDamagedError(f"collection {directory}: index file {name} is unreadable or truncated ({reason})")


def _verify(directory: Path, name: str, file: BinaryIO, checksum: str | None) -> None:
    """Check that segment file ``name``'s bytes hash to ``checksum`` (None: none was recorded) and leave
    ``file`` at its start; from the start, as a file may have been read before in this snapshot (a
    streaming ls head's replayed samples)."""
    file.seek(0)
    if checksum is not None:
        if _checksum(file) != checksum:
            raise CollectionDamagedError(
                f"collection {directory}: index file {name} does not match the checksum "
                "recorded when it was written (it was changed or damaged)"
            )
        file.seek(0)


def _checked(directory: Path, name: str, index: faiss.Index, dimension: int) -> faiss.Index:
    if index.d != dimension:
        raise CollectionDamagedError(
            f"collection {directory}: index file {name} holds {index.d}-d vectors, expected {dimension}"
        )
    return index


def delete_unlisted(directory: Path, keep: set[str]) -> None:
    """Delete segment files not in ``keep`` (superseded by a compaction, or left by a crashed
    writer) if no reader is opening segments now; else a later write will. Only names this code
    writes are touched."""
    with flock(directory / READERS_LOCK, exclusive=True, wait=False) as fd:
        if fd is None:
            return
        for file in directory.iterdir():
            written = SEGMENT_NAME.fullmatch(file.name.removesuffix(".tmp"))
            if written and file.name not in keep:
                file.unlink(missing_ok=True)


def lock_holder(directory: Path) -> str:
    """The pid the writer lock's holder wrote into it ("?" if unknown)."""
    try:
        return (directory / WRITER_LOCK).read_text(errors="replace").strip()[:32] or "?"
    except OSError:
        return "?"

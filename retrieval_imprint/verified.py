"""Verified memory-mapped segments: no answer from a damaged byte, and still no reads at open.

A collection maps its large IVF proxy files instead of reading them (mapped.py), so opening costs
nothing whatever the file's size; hashing the file first would read all of it. Instead each
inverted list's checksum is recorded when the file is written (``list_checksums``, stored in the
database beside the file's own checksum), and before a search scans a list, the first time any
search touches it, the list is hashed and compared (``ListVerifier.ensure``): a list that does not
match refuses the query with the collection's damage error naming the file and the list. A
verified list is remembered, so each list is hashed once, when it is first read from disk anyway
(XXH3-64 over its ids and codes, about 15 GB/s on one core: a few tens of microseconds a list).
What the lists do not cover is checked at open as before: the header's sizes against the file
(segments.map_segment) and the coarse quantizer, which is in the template file, hashed whole.

A file written before list checksums were recorded (or one that is not a plain IVF index) is
hashed whole, once, before its first answer (``FileVerifier``, against the file's recorded
checksum); ``imprint compact`` rewrites it with list checksums.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist_sizes

from .errors import CollectionDamagedError
from .ivf import stored_list

DTYPE = np.dtype("<u8")  # one XXH3-64 per inverted list, as stored


def list_sum(ids: np.ndarray, codes: np.ndarray) -> int:
    """XXH3-64 of an inverted list's size, ids and codes (hashed where they lie, not copied)."""
    import xxhash

    digest = xxhash.xxh3_64(np.int64(len(ids)).tobytes())
    if len(ids):
        digest.update(np.ascontiguousarray(ids).data)
        digest.update(np.ascontiguousarray(codes).data)
    return digest.intdigest()


def _list_sum(invlists: Any, no: int) -> int:
    """``list_sum`` of list ``no`` (-1: an empty list)."""
    return list_sum(*stored_list(invlists, no)) if no >= 0 else list_sum(np.zeros(0, np.int64), np.zeros(0, np.uint8))


def list_checksums(index: faiss.Index) -> bytes:
    """The checksum of each inverted list of IVF ``index``, as stored (``DTYPE`` bytes); only the
    non-empty lists are hashed here (a small add's file has a few among thousands)."""
    invlists: Any = faiss.extract_index_ivf(index).invlists
    out = np.full(invlists.nlist, _list_sum(invlists, -1), DTYPE)  # list -1: the checksum of an empty list
    for no in np.flatnonzero(get_invlist_sizes(invlists)).tolist():
        out[no] = _list_sum(invlists, no)
    return out.tobytes()


class ListVerifier:
    """Checks the lists of one mapped IVF file against ``expected`` (``list_checksums``' bytes)
    the first time each is touched. Thread-safe."""

    def __init__(self, directory: Path, name: str, index: faiss.Index, expected: bytes) -> None:
        self.directory, self.name = directory, name
        self.index = index  # owns the lists: they live as long as it does
        self.invlists: Any = faiss.extract_index_ivf(index).invlists  # FAISS types it Optional
        self.expected = np.frombuffer(expected, DTYPE)
        if len(self.expected) != self.invlists.nlist:
            raise CollectionDamagedError(
                f"collection {directory}: index file {name} has {self.invlists.nlist} "
                f"inverted lists; {len(self.expected)} were recorded"
            )
        self.verified = np.zeros(len(self.expected), bool)
        self._lock = threading.Lock()

    def ensure(self, lists: np.ndarray | None) -> None:
        """Verify the lists numbered in ``lists`` (any shape; -1 ignored; None: every list) not
        verified yet; a ``CollectionDamagedError`` naming the first that does not match."""
        if lists is not None:
            flat = lists.ravel()
            if flat.size and flat.min() >= 0 and self.verified[flat].all():  # after a warm-up, nearly always
                return
        todo = np.arange(len(self.expected)) if lists is None else np.unique(lists[lists >= 0])
        todo = todo[~self.verified[todo]]
        if not len(todo):
            return
        with self._lock:
            for no in todo.tolist():
                if not self.verified[no]:
                    if _list_sum(self.invlists, no) != int(self.expected[no]):
                        raise self.damaged([no])
                    self.verified[no] = True

    def mismatches(self) -> list[int]:
        """Every list that does not match (for ``check``; reads the whole file)."""
        return [no for no in range(len(self.expected)) if _list_sum(self.invlists, no) != int(self.expected[no])]

    def damaged(self, lists: list[int]) -> CollectionDamagedError:
        shown = ", ".join(map(str, lists[:5])) + (f" and {len(lists) - 5} more" if len(lists) > 5 else "")
        return CollectionDamagedError(
            f"collection {self.directory}: index file {self.name} is damaged: inverted "
            f"list{'s' if len(lists) > 1 else ''} {shown} "
            f"do{'' if len(lists) > 1 else 'es'} not match the checksum recorded when "
            "it was written; restore the file or re-index"
        )


class FileVerifier:
    """Checks a whole mapped file against its recorded checksum before its first answer (files
    without list checksums). Maps the file itself at open (no reads) to hash it later."""

    def __init__(self, directory: Path, name: str, file: BinaryIO, checksum: str | None) -> None:
        self.directory, self.name, self.checksum = directory, name, checksum
        self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if checksum is not None else None
        self._lock = threading.Lock()

    def ensure(self, lists: np.ndarray | None) -> None:
        if self.map is None:
            return
        with self._lock:
            if self.map is None:
                return
            if hashlib.blake2b(self.map, digest_size=16).hexdigest() != self.checksum:
                raise CollectionDamagedError(
                    f"collection {self.directory}: index file {self.name} does not match "
                    "the checksum recorded when it was written (it was changed or damaged)"
                )
            self.map.close()
            self.map = None

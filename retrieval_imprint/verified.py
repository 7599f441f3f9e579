"""Verified memory-mapped segments: no answer from a damaged byte, and still no reads at open.

A collection maps its large IVF proxy files instead of reading them (mapped.py), so opening costs
nothing whatever the file's size; hashing the file first would read all of it. Instead checksums of
each inverted list's *blocks* (``BLOCK`` consecutive entries: their count, ids and codes) are
recorded when the file is written (``block_checksums``, stored in the database beside the file's
own checksum), and before a search reads a block, the first time any search touches it, the block
is hashed and compared (``ListVerifier``): one that does not match refuses the query with the
collection's damage error naming the file and the list. A verified block is remembered, so each is
hashed once, when it is first read from disk anyway (XXH3-64, about 15 GB/s on one core). A scan
verifies every block of the lists it probes; a re-rank (refine.py), which reads a few vectors of
many lists, only the blocks holding them: at ten million classes a list of float16 proxies is 1.9
MB, and verifying whole lists made a fresh process read and hash a hundred megabytes a query.
What the blocks do not cover is checked at open as before: the header's sizes against the file
(segments.map_segment) and against the recorded blocks, and the coarse quantizer, which is in the
template file, hashed whole.

Files written before block checksums have one checksum a list (``list_sum`` over the whole list),
verified a list at a time. A file written before list checksums were recorded (or one that is not a
plain IVF index) is hashed whole, once, before its first answer (``FileVerifier``, against the
file's recorded checksum); ``imprint compact`` rewrites either with block checksums.
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

DTYPE = np.dtype("<u8")  # one XXH3-64 per block (or per list, before blocks), as stored
BLOCK = 64  # entries a checksum covers: a re-rank reading one vector hashes 64 (50 KB of 384-d float16), not its list
_HEADER = b"xxh3blk:"  # then the block size (<u8): block checksums; without it, one checksum a list


def list_sum(ids: np.ndarray, codes: np.ndarray) -> int:
    """XXH3-64 of a list's (or block's) size, ids and codes (hashed where they lie, not copied)."""
    import xxhash

    digest = xxhash.xxh3_64(np.int64(len(ids)).tobytes())
    if len(ids):
        digest.update(np.ascontiguousarray(ids).data)
        digest.update(np.ascontiguousarray(codes).data)
    return digest.intdigest()


def block_sums(ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``list_sum`` of each ``BLOCK`` consecutive entries of one list (none for an empty list)."""
    return np.array([list_sum(ids[lo : lo + BLOCK], codes[lo : lo + BLOCK]) for lo in range(0, len(ids), BLOCK)], DTYPE)


def recorded(sums: list[np.ndarray]) -> bytes:
    """What the database stores for a file whose lists have these ``block_sums``, in list order."""
    return _HEADER + np.uint64(BLOCK).astype("<u8").tobytes() + np.concatenate([np.zeros(0, DTYPE), *sums]).tobytes()


def block_checksums(index: faiss.Index) -> bytes:
    """``recorded`` for every list of IVF ``index``, as stored; only the non-empty lists are read
    (a small add's file has a few among thousands; an empty list has no blocks)."""
    invlists: Any = faiss.extract_index_ivf(index).invlists
    return recorded(
        [block_sums(*stored_list(invlists, no)) for no in np.flatnonzero(get_invlist_sizes(invlists)).tolist()]
    )


class ListVerifier:
    """Checks the blocks of one mapped IVF file against ``expected`` (``block_checksums``' bytes, or
    an older file's one checksum a list) the first time each is read. Thread-safe."""

    def __init__(self, directory: Path, name: str, index: faiss.Index, expected: bytes) -> None:
        self.directory, self.name = directory, name
        self.index = index  # owns the lists: they live as long as it does
        self.invlists: Any = faiss.extract_index_ivf(index).invlists  # FAISS types it Optional
        self.sizes = get_invlist_sizes(self.invlists).astype(np.int64)
        self.block: int | None = None  # entries a checksum covers (None: a whole list)
        if expected.startswith(_HEADER):
            self.block = int(np.frombuffer(expected[8:16], "<u8")[0])
            self.expected = np.frombuffer(expected[16:], DTYPE)
            counts = -(-self.sizes // self.block)
        else:  # one checksum a list, empty ones too
            self.expected = np.frombuffer(expected, DTYPE)
            counts = np.ones(len(self.sizes), np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # each list's first checksum
        if self.first[-1] != len(self.expected):
            raise CollectionDamagedError(
                f"collection {directory}: index file {name}'s inverted lists hold "
                f"{'blocks' if self.block else 'lists'} that do not match the {len(self.expected)} checksums recorded"
            )
        self.verified = np.zeros(len(self.expected), bool)
        self.whole = np.zeros(len(self.sizes), bool)  # lists every block of which is verified
        self._lock = threading.Lock()

    def ensure(self, lists: np.ndarray | None) -> None:
        """Verify every block of the lists numbered in ``lists`` (any shape; -1 ignored; None: every
        list) not verified yet; a ``CollectionDamagedError`` naming the first that does not match."""
        flat = np.arange(len(self.sizes)) if lists is None else lists.ravel()
        flat = flat[flat >= 0]
        if self.whole[flat].all():  # after a warm-up, nearly always: one vectorised test a search
            return
        flat = np.unique(flat[~self.whole[flat]])
        counts = self.first[flat + 1] - self.first[flat]
        starts = np.repeat(self.first[flat] - np.cumsum(counts) + counts, counts)
        self._check(starts + np.arange(int(counts.sum())))  # every block of each list
        self.whole[flat] = True

    def ensure_at(self, lists: np.ndarray, offsets: np.ndarray) -> None:
        """Verify the blocks holding entries ``offsets`` of lists ``lists`` (1-d, paired; offsets
        past a list's end are clamped to its last entry, empty lists ignored)."""
        inside = (lists >= 0) & (lists < len(self.sizes))
        lists, offsets = lists[inside], offsets[inside]
        size = self.sizes[lists]
        lists, offsets, size = lists[size > 0], offsets[size > 0], size[size > 0]
        within = np.minimum(offsets, size - 1) // self.block if self.block else 0
        self._check(self.first[lists] + within)

    def _check(self, blocks: np.ndarray) -> None:
        if blocks.size and self.verified[blocks].all():  # after a warm-up, nearly always
            return
        todo = np.unique(blocks[~self.verified[blocks]])
        with self._lock:
            for at in todo.tolist():
                if not self.verified[at]:
                    if self._sum(at) != int(self.expected[at]):
                        raise self.damaged([self._list_of(at)])
                    self.verified[at] = True

    def _list_of(self, at: int) -> int:
        return int(np.searchsorted(self.first, at, side="right") - 1)

    def _sum(self, at: int) -> int:
        no = self._list_of(at)
        ids, codes = stored_list(self.invlists, no)
        if self.block is None:
            return list_sum(ids, codes)
        lo = (at - int(self.first[no])) * self.block
        return list_sum(ids[lo : lo + self.block], codes[lo : lo + self.block])

    def mismatches(self) -> list[int]:
        """Every list with a block that does not match (for ``check``; reads the whole file)."""
        return sorted(
            {self._list_of(at) for at in range(len(self.expected)) if self._sum(at) != int(self.expected[at])}
        )

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

    def ensure_at(self, lists: np.ndarray, offsets: np.ndarray) -> None:
        self.ensure(lists)

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

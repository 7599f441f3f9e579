"""IVF segment files written list by list, in FAISS's own format, so that a collection of tens of
millions of proxies never holds a whole file in memory and opens every large file by mapping it.

Both writers put the index's header as FAISS writes it (without the coarse quantizer, which the
template file holds: ``segments.share_quantizer``), then ``ArrayInvertedLists`` (``ilar``: the list
sizes, then each list's codes and ids), which FAISS reads, or maps with ``IO_FLAG_MMAP_IFC``, as any
file it wrote; and the checksums of each list's blocks (verified.py), which a mapped reader checks
before it first reads them.

- ``write_lists``: a proxy segment merged from other IVF files (compaction), one list in memory at
  a time (a full compaction of 40M proxies would otherwise hold 31 GB of float16 codes).
- ``write_candidates``: a refined index's fast-scan candidates (refine.py). FAISS keeps fast-scan
  codes in ``BlockInvertedLists`` (32 codes interleaved per block for SIMD lookups), which it can
  only read whole: 2.2 GB read and hashed at every open at 40M proxies. Written instead as array
  lists of whole blocks, each list padded to a multiple of 32 with id -1, the bytes a fast-scan
  search reads are the same, and the file maps like a proxy file: nothing read at open, a list
  read and verified when a query first probes it. A padding entry can surface as a candidate with
  id -1, which the re-rank discards (refine.Reranker): it costs a slot, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist_sizes

from .errors import CollectionDamagedError, CollectionIOError
from .ivf import Verify, stored_list
from .segments import Segment, durably
from .verified import block_sums, recorded

_EMPTY_LISTS = 32  # bytes FAISS writes for empty ArrayInvertedLists: ilar, nlist, code_size, sprs, 0 sizes


def write_lists(
    directory: Path,
    version: int,
    like: faiss.Index,
    sources: Sequence[tuple[faiss.Index, Verify | None]],
    keep: Callable,
) -> tuple[Segment, int]:
    """Durably write a new IVF proxy segment holding, list by list, the vectors of the IVF indexes
    ``sources`` (lists and codes of the trained template ``like``; mapped files, typically, each
    with the check of its lists, called on each list before it is copied) whose ids ``keep(ids)``
    accepts, in source order; returns it and how many vectors it holds."""
    nlist, code_size = faiss.extract_index_ivf(like).nlist, faiss.extract_index_ivf(like).code_size
    lists = [faiss.extract_index_ivf(source).invlists for source, _ in sources]
    sizes = np.zeros(nlist, np.uint64)
    for invlists in lists:  # a first pass over the ids alone (1% of the bytes): the header holds the sizes
        for no in np.flatnonzero(get_invlist_sizes(invlists)).tolist():
            sizes[no] += int(keep(stored_list(invlists, no)[0]).sum())

    def merged() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for no in range(nlist):
            for _, verify in sources:
                if verify is not None:
                    verify(np.array([no]))
            parts = [stored_list(invlists, no) for invlists in lists]
            kept = [keep(ids) for ids, _ in parts]
            ids = np.concatenate([ids[k] for (ids, _), k in zip(parts, kept, strict=True)])
            yield ids, np.concatenate([codes[k] for (_, codes), k in zip(parts, kept, strict=True)])

    header = faiss.clone_index(like)  # a template: no lists to copy
    header.ntotal = faiss.extract_index_ivf(header).ntotal = int(sizes.sum())
    return _write(directory, f"proxies-{version:08d}.faiss", header, code_size, sizes, merged()), int(sizes.sum())


def write_candidates(directory: Path, version: int, candidates: faiss.Index) -> Segment:
    """Durably write the fast-scan IVF index ``candidates`` (refine.build) as array lists of whole
    32-code blocks, padded with id -1 (see the module's docstring)."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(candidates))
    blocks = faiss.downcast_InvertedLists(ivf.invlists)
    per_block, block_size = int(blocks.n_per_block), int(blocks.block_size)
    counts = get_invlist_sizes(blocks).astype(np.uint64)
    sizes = -(-counts // per_block) * per_block  # whole blocks

    def padded() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for no in range(ivf.nlist):
            n, m = int(counts[no]), int(sizes[no])
            if not m:
                yield np.zeros(0, np.int64), np.zeros(0, np.uint8)
                continue
            ids = np.full(m, -1, np.int64)
            ids[:n] = faiss.rev_swig_ptr(blocks.get_ids(no), n)
            yield ids, faiss.rev_swig_ptr(blocks.get_codes(no), m // per_block * block_size)

    name = f"candidates-{version:08d}.faiss"
    return _write(directory, name, candidates, block_size // per_block, sizes, padded())


@contextmanager
def _bare(index: faiss.Index, code_size: int) -> Iterator[None]:
    """IVF ``index`` with an empty coarse quantizer and empty array lists of ``code_size`` while its
    header is written; as it was after. Not to be searched meanwhile."""
    ivf = faiss.extract_index_ivf(index)
    saved = ivf.quantizer, ivf.invlists, ivf.own_invlists
    empty_quantizer = faiss.IndexFlat(ivf.d, ivf.metric_type)  # held here: FAISS keeps raw pointers
    empty_lists = faiss.ArrayInvertedLists(ivf.nlist, code_size)
    ivf.own_invlists = False
    ivf.quantizer, ivf.invlists = empty_quantizer, empty_lists
    try:
        yield
    finally:
        ivf.quantizer, ivf.invlists, ivf.own_invlists = saved


def _write(
    directory: Path,
    name: str,
    index: faiss.Index,
    code_size: int,
    sizes: np.ndarray,
    lists: Iterator[tuple[np.ndarray, np.ndarray]],
) -> Segment:
    """Write ``index``'s header, then the ``sizes`` and each list of ``lists`` (ids, codes) as
    ``ilar`` array lists of ``code_size`` bytes a code; the segment with its blocks' checksums."""
    with _bare(index, code_size):
        out = faiss.VectorIOWriter()
        faiss.write_index(index, out)
    head = faiss.vector_to_array(out.data).tobytes()
    if head[-_EMPTY_LISTS : -_EMPTY_LISTS + 4] != b"ilar":
        raise CollectionIOError(f"collection {directory}: FAISS wrote an IVF index in a layout this code does not know")
    nlist = len(sizes)
    sums: list[np.ndarray] = []

    def write(tmp: Path) -> str:
        digest = hashlib.blake2b(digest_size=16)  # of the bytes as written: no second read of the file
        with open(tmp, "wb") as file:

            def put(data: bytes) -> None:
                digest.update(data)
                file.write(data)

            put(head[:-_EMPTY_LISTS])
            put(b"ilar" + struct.pack("<QQ", nlist, code_size) + b"full" + struct.pack("<Q", nlist))
            put(sizes.astype("<u8").tobytes())
            for no, (ids, codes) in enumerate(lists):
                if len(ids) != sizes[no] or codes.size != len(ids) * code_size:
                    raise CollectionDamagedError(
                        f"collection {directory}: inverted list {no} changed while it was written"
                    )
                ids = np.ascontiguousarray(ids, "<i8")
                codes = np.ascontiguousarray(codes, np.uint8).reshape(len(ids), code_size)
                sums.append(block_sums(ids, codes))
                put(codes.tobytes())
                put(ids.tobytes())
        return digest.hexdigest()

    written, checksum = durably(directory, name, write)
    return Segment(written, checksum, recorded(sums))

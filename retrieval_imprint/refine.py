"""Fast-scan candidates re-ranked exactly: how an IVF search of millions of proxies stays within a
few milliseconds and still returns the exact top-1 of what it probes.

A collection index written in FAISS's refine notation, ``IVF4096,PQ48x4fs,Refine(SQfp16)`` (or
``...,RFlat``), keeps two files of its large proxy segment. The *exact* one is an ordinary IVF
index of the refine codes (``IVF4096,SQfp16``): the proxies as stored, memory-mapped, their lists
verified as they are read (verified.py). The *candidates* one is a fast-scan IVF index (4-bit PQ
codes scanned with SIMD lookup tables, FAISS's ``IndexIVFPQFastScan``) of the same vectors under
the same coarse quantizer, whose ids are **positions** in the exact file, ``list << 32 | offset``.
A query scans the candidates (tens of times faster than the float16 codes: docs/index-candidates.md),
takes its ``k_factor * m`` best positions, reads those proxies' ids and codes from the exact file,
decodes them and keeps the ``m`` best by exact distance. The candidates file (M / 2 bytes a proxy
plus its id) is mapped like the proxies (written as padded array lists: listfiles.py); a position
is checked against its list before it is read, so a wrong candidate costs recall, never a wrong score.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist_sizes

from . import ivf
from .errors import InvalidParameterError

_REFINED = re.compile(r"(IVF\d+(?:_HNSW\d+)?),(PQ\d+x4fs),(?:Refine\((\w+)\)|RFlat)")


def parse(factory: str) -> tuple[str, str | None]:
    """``IVF4096,PQ48x4fs,Refine(SQfp16)`` → ``("IVF4096,SQfp16", "IVF4096,PQ48x4fs")``: the IVF
    index stored and its fast-scan candidates (``RFlat``: ``IVF4096,Flat`` stored); any other
    factory string: itself and None."""
    found = _REFINED.fullmatch(factory)
    if found is None:
        if "Refine(" in factory or factory.endswith(",RFlat"):
            raise InvalidParameterError(
                f"index={factory!r}: a refined index is IVF{{nlist}}[_HNSW32],PQ{{M}}x4fs,Refine(SQfp16) "
                "(or Refine(Flat), or RFlat): fast-scan candidates re-ranked from the codes stored"
            )
        return factory, None
    stored = found[3] or "Flat"
    if stored not in ("SQfp16", "Flat"):
        raise InvalidParameterError(
            f"index={factory!r}: the re-rank reads SQfp16 or Flat codes (exact to float16 or float32), not {stored}"
        )
    return f"{found[1]},{stored}", f"{found[1]},{found[2]}"


K_FACTOR = 64  # candidates re-ranked per result asked for, unless a search or the tuning says (``k_factor``)
# k_factors the tuning tries (tuning.tune_nprobe), smallest first: the first with which the re-ranked search
# reaches the recall target at the nprobe the float16 codes need
K_FACTORS = (16, 32, 64, 128, 256, 512, 1024)
POSITION_SHIFT = 32  # a candidate's id: list number << 32 | offset in the list
RERANK_BATCH = 1 << 16  # candidates decoded at once by a batch of queries (100 MB of 384-d float32)
TRAIN_SAMPLE = 1 << 16  # proxies the 4-bit PQ codebooks are trained on (a seeded sample)


def build(exact: faiss.Index, factory: str, seed: int = 0) -> faiss.Index:
    """A fast-scan IVF index (``factory``, e.g. ``IVF4096,PQ48x4fs``) of every vector of the IVF
    index ``exact``, sharing its coarse quantizer, with ids that are positions in ``exact``. Its PQ
    codebooks are trained on a seeded sample of at most ``TRAIN_SAMPLE`` decoded vectors. Each list
    is encoded into the same list (no coarse search: at 40M proxies an HNSW assignment of every
    vector took minutes a merge) and packed into FAISS's 32-code blocks here."""
    source = faiss.extract_index_ivf(exact)
    out = faiss.index_factory(exact.d, factory, exact.metric_type)
    target = faiss.downcast_index(faiss.extract_index_ivf(out))
    if target.nlist != source.nlist or not isinstance(target, faiss.IndexIVFFastScan):
        raise InvalidParameterError(f"candidates {factory!r} must be a fast-scan IVF index of {source.nlist} lists")
    ivf.use_quantizer(out, exact)
    rows = np.sort(np.random.default_rng(seed).permutation(exact.ntotal)[:TRAIN_SAMPLE])
    out.train(np.ascontiguousarray(np.concatenate([X for _, X in ivf.decoded_lists(exact, rows)])))
    packer = target.get_CodePacker()
    blocks = faiss.downcast_InvertedLists(target.invlists)
    per_block = int(packer.nvec)
    for no, X in _decoded_by_list(exact):
        n = len(X)
        codes = np.zeros((-(-n // per_block) * per_block, target.code_size), np.uint8)
        target.encode_vectors(n, faiss.swig_ptr(X), faiss.swig_ptr(np.full(n, no, np.int64)), faiss.swig_ptr(codes))
        packed = np.zeros(len(codes) // per_block * packer.block_size, np.uint8)
        for b in range(len(codes) // per_block):
            packer.pack_all(faiss.swig_ptr(codes[b * per_block :]), faiss.swig_ptr(packed[b * packer.block_size :]))
        positions = (np.int64(no) << POSITION_SHIFT) + np.arange(n, dtype=np.int64)
        blocks.add_entries(no, n, faiss.swig_ptr(positions), faiss.swig_ptr(packed))  # an empty list: whole blocks
    target.ntotal = out.ntotal = exact.ntotal
    return out


def _decoded_by_list(index: faiss.Index) -> Iterator[tuple[int, np.ndarray]]:
    """``(list number, decoded vectors)`` of each non-empty list of IVF ``index``, in list order."""
    filled = np.flatnonzero(get_invlist_sizes(faiss.extract_index_ivf(index).invlists)).tolist()
    for no, (_, X) in zip(filled, ivf.decoded_lists(index), strict=True):
        yield no, np.ascontiguousarray(X, np.float32)


class ListBytes:
    """Entries of a memory-mapped IVF file read by (list, offset), many at once. FAISS maps the file
    whole, and array lists (``ilar``, as FAISS and listfiles.py write them) hold each non-empty
    list's codes, then its ids, back to back to its end, so one view from the first list's codes
    covers them all at offsets known from the sizes.
    Each list's offsets are checked against FAISS's own pointers the first time it is read (one call
    a list, once); a file laid out otherwise makes ``gather`` return None (read list by list)."""

    def __init__(self, invlists: Any, sizes: np.ndarray) -> None:
        self.invlists, self.code_size = invlists, int(invlists.code_size)
        span = sizes.astype(np.int64) * (self.code_size + 8)
        self.codes_at = np.cumsum(span) - span
        self.ids_at = self.codes_at + sizes.astype(np.int64) * self.code_size
        self.checked = np.zeros(len(sizes), bool)
        filled = np.flatnonzero(sizes)
        self.rows: np.ndarray | None = None  # every code_size-byte window of the lists, rows picked by fancy indexing
        if len(filled) and int(span.sum()) >= self.code_size + 8:
            first = invlists.get_codes(int(filled[0]))
            self.base = int(first)
            data = faiss.rev_swig_ptr(first, int(span.sum()))
            strided = np.lib.stride_tricks.as_strided
            self.rows = strided(data, (len(data) - self.code_size + 1, self.code_size), (1, 1), writeable=False)
            self.words = strided(data, (len(data) - 7, 8), (1, 1), writeable=False)

    def gather(self, lists: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, codes)`` of entries ``offsets`` (each inside its list) of ``lists``; None where
        the file is not laid out as one block."""
        if self.rows is None:
            return None
        if not self.checked[lists].all():
            new = np.unique(lists[~self.checked[lists]])
            for no in new.tolist():
                if (
                    int(self.invlists.get_codes(no)) != self.base + self.codes_at[no]
                    or int(self.invlists.get_ids(no)) != self.base + self.ids_at[no]
                ):
                    self.rows = None
                    return None
            self.checked[new] = True
        codes = self.rows[self.codes_at[lists] + offsets * self.code_size]
        ids = self.words[self.ids_at[lists] + offsets * 8].view("<i8").ravel()
        return ids, codes


class Reranker:
    """Reads proxies of the IVF index ``exact`` by position and scores them exactly. ``verify``
    (``ListVerifier.ensure_at``, or None for an index in memory) is called with the lists and
    offsets about to be read; ``sizes``: its lists' sizes, if known. A memory-mapped ``exact``
    (``mapped``) is read through one byte view of its lists (``ListBytes``), else list by
    list. Thread-safe: it only reads."""

    def __init__(
        self, exact: faiss.Index, verify: Any = None, sizes: np.ndarray | None = None, mapped: bool = False
    ) -> None:
        self.exact = exact
        self.ivf: Any = faiss.extract_index_ivf(exact)
        self.invlists: Any = self.ivf.invlists
        self.verify = verify
        self.sizes = get_invlist_sizes(self.invlists).astype(np.int64) if sizes is None else sizes
        self.bytes = ListBytes(self.invlists, self.sizes) if mapped else None
        self.code_size = int(self.invlists.code_size)
        self.listno_bytes = int(self.ivf.coarse_code_size())
        self.larger_is_better = exact.metric_type == faiss.METRIC_INNER_PRODUCT

    def codes(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ok, ids, codes)`` of ``positions`` (1-d), each code prefixed by its list number as
        ``sa_decode`` reads it: ``ok`` False where a position is -1 or lies outside its list; their
        id is -1 and their code zero."""
        lists, offsets = positions >> POSITION_SHIFT, positions & ((1 << POSITION_SHIFT) - 1)
        ok = (positions >= 0) & (lists < self.ivf.nlist)
        ids = np.full(len(positions), -1, np.int64)
        codes = np.zeros((len(positions), self.listno_bytes + self.code_size), np.uint8)
        if self.verify is not None and ok.any():
            self.verify(lists[ok], offsets[ok])
        ok[ok] = offsets[ok] < self.sizes[lists[ok]]
        valid = np.flatnonzero(ok)
        lists, offsets = lists[valid], offsets[valid]
        gathered = self.bytes.gather(lists, offsets) if self.bytes is not None and len(valid) else None
        if gathered is not None:
            ids[valid], codes[valid, self.listno_bytes :] = gathered
        else:
            order = np.argsort(lists, kind="stable")
            for at in np.split(order, np.flatnonzero(np.diff(lists[order])) + 1) if len(valid) else []:
                list_ids, list_codes = ivf.stored_list(self.invlists, int(lists[at[0]]))
                ids[valid[at]], codes[valid[at], self.listno_bytes :] = list_ids[offsets[at]], list_codes[offsets[at]]
        listno = lists.astype("<i8").view(np.uint8).reshape(-1, 8)  # the list number's bytes, little-endian
        codes[valid, : self.listno_bytes] = listno[:, : self.listno_bytes]
        return ok, ids, codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.ivf.sa_decode(codes) if len(codes) else np.zeros((0, self.exact.d), np.float32)


def rerank(
    Q: np.ndarray, found: list[tuple[Reranker, np.ndarray]], m: int, dead: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` best of each query's candidates by exact distance (as FAISS reports it: inner
    product, or squared L2), as ``(distances, ids)`` ``(n, m)``: ``found`` pairs a ``Reranker`` with
    candidate ``positions`` ``(n, R_i)`` in its file (files of one template, which decode alike:
    every candidate is decoded and scored in one step). Ids in the sorted array ``dead`` are left
    out; missing results have id -1."""
    n = len(Q)
    read = [reranker.codes(positions.ravel()) for reranker, positions in found]
    r = sum(positions.shape[1] for _, positions in found)
    ok = np.hstack([part_ok.reshape(n, -1) for part_ok, _, _ in read])
    ids = np.hstack([part_ids.reshape(n, -1) for _, part_ids, _ in read])
    codes = np.concatenate([part_codes.reshape(n, -1, part_codes.shape[1]) for _, _, part_codes in read], axis=1)
    first = found[0][0]
    X = first.decode(codes.reshape(n * r, -1)).reshape(n, r, -1)
    ok &= ivf.alive(ids.ravel(), dead).reshape(n, r)
    if first.larger_is_better:
        D = np.einsum("nrd,nd->nr", X, Q)
    else:
        D = np.einsum("nrd,nrd->nr", X, X) - 2 * np.einsum("nrd,nd->nr", X, Q) + np.einsum("nd,nd->n", Q, Q)[:, None]
    worst = -np.inf if first.larger_is_better else np.inf
    D = np.where(ok, D, worst).astype(np.float32)
    ids = np.where(ok, ids, -1)
    order = np.argsort(-D if first.larger_is_better else D, axis=1, kind="stable")[:, :m]
    D, ids = np.take_along_axis(D, order, 1), np.take_along_axis(ids, order, 1)
    if r < m:
        D = np.hstack([D, np.full((n, m - r), worst, np.float32)])
        ids = np.hstack([ids, np.full((n, m - r), -1, np.int64)])
    return D, ids


def candidates_of(
    candidates: faiss.Index,
    Q: np.ndarray,
    m: int,
    params: dict[str, int] | None,
    assigned: ivf.Assignment | None = None,
    verify: ivf.Verify | None = None,
) -> np.ndarray:
    """Positions ``(n, k_factor * m)`` of the best candidates of prepared queries ``Q`` by the
    fast-scan index (``params``: ``nprobe``, ``quantizer_efSearch``, ``k_factor``) in the lists
    ``assigned`` (``ivf.assign``; else found here), each checked by ``verify`` first if given (a
    mapped candidates file)."""
    params = dict(params or {})
    k_factor = int(params.pop("k_factor", K_FACTOR))
    if k_factor < 1:
        raise InvalidParameterError(f"search parameter k_factor={k_factor} must be at least 1")
    r = min(max(m, 1) * k_factor, max(candidates.ntotal, 1))
    Q = np.ascontiguousarray(Q, np.float32)
    return ivf.search_verified(candidates, Q, r, params, None, verify or _unchecked, assigned)[1]


def reranked(
    Q: np.ndarray, found: list[tuple[Reranker, np.ndarray]], m: int, dead: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``rerank`` a block of queries at a time, so that at most ``RERANK_BATCH`` candidates are
    decoded at once."""
    step = max(1, RERANK_BATCH // max(1, sum(positions.shape[1] for _, positions in found)))
    blocks = [
        rerank(Q[i : i + step], [(reranker, positions[i : i + step]) for reranker, positions in found], m, dead)
        for i in range(0, len(Q), step)
    ]
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate([D for D, _ in blocks]), np.concatenate([ids for _, ids in blocks])


def search(
    candidates: faiss.Index,
    reranker: Reranker,
    Q: np.ndarray,
    m: int,
    params: dict[str, int] | None,
    dead: np.ndarray | None = None,
    assigned: ivf.Assignment | None = None,
    verify: ivf.Verify | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` nearest proxies of prepared queries ``Q``: their ``candidates_of`` the fast-scan
    index, re-ranked exactly (``reranked``)."""
    Q = np.ascontiguousarray(Q, np.float32)
    return reranked(Q, [(reranker, candidates_of(candidates, Q, m, params, assigned, verify))], m, dead)


def _unchecked(lists: np.ndarray | None) -> None:
    """No check: candidates in memory, or read whole and hashed at open."""

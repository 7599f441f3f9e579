"""Refined indexes (refine.py): fast-scan candidates re-ranked exactly from the stored float16 codes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from test_mapped import classes  # 2 modes a class, in both files' tests

from retrieval_imprint import ivf, listfiles, refine, segments, verified
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import CollectionDamagedError, InvalidParameterError
from retrieval_imprint.mapped import MappedProxyIndex
from retrieval_imprint.normalize import l2_normalize

NLIST = 16
FACTORY = f"IVF{NLIST},PQ8x4fs,Refine(SQfp16)"


def test_parse_splits_faiss_refine_notation_and_names_what_is_wrong(tmp_path):
    assert refine.parse("IVF4096,PQ48x4fs,Refine(SQfp16)") == ("IVF4096,SQfp16", "IVF4096,PQ48x4fs")
    assert refine.parse("IVF16384_HNSW32,PQ48x4fs,RFlat") == ("IVF16384_HNSW32,Flat", "IVF16384_HNSW32,PQ48x4fs")
    assert refine.parse("IVF64,SQ8") == ("IVF64,SQ8", None)
    with pytest.raises(InvalidParameterError, match="re-rank reads SQfp16 or Flat codes"):
        refine.parse("IVF64,PQ8x4fs,Refine(SQ8)")
    with pytest.raises(InvalidParameterError, match="a refined index is"):
        refine.parse("IVF64,PQ8,Refine(SQfp16)")  # candidates must be fast-scan codes
    col = Collection.create(
        tmp_path / "c", model=None, k=2, index="IVF64,Flat,RFlat"
    )  # checked where the lists are trained
    with pytest.raises(InvalidParameterError, match="a refined index is"):
        col.add(*classes(0, 100))


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_reranked_candidates_are_the_exact_top_m_of_the_stored_vectors(metric):
    """With every list probed and every vector a candidate, the answer is the brute-force top-m
    over the decoded float16 vectors (float64 numpy); with fewer, a subset ranked the same way."""
    X = classes(0, 400)[0]
    exact = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", metric)
    exact.train(X)
    exact.add_with_ids(X, (np.arange(len(X), dtype=np.int64) << 24) | 5)
    candidates = refine.build(exact, f"IVF{NLIST},PQ8x4fs")
    assert candidates.ntotal == exact.ntotal
    ids, W = map(np.concatenate, zip(*ivf.decoded_lists(exact)))
    Q = X[::7] + 0.3 * np.random.default_rng(1).standard_normal(X[::7].shape).astype(np.float32)
    every = {"nprobe": NLIST, "k_factor": len(X)}
    D, found = refine.search(candidates, refine.Reranker(exact), Q, 5, every)
    Q64, W64 = Q.astype(np.float64), W.astype(np.float64)
    ref = Q64 @ W64.T if metric == faiss.METRIC_INNER_PRODUCT else -((Q64[:, None] - W64[None]) ** 2).sum(-1)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(np.abs(D), np.abs(np.take_along_axis(ref, order, 1)), rtol=1e-5, atol=1e-4)
    # fewer candidates: every answer is a stored id, best first by its exact distance
    D, found = refine.search(candidates, refine.Reranker(exact), Q, 5, {"nprobe": 2, "k_factor": 2})
    assert np.isin(found, ids).all()
    assert (np.diff(D, axis=1) <= 0).all() if metric == faiss.METRIC_INNER_PRODUCT else (np.diff(D, axis=1) >= 0).all()


def test_dead_ids_and_positions_outside_their_list_are_never_answered():
    X = classes(0, 200)[0]
    exact = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    exact.train(X)
    exact.add_with_ids(X, np.arange(len(X), dtype=np.int64))
    candidates = refine.build(exact, f"IVF{NLIST},PQ8x4fs")
    Q, every = X[:20], {"nprobe": NLIST, "k_factor": len(X)}
    _, best = refine.search(candidates, refine.Reranker(exact), Q, 1, every)
    dead = np.sort(best[:, 0])
    _, again = refine.search(candidates, refine.Reranker(exact), Q, 3, every, dead)
    assert not np.isin(again, dead).any()
    reranker = refine.Reranker(exact)
    size = exact.invlists.list_size(0)
    positions = np.array([[0, size, -1, (NLIST + 3) << refine.POSITION_SHIFT]], np.int64)  # in, past, none, no list
    D, found = refine.rerank(Q[:1], [(reranker, positions)], 4)
    assert found[0, 0] >= 0 and (found[0, 1:] == -1).all() and np.isneginf(D[0, 1:]).all()


def test_ids_of_the_candidates_are_positions_in_the_exact_lists():
    X = classes(0, 100)[0]
    exact = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    exact.train(X)
    exact.add_with_ids(X, 1000 + np.arange(len(X), dtype=np.int64))
    candidates = refine.build(exact, f"IVF{NLIST},PQ8x4fs")
    positions = ivf.list_ids(candidates)
    ok, ids, _ = refine.Reranker(exact).codes(positions)
    assert ok.all()
    np.testing.assert_array_equal(np.sort(ids), 1000 + np.arange(len(X)))
    lists = faiss.extract_index_ivf(candidates).invlists
    for no in range(NLIST):  # each proxy's candidate lies in its own list, under the same quantizer
        ids_in_list = faiss.rev_swig_ptr(lists.get_ids(no), lists.list_size(no))
        assert (ids_in_list >> refine.POSITION_SHIFT == no).all()
    assert faiss.extract_index_ivf(candidates).quantizer.this == faiss.extract_index_ivf(exact).quantizer.this


@pytest.fixture
def refined(tmp_path, monkeypatch):
    """A refined collection whose proxy file is mapped and got candidates at its compaction."""
    monkeypatch.setattr(segments, "MAP_MIN", 0)
    col = Collection.create(tmp_path / "c", model=None, k=2, keep_samples=True, index=FACTORY)
    col.add(*classes(0, 300))
    col.add(*classes(300, 40))
    col.compact()
    return col


def brute_force(col: Collection, Q: np.ndarray, top: int) -> np.ndarray:
    """Labels of the ``top`` classes by best proxy over every stored (float16) proxy."""
    ids, W = map(np.concatenate, zip(*ivf.decoded_lists(col._s.proxies.parts[0].index)))
    t = col._s.table
    live = t.live("proxies", ids)
    ids, W = ids[live], W[live]
    S = l2_normalize(Q).astype(np.float64) @ W.T.astype(np.float64)
    best = np.full((len(t), len(Q)), -np.inf)
    np.maximum.at(best, t.positions(ids >> segments.CLASS_SHIFT), S.T)
    return t.labels[np.argsort(-best.T, axis=1, kind="stable")[:, :top]]


def test_a_compacted_refined_collection_answers_from_its_candidates_as_brute_force(refined, tmp_path, monkeypatch):
    s = refined._s
    assert s.files["candidates"] == [segments.candidates_of(s.files["proxies"][0])]
    assert isinstance(s.proxies, MappedProxyIndex) and len(s.proxies.parts) == 1
    part = s.proxies.parts[0]
    assert part.candidates is not None and part.candidates.ntotal == part.index.ntotal
    tuning = refined.info()["index_tuning"]
    assert tuning["recall"] >= 0.99 and tuning["k_factor"] in refine.K_FACTORS
    assert refined.search_params == {"nprobe": tuning["nprobe"], "k_factor": tuning["k_factor"]}
    Q = classes(0, 340, n=1, seed=5)[0]
    every = {"nprobe": NLIST, "k_factor": 10_000}
    np.testing.assert_array_equal(refined.query(Q, 3, search_params=every).labels, brute_force(refined, Q, 3))
    # the tuned nprobe and default k_factor find the brute-force top-1 nearly always
    assert np.mean(refined.predict(Q) == brute_force(refined, Q, 1)[:, 0]) > 0.9
    reopened = Collection.open(tmp_path / "c")
    np.testing.assert_array_equal(reopened.query(Q, 3, search_params=every).labels, brute_force(refined, Q, 3))
    # one query at a time: fewer queries than threads split the lists they probe over the threads
    one_by_one = np.concatenate([refined.query(q[None], 3, search_params=every).labels for q in Q[:40]])
    np.testing.assert_array_equal(one_by_one, brute_force(refined, Q[:40], 3))
    split = faiss.downcast_index(part.candidates).implem
    assert split == (14 if faiss.omp_get_max_threads() > 1 else 0)
    assert reopened.check().ok
    seen, real = [], refine.candidates_of  # a search's parameters override the stored ones key by key
    monkeypatch.setattr(refine, "candidates_of", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    reopened.query(Q[:1], 1, search_params={"nprobe": 3})
    assert seen[-1]["nprobe"] == 3 and seen[-1]["k_factor"] == tuning["k_factor"]


def test_removed_and_reimprinted_classes_leave_the_answers_and_a_compaction_replaces_the_candidates(refined, tmp_path):
    Q = classes(0, 340, n=1, seed=5)[0]
    every = {"nprobe": NLIST, "k_factor": 10_000}
    refined.remove(["c3", "c150"])
    refined.add(*classes(5, 1, seed=9))  # re-imprints c5: its old proxies in the mapped file are dead
    got = refined.query(Q, 3, search_params=every).labels
    assert not {"c3", "c150"} & set(got.ravel())
    reopened = Collection.open(tmp_path / "c")
    assert len(reopened._s.proxies._dead) > 0
    np.testing.assert_array_equal(reopened.query(Q, 3, search_params=every).labels, got)
    old = set(reopened._s.files["candidates"])
    reopened.compact()
    assert reopened._s.files["candidates"] and not old & set(reopened._s.files["candidates"])
    assert not old & {p.name for p in (tmp_path / "c").glob("*.faiss")}  # the replaced file was deleted
    assert reopened.check().ok
    np.testing.assert_array_equal(reopened.query(Q, 3, search_params=every).labels, got)
    reopened.tune()  # re-imprints every class into a new proxy file: its candidates come at the next compaction
    assert reopened._s.files["candidates"] == [] and reopened.check().ok


def test_damaged_candidates_or_exact_lists_never_answer(refined, tmp_path):
    path, s = tmp_path / "c", refined._s
    name = s.files["candidates"][0]
    whole = (path / name).read_bytes()
    (path / name).write_bytes(whole[:-100] + bytes(100))  # the last list: mapped, so checked when first probed
    col = Collection.open(path)
    with pytest.raises(CollectionDamagedError, match=f"{name} is damaged: inverted list"):
        col.query(classes(0, 340, n=1, seed=5)[0], 1, search_params={"nprobe": NLIST})
    assert any(name in problem for problem in Collection.verify(path).problems)
    del col
    (path / name).write_bytes(whole)
    exact = s.files["proxies"][0]
    data = bytearray((path / exact).read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the lists
    (path / exact).write_bytes(bytes(data))
    col = Collection.open(path)
    with pytest.raises(CollectionDamagedError, match=f"{exact} is damaged: inverted list"):
        col.query(classes(0, 340, n=1, seed=5)[0], 1, search_params={"nprobe": NLIST, "k_factor": 10_000})


def test_written_candidates_map_and_answer_as_the_fast_scan_index_they_were_written_from(tmp_path):
    """listfiles.write_candidates: array lists of whole 32-code blocks padded with id -1, mapped back,
    give the in-memory fast-scan index's answers (a padding entry may take a slot, never a score)."""
    X = classes(0, 300)[0]
    exact = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    exact.train(X)
    exact.add_with_ids(X, np.arange(len(X), dtype=np.int64))
    candidates = refine.build(exact, f"IVF{NLIST},PQ8x4fs")
    segment = listfiles.write_candidates(tmp_path, 3, candidates)
    with segments.open_segment(tmp_path, segment.name) as file:
        mapped = segments.map_segment(tmp_path, segment.name, file, X.shape[1], candidates.ntotal)
    lists = faiss.extract_index_ivf(mapped).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.ArrayInvertedLists)
    assert all(lists.list_size(no) % 32 == 0 for no in range(NLIST))
    verified.ListVerifier(tmp_path, segment.name, mapped, segment.lists).ensure(None)  # every list as recorded
    mapped = segments.share_quantizer(tmp_path, segment.name, mapped, exact, same=False)
    Q = X[::9] + 0.2
    for nprobe in (1, 4, NLIST):
        params = ivf.search_parameters(candidates, {"nprobe": nprobe})
        D, ids = candidates.search(Q, 20, params=params)
        Dm, Im = mapped.search(Q, 20, params=params)
        for row in range(len(Q)):
            real = Im[row] >= 0
            n = int(real.sum())
            np.testing.assert_array_equal(Im[row][real], ids[row][:n])
            np.testing.assert_array_equal(Dm[row][real], D[row][:n])


@pytest.mark.parametrize("write", ["faiss", "listfiles"])
def test_a_mapped_file_is_read_by_position_through_one_view_as_faiss_reads_it(tmp_path, write):
    """refine.ListBytes: the ids and codes at any positions of a mapped file (written by FAISS,
    or list by list) are those FAISS's own lists hold there, and the re-rank reads the same codes
    through it as list by list; an index in memory (lists apart) is read list by list."""
    X = classes(0, 300)[0]
    exact = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    exact.train(X)
    exact.add_with_ids(X, 7000 + np.arange(len(X), dtype=np.int64))
    if write == "faiss":
        name = segments.write_segment(tmp_path, "proxies", 2, exact).name
    else:
        name = listfiles.write_lists(tmp_path, 2, exact, [(exact, None)], lambda ids: ids >= 0)[0].name
    with segments.open_segment(tmp_path, name) as file:
        mapped = segments.map_segment(tmp_path, name, file, X.shape[1], exact.ntotal)
    mapped = segments.share_quantizer(tmp_path, name, mapped, exact, same=False)  # written without one
    invlists = faiss.extract_index_ivf(mapped).invlists
    sizes = np.array([invlists.list_size(no) for no in range(NLIST)], np.int64)
    lists = np.repeat(np.arange(NLIST), sizes)
    offsets = np.concatenate([np.arange(n) for n in sizes])
    pick = np.random.default_rng(0).permutation(len(lists))  # any order, lists interleaved
    ids, codes = refine.ListBytes(invlists, sizes).gather(lists[pick], offsets[pick])
    for at, (no, off) in enumerate(zip(lists[pick], offsets[pick], strict=True)):
        list_ids, list_codes = ivf.stored_list(invlists, int(no))
        assert ids[at] == list_ids[off] and (codes[at] == list_codes[off]).all()
    positions = (lists[pick] << refine.POSITION_SHIFT) + offsets[pick]
    positions[::5] = -1
    viewed = refine.Reranker(mapped, sizes=sizes, mapped=True).codes(positions)
    listed = refine.Reranker(mapped).codes(positions)
    for a, b in zip(viewed, listed, strict=True):
        np.testing.assert_array_equal(a, b)
    in_memory = faiss.extract_index_ivf(exact).invlists
    assert refine.ListBytes(in_memory, sizes).gather(lists[pick], offsets[pick]) is None


def test_candidates_of_several_files_are_reranked_together_as_brute_force_over_all():
    """refine.rerank over two files of one template (a collection's tiered files): every candidate
    of both decoded and scored in one step, the top-m of the union by exact inner product, dead ids
    left out, as float64 brute force over both files' stored vectors."""
    X = classes(0, 300)[0]
    template = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    template.train(X)
    files = []
    for part, rows in enumerate(np.array_split(np.random.default_rng(3).permutation(len(X)), 2)):
        exact = faiss.clone_index(template)
        exact.add_with_ids(X[rows], (np.int64(part + 1) << 24) + rows.astype(np.int64))
        files.append((exact, refine.build(exact, f"IVF{NLIST},PQ8x4fs")))
    Q = X[::11] + 0.3 * np.random.default_rng(1).standard_normal(X[::11].shape).astype(np.float32)
    every = {"nprobe": NLIST, "k_factor": len(X)}
    found = [(refine.Reranker(exact), refine.candidates_of(cands, Q, 4, every)) for exact, cands in files]
    ids, W = map(np.concatenate, zip(*(part for exact, _ in files for part in ivf.decoded_lists(exact))))
    dead = np.sort(ids[::17])
    D, got = refine.rerank(Q, found, 4, dead)
    live = ~np.isin(ids, dead)
    S = Q.astype(np.float64) @ W[live].T.astype(np.float64)
    order = np.argsort(-S, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(got, ids[live][order])
    np.testing.assert_allclose(D, np.take_along_axis(S, order, 1), rtol=1e-5, atol=1e-4)
    assert len(np.unique(got >> 24)) == 2  # both files answer

"""Memory-mapped opening: a large IVF proxy segment is mapped, not read, and answers as if read."""

from __future__ import annotations

import os
import pickle

import faiss
import numpy as np
import pytest

from retrieval_imprint import classrows, ivf, listfiles, segments, store, verified
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import CollectionDamagedError
from retrieval_imprint.index import ProxyIndex
from retrieval_imprint.mapped import MappedProxyIndex
from retrieval_imprint.normalize import l2_normalize

NLIST = 16


def classes(first, n_classes, n=6, d=24, seed=0):
    rng = np.random.default_rng([seed, first])
    modes = 2 * rng.standard_normal((n_classes, 2, d)).astype(np.float32)
    y = np.repeat(np.arange(first, first + n_classes), n)
    X = modes[y - first, rng.integers(0, 2, len(y))] + 0.5 * rng.standard_normal((len(y), d)).astype(np.float32)
    return X, [f"c{v}" for v in y]


def open_as(path, monkeypatch, mapped: bool) -> Collection:
    monkeypatch.setattr(segments, "MAP_MIN", 0 if mapped else 1 << 60)
    col = Collection.open(path)
    assert isinstance(col._s.proxies, MappedProxyIndex) == mapped
    return col


def grow(path, **settings):
    """An IVF collection: one big first segment, later small ones, removals from both, a re-imprint."""
    col = Collection.create(path, model=None, k=2, keep_samples=True, index=f"IVF{NLIST},Flat", **settings)
    col.add(*classes(0, 300))
    col.add(*classes(300, 40))
    col.remove(["c3", "c150", "c310"])  # in the first segment, and in a later one
    col.add(*classes(5, 1, seed=9))  # re-imprints c5 (new samples): its old proxies are dead
    col.close()
    return path


@pytest.fixture
def grown(tmp_path):
    return grow(tmp_path / "c")


def brute_force_top(read: Collection, Q: np.ndarray, top: int) -> np.ndarray:
    """Labels of the ``top`` classes by best proxy, over every proxy of a collection read into memory."""
    ids, W = map(np.concatenate, zip(*ivf.decoded_lists(read._s.proxies.index)))
    t = read._s.table
    assert np.array_equal(np.sort(ids), np.sort(t.proxy_ids(t.ids)))
    S = l2_normalize(Q) @ W.T
    best = np.full((len(t), len(Q)), -np.inf)
    np.maximum.at(best, t.positions(ids >> segments.CLASS_SHIFT), S.T)
    return t.labels[np.argsort(-best.T, axis=1, kind="stable")[:, :top]]


@pytest.mark.parametrize("aggregation", ["max", "mnn"])
def test_mapped_collection_answers_as_the_read_one_and_brute_force(tmp_path, monkeypatch, aggregation):
    grown = grow(tmp_path / "c", aggregation=aggregation)
    Q = classes(0, 340, n=1, seed=5)[0]
    full = {"nprobe": NLIST}
    read, mapped = open_as(grown, monkeypatch, False), open_as(grown, monkeypatch, True)
    assert len(mapped._s.proxies._dead) > 0  # removals and the re-imprint left dead proxies in the file
    assert mapped._s.proxies.ntotal == read._s.proxies.ntotal == int(read._s.table.n_proxies.sum())
    np.testing.assert_array_equal(np.sort(mapped._s.proxies.ids), np.sort(read._s.proxies.ids))
    for params in (None, full):
        a, b = read.query(Q, 3, search_params=params), mapped.query(Q, 3, search_params=params)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
    if aggregation == "max":
        np.testing.assert_array_equal(mapped.query(Q, 3, search_params=full).labels, brute_force_top(read, Q, 3))
    assert mapped.check().ok


def test_writes_to_a_mapped_collection_never_touch_the_mapped_file(grown, monkeypatch):
    col = open_as(grown, monkeypatch, True)
    mapped_file = max(col._s.files["proxies"], key=lambda f: (grown / f).stat().st_size)
    before = (grown / mapped_file).read_bytes()
    col.add(*classes(400, 20))
    col.add(*classes(7, 1, seed=3))  # re-imprints a class of the mapped file
    col.remove(["c8", "c405"])
    assert (grown / mapped_file).read_bytes() == before
    Q = classes(0, 420, n=1, seed=6)[0]
    full = {"nprobe": NLIST}
    answer = col.query(Q, 2, search_params=full).labels
    assert not {"c8", "c405"} & set(answer.ravel())
    np.testing.assert_array_equal(open_as(grown, monkeypatch, False).query(Q, 2, search_params=full).labels, answer)
    col.compact()  # rewrites the dead proxies away: the next open maps a file without any
    again = open_as(grown, monkeypatch, True)
    assert len(again._s.proxies._dead) == 0 and again.check().ok
    np.testing.assert_array_equal(again.query(Q, 2, search_params=full).labels, answer)


def dead_in_db(path) -> np.ndarray:
    engine = store.connect(path / segments.DB_NAME)
    with engine.connect() as conn:
        return store.dead_proxy_ids(conn)


def ids_of(classes_, proxies=(0, 1)):
    return np.sort([(c << segments.CLASS_SHIFT) + j for c in classes_ for j in proxies])


def refuse(*_):
    raise AssertionError("read at open")


def test_open_marks_the_dead_the_database_names_without_reading_mapped_ids_or_class_rows(grown, monkeypatch):
    """Removed (c3, c150, c310) and re-imprinted (c5) classes' old proxies are named by the database
    (schema 0014's triggers), so a mapped open marks them dead in O(dead): no mapped id, no class row
    read; it answers as the collection read whole and as brute force."""
    np.testing.assert_array_equal(dead_in_db(grown), ids_of([3, 5, 150, 310]))  # class ids in add order
    with monkeypatch.context() as m:
        m.setattr(MappedProxyIndex, "mapped_ids", refuse)
        m.setattr(classrows, "class_rows", refuse)
        m.setattr(classrows, "class_columns", refuse)
        mapped = open_as(grown, monkeypatch, True)
    np.testing.assert_array_equal(mapped._s.proxies._dead, ids_of([3, 5, 150, 310]))
    read = open_as(grown, monkeypatch, False)
    Q, full = classes(0, 340, n=1, seed=5)[0], {"nprobe": NLIST}
    np.testing.assert_array_equal(mapped.query(Q, 3, search_params=full).labels, brute_force_top(read, Q, 3))
    with monkeypatch.context() as m:  # a removal from the mapped file reads none of it either
        m.setattr(MappedProxyIndex, "mapped_ids", refuse)
        mapped.remove(["c8", "c320"])
    assert not {"c8", "c320"} & set(mapped.query(Q, 3, search_params=full).labels.ravel())
    np.testing.assert_array_equal(dead_in_db(grown), ids_of([3, 5, 8, 150, 310, 320]))
    assert mapped.check().ok


def test_dead_ranges_go_with_the_files_a_compaction_merges(grown, monkeypatch):
    """A tiered compaction forgets the dead ranges of the files it merged and keeps the others'; a full
    one forgets them all; an open after each trusts the database again (``dead_known``)."""
    col = open_as(grown, monkeypatch, True)
    for first in range(400, 460, 3):  # 20 small files: automatic compactions merge some of them
        col.add(*classes(first, 3))
        col.remove([f"c{first}"])
    assert len([f for f in col.info()["segments"] if f.startswith("proxies")]) < 3 + 20
    dead = dead_in_db(grown)
    assert len(dead) < len(ids_of([3, 5, 150, 310])) + 2 * 20  # some removed classes' proxies went with their files
    live = {int(i) for i in open_as(grown, monkeypatch, False)._s.proxies.ids}
    assert not set(dead.tolist()) & live
    reopened = open_as(grown, monkeypatch, True)
    assert reopened._s.dead_known()  # the files hold just the live proxies and the named dead ones
    assert set(ids_of([3, 5, 150, 310])) <= set(dead.tolist())  # the first, mapped file was not merged
    reopened.compact()
    assert len(dead_in_db(grown)) == 0 and open_as(grown, monkeypatch, True)._s.dead_known()


def test_tune_rewrites_every_proxy_and_leaves_no_dead_range(tmp_path, monkeypatch):
    path = grow(tmp_path / "c", generator="auto")
    assert len(dead_in_db(path))
    col = open_as(path, monkeypatch, True)
    col.tune()  # every class re-imprinted into one new file: each old range died, and left with the old files
    assert len(dead_in_db(path)) == 0 and open_as(path, monkeypatch, True)._s.dead_known() and col.check().ok


def test_dead_proxies_from_before_schema_0014_are_found_the_old_way(grown, monkeypatch):
    """Where the database does not name every dead proxy (they died before migration 0014), open
    checks every mapped id against the class rows, as before, until a compaction merges them away."""
    engine = store.connect(grown / segments.DB_NAME)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM dead_proxies")
    col = open_as(grown, monkeypatch, True)
    assert not col._s.dead_known()
    np.testing.assert_array_equal(col._s.proxies._dead, ids_of([3, 5, 150, 310]))
    Q, full = classes(0, 340, n=1, seed=5)[0], {"nprobe": NLIST}
    read = open_as(grown, monkeypatch, False)
    np.testing.assert_array_equal(col.query(Q, 3, search_params=full).labels, brute_force_top(read, Q, 3))
    col.compact()
    assert open_as(grown, monkeypatch, True)._s.dead_known()


def test_a_compaction_that_retrains_reads_every_live_proxy_of_the_mapped_file(grown, monkeypatch):
    Q = classes(0, 340, n=1, seed=7)[0]
    read, mapped = open_as(grown, monkeypatch, False), open_as(grown, monkeypatch, True)
    expected = read._s.proxies.retrained(read._s.config["index_factory"])[1]
    got = mapped._s.proxies.retrained(mapped._s.config["index_factory"])[1]
    np.testing.assert_array_equal(np.sort(got.ids), np.sort(expected.ids))
    top = brute_force_top(read, Q, 2)  # before the compaction: read's snapshot reads its class rows then
    mapped.compact(retrain=True)
    assert mapped.check().ok and not isinstance(mapped._s.proxies, MappedProxyIndex)
    np.testing.assert_array_equal(mapped.query(Q, 2, search_params={"nprobe": NLIST}).labels, top)


def test_a_reader_keeps_its_mapping_after_a_writer_deletes_the_file(grown, monkeypatch):
    reader = open_as(grown, monkeypatch, True)
    Q = classes(0, 340, n=1, seed=8)[0]
    before = reader.query(Q, 2).labels
    with Collection.open(grown) as writer:
        writer.compact()
    assert not set(reader._s.files["proxies"]) & {p.name for p in grown.glob("*.faiss")}  # its file is gone
    np.testing.assert_array_equal(reader.query(Q, 2).labels, before)


def test_a_damaged_mapped_file_is_refused_not_crashed_on(grown, monkeypatch):
    with Collection.open(grown) as col:
        col.compact()
        name = col._s.files["proxies"][0]
    whole = (grown / name).read_bytes()
    os.truncate(grown / name, len(whole) // 2)
    with pytest.raises(CollectionDamagedError, match=f"{name} is unreadable or truncated"):
        open_as(grown, monkeypatch, True)
    assert any(name in problem for problem in Collection.verify(grown).problems)  # the check hashes it
    (grown / name).write_bytes(whole)
    with Collection.open(grown) as col:  # a vector count that is not the one written
        with col._engine.begin() as conn:
            conn.exec_driver_sql("UPDATE segments SET n_vectors = n_vectors + 1 WHERE file = ?", (name,))
    with pytest.raises(CollectionDamagedError, match=f"{name} holds \\d+ vectors; \\d+ were written"):
        open_as(grown, monkeypatch, True)


def test_a_mapped_index_is_not_pickled_by_mistake(grown, monkeypatch):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(open_as(grown, monkeypatch, True)._s.proxies)


def test_labels_of_any_text_and_kind_survive_the_bulk_read(tmp_path):
    labels = ["a,b", 'quo"te', "tab\there", "ünï 😀", "[1, 2]", "null", "\\", " x ", "1e5"]
    X = np.random.default_rng(0).standard_normal((len(labels) * 2, 8)).astype(np.float32)
    with Collection.create(tmp_path / "s", model=None) as col:
        col.add(X, labels * 2)
        col.set_threshold(0.123456789012345678, label="a,b")
    with Collection.open(tmp_path / "s") as col:
        assert col.classes == labels
        assert col.class_table()[0]["threshold"] == 0.123456789012345678
    with Collection.create(tmp_path / "i", model=None) as col:
        col.add(X[:8], [3, -7, 2**70, -(2**65), 3, -7, 2**70, -(2**65)])  # beyond int64 too
    assert Collection.open(tmp_path / "i").classes == [3, -7, 2**70, -(2**65)]


def test_a_collection_of_mixed_label_kinds_made_before_0_2_still_reads(tmp_path):
    X = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    with Collection.create(tmp_path / "m", model=None) as col:
        col.add(X, ["a", "5", "b", "a", "5", "b"])
        with col._engine.begin() as conn:  # as 0.1 stored an int label beside str ones
            conn.exec_driver_sql("UPDATE classes SET label_kind = 'int' WHERE label = '5'")
    assert Collection.open(tmp_path / "m").classes == ["a", 5, "b"]


def compacted(grown):
    """The grown collection in one proxy file (the one mapped), and the name of that file."""
    with Collection.open(grown) as col:
        col.compact()
        return col._s.files["proxies"][0]


def test_no_byte_flip_in_the_mapped_file_gives_a_wrong_answer(grown, monkeypatch):
    """40 seeded byte flips anywhere in the mapped file: each is refused at open, refused by the
    first query that scans a damaged list, or harmless (every answer the same); ``check`` names
    the damaged list where it is one."""
    name = compacted(grown)
    Q = classes(0, 340, n=1, seed=5)[0]
    every_list = {"nprobe": NLIST}
    want = open_as(grown, monkeypatch, True).query(Q, 3, search_params=every_list)
    whole = (grown / name).read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"open": 0, "query": 0, "harmless": 0}
    for position in rng.choice(len(whole), 40, replace=False):
        damaged = bytearray(whole)
        damaged[position] ^= 1 << int(rng.integers(8))
        (grown / name).write_bytes(bytes(damaged))
        try:
            col = open_as(grown, monkeypatch, True)
        except CollectionDamagedError:
            outcomes["open"] += 1
            continue
        try:
            got = col.query(Q, 3, search_params=every_list)
        except CollectionDamagedError as exc:
            assert f"index file {name} is damaged: inverted list" in str(exc)
            problems = Collection.verify(grown).problems
            assert any(name in p and "inverted list" in p and "differ" in p for p in problems), problems
            outcomes["query"] += 1
            continue
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.scores, want.scores)
        outcomes["harmless"] += 1
    (grown / name).write_bytes(whole)
    assert outcomes["query"] >= 20, outcomes  # most of the file is list data
    assert (
        open_as(grown, monkeypatch, True).query(Q, 3, search_params=every_list).labels.tolist() == want.labels.tolist()
    )


def test_lists_are_verified_once_as_queries_first_touch_them(grown, monkeypatch):
    compacted(grown)
    col = open_as(grown, monkeypatch, True)
    verifier = col._s.proxies.parts[0].verifier
    assert not verifier.verified.any()  # opening read nothing
    col.query(classes(0, 1, n=1, seed=5)[0], 1, search_params={"nprobe": 2})
    assert verifier.verified.sum() <= 2
    col.query(classes(0, 340, n=1, seed=5)[0], 1, search_params={"nprobe": NLIST})
    assert verifier.verified.all()


def test_a_file_without_list_checksums_is_hashed_whole_before_its_first_answer(grown, monkeypatch):
    name = compacted(grown)
    with Collection.open(grown) as col, col._engine.begin() as conn:
        conn.exec_driver_sql("UPDATE segments SET lists = NULL WHERE file = ?", (name,))  # as before 0011
    whole = bytearray((grown / name).read_bytes())
    whole[len(whole) // 2] ^= 0x10
    (grown / name).write_bytes(bytes(whole))
    col = open_as(grown, monkeypatch, True)  # opens: nothing is read yet
    with pytest.raises(CollectionDamagedError, match=f"index file {name} does not match the checksum"):
        col.query(classes(0, 1, n=1, seed=5)[0], 1, search_params={"nprobe": 1})


def stored_by_id(index) -> dict[int, bytes]:
    """Every vector of an IVF index: its id -> (its list, its code bytes)."""
    out = {}
    invlists = faiss.extract_index_ivf(index).invlists
    for no in range(invlists.nlist):
        ids, codes = ivf.stored_list(invlists, no)
        out.update({int(i): (no, bytes(c)) for i, c in zip(ids, codes, strict=True)})
    return out


def test_a_streamed_merge_writes_what_faiss_would_list_by_list(tmp_path):
    """listfiles.write_lists: the live vectors of several IVF indexes, each in its list with its
    code, in a file FAISS reads and maps, whose recorded checksums are those of what it holds."""
    X = classes(0, 300)[0]
    template = faiss.index_factory(X.shape[1], f"IVF{NLIST},SQfp16", faiss.METRIC_INNER_PRODUCT)
    template.train(X)
    parts = [faiss.clone_index(template) for _ in range(3)]
    for no, part in enumerate(parts):
        part.add_with_ids(X[no::3], np.arange(len(X))[no::3].astype(np.int64))
    keep = lambda ids: ids % 5 != 0  # noqa: E731
    segment, n = listfiles.write_lists(tmp_path, 7, template, [(p, None) for p in parts], keep)
    whole = faiss.clone_index(template)
    whole.add_with_ids(X, np.arange(len(X), dtype=np.int64))
    expected = {i: v for i, v in stored_by_id(whole).items() if i % 5}
    read = faiss.read_index(str(tmp_path / segment.name))
    assert n == read.ntotal == len(expected) and stored_by_id(read) == expected
    assert verified.block_checksums(read) == segment.lists
    with open(tmp_path / segment.name, "rb") as file:
        mapped = segments.map_segment(tmp_path, segment.name, file, X.shape[1], n)
        assert segments.read_segment(tmp_path, segment.name, file, X.shape[1], segment.checksum).ntotal == n
    assert stored_by_id(mapped) == expected


def test_a_compaction_streams_the_proxies_and_refuses_a_damaged_list(grown, monkeypatch):
    """A full compaction of IVF proxies merges the files list by list (nothing read whole) and the
    writer then searches the new file mapped; a damaged list of a file it merges stops it, and the
    collection is left as it was."""
    monkeypatch.setattr(segments, "MAP_MIN", 0)
    Q = classes(0, 340, n=1, seed=5)[0]
    every = {"nprobe": NLIST}
    want = Collection.open(grown).query(Q, 3, search_params=every)
    col = open_as(grown, monkeypatch, True)
    read, real = [], segments.read_segment
    monkeypatch.setattr(segments, "read_segment", lambda *a, **k: read.append(a[1]) or real(*a, **k))
    col.compact()
    name = col._s.files["proxies"][0]
    assert not [f for f in read if f.startswith("proxies")]  # no proxy file was read into memory
    assert isinstance(col._s.proxies, MappedProxyIndex) and col._s.proxies.index.ntotal == 0
    np.testing.assert_array_equal(col.query(Q, 3, search_params=every).labels, want.labels)
    col.add(*classes(400, 10))
    data = bytearray((grown / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (grown / name).write_bytes(bytes(data))
    before = sorted(p.name for p in grown.iterdir() if p.suffix != ".lock")
    with pytest.raises(CollectionDamagedError, match=f"{name} is damaged: inverted list"):
        Collection.open(grown).compact()
    assert sorted(p.name for p in grown.iterdir() if p.suffix != ".lock") == before


def test_every_mapped_file_shares_the_templates_quantizer_and_one_coarse_search(grown, monkeypatch):
    """One quantizer in memory however many files (segments.share_quantizer), and one coarse search
    a query, whose lists every file scans (ivf.assign)."""
    col = open_as(grown, monkeypatch, True)
    parts = col._s.proxies.parts
    assert len(parts) > 1
    template = int(faiss.extract_index_ivf(col._s.template.index).quantizer.this)
    assert {int(part.quantizer.this) for part in parts} == {template}
    col.add(*classes(400, 3))  # this process's adds: in memory, searched in the lists found for the files
    in_memory = col._s.proxies.index
    assert in_memory.ntotal and int(faiss.extract_index_ivf(in_memory).quantizer.this) == template
    calls, real = [], ivf.assign
    monkeypatch.setattr(ivf, "assign", lambda *a: calls.append(1) or real(*a))
    searched_alone = []  # ProxyIndex._nearest would make a second coarse search for it
    monkeypatch.setattr(ProxyIndex, "_nearest", lambda *a: searched_alone.append(1))
    Q = classes(400, 3)[0]  # a sample of c400
    answer = col.query(Q[:1], 3, search_params={"nprobe": 4})
    assert len(calls) == 1 and not searched_alone and answer.labels[0, 0] == "c400"
    monkeypatch.undo()
    np.testing.assert_array_equal(
        answer.labels, open_as(grown, monkeypatch, False).query(Q[:1], 3, search_params={"nprobe": 4}).labels
    )


def test_a_reread_of_a_few_entries_verifies_only_their_blocks(grown, monkeypatch):
    """verified.ListVerifier.ensure_at (what a re-rank calls): the blocks holding the entries read,
    not their lists; a damaged block elsewhere in the same list is found when it is read."""
    monkeypatch.setattr(verified, "BLOCK", 8)
    name = compacted(grown)
    verifier = open_as(grown, monkeypatch, True)._s.proxies.parts[0].verifier
    assert verifier.block == 8 and len(verifier.expected) > NLIST
    no = int(np.argmax(verifier.sizes))
    assert verifier.sizes[no] > 24
    verifier.ensure_at(np.array([no, no]), np.array([0, 9]))
    assert np.flatnonzero(verifier.verified).tolist() == [verifier.first[no], verifier.first[no] + 1]
    ids, _ = ivf.stored_list(verifier.invlists, no)
    data = bytearray((grown / name).read_bytes())
    data[data.index(ids[20].tobytes())] ^= 0x01  # the id of entry 20: block 2 of the list
    (grown / name).write_bytes(bytes(data))
    verifier = open_as(grown, monkeypatch, True)._s.proxies.parts[0].verifier
    verifier.ensure_at(np.array([no, no]), np.array([3, 12]))  # blocks 0 and 1: as written
    with pytest.raises(CollectionDamagedError, match=f"{name} is damaged: inverted list {no} "):
        verifier.ensure_at(np.array([no]), np.array([20]))


def test_files_with_one_checksum_a_list_still_verify_and_recorded_blocks_must_match(grown, monkeypatch):
    """A file recorded before block checksums (one list_sum a list) is checked a list at a time; a
    file whose lists do not add up to the recorded blocks is refused at open."""
    name = compacted(grown)
    read = open_as(grown, monkeypatch, False)
    invlists = faiss.extract_index_ivf(read._s.proxies.index).invlists
    per_list = np.array([verified.list_sum(*ivf.stored_list(invlists, no)) for no in range(NLIST)], verified.DTYPE)
    with read._engine.begin() as conn:
        blocks = conn.exec_driver_sql("SELECT lists FROM segments WHERE file = ?", (name,)).scalar()
        conn.exec_driver_sql("UPDATE segments SET lists = ? WHERE file = ?", (per_list.tobytes(), name))
    col = open_as(grown, monkeypatch, True)
    assert col._s.proxies.parts[0].verifier.block is None
    Q, every = classes(0, 340, n=1, seed=5)[0], {"nprobe": NLIST}
    np.testing.assert_array_equal(
        col.query(Q, 3, search_params=every).labels, read.query(Q, 3, search_params=every).labels
    )
    assert col.check().ok
    with read._engine.begin() as conn:
        conn.exec_driver_sql("UPDATE segments SET lists = ? WHERE file = ?", (blocks[:-8], name))
    with pytest.raises(CollectionDamagedError, match="do not match the .* checksums recorded"):
        open_as(grown, monkeypatch, True)

"""Collections: persistence, incremental equivalence, queries against brute force, bad input."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import reference as ref
from conftest import blobs

from retrieval_imprint import ImprintClassifier, compaction, segments, store
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import CollectionLockedError, SchemaVersionError
from retrieval_imprint.segments import DB_NAME


def labelled(n_classes=8, n=20, d=6, seed=0, prefix="c"):
    X, y = blobs(n_classes, n, d, seed=seed)
    return X, np.array([f"{prefix}{i}" for i in y])


@pytest.fixture
def data():
    return labelled()


def make(tmp_path, name="col", **params):
    return Collection.create(tmp_path / name, model=None, **params)


def same_answers(a: Collection, b, Q, top=3):
    ra = a.query(Q, top)
    if isinstance(b, Collection):
        rb = b.query(Q, top)
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(ra.labels[:, 0], b)


def test_create_add_reopen_answers_like_the_estimator(tmp_path, data):
    X, y = data
    col = make(tmp_path, k=3)
    col.add(X, y)
    clf = ImprintClassifier(k=3).fit(X, y)
    Q, _ = labelled(seed=1)
    np.testing.assert_array_equal(col.predict(Q), clf.predict(Q))
    assert len(col) == 8 and sorted(col.classes) == sorted(set(y))
    again = Collection.open(tmp_path / "col")
    same_answers(again, col, Q)
    assert again.info()["proxies"] == 24 and again.info()["samples"] == len(X)
    assert again.check().ok


@pytest.mark.parametrize(
    "params",
    [
        dict(generator="kmeans", k=3, aggregation="max"),
        dict(generator="mean"),
        dict(generator="all", aggregation="mnn", m=5, vote="distance"),
        dict(generator="fps", k=4, metric="euclidean", aggregation="max"),
        dict(generator="kmedoids", k=3, aggregation="mnn", m=3),
        dict(generator="kmeans", k=3, aggregation="blend", alpha=0.6),
    ],
)
def test_any_sequence_of_adds_and_removes_equals_a_one_go_build(tmp_path, params):
    X, y = labelled(10, 24, 6, seed=3)
    rng = np.random.default_rng(0)
    col = make(tmp_path, "inc", **params)
    first, second = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    col.add(X[first & np.isin(y, ["c0", "c1", "c2", "c3"])], y[first & np.isin(y, ["c0", "c1", "c2", "c3"])])
    col.add(X[first & ~np.isin(y, ["c0", "c1", "c2", "c3"])], y[first & ~np.isin(y, ["c0", "c1", "c2", "c3"])])
    col.remove(["c5", "c7"])
    col.add(X[second & (y != "c5")], y[second & (y != "c5")])  # grows c0..c9 except c5; re-adds c7
    col.add(X[first & (y == "c7")], y[first & (y == "c7")])
    kept = (y != "c5") & ((y != "c7") | second) | ((y == "c7") & first)
    order = np.concatenate([np.flatnonzero(first & kept), np.flatnonzero(second & kept)])
    one_go = make(tmp_path, "one", **params)
    # the same per-class sample order: a class's first-half samples, then its second half
    for label in dict.fromkeys(y[order]):
        rows = order[y[order] == label]
        if label == "c7":
            rows = np.concatenate([np.flatnonzero(second & (y == "c7")), np.flatnonzero(first & (y == "c7"))])
        one_go.add(X[rows], y[rows])
    Q = rng.standard_normal((40, 6)).astype(np.float32) * 3
    assert sorted(col.classes) == sorted(one_go.classes)
    same_answers(col, one_go, Q)
    same_answers(Collection.open(tmp_path / "inc"), one_go, Q)
    assert col.check().ok


@pytest.mark.parametrize("aggregation,m,vote", [("max", 1, "uniform"), ("mnn", 7, "uniform"), ("mnn", 7, "distance")])
def test_top_n_classes_match_brute_force(tmp_path, data, aggregation, m, vote):
    """max: classes by best-proxy cosine; mnn: by vote share, equal shares to the nearer neighbour."""
    X, y = data
    col = make(tmp_path, k=3, aggregation=aggregation, m=m, vote=vote)
    col.add(X, y)
    Q, _ = labelled(seed=4)
    result = col.query(Q, top=4)
    clf = ImprintClassifier(k=3).fit(X, y)  # the same proxies (tested above), positional ids
    dist, sim = ref.distances(ref.l2(Q), clf.proxies_, "ip")
    for q in range(len(Q)):
        if aggregation == "max":
            best = {c: sim[q, clf.proxy_labels_ == c].max() for c in clf.classes_}
            ranked = sorted(best, key=lambda c: -best[c])[:4]
            expected = [best[c] for c in ranked]
        else:
            near = np.argsort(-sim[q], kind="stable")[:m]
            w = np.ones(m) if vote == "uniform" else 1.0 / (dist[q, near] + 1e-10)
            share, first = {}, {}
            for j, p in enumerate(near):
                c = clf.proxy_labels_[p]
                share[c] = share.get(c, 0.0) + w[j] / w.sum()
                first.setdefault(c, j)
            ranked = sorted(share, key=lambda c: (-round(share[c], 9), first[c]))[:4]
            expected = [share[c] for c in ranked]
        got = [lab for lab in result.labels[q] if lab is not None]
        assert got == ranked, q
        np.testing.assert_allclose(result.scores[q, : len(got)], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rejection", ["max", "shift"])
def test_threshold_rejects_and_is_stored(tmp_path, data, rejection):
    X, y = data
    col = make(tmp_path, k=3, rejection=rejection)
    col.add(X, y)
    Q = np.vstack([X[:3], -X[:3]])
    found = col.query(Q)
    shift = {r["label"]: r["shift"] for r in col.class_table()}
    expected = found.scores[:, 0] - (
        np.array([shift[c] for c in found.candidates[:, 0]]) if rejection == "shift" else 0
    )
    np.testing.assert_allclose(found.rejection_scores[:, 0], expected, rtol=1e-6)
    cut = float(np.median(expected))
    pred = col.predict(Q, threshold=cut)
    assert all((p is None) == (r < cut) for p, r in zip(pred, expected))
    col.set_threshold(cut)
    reopened = Collection.open(tmp_path / "col")
    assert reopened.config["threshold"] == pytest.approx(cut)
    assert [p is None for p in reopened.predict(Q)] == [r < cut for r in expected]
    assert None not in reopened.predict(Q, threshold=-np.inf).tolist()


def test_int_and_unicode_labels_round_trip(tmp_path):
    X, _y = blobs(3, 10, 4)
    col = make(tmp_path, generator="mean")
    col.add(X, [7] * 10 + [2**40] * 10 + [np.int64(-3)] * 10)
    assert Collection.open(tmp_path / "col").classes == [7, 2**40, -3]
    assert set(col.predict(X).tolist()) == {7, 2**40, -3}
    words = Collection.create(tmp_path / "words", model=None, generator="mean")
    words.add(X, ["日本語"] * 10 + ["naïve"] * 10 + ["7"] * 10)
    assert Collection.open(tmp_path / "words").classes == ["日本語", "naïve", "7"]
    assert set(words.predict(X).tolist()) == {"日本語", "naïve", "7"}


def test_automatic_compaction_keeps_answers(tmp_path, data, monkeypatch):
    X, y = data
    col = make(tmp_path, k=2)
    for label in np.unique(y):
        col.add(X[y == label], y[y == label])
    Q, _ = labelled(seed=5)
    before = col.query(Q, 3)
    monkeypatch.setattr("retrieval_imprint.collection.COMPACT_SEGMENTS", 3)
    n_files = len([f for f in col.info()["segments"] if f.startswith("proxies")])
    col.add(X[y == "c0"], y[y == "c0"])  # grows c0 and triggers a compaction
    assert len([f for f in col.info()["segments"] if f.startswith("proxies")]) < n_files
    col.remove(["c0"])
    col.compact()
    reopened = Collection.open(tmp_path / "col")
    assert reopened.check().ok and len(reopened.info()["segments"]) == 2
    keep = before.labels[:, 0] != "c0"
    np.testing.assert_array_equal(reopened.predict(Q)[keep], before.labels[keep, 0])
    assert sorted(p.name for p in (tmp_path / "col").glob("*.faiss")) == sorted(reopened.info()["segments"])


def test_tiered_merges_the_fewest_smallest_files_that_grow_enough():
    assert compaction.tiered([]) == [] and compaction.tiered([7]) == []
    assert compaction.tiered([5] * 17) == [0, 1, 2, 3]  # four equal files make one 4x as large
    assert compaction.tiered([5, 5, 5, 20, 20, 20, 20]) == list(range(7))  # 95 >= 4 x 20 takes all seven
    assert compaction.tiered([1, 1, 1, 4, 4]) == [0, 1, 2]  # no prefix reaches 4x: the one that grows most (3x)
    # merged files stay within max_merged: a 10M collection's files (bytes) after a few one-class adds
    big, tiny = [155 << 20, 155 << 20, 621 << 20, 621 << 20] + [2950 << 20] * 10, [3336, 3336, 3352, 3352]
    assert compaction.tiered(tiny + big) == [0, 1, 2, 3]  # the adds' files, not 12 GB of big ones
    assert compaction.tiered(tiny + big, 2**64) == list(range(12))  # uncapped: four 3 GB files reach the fan-in
    assert compaction.tiered([5, 5, 40, 40], 60) == [0, 1]  # 90 would pass 60
    assert compaction.tiered([50, 50], 60) == []
    # a one-class add's file beside a 10M collection's (bytes): no merge that rewrites 2.5 GB to grow it 1.00x
    assert compaction.tiered([3352, 2483331256, 2948931256]) == []
    assert compaction.tiered([3336, 3352, 2483331256]) == [0, 1]  # the adds' files merge among themselves
    assert compaction.tiered([1, 3, 10]) == []  # no prefix grows its largest 1.5x (4 / 3, 14 / 10)


def test_files_past_the_merge_cap_are_left_to_a_full_compaction(tmp_path, monkeypatch):
    """Every file past MAX_MERGED: an add's automatic compaction merges nothing and writes no
    version; compact() still merges them all."""
    monkeypatch.setattr("retrieval_imprint.collection.COMPACT_SEGMENTS", 2)
    monkeypatch.setattr(compaction.tiered, "__defaults__", (1,))
    X, y = blobs(4, 4, 8, seed=2)
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    for label in range(4):
        col.add(X[y == label], y[y == label])
    assert len(col.snapshot.files["proxies"]) == 4 and col.snapshot.version == 4
    before = col.predict(X)
    col.compact()
    assert len(col.snapshot.files["proxies"]) == 1
    np.testing.assert_array_equal(col.predict(X), before)


def test_automatic_compaction_rewrites_each_vector_a_logarithmic_number_of_times(tmp_path, monkeypatch):
    """A stream of small adds: size-tiered merges keep the files few and rewrite each vector a few
    times (2.5 in a model of this stream), where merging all but the largest file rewrote the
    growing rest at every compaction (5.8 times the collection here, and growing with it)."""
    monkeypatch.setattr("retrieval_imprint.collection.COMPACT_SEGMENTS", 8)
    merged, compact = [], compaction.compact

    def counted(directory, engine, s, **options):
        before = {f: (directory / f).stat().st_size for f in s.files["proxies"]}
        compact(directory, engine, s, **options)
        merged.append(sum(size for f, size in before.items() if f not in s.files["proxies"]))

    monkeypatch.setattr(compaction, "compact", counted)
    X, y = blobs(150, 4, 256, seed=11)
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    for label in range(150):
        col.add(X[y == label], y[y == label])
        assert len(col._s.files["proxies"]) <= 9
    total = sum((tmp_path / "c" / f).stat().st_size for f in col._s.files["proxies"])
    assert len(merged) >= 20 and sum(merged) <= 3.5 * total, (len(merged), sum(merged) / total)
    np.testing.assert_array_equal(col.predict(X), y)
    assert Collection.open(tmp_path / "c").check().ok


# ------------------------------------------------------------------ bad input loses nothing
@pytest.fixture
def filled(tmp_path, data):
    X, y = data
    col = Collection.create(tmp_path / "col", model="all-MiniLM-L6-v2", k=3)
    col.add(X, y)
    Q, _ = labelled(seed=6)
    return col, Q, col.query(Q, 3)


def still_answers(col, Q, before):
    for c in (col, Collection.open(col.path)):
        np.testing.assert_array_equal(c.query(Q, 3).labels, before.labels)
        assert c.check().ok


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c, Q: c.add(Q[:, :4], ["c0"] * len(Q)), ValueError, "X has dimension 4, but this collection holds 6-d"),
        (lambda c, Q: c.query(Q[:, :5]), ValueError, "Q has dimension 5"),
        (
            lambda c, Q: c.add(Q, ["c0"] * len(Q), model="other-model"),
            ValueError,
            "embedded with 'other-model', but this collection uses 'all-MiniLM-L6-v2'",
        ),
        (lambda c, Q: c.query(Q, model="other-model"), ValueError, "embedded with 'other-model'"),
        (
            lambda c, Q: c.add(np.where(np.arange(Q.size).reshape(Q.shape) == 13, np.nan, Q), ["c1"] * len(Q)),
            ValueError,
            "X row 2 holds NaN or infinity",
        ),
        (lambda c, Q: c.query(np.full((2, 6), np.inf)), ValueError, "Q row 0 holds NaN or infinity"),
        (lambda c, Q: c.add(np.zeros((0, 6)), []), ValueError, "X is empty"),
        (lambda c, Q: c.query(np.zeros((0, 6))), ValueError, "Q is empty"),
        (lambda c, Q: c.add(Q[:2], ["ok", 1.5]), ValueError, "label at row 1 is float 1.5: labels must be str or int"),
        (lambda c, Q: c.add(Q[:2], ["ok", None]), ValueError, "label at row 1 is NoneType"),
        (lambda c, Q: c.add(Q[:2], ["ok", True]), ValueError, "label at row 1 is bool"),
        (lambda c, Q: c.add(Q[:2], ["ok", "  "]), ValueError, "label at row 1 is blank"),
        (lambda c, Q: c.add(Q[:3], ["a", "b"]), ValueError, "X has 3 rows but labels has 2"),
        (lambda c, Q: c.remove(["c1", "nope"]), ValueError, "no class 'nope' in collection"),
        (lambda c, Q: c.query(Q, top=0), ValueError, "top=0 is not valid"),
        (lambda c, Q: c.add(np.zeros((1, 6)), ["z"]), ValueError, "row 0 is a zero vector"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(filled, call, error, match):
    col, Q, before = filled
    with pytest.raises(error, match=match):
        call(col, Q)
    still_answers(col, Q, before)


def test_adding_to_a_class_without_kept_samples_says_why(tmp_path, data):
    X, y = data
    col = make(tmp_path, k=3, keep_samples=False)
    col.add(X, y)
    with pytest.raises(ValueError, match="keeps no samples.*keep_samples=True"):
        col.add(X[:2], y[:2])
    assert col.check().ok and len(col) == 8


def test_a_failed_write_leaves_the_previous_state(filled, monkeypatch):
    col, Q, before = filled
    real = segments.write_segment

    def fail_on_samples(directory, kind, version, index):
        if kind == "samples":
            raise OSError("disk full")
        return real(directory, kind, version, index)

    monkeypatch.setattr(segments, "write_segment", fail_on_samples)
    X, y = labelled(2, 5, 6, seed=9, prefix="new")
    with pytest.raises(OSError, match="disk full"):
        col.add(X, y)
    monkeypatch.undo()
    assert "new0" not in col.classes
    still_answers(col, Q, before)
    col.add(X, y)  # the orphan segment file is cleaned up and the write goes through
    assert col.check().ok and "new0" in col.classes


def test_not_a_collection(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a collection \\(no imprint.db"):
        Collection.open(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no collection at"):
        Collection.open(tmp_path / "absent")
    with pytest.raises(FileExistsError, match="already exists and is not an empty directory"):
        Collection.create(tmp_path / "plain")
    with pytest.raises(ValueError, match="generator='kls' needs every class at once"):
        Collection.create(tmp_path / "ls", generator="kls")
    with pytest.raises(ValueError, match="k=0 is not valid"):
        Collection.create(tmp_path / "k0", k=0)
    assert not (tmp_path / "ls").exists() and not (tmp_path / "k0").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_index_file_is_named(filled, damage):
    col, _, _ = filled
    name = col.info()["segments"][0]
    file = col.path / name
    if damage == "missing":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[:100])
    with pytest.raises((FileNotFoundError, ValueError), match=name):
        Collection.open(col.path)
    with pytest.raises((FileNotFoundError, ValueError), match=name):
        Collection(col.path, col._engine)


def test_a_newer_schema_is_refused(filled):
    col, _, _ = filled
    with sqlite3.connect(col.path / DB_NAME) as db:
        db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(SchemaVersionError, match="schema revision f00d, newer than this retrieval-imprint"):
        Collection.open(col.path)


def test_a_second_writer_is_told_who_holds_the_lock(filled):
    col, Q, before = filled
    other = Collection.open(col.path)
    import os

    with col.writing():
        with pytest.raises(CollectionLockedError, match=f"locked by pid {os.getpid()}"):
            other.add(Q[:1], ["x"])
    still_answers(col, Q, before)


def test_check_reports_a_database_that_disagrees_with_the_index(filled):
    """A class range naming a proxy no file holds (the triggers keep the live count in step)."""
    col, _, _ = filled
    assert col.check().ok
    with sqlite3.connect(col.path / DB_NAME) as db:
        db.execute("UPDATE classes SET proxy_hi = proxy_hi + 1 WHERE id = (SELECT MIN(id) FROM classes)")
    report = col.check()
    assert not report.ok
    assert any("the index files hold 24 live vectors and the classes' ranges name 25" in p for p in report.problems)


@pytest.mark.parametrize("rejection", ["max", "shift"])
def test_an_opened_collection_answers_from_its_classes_rows_alone(tmp_path, rejection):
    """Opening and querying read only the rows of the classes an answer names (the whole class table
    is 1.2 GB at ten million classes), and answer as the writer, which holds the whole table, does:
    labels, scores, per-class thresholds and shifts, after adds, a re-imprint, a removal and a
    single-sample class (whose shift is the median of all, under rule shift)."""
    X, y = labelled(12, 10, 6, seed=4)
    labels = np.where(y == "c3", 'çà, "3"', y)  # a label that is no identifier
    col = make(tmp_path, k=2, rejection=rejection)
    col.add(X[: len(X) // 2], labels[: len(X) // 2])
    col.add(X[len(X) // 2 :], labels[len(X) // 2 :])  # grows some classes: re-imprinted
    col.remove(["c5"])
    col.add(X[:1] + 5, ["lonely"])
    col.set_threshold(0.5, label="c1")
    col.set_threshold(0.1)
    writer = col.snapshot.table  # the writer holds the whole table
    Q = np.vstack([X[::7], X[:1] + 5, -X[:3]])
    reader = Collection.open(tmp_path / "col")
    got, want = reader.query(Q, 3), col.query(Q, 3)
    for field in ("labels", "candidates", "scores", "rejection_scores", "thresholds"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert len(reader) == len(writer) == 12
    if rejection == "max":  # no class without a shift was asked about
        assert reader.snapshot.loaded_table is None
    with reader.engine.connect() as conn:  # the count open trusts, kept by the database's triggers
        assert store.live_proxies(conn) == int(writer.n_proxies.sum()) and store.n_classes(conn) == len(writer)
    assert reader.check().ok
    with reader.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE collection SET live_proxies = live_proxies + 1")
    live = int(writer.n_proxies.sum())
    assert f"counts {live + 1} live proxies, the classes table {live}" in " ".join(reader.check().problems)


def test_a_reader_answers_from_its_version_until_a_write_changes_a_class_it_names(tmp_path):
    """Class rows carry the version that last wrote them: a reader keeps answering from the version
    it holds while other writes leave its answer's classes alone, and answers from the version now
    committed once one of them has changed (never from a row newer than its version)."""
    X, y = labelled(6, 10, 6, seed=5)
    writer = make(tmp_path, k=2)
    writer.add(X, y)
    reader = Collection.open(tmp_path / "col")
    held, Q = reader.snapshot, X[y == "c1"][:2]
    before = reader.query(Q)
    writer.add(X[:3] + 9, ["new"] * 3)  # a class the reader's answer does not name
    writer.set_threshold(0.2, label="c4")
    np.testing.assert_array_equal(reader.query(Q).labels, before.labels)
    assert reader.snapshot is held and len(reader) == 6  # its own version's count, no refresh
    writer.remove(["c1"])  # the class it answers is gone since
    after = reader.query(Q)
    assert "c1" not in after.labels.tolist() and reader.snapshot is not held
    np.testing.assert_array_equal(after.labels, Collection.open(tmp_path / "col").query(Q).labels)

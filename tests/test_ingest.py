"""Ingestion from Python: open or create, chunks, resume after an interruption, no stub on failure."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs

from retrieval_imprint import Collection, ingest, segments
from retrieval_imprint.errors import InvalidParameterError, SettingsClashError
from retrieval_imprint.ingestion import chunks, fingerprint, training_sample
from retrieval_imprint.readers import Dataset


def grouped_data(tmp_path, n_classes=12, n=10):
    X, y = blobs(n_classes, n, 6, seed=4)
    np.savez(tmp_path / "v.npz", X=X, y=np.array([f"c{v}" for v in y]))
    return tmp_path / "v.npz", X


@pytest.mark.parametrize("source", ["file", "memory"])
def test_an_interrupted_ingestion_resumes_from_python(tmp_path, monkeypatch, source):
    path, X = grouped_data(tmp_path)
    labels = [f"c{v}" for v in np.repeat(np.arange(12), 10)]
    data = path if source == "file" else Dataset("batch-1", vectors=X, labels=labels)
    commits = []

    def power_cut(name):  # the third chunk is written but never committed
        commits.append(name)
        if commits.count("add: segments written") == 3:
            raise OSError("power cut")

    monkeypatch.setattr(segments, "crash_point", power_cut)
    with pytest.raises(OSError, match="power cut"):
        ingest(tmp_path / "c", [data], chunk_size=25, model=None, k=3)
    monkeypatch.undo()
    partial = Collection.open(tmp_path / "c")
    assert len(partial) == 4 and partial.check().ok  # two chunks, cut between classes of 10 rows
    report = ingest(tmp_path / "c", [data], chunk_size=25, model=None, k=3)
    assert (report.resumed_after, report.rows, report.new_classes, report.classes) == (40, 80, 8, 12)
    one_go = ingest(tmp_path / "one", [data], model=None, k=3)
    assert one_go.rows == 120 and one_go.resumed_after == 0
    np.testing.assert_array_equal(
        Collection.open(tmp_path / "c").predict(X), Collection.open(tmp_path / "one").predict(X)
    )


def test_a_first_ingestion_that_fails_leaves_no_collection(tmp_path):
    path, _ = grouped_data(tmp_path, n_classes=3)
    with pytest.raises(InvalidParameterError, match="needs at least 1024 proxies"):
        ingest(tmp_path / "c", [path], model=None, index="IVF1024,Flat")
    assert not (tmp_path / "c").exists()
    report = ingest(tmp_path / "c", [path], model=None, k=2)  # the corrected run starts afresh
    assert report.classes == 3


def topic_sources(tmp_path, n_topics=5, per_topic=100, n=6, d=32):
    """Classes grouped in topics, so lists trained on one topic fit the others poorly: topic 0's in
    one source file, the others' in a second."""
    rng = np.random.default_rng(0)
    centre = rng.standard_normal((n_topics, 1, 1, d)) + rng.standard_normal((n_topics, per_topic, 2, d))
    modes = centre.reshape(-1, 2, d).astype(np.float32)
    y = np.repeat(np.arange(len(modes)), n)
    X = modes[y, rng.integers(0, 2, len(y))] + 0.3 * rng.standard_normal((len(y), d)).astype(np.float32)
    first = y < per_topic
    np.savez(tmp_path / "a.npz", X=X[first], y=y[first])
    np.savez(tmp_path / "b.npz", X=X[~first], y=y[~first])
    return [tmp_path / "a.npz", tmp_path / "b.npz"], X, y


def test_a_chunked_ingestion_trains_its_lists_on_classes_of_every_source(tmp_path):
    """A new IVF collection filled chunk by chunk trains its lists first on whole classes drawn
    across both sources (``training_sample``), not on the first chunk (topic 0 alone): better
    recall at one probed list than lists trained on that chunk, with no retrain at the end."""
    sources, X, y = topic_sources(tmp_path)
    ivf = dict(model=None, k=3, keep_samples=False, index="IVF32,Flat", search_params={"nprobe": 1})
    report = ingest(tmp_path / "c", sources, chunk_size=1200, **ivf)
    col = Collection.open(tmp_path / "c")
    assert not report.retrained and col.info()["trained_on"] == 600  # 200 classes' proxies; 1,500 in all
    assert [f for f in col.info()["segments"] if f.startswith("template")] == ["template-00000001.faiss"]
    first_chunk = Collection.create(tmp_path / "first", **ivf)  # the lists trained on the first chunk
    first_chunk.add(X[y < 100], y[y < 100])
    first_chunk.add(X[y >= 100], y[y >= 100])
    exact = Collection.create(tmp_path / "exact", model=None, k=3, keep_samples=False)
    exact.add(X, y)
    Q = X[::4] + 0.1 * np.random.default_rng(1).standard_normal(X[::4].shape).astype(np.float32)
    truth = exact.predict(Q)
    assert np.mean(col.predict(Q) == truth) > np.mean(first_chunk.predict(Q) == truth) + 0.03
    assert sorted(col.classes) == sorted(exact.classes) and col.check().ok


def test_the_training_sample_is_whole_classes_drawn_from_every_source_in_any_order(tmp_path):
    _, X, y = topic_sources(tmp_path)
    parts = [Dataset(f"s{i}", vectors=X[y % 2 == i], labels=y[y % 2 == i].tolist()) for i in (0, 1)]
    todo = [(ds, f"s{i}", 0) for i, ds in enumerate(parts)]
    sample, n_classes = training_sample(todo, 300, seed=0)
    labels = [v for part in sample for v in part.labels]
    counts = np.bincount(labels, minlength=500)
    assert n_classes == 500 and len(labels) <= 300 and set(counts[counts > 0]) == {6}  # whole classes
    assert {v % 2 for v in labels} == {0, 1} and len({v // 100 for v in labels}) > 1  # from both, many topics
    backwards = [(ds, s, 0) for ds, s, _ in todo[::-1]]
    assert sorted(v for part in training_sample(backwards, 300, seed=0)[0] for v in part.labels) == sorted(labels)
    assert sorted(v for part in training_sample(todo, 300, seed=1)[0] for v in part.labels) != sorted(labels)


def test_an_ingestion_into_an_existing_collection_checks_its_settings(tmp_path):
    path, _ = grouped_data(tmp_path, n_classes=3)
    ingest(tmp_path / "c", [path], model=None, k=2)
    with pytest.raises(SettingsClashError, match=r"k=5 \(collection: 2\)"):
        ingest(tmp_path / "c", [path], k=5)
    with pytest.raises(InvalidParameterError, match="chunk_size=0 is not valid"):
        ingest(tmp_path / "c", [path], chunk_size=0)
    assert Collection.open(tmp_path / "c").info()["samples"] == 30  # nothing was added by the failures


def test_chunks_cut_between_classes_when_they_can():
    labels = list("aaabbbbcc")
    assert list(chunks(labels, 0, 4)) == [(0, 3), (3, 7), (7, 9)]
    assert list(chunks(labels, 3, 2)) == [(3, 5), (5, 7), (7, 9)]  # a class larger than a chunk is split
    assert list(chunks(list("abcd"), 0, 10)) == [(0, 4)]


def test_fingerprints_change_with_the_data():
    X = np.ones((3, 2), np.float32)
    a = fingerprint(Dataset("m", vectors=X, labels=["x", "y", "z"]))
    assert a == fingerprint(Dataset("m", vectors=X.copy(), labels=["x", "y", "z"]))
    assert a != fingerprint(Dataset("m", vectors=X * 2, labels=["x", "y", "z"]))
    assert a != fingerprint(Dataset("m", vectors=X, labels=["x", "y", "q"]))


@pytest.mark.parametrize("chunk_size", [1000, 25])
def test_the_same_rows_are_not_ingested_twice_unless_asked(tmp_path, chunk_size):
    path, _X = grouped_data(tmp_path)
    ingest(tmp_path / "c", [path], chunk_size=chunk_size, model=None, k=2)
    np.savez(tmp_path / "renamed.npz", **np.load(path))  # the same rows under another name
    again = ingest(tmp_path / "c", [tmp_path / "renamed.npz"], chunk_size=chunk_size)
    assert again.skipped == (str(tmp_path / "renamed.npz"),) and again.rows == 0 and not again.created
    assert Collection.open(tmp_path / "c").info()["samples"] == 120
    forced = ingest(tmp_path / "c", [path], chunk_size=chunk_size, again=True)
    assert forced.rows == 120 and forced.skipped == ()
    assert Collection.open(tmp_path / "c").info()["samples"] == 240


def test_upsert_replaces_the_samples_of_existing_classes(tmp_path):
    """An upserted class answers exactly as in a collection built with its new samples from the start."""
    X, y = blobs(4, 10, 6, seed=2)
    labels = [f"c{v}" for v in y]
    fresh_X = X[y == 1] + 3.0
    col = Collection.create(tmp_path / "c", model=None, generator="kmeans", k=2, aggregation="max")
    col.add(X, labels)
    new_rows = Dataset(
        "new", vectors=np.concatenate([fresh_X, X[y == 0][:3] * 0.5 + 1]), labels=["c1"] * 10 + ["c9"] * 3
    )
    report = ingest(tmp_path / "c", [new_rows], upsert=True)
    assert report.new_classes == 1 and report.classes == 5
    reference = Collection.create(tmp_path / "ref", model=None, generator="kmeans", k=2, aggregation="max")
    keep = y != 1
    reference.add(
        np.concatenate([X[keep], new_rows.vectors]), [label for label, k in zip(labels, keep) if k] + new_rows.labels
    )
    Q = np.random.default_rng(5).standard_normal((200, 6)).astype(np.float32) * 3
    got, want = Collection.open(tmp_path / "c").query(Q, 3), reference.query(Q, 3)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores.astype(float), want.scores.astype(float), atol=1e-6)
    table = {r["label"]: r["samples"] for r in Collection.open(tmp_path / "c").class_table()}
    assert table == {"c0": 10, "c2": 10, "c3": 10, "c1": 10, "c9": 3}
    assert Collection.open(tmp_path / "c").check().ok


def test_a_chunked_upsert_replaces_each_class_once(tmp_path):
    X, y = blobs(3, 10, 6, seed=3)
    labels = [f"c{v}" for v in y]
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    col.add(X, labels)
    interleaved = Dataset("new", vectors=np.tile(X[:4], (5, 1)), labels=["c0", "c1"] * 10)  # c0 in every chunk
    ingest(tmp_path / "c", [interleaved], chunk_size=6, upsert=True)
    table = {r["label"]: r["samples"] for r in Collection.open(tmp_path / "c").class_table()}
    assert table == {"c2": 10, "c0": 10, "c1": 10}  # every new row kept, the old ones of c0 and c1 gone


def test_vectors_beyond_the_held_bytes_wait_in_an_unlinked_file(tmp_path, monkeypatch):
    """Many large files: every one is still checked before the first write, but past HELD_BYTES
    their vectors wait memory-mapped on disk instead of in RAM; the collection is the same, and
    no temporary file is left beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval_imprint import ingestion

    X, y = blobs(9, 12, 6, seed=7)
    files = []
    for i in range(3):  # three files of three classes
        rows = slice(36 * i, 36 * (i + 1))
        files.append(tmp_path / f"part{i}.parquet")
        pq.write_table(pa.table({"label": [f"c{v}" for v in y[rows]], "vector": X[rows].tolist()}), files[-1])
    held = ingest(tmp_path / "held", files, model=None, k=3)
    spilled = []
    real_spill = ingestion._spill
    monkeypatch.setattr(ingestion, "HELD_BYTES", 0)
    monkeypatch.setattr(ingestion, "_spill", lambda X, beside: spilled.append(beside) or real_spill(X, beside))
    report = ingest(tmp_path / "spilled", files, model=None, k=3, chunk_size=40)
    assert spilled == [tmp_path] * 3 and report.rows == len(X) == held.rows
    assert not list(tmp_path.glob(".imprint-spill-*"))
    np.testing.assert_array_equal(
        Collection.open(tmp_path / "spilled").predict(X), Collection.open(tmp_path / "held").predict(X)
    )
    assert ingestion._spill(X, tmp_path / "absent").shape == X.shape  # no such folder: the temp folder

"""Ingestion from Python: open or create, chunks, resume after an interruption, no stub on failure."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import blobs
from retrieval_imprint import Collection, ingest, segments
from retrieval_imprint.errors import InvalidParameterError, SettingsClashError
from retrieval_imprint.ingest import chunks, fingerprint
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
    np.testing.assert_array_equal(Collection.open(tmp_path / "c").predict(X), Collection.open(tmp_path / "one").predict(X))


def test_a_first_ingestion_that_fails_leaves_no_collection(tmp_path):
    path, _ = grouped_data(tmp_path, n_classes=3)
    with pytest.raises(InvalidParameterError, match="needs at least 1024 proxies"):
        ingest(tmp_path / "c", [path], model=None, index="IVF1024,Flat")
    assert not (tmp_path / "c").exists()
    report = ingest(tmp_path / "c", [path], model=None, k=2)  # the corrected run starts afresh
    assert report.classes == 3


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

"""Provenance: a collection keeps the texts (and row ids) its samples came from, shows a class's
examples, the examples behind an answer, and exports itself to Parquet that indexes back equal."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO, blobs

from retrieval_imprint import Collection, Embedder, ingest
from retrieval_imprint.cli import main
from retrieval_imprint.errors import CollectionStateError, DataError
from retrieval_imprint.readers import Dataset, read
from retrieval_imprint.sharded import open_any

TRAIN = DEMO / "demo_train.csv"


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def texts_collection(tmp_path_factory):
    ds = read(TRAIN)
    path = tmp_path_factory.mktemp("prov") / "c"
    col = Collection.create(path, generator="kmeans", k=2, aggregation="max")
    col.add_texts(ds.texts, ds.labels, refs=[f"r{i}" for i in range(len(ds))])
    return path, ds


def test_a_class_shows_its_examples_in_order(texts_collection):
    path, ds = texts_collection
    got = Collection.open(path).examples("lost_card")
    want = [(t, f"r{i}") for i, (t, y) in enumerate(zip(ds.texts, ds.labels)) if y == "lost_card"]
    assert [(r["text"], r["ref"]) for r in got] == want and [r["sample"] for r in got] == list(range(len(want)))
    with pytest.raises(DataError, match="no class 'nope'"):
        Collection.open(path).examples("nope")


def test_explain_returns_the_nearest_examples_of_the_answer(texts_collection):
    """Against a brute-force reference: L2-normalised embeddings, inner product, within the answer's class."""
    path, ds = texts_collection
    col = Collection.open(path)
    queries = ["I lost my card on the bus", "turn the music up", "how much money do I have"]
    Q = Embedder().encode(queries)
    got = col.explain(Q, 3)
    X = Embedder().encode(ds.texts)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    for i, label in enumerate(col.predict(Q)):
        rows = [j for j, y in enumerate(ds.labels) if y == label]
        sims = X[rows] @ q[i]
        order = np.argsort(-sims, kind="stable")[:3]
        assert [r["text"] for r in got[i]] == [ds.texts[rows[j]] for j in order]
        np.testing.assert_allclose([r["score"] for r in got[i]], sims[order], atol=1e-5)


def test_removing_or_replacing_a_class_drops_its_texts(tmp_path):
    ds = read(TRAIN)
    col = Collection.create(tmp_path / "c", generator="mean")
    col.add_texts(ds.texts, ds.labels)
    col.remove(["lost_card"])
    col.add_texts(["where did my card go"], ["set_alarm"], replace=True)
    with sqlite3.connect(tmp_path / "c" / "imprint.db") as db:
        kept = db.execute("SELECT COUNT(*) FROM texts").fetchone()[0]
    assert kept == len(ds) - 24 + 1  # two classes of 12 gone, one text back
    assert [r["text"] for r in Collection.open(tmp_path / "c").examples("set_alarm")] == ["where did my card go"]


def test_export_and_index_make_an_equal_collection(texts_collection, tmp_path):
    path, _ = texts_collection
    original = Collection.open(path)
    assert original.export(tmp_path / "out.parquet") == 96
    report = ingest(tmp_path / "again", [tmp_path / "out.parquet"])  # settings and model from the file
    again = Collection.open(tmp_path / "again")
    assert report.classes == 8 and again.config == original.config and again.model == original.model
    Q = np.random.default_rng(0).standard_normal((100, 384)).astype(np.float32)
    a, b = original.query(Q, 3), again.query(Q, 3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores.astype(float), b.scores.astype(float), atol=1e-6)
    assert again.examples("lost_card") == original.examples("lost_card")


def test_vectors_of_unknown_or_other_models_are_refused_for_a_text_collection(texts_collection, tmp_path):
    path, _ = texts_collection
    X = np.random.default_rng(1).standard_normal((4, 384)).astype(np.float32)
    with pytest.raises(DataError, match="vectors of unknown origin"):
        ingest(path, [Dataset("random", vectors=X, labels=["a"] * 4)])
    with pytest.raises(DataError, match="made by 'other/model'"):
        ingest(path, [Dataset("random", vectors=X, labels=["a"] * 4, model="other/model")])
    assert "a" not in Collection.open(path).classes


def test_a_collection_without_samples_has_no_examples(tmp_path):
    X, y = blobs(2, 5, 4)
    col = Collection.create(tmp_path / "c", model=None, generator="mean", keep_samples=False)
    col.add(X, y)
    with pytest.raises(CollectionStateError, match="keeps no samples"):
        col.examples(0)


def test_the_command_line_shows_examples_and_evidence_and_round_trips(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text(
        "id,text,label\n"
        + "".join(
            f"q{i},{t},{y}\n" for i, (t, y) in enumerate(zip(read(TRAIN).texts, read(TRAIN).labels)) if "," not in t
        )
    )
    run("index", str(tmp_path / "c"), str(csv), "--id-column", "id", "--k", "2", "--quiet")
    rows = json.loads(run("examples", str(tmp_path / "c"), "lost_card", "--limit", "2", "--json").output)
    assert len(rows) == 2 and all(r["ref"].startswith("q") and r["text"] for r in rows)
    out = json.loads(run("query", str(tmp_path / "c"), "I lost my card", "--explain", "2", "--json").output)
    assert out[0]["labels"] == ["lost_card"] and len(out[0]["examples"]) == 2
    assert out[0]["examples"][0]["score"] >= out[0]["examples"][1]["score"]
    lines = run("query", str(tmp_path / "c"), "I lost my card", "--top", "3", "--explain", "2").output.splitlines()
    assert lines[1].endswith("lost_card") and all(line.startswith("      ") for line in lines[2:4])
    assert not lines[4].startswith("      ") and not lines[5].startswith("      ")  # the examples sit under the answer
    run("export", str(tmp_path / "c"), str(tmp_path / "c.parquet"))
    run("index", str(tmp_path / "d"), str(tmp_path / "c.parquet"), "--quiet")
    assert json.loads(run("classes", str(tmp_path / "d"), "--json").output) == json.loads(
        run("classes", str(tmp_path / "c"), "--json").output
    )


@pytest.mark.parametrize("shards", [1, 2])
def test_an_export_indexed_again_answers_exactly_as_the_original(tmp_path, shards):
    """The threshold and rule calibration chose, each class's shift and own threshold, what auto
    chose, the search parameters: all travel in the export, so `query --json` is the same."""
    test = read(DEMO / "demo_test.csv")
    original = tmp_path / "original"
    run(
        "index",
        str(original),
        str(TRAIN),
        "--quiet",
        "--shards",
        str(shards),
        *(["--index", "IVF2,Flat"] if shards == 1 else []),
    )
    col = open_any(original)
    if shards == 1:
        col.set_search_params(nprobe=1)  # one of two lists: approximate answers, the same in the copy
    X = col.embedder().encode(test.texts)
    col.calibrate(X, test.labels, rule="shift", target_accuracy=0.5)
    col.set_threshold(0.05, label="play_music")
    run("export", str(original), str(tmp_path / "c.parquet"))
    run("index", str(tmp_path / "again"), str(tmp_path / "c.parquet"), "--quiet")
    queries = [
        "my card never showed up",
        "play some jazz",
        "what is the meaning of life",
        "book me a flight",
        "is it going to rain tomorrow in paris",
    ]
    answers = [
        json.loads(run("query", str(path), *queries, "--top", "3", "--json").output)
        for path in (original, tmp_path / "again")
    ]
    assert answers[0] == answers[1]
    assert any(r["rejected"][0] for r in answers[0]) and any(not r["rejected"][0] for r in answers[0])
    info = [json.loads(run("info", str(path), "--json").output) for path in (original, tmp_path / "again")]
    for key in ("threshold", "rejection", "search_params", "generator", "k", "aggregation", "index_factory"):
        assert info[0]["config"][key] == info[1]["config"][key], key
    assert info[0]["auto_choice"] == info[1]["auto_choice"] and info[0]["classes"] == info[1]["classes"]

"""Sharded collections: answers equal one collection's and a numpy brute force for every
aggregation, with ties and empty shards; writes, checks, ingestion and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import reference as ref
from click.testing import CliRunner
from conftest import DEMO, blobs

from retrieval_imprint.cli import main
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import CollectionStateError, DataError, SettingsClashError
from retrieval_imprint.ingestion import ingest
from retrieval_imprint.sharded import ShardedCollection
from retrieval_imprint.shards import MANIFEST, is_sharded, shard_name, shard_of

AGGREGATIONS = {
    "max": dict(generator="all", aggregation="max"),
    "mnn": dict(generator="all", aggregation="mnn", m=5),
    "mnn-distance": dict(generator="all", aggregation="mnn", m=6, vote="distance"),
    "blend": dict(generator="all", aggregation="blend", alpha=0.6),
}
TOL = 1e-5


def twin_label(labels, shards=(2, 3)):
    """A label in another shard than ``labels[0]`` for every shard count in ``shards``."""
    j = 0
    while any(shard_of([f"twin{j}"], s)[0] == shard_of([labels[0]], s)[0] for s in shards):
        j += 1
    return f"twin{j}"


@pytest.fixture(scope="module")
def data():
    """12 classes, and a twin of the first class (the same samples) in another shard: its scores
    tie with the first's exactly."""
    X, y = blobs(12, 6, 8, seed=5)
    y = np.array([f"c{i}" for i in y])
    twin = twin_label(y)
    X = np.vstack([X, X[y == "c0"]])
    y = np.concatenate([y, [twin] * int((y == "c0").sum())])
    rng = np.random.default_rng(1)
    Q = np.vstack([rng.standard_normal((40, 8)) * 3, X[y == "c0"][:3]]).astype(np.float32)
    return X, y, Q


def reference_scores(X, y, Q, params):
    """Per query and class (in ``classes`` order), the aggregated score in float64, and the
    queries whose m-th and (m+1)-th proxy tie (an mnn vote may then count either)."""
    classes = list(dict.fromkeys(y))
    code = np.array([classes.index(v) for v in y])
    W, Qn = ref.l2(X), ref.l2(Q)
    if params["aggregation"] == "blend":
        means = ref.l2(np.array([W[code == c].mean(0) for c in range(len(classes))]))
        return classes, ref.blend(Qn, W, code, means, params["alpha"]), np.zeros(len(Q), bool)
    out, _ = ref.scores(
        Qn, W, code, len(classes), "ip", params["aggregation"], params.get("m", 1), params.get("vote", "uniform")
    )
    sim = np.sort(Qn @ W.T, axis=1)[:, ::-1]
    m = params.get("m", 1)
    ambiguous = np.abs(sim[:, m - 1] - sim[:, m]) <= TOL if params["aggregation"] == "mnn" else np.zeros(len(Q), bool)
    return classes, out, ambiguous


def assert_matches_reference(result, classes, expected, ambiguous, top, vote=False):
    """Each query's ``top`` classes are the best by the reference score, up to float32 ties."""
    for q in range(len(expected)):
        if ambiguous[q]:
            continue
        best = np.sort(expected[q])[::-1][:top]
        got = [v for v in result.labels[q] if v is not None]
        voted = np.count_nonzero(expected[q]) if vote else len(classes)  # a vote names classes with votes
        assert len(got) == min(top, voted), q
        np.testing.assert_allclose(result.scores[q, : len(got)], best[: len(got)], rtol=TOL, atol=TOL)
        for label, score in zip(got, result.scores[q]):
            assert abs(expected[q, classes.index(label)] - score) <= TOL * (1 + abs(score)), (q, label)


def assert_same_answers(a, b, Q, top=4):
    """Equal scores rank by rank, and equal labels but where equal scores may stand in any order."""
    ra, rb = a.query(Q, top), b.query(Q, top)
    np.testing.assert_allclose(ra.scores, rb.scores, rtol=TOL, atol=TOL)
    for q in range(len(Q)):
        for j in range(top):
            if ra.labels[q, j] != rb.labels[q, j]:
                tied = np.abs(ra.scores[q] - ra.scores[q, j]) <= TOL * (1 + abs(ra.scores[q, j]))
                assert rb.labels[q, j] in set(ra.labels[q, tied]) or tied[-1], (q, j)


@pytest.mark.parametrize("name", list(AGGREGATIONS))
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_merged_answers_equal_brute_force_and_one_collection(tmp_path, data, name, shards):
    X, y, Q = data
    params = AGGREGATIONS[name]
    one = Collection.create(tmp_path / "one", model=None, **params).add(X, y)
    col = ShardedCollection.create(tmp_path / "sharded", shards=shards, model=None, **params).add(X, y)
    assert sum(len(s) for s in col.shards) == len(one) == 13
    classes, expected, ambiguous = reference_scores(X, y, Q, params)
    assert ambiguous.mean() < 0.5
    for top in (1, 4):
        assert_matches_reference(col.query(Q, top), classes, expected, ambiguous, top, name.startswith("mnn"))
    assert_same_answers(one, col, Q[~ambiguous])
    if name.startswith("mnn"):
        return  # a vote among tied proxies may count either twin (the reference skips those queries)
    twin = twin_label(y)
    every = col.query(Q, len(col))  # c0 and its twin score alike, in any order of the two
    for labels, scores in zip(every.labels.tolist(), every.scores):
        i, j = labels.index("c0"), labels.index(twin)
        assert abs(i - j) == 1 or scores[i] == scores[min(i, j) + 1]
        np.testing.assert_allclose(scores[i], scores[j], rtol=TOL)


@pytest.mark.parametrize("params", [dict(generator="kmeans", k=3), {}], ids=["kmeans", "auto"])
def test_k_means_and_auto_answer_as_one_collection(tmp_path, data, params):
    """k-means draws are keyed by label, so a class's proxies do not depend on its shard; auto
    chooses once, on the first add, for every shard."""
    X, y, Q = data
    one = Collection.create(tmp_path / "one", model=None, **params).add(X, y)
    col = ShardedCollection.create(tmp_path / "sharded", shards=3, model=None, **params).add(X, y)
    assert_same_answers(one, col, Q)
    assert col.auto_choice == one.auto_choice
    assert all(shard.auto_choice == one.auto_choice for shard in col.shards)


def labels_in_shards(wanted, shards, n):
    """``n`` labels that all hash into the shards ``wanted``."""
    out, j = [], 0
    while len(out) < n:
        if shard_of([f"k{j}"], shards)[0] in wanted:
            out.append(f"k{j}")
        j += 1
    return out


@pytest.mark.parametrize("name", list(AGGREGATIONS))
def test_an_empty_shard_answers_nothing_and_fills_later(tmp_path, name):
    params = AGGREGATIONS[name]
    X, code = blobs(6, 5, 8, seed=2)
    names = labels_in_shards({0, 1}, 3, 6)
    y = np.array([names[c] for c in code])
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None, **params)
    with pytest.raises(CollectionStateError, match="no classes yet"):
        col.query(X[:2])
    col.add(X, y)
    assert len(col.shards[2]) == 0
    Q = np.random.default_rng(3).standard_normal((30, 8)).astype(np.float32)
    classes, expected, ambiguous = reference_scores(X, y, Q, params)
    assert_matches_reference(col.query(Q, 3), classes, expected, ambiguous, 3, name.startswith("mnn"))
    late = labels_in_shards({2}, 3, 1)[0]
    X2, _ = blobs(1, 5, 8, seed=9)
    col.add(X2, [late] * 5)
    assert col.shards[2].classes == [late]
    classes, expected, ambiguous = reference_scores(np.vstack([X, X2]), np.concatenate([y, [late] * 5]), Q, params)
    assert_matches_reference(
        ShardedCollection.open(tmp_path / "s").query(Q, 3), classes, expected, ambiguous, 3, name.startswith("mnn")
    )


@pytest.mark.parametrize("rejection", ["max", "shift"])
def test_threshold_rejects_as_one_collection(tmp_path, data, rejection):
    X, y, Q = data
    one = Collection.create(tmp_path / "one", model=None, k=2, rejection=rejection).add(X, y)
    col = ShardedCollection.create(tmp_path / "s", shards=2, model=None, k=2, rejection=rejection).add(X, y)
    cut = float(np.median(one.query(Q).rejection_scores[:, 0]))
    one.set_threshold(cut)
    col.set_threshold(cut)
    a, b = one.query(Q, 2), ShardedCollection.open(tmp_path / "s").query(Q, 2)
    np.testing.assert_array_equal(a.rejected, b.rejected)
    np.testing.assert_array_equal(a.labels[:, 0], b.labels[:, 0])
    np.testing.assert_allclose(a.thresholds, b.thresholds)
    np.testing.assert_allclose(a.rejection_scores, b.rejection_scores, rtol=TOL, atol=TOL)
    assert 0 < a.rejected[:, 0].mean() < 1
    label = a.candidates[0, 0]
    col.set_threshold(2.0, label=label)  # a class's own threshold lives in its shard
    assert col.query(Q[:1]).labels[0, 0] is None


def test_reopen_info_classes_check_and_remove(tmp_path, data):
    X, y, Q = data
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None, k=2).add(X, y)
    assert is_sharded(tmp_path / "s") and not is_sharded(tmp_path)
    again = ShardedCollection.open(tmp_path / "s")
    assert_same_answers(col, again, Q)
    info = again.info()
    assert info["shards"] == 3 and info["classes"] == 13 and info["proxies"] == 26 and info["samples"] == len(X)
    assert [row["classes"] for row in info["shard_info"]] == [len(s) for s in again.shards]
    assert sorted(again.classes) == sorted(set(y))
    table = again.class_table()
    assert all(shard_of([row["label"]], 3)[0] == row["shard"] for row in table)
    assert again.check().ok
    with pytest.raises(DataError, match="no class 'nope'"):
        again.remove(["c1", "nope"])
    assert "c1" in again.classes  # nothing removed
    again.remove(["c1", "c2"])
    assert "c1" not in again.classes and len(again) == 11
    assert not {"c1", "c2"} & set(ShardedCollection.open(tmp_path / "s").query(Q, 3).labels.ravel())


def test_check_finds_a_class_in_the_wrong_shard(tmp_path, data):
    X, y, _ = data
    ShardedCollection.create(tmp_path / "s", shards=2, model=None, k=2).add(X, y).close()
    a, b = tmp_path / "s" / shard_name(0), tmp_path / "s" / shard_name(1)
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    report = ShardedCollection.verify(tmp_path / "s")
    assert not report.ok and "belongs in shard" in report.problems[0]
    (tmp_path / "s" / MANIFEST).write_text("{")
    report = ShardedCollection.verify(tmp_path / "s")
    assert not report.ok and MANIFEST in report.problems[0]


def test_bad_input_changes_no_shard(tmp_path, data):
    X, y, _Q = data
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None, k=2, keep_samples=False).add(X, y)
    versions = [s.info()["version"] for s in col.shards]
    bad = X[:4].copy()
    bad[3, 0] = np.nan
    with pytest.raises(DataError, match="row 3"):
        col.add(bad, ["new1", "new2", "new3", "new4"])
    with pytest.raises(DataError, match="dimension 5"):
        col.add(X[:2, :5], ["new1", "new2"])
    with pytest.raises(DataError, match="already exists and this collection keeps no samples"):
        col.add(X[:2], ["brand-new", "c3"])  # c3 exists; brand-new may sit in a shard written first
    with pytest.raises(DataError):
        col.add(X[:2], [1, 2])  # int labels in a collection of str labels
    assert [s.info()["version"] for s in ShardedCollection.open(tmp_path / "s").shards] == versions
    with pytest.raises(CollectionStateError, match="keeps no samples, so there is nothing to tune on"):
        col.tune()


@pytest.mark.parametrize("rejection", ["max", "shift"])
def test_calibrate_chooses_and_stores_what_one_collection_would(tmp_path, data, rejection):
    X, y, Q = data
    rng = np.random.default_rng(4)
    X_val, X_oos = X + 0.3 * rng.standard_normal(X.shape).astype(np.float32), 3 * Q[:30]
    one = Collection.create(tmp_path / "one", model=None, k=2, rejection=rejection).add(X, y)
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None, k=2, rejection=rejection).add(X, y)
    for how in (
        dict(X=X_val, labels=y, X_oos=X_oos, target_oos_recall=0.8),
        dict(target_false_rejection=0.1),
        dict(X=X_val, labels=y, X_oos=X_oos, rule="shift"),
    ):
        a, b = one.calibrate(**how), col.calibrate(**how)
        assert a.rule == b.rule and a.threshold == pytest.approx(b.threshold, abs=TOL)
        again = ShardedCollection.open(tmp_path / "s")
        assert all(s.config["threshold"] == b.threshold and s.config["rejection"] == b.rule for s in again.shards)
        x, z = one.query(X_oos, 2), again.query(X_oos, 2)
        np.testing.assert_array_equal(x.rejected, z.rejected)
        np.testing.assert_allclose(x.rejection_scores, z.rejection_scores, rtol=TOL, atol=TOL)


def test_tune_chooses_once_on_every_shards_samples_as_one_collection(tmp_path, data):
    X, y, Q = data
    one = Collection.create(tmp_path / "one", model=None).add(X, y)
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None).add(X, y)
    choice = col.tune()
    assert choice == one.tune() and ShardedCollection.open(tmp_path / "s").auto_choice == choice
    assert all(s.auto_choice == choice for s in col.shards if len(s))
    np.testing.assert_array_equal(col.predict(Q), one.predict(Q))


def test_sharded_ingestion_resumes_exactly(tmp_path, data, monkeypatch):
    """A run killed after some shards committed a chunk resumes: each shard skips what it has."""
    X, y, Q = data
    np.savez(tmp_path / "train.npz", train_X=X, train_y=y)
    calls = {"n": 0}
    real = Collection.add

    def crash_on_the_fourth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "add", crash_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "s", [str(tmp_path / "train.npz")], chunk_size=20, shards=3, model=None, k=2)
    monkeypatch.undo()
    assert 0 < len(ShardedCollection.open(tmp_path / "s")) < 13
    report = ingest(tmp_path / "s", [str(tmp_path / "train.npz")], chunk_size=20, shards=3, model=None, k=2)
    assert report.resumed_after > 0
    whole = ingest(tmp_path / "whole", [str(tmp_path / "train.npz")], chunk_size=20, shards=3, model=None, k=2)
    resumed, straight = ShardedCollection.open(tmp_path / "s"), ShardedCollection.open(tmp_path / "whole")
    assert resumed.info()["samples"] == straight.info()["samples"] == len(X)
    assert_same_answers(straight, resumed, Q)
    again = ingest(tmp_path / "s", [str(tmp_path / "train.npz")], chunk_size=20, shards=3, model=None, k=2)
    assert again.skipped and again.rows == 0
    with pytest.raises(SettingsClashError, match="shards=2"):
        ingest(tmp_path / "s", [str(tmp_path / "train.npz")], shards=2, model=None, k=2)
    assert whole.created


def test_cli_index_query_info_check_on_shards(tmp_path):
    runner = CliRunner()
    where = str(tmp_path / "col")
    out = runner.invoke(
        main,
        ["index", where, str(DEMO / "demo_train.csv"), "--shards", "3", "--quiet", "--model", "none", "--k", "2"],
        catch_exceptions=False,
    )
    assert out.exit_code != 0 and "texts" in out.output  # a vector collection cannot take texts
    assert not (tmp_path / "col").exists()  # and no stub is left
    vectors = tmp_path / "v.npz"
    X, code = blobs(5, 6, 8, seed=4)
    np.savez(vectors, train_X=X, train_y=np.array([f"v{c}" for c in code]))
    out = runner.invoke(
        main,
        ["index", where, str(vectors), "--shards", "3", "--model", "none", "--k", "2", "--quiet", "--json"],
        catch_exceptions=False,
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["classes"] == 5
    info = json.loads(runner.invoke(main, ["info", where, "--json"]).output)
    assert info["shards"] == 3 and len(info["shard_info"]) == 3
    assert runner.invoke(main, ["check", where]).exit_code == 0
    np.save(tmp_path / "q.npy", X[:3])
    answers = json.loads(runner.invoke(main, ["query", where, "--vectors", str(tmp_path / "q.npy"), "--json"]).output)
    assert [a["labels"][0] for a in answers] == [f"v{c}" for c in code[:3]]
    out = runner.invoke(main, ["calibrate", where, "--target-false-rejection", "0.2", "--json"])
    assert out.exit_code == 0, out.output
    threshold = json.loads(out.output)["threshold"]
    assert all(s.config["threshold"] == pytest.approx(threshold) for s in ShardedCollection.open(where).shards)
    out = runner.invoke(main, ["tune", where, "--json"])
    assert out.exit_code == 0, out.output
    after = json.loads(out.output)["after"]
    assert {k: v for k, v in ShardedCollection.open(where).auto_choice.items() if k != "cv_results"} == {
        k: v for k, v in after.items() if k != "cv_results"
    }
    clash = runner.invoke(main, ["index", where, str(vectors), "--shards", "2", "--model", "none", "--k", "2"])
    assert clash.exit_code != 0 and "shards=2 (collection: 3)" in clash.output
    shutil.rmtree(tmp_path / "col" / shard_name(1))
    assert runner.invoke(main, ["check", where]).exit_code == 1


def test_export_round_trips_into_any_shard_count(tmp_path, data):
    X, y, Q = data
    col = ShardedCollection.create(tmp_path / "s", shards=3, model=None, k=2).add(X, y)
    assert col.export(tmp_path / "all.parquet") == len(X)
    one = ingest(tmp_path / "one", [str(tmp_path / "all.parquet")])
    two = ingest(tmp_path / "two", [str(tmp_path / "all.parquet")], shards=2)
    assert one.classes == two.classes == 13
    assert_same_answers(col, Collection.open(tmp_path / "one"), Q)
    assert_same_answers(col, ShardedCollection.open(tmp_path / "two"), Q)


def test_a_sharded_reader_moves_on_when_a_class_it_answers_is_removed(tmp_path):
    """Each shard answers from the version it holds while other writes leave the classes it names
    alone, and from the committed version once one was removed (``Collection.current``)."""
    X, y = blobs(8, 10, 6, seed=9)
    labels = np.array([f"s{i}" for i in y])
    ShardedCollection.create(tmp_path / "sh", shards=3, model=None, k=2).add(X, labels)
    reader = ShardedCollection.open(tmp_path / "sh")
    Q = X[labels == "s2"][:2]
    assert (reader.predict(Q) == "s2").all()
    writer = ShardedCollection.open(tmp_path / "sh")
    writer.add(X[:3] + 9, ["new"] * 3)
    assert (reader.predict(Q) == "s2").all()
    writer.remove(["s2"])
    after = reader.query(Q, 2)
    assert "s2" not in after.labels.tolist()
    np.testing.assert_array_equal(after.labels, ShardedCollection.open(tmp_path / "sh").query(Q, 2).labels)

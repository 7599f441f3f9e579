"""lshead.py: a streaming least-squares collection answers as the closed form over the classes it
holds, with the ridge it stores, under any history of adds, removes, upserts and reopens; the ridge is
chosen again, as a build of all the samples at once would choose it, whenever they double or halve."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from sqlalchemy import text

from retrieval_imprint import Collection, ImprintClassifier, ShardedCollection, generate, lshead, segments
from retrieval_imprint.errors import InvalidParameterError
from retrieval_imprint.features import feature_map
from retrieval_imprint.ingestion import ingest

D, WIDTH = 16, 64


def pool(n_classes: int, seed: int) -> dict[int, np.ndarray]:
    """Samples of each class (5 to 12), around a class centre."""
    rng = np.random.default_rng(seed)
    return {
        c: rng.normal(rng.normal(size=D), 0.6, (int(rng.integers(5, 13)), D)).astype(np.float32)
        for c in range(n_classes)
    }


def features(X: np.ndarray) -> np.ndarray:
    """The head's features, computed here in float64: ``l2(relu(l2(x) R))``, R the seeded map."""
    return ref.l2(np.maximum(ref.l2(X) @ feature_map(X.shape[1], WIDTH, 0).astype(np.float64), 0.0))


def closed_form(members: dict[int, np.ndarray], lam: float, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of the best class per query: ``reference.ls`` over the members' features
    (rho = lam / n), scored against the queries' features."""
    labels = sorted(members)
    X = np.concatenate([features(members[c]) for c in labels])
    y = np.repeat(labels, [len(members[c]) for c in labels])
    S = features(Q) @ ref.ls(X, y, lam / len(X), classes=labels).T
    return np.array(labels)[S.argmax(1)], S.max(1)


def add(col: Collection | ShardedCollection, members: dict[int, np.ndarray], classes: list[int], **kw) -> None:
    col.add(np.concatenate([members[c] for c in classes]), [c for c in classes for _ in members[c]], **kw)


def check_answers(col: Collection | ShardedCollection, members: dict, Q: np.ndarray) -> None:
    labels, scores = closed_form(members, col.config["ridge"], Q)
    got = col.query(Q)
    np.testing.assert_array_equal(got.labels[:, 0].astype(str), labels.astype(str))
    np.testing.assert_allclose(got.scores[:, 0], scores, rtol=1e-4, atol=1e-5)


@pytest.fixture
def queries() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(40, D)).astype(np.float32)


def test_any_history_answers_as_the_closed_form(tmp_path, queries):
    """Batches of new classes, a class grown by a later add, removals, an upsert and a reopen: the
    answers are the float64 closed form over the classes left, with the stored lambda."""
    data, extra = pool(12, seed=1), pool(2, seed=2)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.01)
    add(col, data, list(range(5)))
    lam = col.snapshot.head.lam
    assert lam == pytest.approx(0.01 * sum(len(data[c]) for c in range(5)))  # lambda = n rho of the first add
    add(col, data, list(range(5, 12)))  # more than doubles the samples: lambda = n rho again
    n = sum(map(len, data.values()))
    assert col.snapshot.head.lam == pytest.approx(0.01 * n) and col.config["ridge"] == col.snapshot.head.lam
    lam = col.snapshot.head.lam
    members = dict(data)
    check_answers(col, members, queries)
    col.add(extra[0], [3] * len(extra[0]))  # class 3 grows: kept samples and new ones
    members[3] = np.concatenate([data[3], extra[0]])
    col.remove([7, 1])
    del members[7], members[1]
    col.add(extra[1], [9] * len(extra[1]), replace=True)  # an upsert: class 9 is these samples alone
    members[9] = extra[1]
    assert col.snapshot.head.lam == lam and col.snapshot.head.n_rows == sum(map(len, members.values()))
    check_answers(col, members, queries)
    again = Collection.open(tmp_path / "c")
    check_answers(again, members, queries)
    assert again.check().ok
    # the ridge's inverse, updated rank by rank, agrees with the one an open factors anew
    np.testing.assert_allclose(col.snapshot.head.ridge.inverse_, again.snapshot.head.ridge.inverse_, atol=1e-9)


def test_a_one_add_collection_answers_as_the_estimator(tmp_path, queries):
    """The estimator's ls on the same features, with post_norm none and the same rho."""
    data = pool(8, seed=3)
    X = np.concatenate(list(data.values()))
    y = np.repeat(list(data), [len(v) for v in data.values()])
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH)
    col.add(X, y.tolist())
    rho = col.snapshot.head.lam / len(X)  # chosen by leave-one-out (auto)
    est = ImprintClassifier(generator="ls", features=WIDTH, post_norm="none", ls_reg=rho, temperature=1.0)
    est.fit(X, y)
    got = col.query(queries)
    np.testing.assert_array_equal(got.labels[:, 0].astype(int), est.predict(queries))
    np.testing.assert_allclose(got.scores[:, 0], est.decision_function(queries).max(1), rtol=1e-4, atol=1e-5)


def test_lambda_is_chosen_again_as_a_one_add_build_chooses_it_when_the_samples_double_or_halve(tmp_path, queries):
    """With ls_reg auto, each add that leaves twice the samples lambda was chosen on (and a removal
    that leaves half) chooses it by leave-one-out on every kept sample, from G: the rho a collection
    built from the same classes in one add chooses. Between, lambda stays; a reopen knows where."""
    data = pool(24, seed=11)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH)

    def scratch(classes: list[int]) -> float:
        """rho of a collection of these classes, built in one add."""
        other = Collection.create(tmp_path / f"s{len(classes)}", model=None, generator="ls", features=WIDTH)
        add(other, data, classes)
        return other.snapshot.head.lam / other.snapshot.head.n_rows

    def rho() -> float:
        head = col.snapshot.head
        assert head.chosen_on == head.n_rows  # chosen on every sample it sums
        return head.lam / head.n_rows

    add(col, data, [0, 1, 2])
    first = col.snapshot.head.lam
    add(col, data, [3])  # fewer than twice the samples: kept
    assert col.snapshot.head.lam == first and col.snapshot.head.chosen_on < col.snapshot.head.n_rows
    add(col, data, list(range(4, 24)))
    assert rho() == pytest.approx(scratch(list(range(24))), rel=1e-9)
    check_answers(col, data, queries)
    again = Collection.open(tmp_path / "c")
    assert again.snapshot.head.chosen_on == col.snapshot.head.chosen_on and again.config["ridge"] == col.config["ridge"]
    check_answers(again, data, queries)
    col.remove(list(range(6, 24)))
    members = {c: data[c] for c in range(6)}
    assert rho() == pytest.approx(scratch(list(range(6))), rel=1e-9)
    check_answers(col, members, queries)
    assert Collection.open(tmp_path / "c").check().ok


def test_a_collection_from_before_ridge_rows_chooses_its_ridge_again_on_its_next_write(tmp_path, queries):
    """Schema 0016 added the count lambda was chosen on; where it is empty (a collection written
    before), the next write sets lambda = n rho on every sample."""
    data = pool(6, seed=14)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.01)
    add(col, data, [0, 1, 2, 3, 4])
    with col.engine.begin() as conn:
        conn.execute(text("UPDATE collection SET ridge_rows = NULL"))
    old = Collection.open(tmp_path / "c")
    assert old.snapshot.head.chosen_on == 0 and old.snapshot.head.outgrown
    add(old, data, [5])
    n = sum(map(len, data.values()))
    assert old.snapshot.head.chosen_on == n and old.config["ridge"] == pytest.approx(0.01 * n)
    check_answers(old, data, queries)
    assert Collection.open(tmp_path / "c").snapshot.head.chosen_on == n


def test_tune_chooses_lambda_again_on_every_sample(tmp_path, queries):
    data = pool(9, seed=4)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.02)
    add(col, data, [0, 1, 2])
    add(col, data, list(range(3, 9)))
    col.tune()
    n = sum(map(len, data.values()))
    assert col.snapshot.head.lam == pytest.approx(0.02 * n)
    check_answers(col, data, queries)
    check_answers(Collection.open(tmp_path / "c"), data, queries)


def test_a_failed_write_leaves_the_head_as_it_was(tmp_path, queries, monkeypatch):
    """A write that fails after its Gram file is written changes nothing, in memory or on disk."""
    data = pool(6, seed=6)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.01)
    add(col, data, [0, 1, 2, 3])
    before = col.query(queries)

    def fail(name: str) -> None:
        if name in ("add: segments written", "remove: committed"):
            raise OSError(f"crash at {name}")

    monkeypatch.setattr(segments, "crash_point", fail)
    with pytest.raises(OSError):
        add(col, data, [4, 5])
    monkeypatch.undo()
    members = {c: data[c] for c in range(4)}
    for reader in (col, Collection.open(tmp_path / "c")):
        np.testing.assert_array_equal(reader.query(queries).labels, before.labels)
        check_answers(reader, members, queries)
    assert Collection.open(tmp_path / "c").check().ok


def test_small_adds_leave_g_to_be_summed_at_open(tmp_path, queries, monkeypatch):
    """Adds of few samples write no Gram file: an open sums the sample files written since the last
    one. Past REPLAY_MAX samples an add writes it; a compaction that merges sample files does too."""
    data = pool(10, seed=7)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.01)

    def gram() -> list[str]:
        return [f for f in col.info()["segments"] if f.startswith("gram-")]

    add(col, data, [0, 1, 2, 3])
    written = gram()
    for c in (4, 5, 6):
        add(col, data, [c])
    assert gram() == written
    members = {c: data[c] for c in range(7)}
    check_answers(col, members, queries)
    check_answers(Collection.open(tmp_path / "c"), members, queries)
    assert Collection.open(tmp_path / "c").check().ok
    monkeypatch.setattr(lshead, "REPLAY_MAX", len(data[7]) + 1)  # the samples since the last G and class 7's
    add(col, data, [7])
    assert gram() != written and gram()[0] == f"gram-{col.info()['version']:08d}.npy"
    add(col, data, [8, 9])
    col.compact()
    assert gram()[0] == f"gram-{col.info()['version']:08d}.npy"
    again = Collection.open(tmp_path / "c")
    check_answers(again, data, queries)
    assert again.check().ok and again.snapshot.head.pending == 0


def test_an_ivf_index_of_the_means_is_tuned_on_mapped_samples_and_exact_when_every_list_is_probed(tmp_path, queries):
    data = pool(40, seed=9)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH, ls_reg=0.01, index="IVF4,Flat")
    add(col, data, list(range(20)))
    tuning = col.info()["index_tuning"]
    assert tuning["queries"] == sum(len(data[c]) for c in range(20))  # every sample of the first add, mapped
    add(col, data, list(range(20, 40)))
    col.remove([5])
    members = {c: v for c, v in data.items() if c != 5}
    for reader in (col, Collection.open(tmp_path / "c")):
        labels, scores = closed_form(members, reader.config["ridge"], queries)
        got = reader.query(queries, search_params={"nprobe": 4})
        np.testing.assert_array_equal(got.labels[:, 0].astype(int), labels)
        np.testing.assert_allclose(got.scores[:, 0], scores, rtol=1e-4, atol=1e-5)
    col.compact(retrain=True)
    assert col.info()["index_tuning"]["queries"] == sum(map(len, members.values()))
    assert Collection.open(tmp_path / "c").check().ok


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(aggregation="mnn"), "aggregation"),
        (dict(post_norm="quantile"), "post_norm"),
        (dict(index="IVF16,PQ8x4fs,Refine(SQfp16)"), "index"),
        (dict(keep_samples=False), "keep_samples"),
        (dict(metric="euclidean"), "metric"),
        (dict(k=5), "k=5"),
    ],
)
def test_settings_the_head_cannot_take_are_refused_by_name(tmp_path, settings, named):
    with pytest.raises(InvalidParameterError, match=named):
        Collection.create(tmp_path / "c", model=None, generator="ls", **settings)


def test_features_and_ls_reg_belong_to_the_ls_head(tmp_path):
    for settings in (dict(features=100), dict(ls_reg=0.1)):
        with pytest.raises(InvalidParameterError, match="generator='ls'"):
            Collection.create(tmp_path / "c", model=None, generator="kmeans", **settings)


@pytest.mark.parametrize("loo_rows", [None, 40])
def test_a_sharded_collection_answers_as_one_collection_of_all_its_classes(tmp_path, queries, monkeypatch, loo_rows):
    """Each shard's G sums its own samples; a query is mapped once by the ridge of them all (the
    manifest's lambda, set and chosen again as one collection's is) and that z searched in every
    shard: the answers are the closed form over every class, after adds, a grown class, removals,
    a reopen and tune, and explain explains those answers. With more kept samples than the
    leave-one-out scores (``loo_rows``: a sample of them), both score the same ones."""
    if loo_rows is not None:
        monkeypatch.setattr(generate, "LOO_ROWS", loo_rows)
    data, extra = pool(30, seed=12), pool(1, seed=13)
    sharded = ShardedCollection.create(tmp_path / "s", shards=3, model=None, generator="ls", features=WIDTH)
    one = Collection.create(tmp_path / "one", model=None, generator="ls", features=WIDTH)
    for classes in ([0, 1, 2, 3], list(range(4, 12)), list(range(12, 30))):
        for col in (sharded, one):
            add(col, data, classes)
    assert sharded.manifest["ridge"]["rows"] == one.snapshot.head.chosen_on == one.snapshot.head.n_rows
    assert sharded.config["ridge"] == pytest.approx(one.config["ridge"], rel=1e-9)
    assert sharded.config["ridge"] != sharded.shards[0].config["ridge"]  # each shard keeps its own, for itself
    assert sharded.info()["config"]["ridge"] == sharded.config["ridge"]
    check_answers(sharded, data, queries)
    sharded.add(extra[0], [3] * len(extra[0]))
    members = {**data, 3: np.concatenate([data[3], extra[0]])}
    sharded.remove(list(range(14, 30)))
    members = {c: v for c, v in members.items() if c < 14}
    for reader in (sharded, ShardedCollection.open(tmp_path / "s")):
        check_answers(reader, members, queries)
    assert sharded.check().ok
    answers = sharded.predict(queries[:6])
    for label, rows in zip(answers, sharded.explain(queries[:6], n=100)):  # every sample of the whole's answer
        assert sorted(row["sample"] for row in rows) == list(range(len(members[int(label)])))
    one.remove(list(range(14, 30)))
    one.add(extra[0], [3] * len(extra[0]))
    sharded.tune()
    one.tune()
    assert sharded.config["ridge"] == pytest.approx(one.config["ridge"], rel=1e-9)
    check_answers(sharded, members, queries)


def test_a_sharded_collection_with_empty_shards_answers_as_the_closed_form(tmp_path, queries):
    """Shards that hold no class yet (two classes over six shards) have no head and no index: the whole's
    head and class count come from the others."""
    data = pool(2, seed=15)
    sharded = ShardedCollection.create(tmp_path / "s", shards=6, model=None, generator="ls", features=WIDTH)
    add(sharded, data, [0, 1])
    assert sum(len(col) == 0 for col in sharded.shards) >= 4
    check_answers(sharded, data, queries)


def test_what_the_head_does_not_do_yet_is_refused_by_name(tmp_path, queries):
    """Calibration from left-out training scores (the head has none) is refused; calibration on
    validation queries takes rule max."""
    data = pool(6, seed=8)
    col = Collection.create(tmp_path / "c", model=None, generator="ls", features=WIDTH)
    add(col, data, list(range(6)))
    with pytest.raises(InvalidParameterError, match="rule max on validation queries"):
        col.calibrate(target_false_rejection=0.05)
    with pytest.raises(InvalidParameterError, match="rule max on validation queries"):
        col.calibrate(data[0], [0] * len(data[0]), queries, rule="shift")
    result = col.calibrate(np.concatenate([data[0], data[1]]), [0] * len(data[0]) + [1] * len(data[1]), queries)
    assert result.rule == "max" and col.config["rejection"] == "max"


def test_an_export_is_indexed_again_with_the_ridge_it_had(tmp_path, queries):
    """``export`` carries the ridge a collection had chosen as it grew (and the samples it was chosen
    on); ``ingest`` makes the collection again with it, so the answers are the same, one collection
    or sharded, into one collection or shards."""
    data = pool(30, seed=14)
    one = Collection.create(tmp_path / "one", model=None, generator="ls", features=WIDTH)
    sharded = ShardedCollection.create(tmp_path / "s", shards=3, model=None, generator="ls", features=WIDTH)
    for classes in (list(range(20)), list(range(20, 30))):  # the second add does not double the samples
        for col in (one, sharded):
            add(col, data, classes)
    scratch = Collection.create(tmp_path / "scratch", model=None, generator="ls", features=WIDTH)
    add(scratch, data, list(range(30)))
    assert one.config["ridge"] != scratch.config["ridge"]  # a build of the samples alone chooses another
    for original, shards in ((one, 1), (sharded, 1), (one, 2), (sharded, 3)):
        name = f"{original.path.name}-{shards}"
        original.export(tmp_path / f"{name}.parquet")
        ingest(tmp_path / name, [tmp_path / f"{name}.parquet"], shards=shards)
        again = ShardedCollection.open(tmp_path / name) if shards > 1 else Collection.open(tmp_path / name)
        assert (again.config["ridge"], again.config["ridge_rows"]) == (
            original.config["ridge"],
            original.config["ridge_rows"],
        )
        a, b = original.query(queries, 3), again.query(queries, 3)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)

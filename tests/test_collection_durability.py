"""Collections across processes and schema versions: SIGKILLed writers, concurrent readers,
Alembic upgrades."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import blobs

from retrieval_imprint import collection, schema, store
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import SchemaVersionError
from retrieval_imprint.segments import DB_NAME

WRITER = textwrap.dedent("""
    import os, signal, sys, numpy as np
    import retrieval_imprint.collection as rc
    import retrieval_imprint.segments as segments
    rc.COMPACT_SEGMENTS = 4  # compact often, so kills land inside compactions too
    point, nth, seen = sys.argv[3], int(sys.argv[4]), []

    def crash_point(name):  # die at the nth time the writer reaches the named step
        seen.append(name)
        if name == point and seen.count(name) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    segments.crash_point = crash_point
    col = rc.Collection.open(sys.argv[1])
    start = int(sys.argv[2])
    for i in range(start, start + 400):
        rng = np.random.default_rng(i)
        col.add(rng.standard_normal((6, 8)).astype(np.float32) + i % 5, [f"w{i}"] * 6)
        if i % 3 == 0 and f"w{i - 1}" in col.classes:
            col.remove([f"w{i - 1}"])
        print(i, flush=True)
""")

# Every named step of a write, some more than once: (step, the how-many-th time it is reached)
KILLS = [
    ("segment: tmp written", 1),
    ("add: segments written", 2),
    ("add: committed", 3),
    ("remove: committed", 1),
    ("compact: segments written", 1),
    ("compact: committed", 1),
    ("segment: tmp written", 5),
    ("add: segments written", 7),
    ("compact: committed", 2),
    ("add: committed", 6),
]


def step(state: set[str], i: int, *, remove: bool = True) -> set[str]:
    """The writer's step i: add w{i}, then (every third step) remove w{i-1} if present."""
    state = state | {f"w{i}"}
    return state - {f"w{i - 1}"} if remove and i % 3 == 0 else state


@pytest.mark.slow
def test_writers_killed_at_every_named_step_leave_the_old_or_the_new_state(tmp_path):
    path = tmp_path / "col"
    col = Collection.create(path, model=None, k=2)
    X, y = blobs(3, 6, 8)
    col.add(X, [f"base{i}" for i in y])
    state: set[str] = set()
    start = 0
    for point, nth in KILLS:
        proc = subprocess.run(
            [sys.executable, "-c", WRITER, str(path), str(start), point, str(nth)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, (point, nth, proc.stderr or "the writer never reached the step")
        for i in map(int, proc.stdout.split()):  # steps the writer finished
            state = step(state, i)
        killed = start + len(proc.stdout.split())
        # the killed step committed nothing, its add, or its add and its remove
        allowed = [state, step(state, killed, remove=False), step(state, killed)]
        reopened = Collection.open(path)
        report = reopened.check()
        assert report.ok, (point, nth, report.problems)
        got = {c for c in reopened.classes if c.startswith("w")}
        assert got in allowed, (point, nth, killed, sorted(got ^ state))
        assert {f"base{i}" for i in range(3)} <= set(reopened.classes)
        assert set(reopened.predict(np.ones((2, 8), np.float32))) <= set(reopened.classes)
        state = got
        start = killed + 1 if f"w{killed}" in got else killed
    col = Collection.open(path).compact()  # the next writer deletes what killed ones left behind
    assert sorted(p.name for p in path.iterdir() if p.suffix in (".faiss", ".tmp")) == sorted(col.info()["segments"])


READER = textwrap.dedent("""
    import sys, time, faiss, numpy as np
    import retrieval_imprint.collection as rc
    import retrieval_imprint.segments as segments
    # widen both windows a compaction can hit: listing the segments -> opening them -> reading them
    open_segment, read_index = segments.open_segment, faiss.read_index
    segments.open_segment = lambda directory, name: time.sleep(0.003) or open_segment(directory, name)
    faiss.read_index = lambda *args: time.sleep(0.01) or read_index(*args)
    col = rc.Collection.open(sys.argv[1])
    q = np.ones((4, 8), np.float32)
    seen, end = set(), time.time() + float(sys.argv[2])
    while time.time() < end:
        col.refresh()
        pred = col.predict(q)
        assert all(p in set(col.classes) for p in pred), pred
        seen.add(len(col))
        if len(seen) % 8 == 0:  # check() beside a writer compares one committed version
            report = col.check()
            assert report.ok, report.problems
    print(max(seen))
""")


@pytest.mark.slow
def test_readers_query_while_a_writer_adds_and_compacts(tmp_path, monkeypatch):
    monkeypatch.setattr(collection, "COMPACT_SEGMENTS", 3)  # compact every few adds, under the readers
    path = tmp_path / "col"
    col = Collection.create(path, model=None, generator="mean")
    col.add(np.ones((2, 8), np.float32), ["first", "first"])
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    time.sleep(1.0)
    rng = np.random.default_rng(0)
    deadline = time.time() + 3
    n = 0
    while time.time() < deadline:
        col.add(rng.standard_normal((3, 8)).astype(np.float32), [f"x{n}"] * 3)
        n += 1
    for proc in readers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert int(out) > 1, "the reader saw the writer's classes"
    assert Collection.open(path).check().ok
    col.compact()  # with no reader about, superseded files left behind by busy moments go
    assert sorted(p.name for p in path.glob("*.faiss")) == sorted(col.info()["segments"])


def test_upgrade_from_the_initial_revision_keeps_the_data(tmp_path):
    path = tmp_path / "col"
    col = Collection.create(path, model=None, generator="kmeans", k=3, aggregation="max")
    X, y = blobs(5, 12, 6)
    col.add(X, y)
    before = col.query(X, 3)
    engine = store.connect(path / DB_NAME)
    head = schema.schema_revision_of(engine, path)[1]
    store.migrate(engine, "0001", down=True)
    with pytest.raises(SchemaVersionError, match=f"schema revision 0001, older than {head}: run `imprint db upgrade"):
        Collection.open(path)
    upgraded = Collection.open(path, upgrade=True)
    np.testing.assert_array_equal(upgraded.query(X, 3).labels, before.labels)
    assert upgraded.check().ok and upgraded.config["threshold"] is None


def test_the_vector_rows_go_at_0013_and_come_back_from_the_class_ranges_on_downgrade(tmp_path):
    """Migration 0013 drops the row per vector (the classes' ranges name the live ids); a downgrade
    makes them again from those ranges, each naming the newest file of its kind, and the upgrade
    after it leaves a collection that checks and answers as before."""
    path = tmp_path / "col"
    col = Collection.create(path, model=None, generator="kmeans", k=2, aggregation="max")
    X, y = blobs(6, 8, 5)
    col.add(X[:24], y[:24])
    col.add(X[24:], y[24:])  # grows some classes: re-imprinted, their ranges move on
    col.remove([y[0]])
    before, table = col.query(X, 2), col.snapshot.table
    engine = store.connect(path / DB_NAME)
    store.migrate(engine, "0012", down=True)
    with engine.connect() as conn:
        for kind, lo, hi in (("proxies", table.proxy_lo, table.proxy_hi), ("samples", 0 * table.ids, table.n_samples)):
            rows = conn.exec_driver_sql(f"SELECT id, class_id, segment_id FROM {kind} ORDER BY id").all()
            want = np.sort(np.concatenate([(c << 24) + np.arange(a, b) for c, a, b in zip(table.ids, lo, hi)]))
            np.testing.assert_array_equal([r[0] for r in rows], want)
            assert all(r[0] >> 24 == r[1] for r in rows)
            newest = conn.exec_driver_sql(f"SELECT MAX(id) FROM segments WHERE kind = '{kind}'").scalar()
            assert {r[2] for r in rows} == {newest}
    upgraded = Collection.open(path, upgrade=True)
    with engine.connect() as conn:
        assert not {"proxies", "samples"} & set(conn.exec_driver_sql("SELECT name FROM sqlite_master").scalars())
    np.testing.assert_array_equal(upgraded.query(X, 2).labels, before.labels)
    assert upgraded.check().ok


def test_the_models_match_the_head_revision(tmp_path):
    col = Collection.create(tmp_path / "col", model=None)
    with col._engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []

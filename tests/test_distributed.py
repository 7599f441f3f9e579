"""The Ray engine on a local Ray this module starts (2 CPUs) and stops: a Ray Data build equals a
one-process build, reruns skip what is in, and Ray Serve answers as the local collection."""

from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO, blobs
from test_lshead import WIDTH, check_answers
from test_sharded import assert_same_answers

try:
    import ray
except ImportError:  # the dev extra installs Ray; CI must have it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("Ray is not installed (pip install -e '.[dev]' installs it)", allow_module_level=True)

import pyarrow as pa
import pyarrow.parquet as pq
from test_serve import check_routes_and_errors, in_thread, wait_ready

from retrieval_imprint import labels as lab
from retrieval_imprint.cli import main
from retrieval_imprint.client import Client
from retrieval_imprint.collection import Collection
from retrieval_imprint.device import use_device
from retrieval_imprint.distributed import build
from retrieval_imprint.errors import InvalidParameterError, ServerError
from retrieval_imprint.ingestion import ingest
from retrieval_imprint.rayserving import serve, serve_shutdown
from retrieval_imprint.readers import load_demo
from retrieval_imprint.service import Limits, Service
from retrieval_imprint.sharded import ShardedCollection, open_any

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """24 classes of 6 vectors spread over 3 Parquet files (each class in every file)."""
    where = tmp_path_factory.mktemp("parquet")
    X, code = blobs(24, 6, 8, seed=7)
    y = np.array([f"c{c}" for c in code])
    paths = []
    for j in range(3):
        rows = np.arange(len(y)) % 3 == j
        paths.append(str(where / f"part{j}.parquet"))
        pq.write_table(pa.table({"label": y[rows].tolist(), "vector": list(X[rows])}), paths[-1])
    return paths, X, y


def documented_order(paths, X, y):
    """The row order the Ray build imprints a class's rows in: file by path, then the BLAKE2b hash
    of each row's label and vector (docs/distributed.md), computed here independently."""
    keyed = []
    for j, path in enumerate(paths):
        for i in np.flatnonzero(np.arange(len(y)) % 3 == j):
            digest = hashlib.blake2b(
                repr(lab.entry(str(y[i]))).encode() + b"\0" + X[i].astype("<f4").tobytes(), digest_size=8
            ).digest()
            keyed.append((path, lab.label_key(str(y[i])), digest, i))
    return np.array([i for *_, i in sorted(keyed)])


def test_ray_build_equals_one_process_build(tmp_path, files):
    paths, X, y = files
    report = build(tmp_path / "ray", paths, shards=3, buckets_per_shard=2, model=None, k=2)
    assert report.created and report.parts == 18 and report.rows == len(y) and report.classes == 24
    col = ShardedCollection.open(tmp_path / "ray")
    assert col.check().ok
    order = documented_order(paths, X, y)
    one = Collection.create(tmp_path / "one", model=None, k=2).add(X[order], y[order])
    Q = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    assert_same_answers(one, col, Q)
    assert col.auto_choice["k"] == 2


def test_the_writers_run_k_means_on_the_drivers_device(tmp_path, files):
    """The shards' writers are processes of their own: the driver's device reaches them, and the
    torch backend builds what numpy builds."""
    paths, _X, _y = files
    with use_device("cpu"):
        report = build(tmp_path / "torch", paths, shards=2, buckets_per_shard=2, model=None, generator="kmeans", k=2)
    numpy = build(tmp_path / "numpy", paths, shards=2, buckets_per_shard=2, model=None, generator="kmeans", k=2)
    assert report.device == "cpu" and numpy.device is None
    assert_same_answers(
        ShardedCollection.open(tmp_path / "numpy"),
        ShardedCollection.open(tmp_path / "torch"),
        np.random.default_rng(2).standard_normal((30, 8)).astype(np.float32),
    )


def test_a_rerun_skips_what_is_in_and_more_files_extend(tmp_path, files):
    paths, _X, y = files
    build(tmp_path / "grown", paths[:2], shards=2, buckets_per_shard=3, model=None, generator="kmeans", k=2)
    report = build(tmp_path / "grown", paths, shards=2, buckets_per_shard=3, model=None, generator="kmeans", k=2)
    assert report.parts_skipped == 12 and report.parts == 6 and not report.created
    again = build(tmp_path / "grown", paths, shards=2, buckets_per_shard=3, model=None, generator="kmeans", k=2)
    assert again.parts == 0 and again.rows == 0
    whole = build(tmp_path / "whole", paths, shards=2, buckets_per_shard=3, model=None, generator="kmeans", k=2)
    grown, straight = ShardedCollection.open(tmp_path / "grown"), ShardedCollection.open(tmp_path / "whole")
    assert grown.info()["samples"] == straight.info()["samples"] == whole.rows == len(y)
    assert_same_answers(straight, grown, np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32))


def test_texts_are_embedded_on_the_workers(tmp_path):
    demo = load_demo("train")
    path = str(tmp_path / "demo.parquet")
    pq.write_table(pa.table({"text": demo.texts, "label": demo.labels}), path)
    build(tmp_path / "ray", [path], shards=2, generator="mean")
    ingest(tmp_path / "local", [str(DEMO / "demo_train.csv")], generator="mean")
    texts = load_demo("test").texts
    a, b = Collection.open(tmp_path / "local").query_texts(texts, 3), ShardedCollection.open(tmp_path / "ray")
    b = b.query_texts(texts, 3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_streaming_ls_collection_builds_on_ray_and_ray_serve_refuses_it(tmp_path, files):
    """The ridge of the whole is set on the first chunk and chosen again once the writers' adds have
    doubled its samples; the answers are the closed form over every class (test_lshead.py). Ray
    Serve, whose shards would each map a query by their own ridge, refuses it by name."""
    paths, X, y = files
    build(
        tmp_path / "ray", paths, shards=3, buckets_per_shard=1, model=None, generator="ls", features=WIDTH, ls_reg=0.01
    )
    col = ShardedCollection.open(tmp_path / "ray")
    assert col.manifest["ridge"]["rows"] == len(y) and col.config["ridge"] == pytest.approx(0.01 * len(y))
    Q = np.random.default_rng(1).standard_normal((40, X.shape[1])).astype(np.float32)
    check_answers(col, {label: X[y == label] for label in np.unique(y)}, Q)
    assert col.check().ok
    with pytest.raises(InvalidParameterError, match="not served on Ray yet"):
        serve(tmp_path / "ray", port=free_port())


def test_ray_serve_is_the_one_process_app(tmp_path, files):
    """The Ray engine mounts the one-process app over its shard router: the same answers, /info,
    /health, routes and errors as ``imprint serve`` in one process."""
    paths, _X, _y = files
    build(tmp_path / "ray", paths, shards=3, buckets_per_shard=1, model=None, k=2)
    col = ShardedCollection.open(tmp_path / "ray")
    col.set_threshold(0.6)
    limits = Limits(max_top=5)
    with use_device("cpu"):  # the shard replicas search on the driver's device: the torch backend
        url = serve(tmp_path / "ray", port=free_port(), refresh=0.0, limits=limits, api_key="k")
    try:
        client = Client(url, timeout=120, api_key="k")
        assert client.health() == {"status": "ok", "ready": True, "classes": 24, "shards": 3, "model": None}
        Q = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
        for top in (1, 3):
            got, want = client.query(vectors=Q, top=top), col.query(Q, top)
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.rejected, want.rejected)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
        service = Service(lambda: open_any(tmp_path / "ray"), refresh=0.0, limits=limits)
        with in_thread(service, api_key="k") as local:
            one = wait_ready(local, api_key="k")
            assert client.info() == one.info() == json.loads(json.dumps(col.info()))
            assert client.health() == one.health()
        with pytest.raises(ServerError, match="401"):
            Client(url, api_key="").info()
        check_routes_and_errors(url, 24, 8, limits, api_key="k")
    finally:
        serve_shutdown()


def test_cli_index_on_ray(tmp_path, files):
    paths, _, _ = files
    runner = CliRunner()
    out = runner.invoke(
        main,
        ["index", str(tmp_path / "c"), *paths, "--engine", "ray", "--shards", "2", "--model", "none", "--k", "2"],
        catch_exceptions=False,
    )
    assert out.exit_code == 0, out.output
    assert "indexed 144 rows" in out.output and "24 classes" in out.output
    out = runner.invoke(
        main,
        [
            "index",
            str(tmp_path / "c"),
            *paths,
            "--engine",
            "ray",
            "--shards",
            "2",
            "--model",
            "none",
            "--k",
            "2",
            "--json",
        ],
    )
    report = json.loads(out.stdout)
    assert report["rows"] == 0 and report["parts"] == 0 and report["parts_skipped"] > 0
    out = runner.invoke(main, ["index", str(tmp_path / "c"), *paths, "--engine", "ray", "--again"])
    assert out.exit_code == 2 and "--again cannot be used with --engine ray" in out.output
    out = runner.invoke(main, ["index", str(tmp_path / "d"), str(DEMO / "demo_train.csv"), "--engine", "ray"])
    assert out.exit_code == 2 and "reads Parquet files" in out.output

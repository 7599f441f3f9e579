"""``imprint serve`` over loopback: the HTTP API and the Python client give the local answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import blobs
from retrieval_imprint.client import Client, ServerError
from retrieval_imprint.collection import Collection
from retrieval_imprint.serve import parse_query
from retrieval_imprint.errors import DataError
from retrieval_imprint.sharded import ShardedCollection

START_TIMEOUT = 60  # seconds for the server to bind and say where


@contextmanager
def served(path, *options):
    """``imprint serve path --port 0`` in a subprocess on 127.0.0.1; yields a Client; always stopped."""
    proc = subprocess.Popen([sys.executable, "-c", "from retrieval_imprint.cli import main; main()", "serve", str(path),
                             "--port", "0", *options], stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                ready.set()
        ready.set()  # the server ended before it served: the assertion below shows why

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(START_TIMEOUT)
        found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", "".join(lines))
        assert found, "".join(lines)
        port = found.group(1)
        yield Client(f"http://127.0.0.1:{port}", timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def vectors():
    X, code = blobs(9, 6, 8, seed=11)
    return X, np.array([f"v{c}" for c in code]), np.random.default_rng(2).standard_normal((25, 8)).astype(np.float32)


def assert_same(a, b):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_array_equal(a.rejected, b.rejected)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 3])
def test_served_answers_are_the_local_ones(tmp_path, vectors, shards):
    X, y, Q = vectors
    if shards == 1:
        col = Collection.create(tmp_path / "c", model=None, k=2)
    else:
        col = ShardedCollection.create(tmp_path / "c", shards=shards, model=None, k=2)
    col.add(X, y).set_threshold(0.5)
    with served(tmp_path / "c", "--refresh", "0") as client:
        assert client.health() == {"status": "ok", "classes": 9, "shards": shards, "model": None}
        assert client.info()["classes"] == 9
        assert_same(client.query(vectors=Q, top=3), col.query(Q, 3))
        assert_same(client.query(vectors=Q, top=2, threshold=-1.0), col.query(Q, 2, threshold=-1.0))
        with pytest.raises(ServerError, match="400 Q has dimension 3"):
            client.query(vectors=Q[:, :3])
        with pytest.raises(ServerError, match="texts, not texts|precomputed vectors"):
            client.query(texts=["hello"])
        request = urllib.request.Request(client.url + "/query", data=b'{"vectors": [[1, 2]], "top": 0}')
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400 and "top must be a positive integer" in json.loads(err.value.read())["error"]
        X2, _ = blobs(1, 6, 8, seed=12)
        col.add(X2, ["late"] * 6)  # another process's write is served after the refresh
        assert client.health()["classes"] == 10
        assert_same(client.query(vectors=Q, top=3), col.query(Q, 3))
    with pytest.raises(ServerError, match="cannot reach"):
        client.health()


@pytest.mark.slow
def test_served_texts_use_the_collections_model(tmp_path):
    from retrieval_imprint import ingest
    from conftest import DEMO

    ingest(tmp_path / "c", [str(DEMO / "demo_train.csv")])
    col = Collection.open(tmp_path / "c")
    texts = ["my card never showed up", "put on some Queen"]
    with served(tmp_path / "c") as client:
        assert_same(client.query(texts=texts, top=2), col.query_texts(texts, 2))


@pytest.mark.parametrize("body,message", [
    (b"{", "not JSON"), (b"[1]", "JSON object"), (b'{"texts": ["a"], "vectors": [[1]]}', "either texts"),
    (b'{"texts": "a"}', "non-empty list of strings"), (b'{"vectors": [[1, 2], [3]]}', "all of one length"),
    (b'{"vectors": []}', "non-empty"), (b'{"texts": ["a"], "top": true}', "top must"),
    (b'{"texts": ["a"], "threshold": "x"}', "threshold must"), (b'{"texts": ["a"], "nprobe": 0}', "nprobe must"),
    (b'{"texts": ["a"], "k": 3}', "unknown field"),
])
def test_bad_requests_name_the_problem(body, message):
    with pytest.raises(DataError, match=message):
        parse_query(body)

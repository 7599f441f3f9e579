"""The HTTP server: answers equal the in-process ones under concurrent clients, micro-batches,
limits and errors (JSON, right status), auth, readiness, health, metrics, drain on SIGTERM.

Servers run on 127.0.0.1 only: ``in_thread`` mounts the app on uvicorn in this process (the whole
HTTP stack, quick to start), ``served`` runs ``imprint serve`` in a subprocess (signals, the CLI).
``check_routes_and_errors`` is shared with the Ray engine's test (test_distributed.py): both
engines answer the same routes with the same errors.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import DEMO, blobs

from retrieval_imprint.batching import MicroBatcher
from retrieval_imprint.client import Client
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import DataError, RequestError, ServerError
from retrieval_imprint.serve import create_app, listen, parse_query, request_model
from retrieval_imprint.service import Limits, Service
from retrieval_imprint.sharded import ShardedCollection, open_any

START_TIMEOUT = 120  # seconds for a server to say it is ready (a cold model export included)


@contextmanager
def served(path, *options, env=None):
    """``imprint serve path --port 0`` in a subprocess on 127.0.0.1; yields ``(client, proc)``
    once it is ready; always stopped."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from retrieval_imprint.cli import main; main()",
            "serve",
            str(path),
            "--port",
            "0",
            *options,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(("ready", "not ready")):
                ready.set()
        ready.set()  # the server ended before it was ready: the assertion below shows why

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(START_TIMEOUT)
        found = re.search(r"ready: .* answers on http://127\.0\.0\.1:(\d+)", "".join(lines))
        assert found, "".join(lines)
        yield Client(f"http://127.0.0.1:{found.group(1)}", timeout=60, api_key=(env or {}).get("IMPRINT_API_KEY")), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def in_thread(service, api_key=None):
    """The app over ``service`` on uvicorn in a thread of this process, 127.0.0.1, any free port;
    yields its URL once it listens (not necessarily ready); stopped on exit."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, api_key=api_key), log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(url, api_key=None):
    client = Client(url, api_key=api_key)
    deadline = time.monotonic() + START_TIMEOUT
    while not client.ready():
        assert time.monotonic() < deadline, client.health()
        time.sleep(0.05)
    return client


def raw(url, method, route, body=None, headers=None):
    """``(status, headers, JSON answer)`` of one request, whatever its status."""
    request = urllib.request.Request(url + route, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.fixture(scope="module")
def vectors():
    X, code = blobs(9, 6, 8, seed=11)
    return X, np.array([f"v{c}" for c in code]), np.random.default_rng(2).standard_normal((25, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def texts_collection(tmp_path_factory):
    """The demo intents, indexed from text with the packaged model."""
    from retrieval_imprint import ingest

    path = tmp_path_factory.mktemp("served") / "intents"
    ingest(path, [str(DEMO / "demo_train.csv")])
    return path


def assert_same(a, b):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.rejected, b.rejected)


def check_routes_and_errors(url, n_classes, dimension, limits=Limits(), api_key=None):
    """What every engine's app answers the same way: each case of a bad request gets its 4xx
    JSON ``{"error", "code"}`` naming the problem, a too-large top is capped, unknown routes and
    methods are JSON 404/405, the schema is served."""
    key = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    vec = [[0.5] * dimension]
    # what each error names (the field, the limit), not pydantic's wording, which its versions change
    cases = [
        (b"{", "invalid_request", ["not valid JSON"]),
        (b"[1]", "invalid_request", ["the request body:", "object"]),
        (b"[" * 1000, "invalid_request", ["not valid JSON", "recursion limit"]),  # as deep as 100,000
        (json.dumps({"texts": ["a"], "vectors": vec}).encode(), "invalid_request", ["either texts"]),
        (json.dumps({"texts": "a"}).encode(), "invalid_request", ["texts:"]),
        (json.dumps({"vectors": [[1, 2], [3]]}).encode(), "invalid_request", ["rows of one length"]),
        (json.dumps({"vectors": []}).encode(), "invalid_request", ["vectors:", "1"]),
        (json.dumps({"vectors": vec, "top": True}).encode(), "invalid_request", ["top:", "integer"]),
        (json.dumps({"vectors": vec, "top": 10**9}).encode(), "invalid_request", ["top:", str(limits.max_top)]),
        (b'{"vectors": [[0.5]], "threshold": NaN}', "invalid_request", ["threshold:", "finite"]),
        (b'{"vectors": [[Infinity]]}', "invalid_request", ["vectors.0.0:", "finite"]),
        (json.dumps({"vectors": [[1e39]]}).encode(), "invalid_request", ["beyond float32"]),
        (json.dumps({"vectors": vec, "nprobe": 0}).encode(), "invalid_request", ["nprobe:", "1"]),
        (json.dumps({"vectors": vec, "k": 3}).encode(), "invalid_request", ["k:"]),
        (
            json.dumps({"texts": ["x" * (limits.max_text_chars + 1)]}).encode(),
            "invalid_request",
            ["texts.0:", str(limits.max_text_chars)],
        ),
        (
            json.dumps({"texts": ["x"] * (limits.max_queries + 1)}).encode(),
            "invalid_request",
            ["texts:", str(limits.max_queries)],
        ),
        (
            json.dumps({"vectors": [[0.5] * (dimension + 1)]}).encode(),
            "invalid_data",
            [f"vectors have dimension {dimension + 1}, but this collection holds {dimension}-d"],
        ),
    ]
    for body, code, words in cases:
        status, _, answer = raw(url, "POST", "/query", body, key)
        assert status == 400 and answer["code"] == code and all(w in answer["error"] for w in words), (
            body[:60],
            answer,
        )
    status, _, answer = raw(url, "POST", "/query", json.dumps({"vectors": vec, "top": limits.max_top}).encode(), key)
    assert status == 200 and len(answer["results"][0]["labels"]) == min(n_classes, limits.max_top)  # capped
    assert raw(url, "GET", "/nowhere", None, key)[0::2] == (
        404,
        {
            "error": "no route /nowhere; routes: /health, /ready, /info, /query, /metrics, /openapi.json, /docs",
            "code": "not_found",
        },
    )
    assert raw(url, "DELETE", "/query", None, key)[0::2] == (
        405,
        {"error": "DELETE is not allowed on /query", "code": "method_not_allowed"},
    )
    status, _, schema = raw(url, "GET", "/openapi.json", None, key)
    assert status == 200 and "/query" in schema["paths"]
    assert schema["components"]["schemas"]["QueryRequest"]["properties"]["top"]["maximum"] == limits.max_top


# ----------------------------------------------------------------- one process, over real HTTP
@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 3])
def test_served_answers_are_the_local_ones(tmp_path, vectors, shards):
    X, y, Q = vectors
    if shards == 1:
        col = Collection.create(tmp_path / "c", model=None, k=2)
    else:
        col = ShardedCollection.create(tmp_path / "c", shards=shards, model=None, k=2)
    col.add(X, y).set_threshold(0.5)
    with served(tmp_path / "c", "--refresh", "0") as (client, _):
        assert client.health() == {"status": "ok", "ready": True, "classes": 9, "shards": shards, "model": None}
        assert client.info() == json.loads(json.dumps(open_any(tmp_path / "c").info()))
        assert_same(client.query(vectors=Q, top=3), col.query(Q, 3))
        assert_same(client.query(vectors=Q, top=2, threshold=-1.0), col.query(Q, 2, threshold=-1.0))
        with pytest.raises(ServerError, match="precomputed vectors") as err:
            client.query(texts=["hello"])
        assert err.value.status == 400 and err.value.code == "invalid_data"
        X2, _ = blobs(1, 6, 8, seed=12)
        col.add(X2, ["late"] * 6)  # another process's write is served after the refresh
        assert client.health()["classes"] == 10
        assert_same(client.query(vectors=Q, top=3), col.query(Q, 3))
        check_routes_and_errors(client.url, 10, 8)
    with pytest.raises(ServerError, match="cannot reach"):
        client.health()


@pytest.mark.slow
def test_concurrent_text_and_vector_clients_get_the_in_process_answers(texts_collection):
    """The failure this server was rebuilt for: 8+ concurrent clients sending texts (the embedding
    cache's SQLite connection was used across threads). 16 clients, texts and vectors mixed, each
    answer equal to the in-process one; requests were batched; the server answers after."""
    col = Collection.open(texts_collection)
    rng = np.random.default_rng(0)
    words = "card lost where music play jazz flight book weather alarm money send balance pizza".split()
    texts = [" ".join(rng.choice(words, 4)) + f" {i}" for i in range(160)]
    Q = col.embedder().encode(texts[:40]) + rng.normal(0, 0.01, (40, 384)).astype(np.float32)
    want_texts, want_vectors = col.query_texts(texts, 2), col.query(Q, 2)
    service = Service(lambda: open_any(texts_collection), window=0.002)
    with in_thread(service) as url:
        client = wait_ready(url)

        def ask(i):
            if i % 4 == 3:
                got = client.query(vectors=Q[i // 4 : i // 4 + 1], top=2)
                return got, want_vectors.rows(i // 4, i // 4 + 1)
            return client.query(texts=texts[i : i + 1], top=2), want_texts.rows(i, i + 1)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(160)))
        for got, want in answers:
            assert_same(got, want)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        batches = float(re.search(r"^imprint_batch_requests_count (\S+)", metrics, re.M).group(1))
        assert batches < 160  # some requests shared a batch
        assert re.search(r'^imprint_requests_total\{route="/query",status="200"\} 160\.0', metrics, re.M)
        assert client.health()["status"] == "ok"
        assert_same(client.query(texts=texts[:3], top=2), want_texts.rows(0, 3))


def test_micro_batches_gather_concurrent_requests_and_keep_errors_apart():
    sizes = []

    def handle(items):
        sizes.append(len(items))
        return [ValueError(f"bad {x}") if x % 7 == 0 else x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(handle, window=0.01, max_rows=8)
        results = await asyncio.gather(*[batcher.submit(x) for x in range(1, 31)], return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    for x, got in zip(range(1, 31), results):
        if x % 7 == 0:
            assert isinstance(got, ValueError) and str(got) == f"bad {x}"
        else:
            assert got == x * 10
    assert sum(sizes) == 30 and max(sizes) == 8 and len(sizes) == 4  # 30 requests, 8 at most a batch


def test_an_overloaded_batcher_refuses_with_503():
    release = threading.Event()

    async def main():
        batcher = MicroBatcher(lambda items: release.wait(10) and items, window=0, max_rows=4, max_waiting=4)
        first = asyncio.ensure_future(batcher.submit(1, 4))
        await asyncio.sleep(0.05)  # the first batch is running; four more queries may wait
        waiting = asyncio.ensure_future(batcher.submit(2, 4))
        await asyncio.sleep(0)
        with pytest.raises(RequestError, match="overloaded") as err:
            await batcher.submit(3, 1)
        release.set()
        assert await first == 1 and await waiting == 2
        await batcher.close()
        return err.value

    assert asyncio.run(main()).http_status == 503


def test_batched_answers_equal_one_at_a_time_answers(tmp_path, vectors):
    """Requests of different tops, thresholds and shapes in one batch: each gets what it gets alone."""
    X, y, Q = vectors
    col = Collection.create(tmp_path / "c", model=None, k=2).add(X, y).set_threshold(0.4)
    service = Service(lambda: Collection.open(tmp_path / "c"), window=0.05)
    with in_thread(service) as url:
        client = wait_ready(url)
        asks = [(Q[i : i + 1 + i % 3], 1 + i % 4, None if i % 2 else 0.1 * (i % 5)) for i in range(20)]
        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(lambda a: client.query(vectors=a[0], top=a[1], threshold=a[2]), asks))
        for (q, top, threshold), answer in zip(asks, got):
            assert_same(answer, col.query(q, top, threshold=threshold))


def test_limits_of_this_server(tmp_path, vectors):
    """Smaller limits than the defaults, each enforced: body size from Content-Length before
    reading, and counted while streaming when there is none (chunked)."""
    X, y, _ = vectors
    Collection.create(tmp_path / "c", model=None, k=2).add(X, y)
    limits = Limits(max_queries=5, max_text_chars=50, max_top=3, max_body=2000)
    service = Service(lambda: Collection.open(tmp_path / "c"), limits=limits)
    with in_thread(service) as url:
        wait_ready(url)
        check_routes_and_errors(url, 9, 8, limits)
        host, port = url.removeprefix("http://").split(":")
        too_large = {"error": "the request body is over this server's limit of 2000 bytes", "code": "body_too_large"}
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/query")
        conn.putheader("Content-Length", str(10**9))  # a gigabyte announced, nothing sent: refused before reading
        conn.endheaders()
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (413, too_large)
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/query", body=iter([b'{"vectors": [' + b"[0.5]," * 500, b"[0.5]]}"]), encode_chunked=True)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (413, too_large)
        assert Client(url).query(vectors=X[:2], top=2).labels.shape == (2, 2)  # and it answers after


def test_api_key_guards_every_route_but_health_and_ready(tmp_path, vectors):
    X, y, Q = vectors
    col = Collection.create(tmp_path / "c", model=None, k=2).add(X, y)
    service = Service(lambda: Collection.open(tmp_path / "c"))
    with in_thread(service, api_key="s3cret-key") as url:
        wait_ready(url)
        for route in ("/health", "/ready"):
            assert raw(url, "GET", route)[0] == 200
        for method, route, body in (
            ("POST", "/query", b'{"vectors": [[1]]}'),
            ("GET", "/info", None),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("GET", "/docs", None),
        ):
            status, headers, answer = raw(url, method, route, body)
            assert status == 401 and answer["code"] == "unauthorized" and headers["www-authenticate"] == "Bearer"
            assert "needs an API key" in answer["error"]
            status, _, answer = raw(url, method, route, body, {"Authorization": "Bearer wrong-key"})
            assert status == 401 and answer["error"] == "the API key sent is not this server's"
        with pytest.raises(ServerError, match="401"):
            Client(url, api_key="").query(vectors=Q)
        assert_same(Client(url, api_key="s3cret-key").query(vectors=Q, top=2), col.query(Q, 2))
        request = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer s3cret-key"})
        assert b"imprint_classes 9.0" in urllib.request.urlopen(request, timeout=30).read()


def test_ready_only_once_loaded_and_health_reports_a_broken_collection(tmp_path, vectors):
    X, y, Q = vectors
    Collection.create(tmp_path / "c", model=None, k=2).add(X, y)
    opening = threading.Event()

    def slow_open():
        opening.wait(30)
        return Collection.open(tmp_path / "c")

    service = Service(slow_open, refresh=0)
    with in_thread(service) as url:
        status, _, answer = raw(url, "GET", "/ready")
        assert (status, answer["ready"]) == (503, False)
        assert raw(url, "GET", "/health")[0::2] == (
            200,
            {"status": "ok", "ready": False, "classes": None, "shards": None, "model": None},
        )
        status, _, answer = raw(url, "POST", "/query", b'{"vectors": [[1, 2, 3, 4, 5, 6, 7, 8]]}')
        assert (status, answer["code"]) == (503, "not_ready")
        opening.set()
        client = wait_ready(url)
        client.query(vectors=Q)
        writer = Collection.open(tmp_path / "c")
        before = set(writer.info()["segments"])
        X2, _ = blobs(1, 6, 8, seed=12)
        writer.add(X2, ["late"] * 6)  # another process commits a new segment file...
        moved = [tmp_path / "c" / f for f in set(writer.info()["segments"]) - before]
        for f in moved:  # ...which is lost before the server reads it
            f.rename(f.with_suffix(".away"))
        status, _, answer = raw(url, "POST", "/query", json.dumps({"vectors": Q[:1].tolist()}).encode())
        assert (status, answer["code"]) == (500, "collection_damaged"), answer
        status, _, health = raw(url, "GET", "/health")
        assert status == 503 and health["status"] == "error" and "is missing" in health["problems"]["collection"]
        assert raw(url, "GET", "/ready")[0] == 503
        for f in moved:  # repaired: healthy again at the next look
            f.with_suffix(".away").rename(f)
        assert client.query(vectors=Q).labels.shape == (25, 1)
        assert raw(url, "GET", "/health")[0::2] == (
            200,
            {"status": "ok", "ready": True, "classes": 10, "shards": 1, "model": None},
        )


def test_a_collection_that_cannot_open_is_not_ready_and_says_why(tmp_path):
    service = Service(lambda: open_any(tmp_path / "absent"))
    with in_thread(service) as url:
        deadline = time.monotonic() + 30
        while "startup" not in raw(url, "GET", "/health")[2].get("problems", {}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, _, answer = raw(url, "POST", "/query", b'{"vectors": [[1]]}')
        assert status == 503 and "could not start: no collection at" in answer["error"]


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_exits_and_exits_at_once_when_idle(texts_collection):
    texts = [f"a text never seen before, number {i}, about flights and cards" for i in range(600)]
    with served(texts_collection, env={"RETRIEVAL_IMPRINT_CACHE": "off"}) as (client, proc):
        answer = []
        thread = threading.Thread(target=lambda: answer.append(client.query(texts=texts)))
        thread.start()
        time.sleep(0.3)  # the request is being answered (600 texts take over a second to embed)
        assert thread.is_alive()
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert answer and len(answer[0]) == 600  # drained: answered, not dropped
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    with served(texts_collection) as (client, proc):
        client.query(texts=["where is my card"])  # a keep-alive connection is left open by no one: idle
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 1.0


@pytest.mark.slow
def test_the_cli_server_takes_its_api_key_from_the_environment(tmp_path, vectors):
    X, y, Q = vectors
    col = Collection.create(tmp_path / "c", model=None, k=2).add(X, y)
    with served(tmp_path / "c", "--max-top", "2", env={"IMPRINT_API_KEY": "k3y"}) as (client, _):
        assert_same(client.query(vectors=Q, top=2), col.query(Q, 2))
        with pytest.raises(ServerError, match="401"):
            Client(client.url, api_key="nope").info()
        with pytest.raises(ServerError, match="less than or equal to 2"):
            client.query(vectors=Q, top=3)


def test_parse_query_builds_the_engine_request():
    model = request_model(Limits())
    q = parse_query(b'{"vectors": [[1, 2], [3, 4.5]], "top": 2, "threshold": 0.25, "nprobe": 8}', model)
    assert q.vectors.dtype == np.float32 and q.vectors.tolist() == [[1, 2], [3, 4.5]] and len(q) == 2
    assert (q.top, q.threshold, q.search_params, q.texts) == (2, 0.25, {"nprobe": 8}, None)
    q = parse_query(b'{"texts": ["a", "b"]}', model)
    assert (q.texts, q.vectors, q.top, q.threshold, q.search_params) == (["a", "b"], None, 1, None, None)
    with pytest.raises(DataError, match="give either texts"):
        parse_query(b"{}", model)


def test_the_embedding_cache_is_shared_by_threads(tmp_path):
    from retrieval_imprint.embed import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    rng = np.random.default_rng(0)

    def work(t):
        texts = [f"text {t} {i}" for i in range(50)]
        vectors = rng.standard_normal((50, 4)).astype(np.float32)
        cache.put("m", texts, vectors)
        got = cache.get("m", texts)
        return all(np.array_equal(got[text], v) for text, v in zip(texts, vectors))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(32)))
    assert cache.info()["vectors"] == 32 * 50


def test_every_engine_implements_the_searchable_protocol(tmp_path, vectors):
    from retrieval_imprint.rayserving import ShardRouter
    from retrieval_imprint.searchable import Searchable

    X, y, _ = vectors
    members = [name for name in vars(Searchable) if not name.startswith("_") or name == "__len__"]
    assert {"model", "dimension", "n_shards", "info", "refresh", "embedder", "query", "__len__"} <= set(members)
    one = Collection.create(tmp_path / "one", model=None).add(X, y)
    many = ShardedCollection.create(tmp_path / "many", shards=2, model=None).add(X, y)
    assert isinstance(one, Searchable) and isinstance(many, Searchable)
    assert (one.n_shards, many.n_shards, one.dimension, many.dimension) == (1, 2, 8, 8)
    missing = [name for name in members if not hasattr(ShardRouter, name)]
    assert not missing, missing

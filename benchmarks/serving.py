"""Serving benchmark: ``imprint serve`` under 1, 8 and 64 concurrent clients, beside the in-process
ceiling and the server it replaced, all on 127.0.0.1, in one run.

Collections: BANKING77 (77 classes, made from the shared MiniLM embeddings of its train split and
recorded with the packaged model, so texts can be sent) and a 1M-class IVF collection
(IVF2048,SQfp16, one mean proxy per class) of scale.py's seeded synthetic classes (topics of
1,000 classes; isotropic random vectors would make any IVF search every list). Servers, each in its own process with the embedding cache off (every text is
embedded): this one (micro-batching), the same with a 1 ms window, with batching off
(``--max-batch 1``), and the one before it (``--baseline REV``, run from a ``git archive`` of that
commit). Load: closed-loop
clients in another process (aiohttp, keep-alive), one query per request, for a bounded time;
texts are BANKING77 test texts, each made unique. Reported: requests/s, p50/p99 latency, errors,
and the mean micro-batch (from the server's /metrics); after each load the server must still
answer, and on the 1M collection its answers to 200 queries must equal the in-process ones.
Ceilings: the same collection queried in process in batches of 64 (texts: embedded, then
queried). Also: a cold ``imprint query DIR "new text"``, the first text query after /ready, and
the two embedding backends.

    .venv/bin/python benchmarks/serving.py [--seconds 10] [--long 60] [--out docs/serving-benchmark.md]

``--quick`` (the test suite's) runs 2-second rows on BANKING77 alone, without the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "banking77"
BASELINE = "0a726de"  # the last commit with the one-query-at-a-time server
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVAL_IMPRINT_CACHE": "off"}
OLD_SERVER = """import sys
sys.path.insert(0, sys.argv[1])
from retrieval_imprint.serve import LocalService, json_app, listen, run
service = LocalService(sys.argv[2], 1.0)
sock = listen("127.0.0.1", 0)
run(json_app(service.health, service.info, service.query), sock,
    lambda: print(f"ready: baseline answers on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True))
"""


# ----------------------------------------------------------------- the load generator (a process of its own)
def load(url: str, clients: int, seconds: float, payloads: str) -> dict:
    """Closed-loop clients on keep-alive connections for ``seconds``; each request one query: the
    ``payloads`` file's JSON lines in turn (a ``{i}`` in a text is the request's number)."""
    import aiohttp

    bodies = [json.loads(line) for line in Path(payloads).read_text().splitlines()]
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(10**9))

    async def client(session: aiohttp.ClientSession, stop: float) -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            body = bodies[i % len(bodies)]
            if "texts" in body:
                body = {"texts": [body["texts"][0].replace("{i}", str(i))]}
            started = time.perf_counter()
            try:
                async with session.post(url + "/query", json=body) as response:
                    answer = await response.read()
                    if response.status != 200:
                        errors.append(f"{response.status} {answer[:200]!r}")
            except aiohttp.ClientError as exc:
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - started)

    async def run() -> float:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
            started = time.perf_counter()
            await asyncio.gather(*[client(session, started + seconds) for _ in range(clients)])
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    ms = np.array(latencies) * 1e3
    return {
        "requests": len(ms),
        "rps": len(ms) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def run_load(url: str, clients: int, seconds: float, payloads: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--load", url, str(clients), str(seconds), str(payloads)],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    ).stdout
    return json.loads(out)


# ----------------------------------------------------------------- servers
@contextmanager
def server(command: list[str], env: dict | None = None):
    """A server process; yields its URL once it says it is ready (and whether it is the new one)."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env or ENV)
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"ready: .* answers on (http://127\.0\.0\.1:\d+)", line)
            if match:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        time.sleep(0.02)
    try:
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def imprint(*args: str) -> list[str]:
    return [sys.executable, "-c", "from retrieval_imprint.cli import main; main()", *args]


def batch_stats(url: str) -> tuple[float, float]:
    """(queries, batches) so far, from the server's /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()

    def value(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))

    return value("imprint_batch_queries_sum"), value("imprint_batch_queries_count")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/query", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=120).read())


# ----------------------------------------------------------------- data and collections
def banking77(work: Path) -> tuple[Path, list[str], np.ndarray]:
    """The 77-class collection, BANKING77's test texts and their vectors (the shared embeddings)."""
    from retrieval_imprint.collection import Collection

    with np.load(DATA / "embeddings.npz") as z:
        X, y, Q = z["train_X"], z["train_y"], z["test_X"]
    with (DATA / "test.csv").open(newline="") as f:
        texts = [row["text"].strip() for row in csv.DictReader(f)]
    path = work / "banking77"
    Collection.create(path, k=4, generator="kmeans", aggregation="max").add(X, y.tolist(), model="all-MiniLM-L6-v2")
    return path, texts, (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)


def million(work: Path, n: int) -> tuple[Path, np.ndarray]:
    """A collection of ``n`` classes on IVF (scale.py's synthetic classes: topics of 1,000 classes,
    two modes each; one mean proxy per class), and 200 held-out queries per 100,000 classes."""
    from scale import chunk

    from retrieval_imprint.collection import Collection
    from retrieval_imprint.ivf import ivf_lists

    path, step, queries = work / "million", 100_000, []
    col = Collection.create(path, preset="qi", model=None, index=f"IVF{ivf_lists(n)},SQfp16", keep_samples=False)
    for first in range(0, n, step):
        X, y, q = chunk(first, min(step, n - first))
        col.add(X, [f"c{i}" for i in y])
        queries.append(q[:200])
    col.compact()  # retrains the lists on every class, and tunes nprobe
    Q = np.concatenate(queries)
    return path, (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)


def payload_file(work: Path, name: str, bodies: list[dict]) -> Path:
    path = work / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(b) for b in bodies))
    return path


# ----------------------------------------------------------------- in-process figures
def ceiling_vectors(path: Path, Q: np.ndarray, seconds: float = 3.0) -> float:
    """Queries/s of the collection in process, in batches of 64 vectors."""
    from retrieval_imprint.collection import Collection

    col = Collection.open(path)
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        col.query(Q[i % (len(Q) - 64) :][:64])
        done, i = done + 64, i + 64
    return done / (time.perf_counter() - started)


def ceiling_texts(path: Path, texts: list[str], seconds: float = 5.0) -> float:
    """Texts/s in process: 64 new texts embedded (no cache) and queried at a time."""
    from retrieval_imprint.collection import Collection
    from retrieval_imprint.embed import Embedder

    col = Collection.open(path)
    embedder = Embedder(col.model, cache=False).warm()
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        batch = [f"{texts[(i + j) % len(texts)]} ({i + j})" for j in range(64)]
        col.query(embedder.encode(batch), model=col.model)
        done, i = done + 64, i + 64
    return done / (time.perf_counter() - started)


def backends(texts: list[str]) -> list[list[object]]:
    """Each embedding backend: load seconds, one text (median ms of 50), 64 texts at a time (texts/s)."""
    from retrieval_imprint.embed import Embedder

    rows = []
    for backend in ("onnx", "torch"):
        started = time.perf_counter()
        embedder = Embedder(cache=False, backend=backend).warm()
        loaded = time.perf_counter() - started
        one = []
        for i in range(50):
            t = time.perf_counter()
            embedder.encode([f"{texts[i]} ({i})"])
            one.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, 640, 64):
            embedder.encode([f"{texts[(i + j) % len(texts)]} [{i + j}]" for j in range(64)])
        rows.append(
            [backend, f"{loaded:.2f}", f"{statistics.median(one) * 1e3:.1f}", f"{640 / (time.perf_counter() - t):.0f}"]
        )
    return rows


def cold_query(path: Path, repeat: int = 3) -> list[float]:
    """Seconds of a new process answering ``imprint query DIR "new text"`` (cache off)."""
    out = []
    for i in range(repeat):
        started = time.perf_counter()
        subprocess.run(
            imprint("query", str(path), f"is my new card on its way yet {time.time()} {i}"),
            env=ENV,
            check=True,
            capture_output=True,
        )
        out.append(time.perf_counter() - started)
    return out


def first_text_query(path: Path) -> float:
    """Seconds of the first text query a new server answers once it says it is ready."""
    with server(imprint("serve", str(path), "--port", "0")) as url:
        started = time.perf_counter()
        post(url, {"texts": ["has my new card been sent yet"]})
        return time.perf_counter() - started


# ----------------------------------------------------------------- the run
def measure(
    label: str, url: str, kind: str, clients: int, seconds: float, payloads: Path, new: bool, check: object = None
) -> dict:
    before = batch_stats(url) if new else None
    result = run_load(url, clients, seconds, payloads)
    if new:
        after = batch_stats(url)
        result["batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    post(url, {"vectors": [[0.1] * 384]})  # it answers after the load
    if check is not None:
        check(url)
    result.update(server=label, kind=kind, clients=clients, seconds=seconds)
    print(json.dumps(result), flush=True)
    return result


def row(r: dict) -> list[object]:
    batch = f"{r['batch']:.1f}" if "batch" in r else "-"
    return [
        r["server"],
        r["kind"],
        r["clients"],
        r["seconds"],
        r["requests"],
        f"{r['rps']:.0f}",
        f"{r['p50']:.1f}",
        f"{r['p99']:.1f}",
        r["errors"],
        batch,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Seconds of each 1- and 8-client row.")
    parser.add_argument("--long", type=float, default=60.0, help="Seconds of each 64-client row.")
    parser.add_argument("--classes", type=int, default=1_000_000, help="Classes of the IVF collection (0: none).")
    parser.add_argument("--baseline", default=BASELINE, help="The commit whose server is the baseline ('' : none).")
    parser.add_argument("--quick", action="store_true", help="2-second rows, BANKING77 only, no baseline.")
    parser.add_argument("--out", type=Path, default=DOCS / "serving-benchmark.md")
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, clients, seconds, payloads = args.load
        print(json.dumps(load(url, int(clients), float(seconds), payloads)))
        return
    if args.quick:
        args.seconds, args.long, args.classes, args.baseline = 2.0, 2.0, 0, ""
    started = time.time()
    results: list[dict] = []
    with scratch("ri-serving-") as tmp:
        work = Path(tmp)
        path77, texts, Q77 = banking77(work)
        vec77 = payload_file(work, "vectors77", [{"vectors": [q.round(6).tolist()]} for q in Q77])
        txt77 = payload_file(work, "texts77", [{"texts": [t + " ({i})"]} for t in texts])
        old = None
        if args.baseline:
            old = work / "baseline"
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline, "retrieval_imprint"], check=True, capture_output=True
            ).stdout
            with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
                tar.extractall(old, filter="data")
        servers = [
            ("this", imprint("serve", str(path77), "--port", "0"), True),
            ("this, 1 ms window", imprint("serve", str(path77), "--port", "0", "--batch-window", "1"), True),
            ("batching off", imprint("serve", str(path77), "--port", "0", "--max-batch", "1"), True),
        ]
        if old is not None:
            servers.append(
                (f"baseline {args.baseline}", [sys.executable, "-c", OLD_SERVER, str(old), str(path77)], False)
            )
        for label, command, new in servers:
            with server(command) as url:
                for kind, payloads in (("vectors", vec77), ("texts", txt77)):
                    for clients in (1, 8, 64):
                        seconds = args.long if clients == 64 else args.seconds
                        results.append(measure(label, url, kind, clients, seconds, payloads, new))
        ceilings = {"vectors": ceiling_vectors(path77, Q77), "texts": ceiling_texts(path77, texts)}
        embedding = backends(texts)
        cold = cold_query(path77)
        first = first_text_query(path77)
        big: list[dict] = []
        if args.classes:
            t = time.perf_counter()
            path1m, Q1m = million(work, args.classes)
            built = time.perf_counter() - t
            vec1m = payload_file(work, "vectors1m", [{"vectors": [q.round(6).tolist()]} for q in Q1m])
            ceilings["1M vectors"] = ceiling_vectors(path1m, Q1m)

            def same_answers(url: str) -> None:
                from retrieval_imprint.collection import Collection

                want = Collection.open(path1m).query(Q1m[:200].round(6).astype(np.float32), 1).labels[:, 0].tolist()
                got = [post(url, {"vectors": [q.round(6).tolist()]})["results"][0]["labels"][0] for q in Q1m[:200]]
                same = sum(a == b for a, b in zip(got, want))
                print(f"1M: {same} of 200 answers equal the in-process ones", flush=True)
                if same != 200:
                    raise SystemExit(f"served answers differ from the in-process ones: {same} of 200 equal")

            with server(imprint("serve", str(path1m), "--port", "0")) as url:
                for clients in (1, 8, 64):
                    seconds = args.long if clients == 64 else args.seconds
                    big.append(
                        measure(
                            "this",
                            url,
                            f"vectors, {args.classes:,} classes",
                            clients,
                            seconds,
                            vec1m,
                            True,
                            same_answers,
                        )
                    )
            if old is not None:
                with server([sys.executable, "-c", OLD_SERVER, str(old), str(path1m)]) as url:
                    big.append(
                        measure(
                            f"baseline {args.baseline}",
                            url,
                            f"vectors, {args.classes:,} classes",
                            64,
                            args.long,
                            vec1m,
                            False,
                        )
                    )
    write(args, results, big, ceilings, embedding, cold, first, built if args.classes else None, started)


def write(args, results, big, ceilings, embedding, cold, first, built, started) -> None:
    header = [
        "server",
        "queries",
        "clients",
        "seconds",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "mean batch",
    ]
    best = {(r["kind"], r["clients"]): r for r in results if r["server"] == "this"}
    lines = [
        "# Serving benchmark",
        "",
        f"`.venv/bin/python benchmarks/serving.py{' --quick' if args.quick else ''}` on {machine()}; "
        f"{time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.1f} min. Server and load generator share "
        "this machine's cores; every server runs with the embedding cache off (each text is embedded).",
        "",
        "## BANKING77 (77 classes)",
        "",
        markdown_table(header, [row(r) for r in results]),
        "",
        "In-process ceilings in the same run, batches of 64: "
        + ", ".join(f"{k} {v:,.0f} queries/s" for k, v in ceilings.items())
        + ".",
        "",
    ]
    if big:
        lines += [
            f"## {args.classes:,} classes, IVF (built in {built:.0f} s)",
            "",
            markdown_table(header, [row(r) for r in big]),
            "",
        ]
    ratio = {k: best[k]["rps"] for k in best}
    lines += [
        "## Against the targets",
        "",
        markdown_table(
            ["target", "measured", "held"],
            [
                [
                    "0 errors, 64 clients, texts and vectors",
                    ", ".join(f"{k[0]}: {best[k]['errors']}" for k in best if k[1] == 64),
                    all(best[k]["errors"] == 0 for k in best if k[1] == 64),
                ],
                [
                    "vectors, 77 classes, 64 clients: >= 600 req/s, p99 <= 100 ms",
                    f"{ratio[('vectors', 64)]:.0f} req/s, p99 {best[('vectors', 64)]['p99']:.1f} ms",
                    ratio[("vectors", 64)] >= 600 and best[("vectors", 64)]["p99"] <= 100,
                ],
                [
                    "texts, 64 clients: >= 0.5x the in-process embed+query ceiling, p99 <= 1 s",
                    f"{ratio[('texts', 64)]:.0f} req/s = {ratio[('texts', 64)] / ceilings['texts']:.2f}x of "
                    f"{ceilings['texts']:.0f}, p99 {best[('texts', 64)]['p99']:.0f} ms",
                    ratio[("texts", 64)] >= 0.5 * ceilings["texts"] and best[("texts", 64)]["p99"] <= 1000,
                ],
                *(
                    [
                        [
                            f"{args.classes:,}-class IVF, 64 clients: >= 500 req/s, answers equal in-process",
                            f"{big[2]['rps']:.0f} req/s, 200 of 200 answers equal",
                            big[2]["rps"] >= 500,
                        ]
                    ]
                    if big
                    else []
                ),
                [
                    'cold `imprint query DIR "new text"` <= 2 s',
                    f"{statistics.median(cold):.2f} s (median of {len(cold)}: {', '.join(f'{c:.2f}' for c in cold)})",
                    statistics.median(cold) <= 2,
                ],
                ["first served text query <= 0.5 s after ready", f"{first * 1e3:.0f} ms", first <= 0.5],
            ],
        ),
        "",
        "## Embedding backends (in process, cache off)",
        "",
        markdown_table(
            ["backend", "load + first text, s", "one text, ms (median of 50)", "64 at a time, texts/s"], embedding
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

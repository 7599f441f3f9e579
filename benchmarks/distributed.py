"""Distributed benchmark: a sharded collection built with Ray Data and served with Ray Serve, against
one process doing the same (docs/distributed.md).

Synthetic classes as benchmarks/scale.py makes them (384-d, topics, two modes, 8 training samples
and one held-out query per class), written to Parquet 50,000 classes a file. Builds, each in its
own process: `ingest` into one collection (the single-process `imprint index`), and
`distributed.build` with S shards on a local Ray of 2 CPUs. Reports build times and their ratio,
peak RSS per process (the single build; the Ray driver and the largest Ray worker), agreement of
the merged answer with one exact search over every proxy of the sharded collection, and batch-1
latency (p50/p99 over 1,000 queries) and batch-1,000 throughput for one collection in process, the
sharded collection in process, `imprint serve` (one process, HTTP) and Ray Serve (HTTP), with a
memory model for 10M and 100M classes.

    .venv/bin/python benchmarks/distributed.py [--classes 1000000] [--shards 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch
from scale import chunk

K, N_QUERIES, FILE_CLASSES = 4, 1000, 50_000
SETTINGS = dict(model=None, generator="kmeans", k=K, aggregation="max", keep_samples=False)


def write_parquet(n_classes: int, root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Parquet files of the training rows; held-out queries of 1,000 random classes and their labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, queries, truth = [], [], []
    chosen = np.sort(np.random.default_rng(n_classes).choice(n_classes, min(N_QUERIES, n_classes), replace=False))
    for first in range(0, n_classes, FILE_CLASSES):
        n = min(FILE_CLASSES, n_classes - first)
        X, y, held = chunk(first, n)
        files.append(str(root / f"train-{first:08d}.parquet"))
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
        pq.write_table(
            pa.table({"label": [f"class{v}" for v in y], "vector": vectors.cast(pa.list_(pa.float32()))}), files[-1]
        )
        mine = chosen[(chosen >= first) & (chosen < first + n)]
        queries.append(held[mine - first])
        truth += [f"class{v}" for v in mine]
    return files, np.concatenate(queries), np.array(truth, object)


def descendants_peak() -> tuple[int, int]:
    """Peak RSS (VmHWM) of this process and the largest of its living descendants (Ray's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(re.search(r"PPid:\s+(\d+)", (entry / "status").read_text()).group(1))
            except (OSError, AttributeError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, peak = list(children.get(os.getpid(), [])), 0
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)))
        except (OSError, AttributeError):
            pass
    own = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return own * 1024, peak * 1024


def child_build(engine: str, path: str, files: list[str], shards: int) -> None:
    """One build in this (child) process; prints its seconds and peak RSS as JSON."""
    t = time.perf_counter()
    if engine == "local":
        from retrieval_imprint.ingestion import ingest

        ingest(path, files, **SETTINGS)
        print(json.dumps({"seconds": time.perf_counter() - t, "peak": descendants_peak()[0], "worker_peak": 0}))
        return
    from retrieval_imprint import distributed

    distributed.init(num_cpus=2)
    distributed.build(path, files, shards=shards, **SETTINGS)
    seconds = time.perf_counter() - t
    own, workers = descendants_peak()
    print(json.dumps({"seconds": seconds, "peak": own, "worker_peak": workers}))


def timed_build(engine: str, path: Path, files: list[str], shards: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", engine, str(path), str(shards), *files],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def latencies(answer, queries: np.ndarray) -> tuple[float, float, float]:
    """p50 and p99 ms of batch-1 calls, and queries per second at batch 1,000."""
    answer(queries[:5])  # warm: the first call loads lazily
    ms = []
    for q in queries:
        t = time.perf_counter()
        answer(q[None])
        ms.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    answer(queries)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(queries) / (time.perf_counter() - t)


def exact_labels(sharded, Qn: np.ndarray) -> np.ndarray:
    """Top-1 class of one exact search over every proxy of every shard (float64 on float32 proxies)."""
    best, label = np.full(len(Qn), -np.inf), np.empty(len(Qn), object)
    Q, rows = Qn.astype(np.float64), np.arange(len(Qn))
    for col in sharded.shards:
        s = col.snapshot
        if not len(col):
            continue
        all_ids = s.proxies.ids
        for lo in range(0, len(all_ids), 1 << 17):  # blocks: 1,000 x 1M float64 scores would be 8 GB
            ids = all_ids[lo : lo + (1 << 17)]
            S = Q @ s.proxies.reconstruct(ids).astype(np.float64).T
            j = S.argmax(1)
            top = S[rows, j]
            better = top > best
            best[better] = top[better]
            label[better] = s.table.labels[s.table.positions(ids[j[better]] >> 24)]
    return label


def serve_local(path: Path):
    """``imprint serve path`` in a subprocess, and its URL once it says it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from retrieval_imprint.cli import main; main()", "serve", str(path), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        found = re.search(r"^ready: .* answers on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("imprint serve did not start")


def memory_model(bytes_per_proxy: float) -> list[list[str]]:
    """Shards needed for 10M and 100M classes (k = 4) at several RAM sizes per machine, keeping the
    index within half the RAM (the rest: queries, the OS page cache, compaction's second copy)."""
    rows = []
    for classes in (10_000_000, 100_000_000):
        for name, per_dim in (("IVF-SQfp16", 2), ("Flat", 4)):
            size = classes * K * (384 * per_dim + 8)  # codes + 8-byte ids
            rows.append(
                [f"{classes:,}", name, f"{size / 1e9:,.0f}"]
                + [str(int(np.ceil(size / (ram * 1e9 / 2)))) for ram in (64, 128, 256)]
            )
    rows.append(["measured here", "this run's shards", f"{bytes_per_proxy:,.0f} B/proxy on disk", "", "", ""])
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, path, shards, *files = sys.argv[2:]
        if engine == "query":
            from retrieval_imprint.collection import Collection

            with Collection.open(path) as one:
                print(json.dumps(latencies(one.predict, np.load(files[0]))))
        else:
            child_build(engine, path, files, int(shards))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DOCS / "distributed.md")
    parser.add_argument("--builds-only", action="store_true", help="time the two builds and stop")
    args = parser.parse_args()
    started = time.perf_counter()
    with scratch("ri-distributed-") as root:
        run(args, root, started)


def run(args: argparse.Namespace, root: Path, started: float) -> None:
    """The benchmark in the working folder ``root`` (removed by the caller, however this ends)."""
    print(f"writing Parquet for {args.classes:,} classes", flush=True)
    files, queries, truth = write_parquet(args.classes, root)
    print("one-process build", flush=True)
    single = timed_build("local", root / "single", files, 1)
    print(f"  {single['seconds']:.0f} s; Ray build, {args.shards} shards", flush=True)
    sharded_build = timed_build("ray", root / "sharded", files, args.shards)
    print(f"  {sharded_build['seconds']:.0f} s; queries", flush=True)
    build_rows = [
        ["one process (`imprint index`)", f"{single['seconds']:.0f}", "1.00x", f"{single['peak'] / 2**30:.2f}", ""],
        [
            f"Ray Data, {args.shards} shards",
            f"{sharded_build['seconds']:.0f}",
            f"{sharded_build['seconds'] / single['seconds']:.2f}x",
            f"{sharded_build['peak'] / 2**30:.2f}",
            f"{sharded_build['worker_peak'] / 2**30:.2f}",
        ],
    ]
    build_table = markdown_table(
        ["build", "seconds", "vs one process", "peak RSS GiB (driver)", "largest Ray worker GiB"], build_rows
    )
    command = (
        "benchmarks/distributed.py"
        + (f" --classes {args.classes}" if args.classes != 1_000_000 else "")
        + (f" --shards {args.shards}" if args.shards != 4 else "")
        + (" --builds-only" if args.builds_only else "")
        + (f" --out {args.out}" if args.out.resolve() != DOCS / "distributed.md" else "")
    )
    setup = (
        f"Setup: {args.classes:,} synthetic classes as in [scale.md](scale.md) (384-d, 8 training samples each, "
        f"in Parquet files of {FILE_CLASSES:,} classes), GEN kmeans k = {K}, max, exact (Flat) indexes, samples "
        "not kept. Each build runs in its own process."
    )
    if args.builds_only:
        minutes = (time.perf_counter() - started) / 60
        args.out.write_text(
            "\n".join(
                [
                    "# Distributed: the Ray build against one process",
                    "",
                    f"Command: `.venv/bin/python {command}` ({minutes:.0f} min)  ",
                    f"Machine: {machine()}; a local Ray of 2 CPUs  ",
                    setup
                    + " The peak RSS of the one-process build counts the pages of its memory-mapped input (the vectors "
                    "read past 1 GiB wait in a file), which the OS can drop.",
                    "",
                    build_table,
                    "",
                ]
            )
        )
        print(args.out.read_text())
        return

    from retrieval_imprint import distributed
    from retrieval_imprint.client import Client
    from retrieval_imprint.normalize import l2_normalize
    from retrieval_imprint.sharded import ShardedCollection

    # one copy of the proxies in memory at a time (at 1M classes each is 6 GB): the single
    # collection is queried in a child process, which gives all its memory back when it ends
    np.save(root / "queries.npy", queries)
    done = subprocess.run(
        [sys.executable, __file__, "--child", "query", str(root / "single"), "0", str(root / "queries.npy")],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [["one collection, in process", *json.loads(done.stdout.strip().splitlines()[-1])]]
    sharded = ShardedCollection.open(root / "sharded")
    merged = sharded.predict(queries)
    agreement = float(np.mean(merged == exact_labels(sharded, l2_normalize(queries))))
    accuracy = float(np.mean(merged == truth))
    rows.append([f"{args.shards} shards, in process", *latencies(sharded.predict, queries)])
    info = sharded.info()
    sharded.close()
    del sharded
    gc.collect()
    proc, url = serve_local(root / "sharded")
    try:
        client = Client(url)
        rows.append(
            [f"{args.shards} shards, imprint serve (HTTP)", *latencies(lambda Q: client.query(vectors=Q), queries)]
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    distributed.init(num_cpus=2)
    from retrieval_imprint import rayserving

    client = Client(rayserving.serve(root / "sharded", port=8765), timeout=300)
    try:
        rows.append([f"{args.shards} shards, Ray Serve (HTTP)", *latencies(lambda Q: client.query(vectors=Q), queries)])
    finally:
        rayserving.serve_shutdown()
    base = rows[0][1]
    table = [[name, f"{p50:.2f}", f"{p99:.2f}", f"{p50 / base:.1f}x", f"{qps:,.0f}"] for name, p50, p99, qps in rows]
    proxies = info["proxies"]
    minutes = (time.perf_counter() - started) / 60
    doc = "\n".join(
        [
            "# Distributed: shards on Ray",
            "",
            f"Command: `.venv/bin/python {command}` ({minutes:.0f} min)  ",
            f"Machine: {machine()}; a local Ray of 2 CPUs  ",
            f"{setup} Queries: one held-out sample of each of {len(queries):,} random classes.",
            "",
            "## Build",
            "",
            build_table,
            "",
            "## Answers",
            "",
            f"- merged answer = top-1 of one exact search over all {proxies:,} proxies of the shards: "
            f"{agreement:.4f} of queries",
            f"- held-out accuracy of the merged answer: {accuracy:.4f}",
            "",
            "## Queries",
            "",
            markdown_table(
                ["answered by", "batch-1 p50 ms", "batch-1 p99 ms", "p50 vs one collection", "batch-1,000 q/s"], table
            ),
            "",
            "## Memory model (arithmetic)",
            "",
            "Index bytes = classes x k x (384 x bytes per dimension + 8 for the id); shards needed to keep each "
            "shard's index within half a machine's RAM.",
            "",
            markdown_table(
                ["classes", "index", "index GB", "shards at 64 GB", "at 128 GB", "at 256 GB"],
                memory_model(info["bytes_on_disk"] / max(proxies, 1)),
            ),
            "",
        ]
    )
    args.out.write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()

"""Scale benchmark: collections of 10k, 100k and 1M classes (k = 4, 384-d) on IVF proxy indexes.

Synthetic classes (seeded; ``--data topics``: grouped in topics, two modes each; ``--data
realistic``: real sentence embeddings mixed and spread by real within-intent residuals, see
``Realistic``; 8 training samples and 1 held-out query per class) are
generated and added 50,000 classes at a time, so the raw embeddings are never all in memory.
Reports build time (the adds plus a final compaction), peak RSS, on-disk size, open time, query
latency (batch 1, p50/p90/p99/max) and throughput (batch 1000), recall@1 of the approximate index against
exact search over the same proxies (with the IVF lists trained on the first add, and after the final
compaction retrained them), accuracy on held-out queries, and add-one-class latency.
Writes docs/scale.md (or --out), headed by the CPU's SIMD and the one FAISS uses: run with
FAISS_SIMD_LEVEL=AVX2 on an AVX-512 machine to see FAISS's AVX2 path.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--data topics|realistic]
        [--index refined sqfp16] [--out FILE] [--keep DIR [--resume]]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch

from retrieval_imprint._groups import Grouped
from retrieval_imprint.collection import Collection
from retrieval_imprint.generate import generate
from retrieval_imprint.ivf import HNSW_QUANTIZER_LISTS, TRAIN_PER_LIST, ivf_lists, refined
from retrieval_imprint.labels import label_keys
from retrieval_imprint.normalize import l2_normalize
from retrieval_imprint.segments import CLASS_SHIFT, MAP_MIN, candidates_of

D, K, TRAIN, CHUNK, N_QUERIES, ADDS, COLD = 384, 4, 8, 50_000, 1000, 100, 100
STATE_CHUNKS = 10  # chunks between the saves of an exact reference's progress
HEARTBEAT = 5.0  # seconds between a build's marks that it runs: a resumed build knows when it was killed
BULK_BYTES = 8 * 2**30  # float16 proxies from which the lists are trained once, on a sample, before the adds
SAMPLE_RUN = 16  # consecutive classes in each run of a bulk build's training sample (training_sample)


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def open_fresh(path: Path, queries: np.ndarray) -> dict[str, float]:
    """Open the collection in a new process (imports done first, as a server's are) and query it
    one query at a time: seconds to open, the first query's milliseconds, and the process's
    anonymous and file-backed (mapped) resident memory before opening, after it and after the
    queries (``open_only`` prints them)."""
    with tempfile.NamedTemporaryFile(suffix=".npy") as q:
        np.save(q.name, queries)
        out = subprocess.run(
            [sys.executable, __file__, "--open-only", str(path), q.name], check=True, capture_output=True, text=True
        ).stdout
    return json.loads(out)


def open_only(path: str, query_file: str) -> None:
    """The child of ``open_fresh``: prints its figures as JSON."""
    queries = np.load(query_file)
    memory = {}

    def resident(when: str) -> None:
        for key in ("VmRSS", "RssAnon", "RssFile"):
            memory[f"{key}_{when}"] = status(key + ":") / 2**30

    resident("before")
    t = time.perf_counter()
    col = Collection.open(path)
    opened = time.perf_counter() - t
    resident("open")
    cold = batch1_ms(col, queries)  # the first queries after open bring in the lists they probe
    resident("queried")
    print(
        json.dumps(
            {
                "open_s": opened,
                "first_ms": cold[0],
                "cold_p50_ms": float(np.percentile(cold[:COLD], 50)),
                "cold_max_ms": float(cold[:COLD].max()),
                **memory,
            }
        )
    )


def batch1_ms(col: Collection, queries: np.ndarray) -> np.ndarray:
    """Milliseconds of each query answered alone, in order."""
    out = []
    for q in queries:
        t = time.perf_counter()
        col.predict(q[None])
        out.append(time.perf_counter() - t)
    return np.array(out) * 1e3


def add_one(col: Collection, first: int, make: Callable) -> list[float]:
    """Seconds of each of ``ADDS`` adds of one new class (classes ``first``, ``first + 1``, ...)."""
    out = []
    for i in range(ADDS):
        X, y, _ = make(first + i, 1)
        t = time.perf_counter()
        col.add(X, y.tolist())
        out.append(time.perf_counter() - t)
    return out


def held_out(
    n_classes: int, make: Callable, known: dict[int, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The classes queried (``N_QUERIES``, seeded by the size) and one held-out sample of each: those
    of the chunks in ``known`` (by first class, kept as the build made them: ``queries_of``), the
    others' made here."""
    chosen = chosen_classes(n_classes)
    known = known or {}
    queries = [
        known[f] if f in known else queries_of(chosen, f, make(f, min(CHUNK, n_classes - f))[2])
        for f in range(0, n_classes, CHUNK)
    ]
    return chosen, np.concatenate(queries)


def chosen_classes(n_classes: int) -> np.ndarray:
    """The classes queried, sorted: ``N_QUERIES`` of them, seeded by the size."""
    return np.sort(np.random.default_rng(n_classes).choice(n_classes, min(N_QUERIES, n_classes), replace=False))


def queries_of(chosen: np.ndarray, first: int, queries: np.ndarray) -> np.ndarray:
    """The held-out samples of the ``chosen`` classes among the chunk starting at class ``first``."""
    return queries[chosen[(chosen >= first) & (chosen < first + CHUNK)] - first]


def reopen(path: Path, n_classes: int, make: Callable) -> str:
    """A kept collection of ``n_classes`` measured again with this code (``--reopen``): its schema
    upgraded first if older, then opened in a new process and queried cold, then here twice (the first
    pass of a process verifies the blocks it reads; the second is the warm one), then
    ``ADDS`` classes added one at a time (new ones, numbered after every class it holds: a collection
    with removed classes holds fewer than its largest label)."""
    t = time.perf_counter()
    before, after = Collection.upgrade(path)
    upgrade = time.perf_counter() - t
    queries = cached(path.parent / f"{path.name}.queries.npy", lambda: held_out(n_classes, make)[1])
    fresh = open_fresh(path, queries)
    col = Collection.open(path)
    first = batch1_ms(col, queries)  # this process's first pass verifies the blocks it reads (verified.py)
    warm = batch1_ms(col, queries)
    adds = np.array(add_one(col, max(col.classes) + 1, make)) * 1e3  # new classes past every label, removed ones too
    names = ["classes", "upgrade s", "open s", "RSS after open GiB", "anon after open GiB", "first query ms"]
    names += [f"cold first {COLD} p50 ms", f"cold first {COLD} max ms", "first pass here p50 ms"]
    names += ["warm batch-1 p50 ms", "warm p99 ms"]
    names += ["add-one p50 ms", "add-one p99 ms"]
    row = [f"{n_classes:,}", f"{upgrade:.1f} ({before} -> {after})" if before != after else "-"]
    row += [f"{fresh['open_s']:.2f}", f"{fresh['VmRSS_open']:.2f}", f"{fresh['RssAnon_open']:.2f}"]
    row += [f"{fresh['first_ms']:.1f}", f"{fresh['cold_p50_ms']:.2f}", f"{fresh['cold_max_ms']:.1f}"]
    row += [f"{np.percentile(first, 50):.2f}"]
    row += [f"{np.percentile(warm, 50):.2f}", f"{np.percentile(warm, 99):.2f}"]
    row += [f"{np.percentile(adds, 50):.1f}", f"{np.percentile(adds, 99):.1f}"]
    return markdown_table(names, [row])


def chunk(first: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes ``first .. first + n``: training samples ``(8n, D)``, labels, one held-out query each.

    Like real intents, classes sit in topics (1,000 classes per topic, topic centres seeded once);
    each class has two modes; samples scatter around them.
    """
    topics = np.random.default_rng(11).standard_normal((max(1, (first + n) // 1000 + 1), D)).astype(np.float32)
    rng = np.random.default_rng([7, first])
    centre = topics[(first + np.arange(n)) // 1000] + 0.7 * rng.standard_normal((n, D), dtype=np.float32)
    modes = centre[:, None, :] + 0.5 * rng.standard_normal((n, 2, D), dtype=np.float32)
    pick = rng.integers(0, 2, (n, TRAIN + 1))
    X = modes[np.arange(n)[:, None], pick] + 0.4 * rng.standard_normal((n, TRAIN + 1, D), dtype=np.float32)
    y = np.repeat(np.arange(first, first + n), TRAIN)
    return X[:, :TRAIN].reshape(-1, D), y, X[:, TRAIN]


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Realistic:
    """Classes whose geometry is real text's: each class centre is a mixture of two real sentence
    embeddings (all-MiniLM-L6-v2, L2-normalised, of CLINC150 and BANKING77, every split), and each
    sample is that centre plus a real within-intent residual (a sentence minus the mean of its own
    intent), so the spread, anisotropy and hubness are those of real same-intent sentences.

    Seeded per chunk, like ``chunk``: classes ``first .. first + n`` are the same whatever the sizes
    run. The mixing weight is uniform in [0.3, 0.7]; the two sentences are drawn from the whole pool
    (36,783 sentences of 228 intents, counting out-of-scope as one), so distinct classes may share
    a sentence, as near-duplicate entities and products do."""

    def __init__(self) -> None:
        vectors, residuals = [], []
        for name in ("clinc150", "banking77"):
            with np.load(SHARED / name / "embeddings.npz") as z:
                for split in sorted({key[:-2] for key in z.files if key.endswith("_X")}):
                    X, y = l2_normalize(z[f"{split}_X"]), z[f"{split}_y"]
                    vectors.append(X)
                    for label in np.unique(y):
                        rows = X[y == label]
                        residuals.append(rows - rows.mean(0))
        self.pool = np.concatenate(vectors).astype(np.float32)
        self.residuals = np.concatenate(residuals).astype(np.float32)

    def __call__(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``chunk``: training samples ``(8n, D)``, labels, one held-out query per class."""
        rng = np.random.default_rng([17, first])
        a = rng.uniform(0.3, 0.7, (n, 1)).astype(np.float32)
        pick = rng.integers(0, len(self.pool), (n, 2))
        centre = l2_normalize(a * self.pool[pick[:, 0]] + (1 - a) * self.pool[pick[:, 1]])
        spread = self.residuals[rng.integers(0, len(self.residuals), (n, TRAIN + 1))]
        X = centre[:, None, :] + spread
        y = np.repeat(np.arange(first, first + n), TRAIN)
        return X[:, :TRAIN].reshape(-1, D), y, X[:, TRAIN]


def training_sample(n_classes: int, make: Callable, n_sample: int) -> tuple[np.ndarray, list[str]]:
    """Samples of about ``n_sample`` classes spread over all ``n_classes``: runs of ``SAMPLE_RUN``
    consecutive classes at even steps, each drawn as ``make`` draws classes (seeded by where the run
    starts: like the classes built, not the same ones), labelled apart from them. What a bulk build
    trains its lists on before its first add (``Collection.train``)."""
    runs = np.linspace(0, n_classes - SAMPLE_RUN, -(-n_sample // SAMPLE_RUN)).astype(int)
    parts = [make(int(f), SAMPLE_RUN) for f in runs]
    labels = [f"sample {i // TRAIN}" for i in range(sum(len(p[0]) for p in parts))]
    return np.concatenate([p[0] for p in parts]), labels


def reference_proxies(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The proxies the collection computes (L2 / kmeans k=4 / L2, per-class seeds), as float32."""
    classes, codes = np.unique(y, return_inverse=True)
    W, _ = generate("kmeans", Grouped.from_codes(l2_normalize(X), codes, label_keys(classes.tolist())), K, 0)
    return l2_normalize(W, copy=False)


def exact_top1(Qn: np.ndarray, n_classes: int, make: Callable = chunk, state: Path | None = None) -> np.ndarray:
    """Ids (``class << 24 | j``) of the exact top-1 proxies, recomputed chunk by chunk after the build;
    with ``state``, the best so far kept there every ``STATE_CHUNKS`` chunks and taken up again (at
    10M classes this pass makes every chunk again: half an hour)."""
    best_sim, best_id, start = np.full(len(Qn), -np.inf, np.float32), np.zeros(len(Qn), np.int64), 0
    if state is not None and state.exists():
        with np.load(state) as saved:
            if np.array_equal(saved["queries"], Qn):
                best_sim, best_id, start = saved["best_sim"], saved["best_id"], int(saved["next"])
    for first in range(start, n_classes, CHUNK):
        X, y, _ = make(first, min(CHUNK, n_classes - first))
        S = Qn @ reference_proxies(X, y).T
        j = S.argmax(1)
        s = S[np.arange(len(Qn)), j]
        better = s > best_sim
        best_sim[better] = s[better]
        best_id[better] = ((first + j[better] // K) << CLASS_SHIFT) + j[better] % K
        done = min(first + CHUNK, n_classes)
        if state is not None and ((first // CHUNK) % STATE_CHUNKS == STATE_CHUNKS - 1 or done == n_classes):
            np.savez(state, queries=Qn, best_sim=best_sim, best_id=best_id, next=done)
    return best_id


def cached(path: Path, make_it: Callable[[], np.ndarray]) -> np.ndarray:
    """``make_it()``, kept in ``path``: what a resumed or repeated measurement of a kept collection reads back."""
    if path.exists():
        return np.load(path)
    out = make_it()
    np.save(path, out)
    return out


class Progress:
    """A build's figures so far, kept in a file beside the collection after every add, so that a
    killed build (``--resume``) goes on from the last add the collection committed and reports the
    whole build: the adds of every run, plus the work the kill lost (from the last add recorded to
    the last of the killed run's marks, made every ``HEARTBEAT`` seconds; none once every add was
    in, as the kill then stopped a measurement)."""

    def __init__(self, path: Path) -> None:
        self.path, self.alive = path, path.with_suffix(".alive")
        self.build, self.peak, self.at = 0.0, 0, time.time()
        self.resumed: list[str] = []

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"build": self.build, "peak": self.peak, "at": self.at, "resumed": self.resumed}))
        tmp.replace(self.path)

    def beat(self) -> None:
        """Mark the build as running, now and every ``HEARTBEAT`` seconds (a daemon thread)."""

        def loop() -> None:
            while True:
                self.alive.write_text(repr(time.time()))
                time.sleep(HEARTBEAT)

        threading.Thread(target=loop, daemon=True).start()

    def added(self, seconds: float, peak: int) -> None:
        self.build, self.peak, self.at = self.build + seconds, max(self.peak, peak), time.time()
        self.save()

    def resume(self, batches: list[list[int]], done: int, n_classes: int) -> list[list[int]]:
        """The batches left once ``done`` classes are in; the figures read back."""
        ends = [0] + [min(b[-1] + CHUNK, n_classes) for b in batches]
        if done not in ends:
            raise SystemExit(f"{self.path}: {done:,} classes is not where an add ends: not a build to resume")
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.build, self.peak, self.resumed = saved["build"], saved["peak"], saved["resumed"]
            killed = float(self.alive.read_text()) if self.alive.exists() else time.time()
            # once every add is in, the kill lost a measurement, not part of the build
            lost = max(0.0, killed - saved["at"]) if done < n_classes else 0.0
            self.build += lost
            self.resumed.append(f"killed after {done:,} classes and resumed ({lost:.0f} s lost, counted)")
        self.at = time.time()
        self.save()
        print(f"  resumed at {done:,} classes, {self.build:.0f} s", flush=True)
        return batches[ends.index(done) :]


def run(
    n_classes: int, root: Path, make: Callable = chunk, index: str = "refined", resume: bool = False
) -> tuple[list[str], dict[str, float]]:
    chosen, known = chosen_classes(n_classes), {}  # each chunk's queries, taken as the build makes it
    nlist = ivf_lists(K * n_classes)
    factory = INDEXES[index](f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}")
    # beyond BULK_BYTES of float16 proxies a retrain (which reads every proxy into memory) is avoided:
    # the lists are trained before the first add on a sample across all classes (TRAIN_PER_LIST proxies a list)
    bulk = K * n_classes * 2 * D > BULK_BYTES
    path = root / f"c{n_classes}-{index}"
    base = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    batches = [[f] for f in range(0, n_classes, CHUNK)]
    progress = Progress(root / f"{path.name}.build.json")
    if resume and path.exists():
        col = Collection.open(path)
        if len(col) > n_classes:  # killed while it measured adds: the build is whole; those adds come again
            col.remove(list(range(n_classes, len(col))))
        batches = progress.resume(batches, len(col), n_classes)
    else:
        col = Collection.create(
            path, model=None, generator="kmeans", k=K, aggregation="max", index=factory, keep_samples=False
        )
        for stale in (".queries.npy", ".exact.npz"):  # a kept collection built anew: its measurement too
            (root / f"{path.name}{stale}").unlink(missing_ok=True)
        progress.save()
    progress.beat()
    if bulk and not any(name.startswith("template") for name in col.info()["segments"]):
        X, labels = training_sample(n_classes, make, -(-TRAIN_PER_LIST * nlist // K))
        t = time.perf_counter()
        col.train(X, labels, classes=n_classes)
        progress.added(time.perf_counter() - t, status("VmHWM:") - base)
        print(f"  trained on {len(labels) // TRAIN:,} classes, {progress.build:.0f} s", flush=True)
        del X, labels
    for batch in batches:
        parts = [make(f, min(CHUNK, n_classes - f)) for f in batch]  # chunk by chunk: the same classes
        known.update((f, queries_of(chosen, f, p[2])) for f, p in zip(batch, parts))
        X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        del parts  # the chunks once: a first add of 200,000 classes holds 2.5 GB of samples
        t = time.perf_counter()
        col.add(X, y.tolist())
        progress.added(time.perf_counter() - t, status("VmHWM:") - base)
        print(f"  {batch[-1] + min(CHUNK, n_classes - batch[-1]):,} classes, {progress.build:.0f} s", flush=True)
    build = progress.build
    # those of the chunks a killed run added made again; kept beside the collection for --resume and --reopen
    queries = cached(root / f"{path.name}.queries.npy", lambda: held_out(n_classes, make, known)[1])
    Qn = l2_normalize(queries)
    peak = max(status("VmHWM:") - base, progress.peak)  # the adds': before the search below maps lists in
    _, _, first_lists = col.snapshot.proxies.search(Qn, 1)
    t = time.perf_counter()
    if not bulk:  # retrains: the proxies outgrew the first add's 4x; a bulk build keeps its tiered files
        col.compact()
        peak = max(peak, status("VmHWM:") - base)
    compact = time.perf_counter() - t
    build += compact
    disk = col.info()["bytes_on_disk"]
    del col
    fresh = open_fresh(path, queries)
    col = Collection.open(path)
    _, _, approx = col.snapshot.proxies.search(Qn, 1)
    nprobe = col.search_params.get("nprobe")
    k_factor = col.search_params.get("k_factor")  # a refined index's re-ranked candidates per result
    ms = batch1_ms(col, queries)  # the timings first, while the build's chunks are not being made again
    t = time.perf_counter()
    accuracy = float(np.mean(col.predict(queries) == chosen))
    batch = time.perf_counter() - t
    adds = add_one(col, n_classes, make)
    exact = exact_top1(Qn, n_classes, make, root / f"{path.name}.exact.npz")
    recall_first = float(np.mean(first_lists[:, 0] == exact))
    recall = float(np.mean(approx[:, 0] == exact))
    largest = max(col.snapshot.files["proxies"], key=lambda name: (path / name).stat().st_size)  # mapped at open
    candidates = path / candidates_of(largest)  # a refined index's fast-scan codes, mapped at open
    memory = {
        **fresh,
        "classes": n_classes,
        "index_gib": (path / largest).stat().st_size / 2**30,
        "candidates_gib": candidates.stat().st_size / 2**30 if candidates.exists() else 0.0,
        "resumed": [f"{n_classes:,} classes, {factory}: {note}" for note in progress.resumed],
    }
    return [
        f"{n_classes:,}",
        factory,
        f"{nprobe}" + (f", k_factor {k_factor}" if k_factor else ""),
        f"{build:.0f}",
        f"{compact:.0f}",
        f"{peak / 2**30:.2f}",
        f"{disk / 2**20:,.0f}",
        f"{fresh['open_s']:.2f}",
        f"{fresh['VmRSS_open']:.2f}",
        f"{fresh['first_ms']:.1f}",
        f"{fresh['cold_p50_ms']:.2f} / {fresh['cold_max_ms']:.0f}",
        f"{np.percentile(ms, 50):.2f}",
        f"{np.percentile(ms, 90):.2f}",
        f"{np.percentile(ms, 99):.2f}",
        f"{ms.max():.1f}",
        f"{len(queries) / batch:,.0f}",
        f"{recall_first:.3f}",
        f"{recall:.3f}",
        f"{accuracy:.3f}",
        f"{np.median(adds) * 1e3:.1f}",
        f"{np.percentile(adds, 99) * 1e3:.1f}",
        f"{max(adds) * 1e3:.0f}",
    ], memory


COLUMNS = [
    "classes",
    "index",
    "nprobe (refined: and k_factor)",
    "build s",
    "of which compact s",
    "peak RSS GiB",
    "disk MiB",
    "open s",
    "RSS after open GiB",
    "first query ms",
    f"cold first {COLD} p50 / max ms",
    "batch-1 p50 ms",
    "batch-1 p90 ms",
    "batch-1 p99 ms",
    "batch-1 max ms",
    "batch-1000 q/s",
    "recall@1 first lists",
    "recall@1",
    "accuracy",
    "add-one p50 ms",
    "add-one p99 ms",
    "add-one max ms",
]
# The targets at 1M classes (issue 17) and at 10M (issue 28): column, unit, direction, bound at each (None: none)
TARGET_SIZES = (1_000_000, 10_000_000)
TARGETS = [
    ("build s", "s", "<=", 20 * 60, 90 * 60),
    ("peak RSS GiB", "GiB", "<=", 12, 16),
    ("disk MiB", "MiB", "<=", None, 40 * 1024),
    ("open s", "s", "<=", 1, 2),
    ("RSS after open GiB", "GiB", "<=", 1, 2),
    ("batch-1 p50 ms", "ms", "<=", 3, 3),
    ("batch-1 p99 ms", "ms", "<=", 10, 15),
    ("recall@1", "", ">=", 0.99, 0.99),
    ("add-one p50 ms", "ms", "<=", 30, 50),
    ("add-one p99 ms", "ms", "<=", 100, 200),
]


def targets(row: list[str]) -> str:
    """The targets of the largest size at most the row's, each marked met or missed from a result
    row (one index at one size)."""
    at = sum(int(row[0].replace(",", "")) >= n for n in TARGET_SIZES[1:])  # which size's bounds apply
    lines = []
    for name, unit, op, *bounds in TARGETS:
        bound = bounds[at]
        if bound is None:
            continue
        value = float(row[COLUMNS.index(name)].replace(",", ""))
        ok = value <= bound if op == "<=" else value >= bound
        lines.append(
            f"- {name.removesuffix(' ' + unit).removesuffix(' s')}: {value:g}{' ' + unit if unit else ''} "
            f"(target {op} {bound:g}{' ' + unit if unit else ''}): {'met' if ok else 'missed'}"
        )
    return f"## Targets at {row[0]} classes, {row[1]}\n\n" + "\n".join(lines) + "\n"


FAST_SCAN = D // 8  # bytes of a refined index's 4-bit candidate codes per proxy (ivf.refined: D / 4 codes)
CODES = [
    ("Flat (exact, read into memory)", 4 * D + 8, 4 * D + 16),
    ("IVF-Flat", 4 * D, 0),
    ("IVF-SQfp16", 2 * D, 0),
    ("refined: IVF-SQfp16 + fast-scan PQ96x4fs candidates", 2 * D + FAST_SCAN + 8, 0),
    ("IVF-SQ8", D, 0),
    ("IVF-PQ48", 48, 0),
]  # code bytes per proxy on disk (each with an 8-byte id besides), and those read into memory at open


def memory_model(measured: list[dict[str, float]]) -> str:
    """A memory model: resident bytes per class after open beyond what is read (the class table is
    not: collections.md) fitted on the largest run and checked against every run, then projected to
    10M and 100M classes for each index type."""

    def read_in(m: dict[str, float]) -> float:  # GiB of index read into memory: files below MAP_MIN
        return m["index_gib"] if m["index_gib"] * 2**30 < MAP_MIN else 0.0

    big = measured[-1]
    per_class = (big["RssAnon_open"] - big["RssAnon_before"] - read_in(big)) * 2**30 / big["classes"]
    check = [
        [
            f"{m['classes']:,}",
            f"{(m['RssAnon_open'] - m['RssAnon_before']):.3f}",
            f"{per_class * m['classes'] / 2**30 + read_in(m):.3f}",
            f"{m['RssAnon_queried'] - m['RssAnon_before']:.3f}",
            f"{m['RssFile_queried'] - m['RssFile_before']:.3f}",
            f"{m['index_gib']:.2f}",
            f"{m['candidates_gib']:.2f}",
            f"{m['open_s']:.2f}",
        ]
        for m in measured
    ]
    projected = []
    for n in (10_000_000, 100_000_000):
        proxies = K * n
        quantizer = ivf_lists(proxies) * D * 4
        for name, code, resident in CODES:
            index = proxies * (code + 8) + (0 if name.startswith("Flat") else quantizer)
            table = per_class * n
            at_open = table + proxies * resident + (0 if name.startswith("Flat") else quantizer)  # the template
            projected.append([f"{n:,}", name, f"{code + 8:,}", f"{index / 2**30:,.1f}", f"{at_open / 2**30:,.1f}"])
    return (
        "## Memory model\n\n"
        f"Resident memory a collection adds to a process at open is {per_class:.0f} bytes per class (fitted on the "
        f"{big['classes']:,}-class run: anonymous RSS after opening minus before, less what is read; the class "
        "table is not read at open, only the rows of the classes an answer names), plus, for an IVF "
        f"index, nothing at open if its file has {MAP_MIN // 2**20} MiB or more (else the file is read into "
        "memory; the model adds it): that file is memory-mapped, and a query brings in the lists it probes "
        "as file-backed pages, which the kernel can drop and read again. "
        "The coarse quantizer (the template file) is read at open, one copy whatever the files. A refined index's "
        "fast-scan candidates file (half a byte per code and an 8-byte id per proxy) is mapped too: a query "
        "brings in the candidate lists it probes and the blocks of the proxy file holding its re-ranked "
        "candidates. "
        "Checked against each run (fresh process; GiB):\n\n"
        + markdown_table(
            [
                "classes",
                "anon after open",
                "model",
                "anon after 1,000 queries",
                "file-backed after 1,000 queries",
                "largest proxy file",
                "its candidates file",
                "open s",
            ],
            check,
        )
        + "\n\nProjected (4 proxies per class, 384-d; index: proxies x (code + 8-byte id) + the coarse "
        "quantizer, nlist = ivf_lists(proxies); RAM at open: the fitted bytes per class and what is read (Flat: "
        "all; IVF: the coarse quantizer); a query adds file-backed pages the kernel can drop; GiB):\n\n"
        + markdown_table(["classes", "index", "bytes per proxy", "index size", "RAM at open"], projected)
        + "\n\nBeyond one machine's RAM for what is read at open or disk for the index, shard the collection "
        "([distributed.md](distributed.md)).\n"
    )


INDEXES = {  # the proxy index on IVF lists ("IVF4096"): refined (fast-scan, re-ranked) or float16 codes alone
    "refined": lambda lists: refined(lists, D),
    "sqfp16": lambda lists: f"{lists},SQfp16",
}
DATA = {
    "topics": "synthetic classes, 384-d, 1,000 per topic, two modes each",
    "realistic": "realistic classes (``Realistic`` in benchmarks/scale.py: each centre a mixture of two real "
    "all-MiniLM-L6-v2 sentence embeddings of CLINC150 and BANKING77, each sample the centre plus a real "
    "within-intent residual, so the geometry is real text's)",
}


def write_doc(
    rows: list[list[str]],
    measured: list[dict[str, float]],
    sizes: list[int],
    minutes: float,
    out: Path,
    data: str = "topics",
    indexes: tuple[str, ...] = ("refined",),
) -> str:
    table = markdown_table(COLUMNS, rows)
    env = "".join(
        f"{name}={os.environ[name]} " for name in ("FAISS_SIMD_LEVEL", "OPENBLAS_CORETYPE") if name in os.environ
    )
    default_out = DOCS / ("scale.md" if data == "topics" else f"scale-{data}.md")
    text = (
        ("# Scale\n\n" if data == "topics" else f"# Scale, {data} classes\n\n")
        + f"Command: `{env}.venv/bin/python benchmarks/scale.py --sizes {' '.join(map(str, sizes))}"
        f"{' --data ' + data if data != 'topics' else ''}"
        f"{' --index ' + ' '.join(indexes) if list(indexes) != ['refined'] else ''}"
        f"{' --out ' + str(out.relative_to(DOCS.parent)) if out.parent == DOCS and out != default_out else ''}` "
        f"({minutes:.0f} min)  \nMachine: {machine()}  \n"
        f"Setup: {DATA[data]}, {TRAIN} training samples per class "
        f"added {CHUNK:,} classes at a time, then one full compaction; GEN kmeans k = {K}, L2 norms, max "
        "aggregation, an IVF proxy index (nlist about 2 sqrt(proxies); nprobe tuned, at the first add and "
        "again at the compaction, to the smallest clearing recall@1 0.99 by one standard error on 1,000 held-out proxies against "
        "exact search: the *nprobe* column, with a refined index's k_factor tuned beside it), samples not kept. *Refined* (`IVF{nlist},PQ96x4fs,Refine(SQfp16)`, "
        "what index=auto chooses): the proxies' float16 codes in the memory-mapped file, and fast-scan 4-bit PQ "
        "candidates of them written by the compaction; a query scans the candidates and re-ranks its best k_factor "
        "exactly from the float16 codes (refine.py). *IVF-SQfp16* alone scans the float16 codes of every list "
        "it probes. The IVF lists are trained on the first add's "
        "proxies; the final compaction retrains them on a sample of all live proxies and re-encodes every "
        "proxy (the proxies outgrew the first add's 4x; its time is the *compact* column, inside *build*), "
        f"except beyond {BULK_BYTES // 2**30} GiB of float16 proxies, where the lists are trained before the first add "
        f"(`Collection.train`, its time inside *build*) on a sample of classes spread over all of them ({TRAIN_PER_LIST} "
        f"proxies a list; runs of {SAMPLE_RUN} consecutive classes at even steps) and no full compaction follows (it would retrain "
        "from every proxy in memory, or without a retrain need twice the index's disk while it writes): the "
        "automatic compactions' tiered files stay, each large one with its candidates, and nprobe is tuned "
        "again whenever a merged file holds 4x the proxies of the last tuning; from 16,384 lists an HNSW graph "
        "finds the lists. "
        f"Queries: one held-out sample of each of {N_QUERIES:,} random classes, timed one at a time "
        "(*batch-1*) and together. recall@1: the approximate top-1 proxy equals the exact top-1 over the same "
        "float32 proxies, with the first add's lists (*first lists*, before the compaction) and after it. "
        "Peak RSS: the process's high-water mark during the build (generating and adding chunks, compaction; "
        "a compaction's counts the mapped files' pages that the first-lists search before it read) "
        "above its RSS before. Open: in a new process, after its imports: seconds to open, that process's whole "
        "RSS after opening (proxy segments of 64 MiB or more are memory-mapped, not read), its first batch-1 "
        f"query, and the p50 and max of its first {COLD} (*cold*: the lists they probe come in from the page "
        "cache or the disk as they touch them). "
        f"add-one-class: {ADDS} adds of one new 8-sample class after the build."
        + "".join(
            f" Resumed build ({note}): *build s* sums every run's adds." for m in measured for note in m["resumed"]
        )
        + "\n\n"
        + table
        + "\n\n"
        + "\n".join(targets(row) for row in rows if row[0] == f"{max(sizes):,}")
        + "\n"
        + memory_model(measured)
    )
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--data", choices=list(DATA), default="topics", help="The classes' distribution.")
    parser.add_argument(
        "--index", nargs="+", choices=list(INDEXES), default=["refined"], help="Proxy indexes to build, each size."
    )
    parser.add_argument("--out", type=Path, help="Where to write the table (docs/scale.md, docs/scale-DATA.md).")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="Build the collections in DIR and keep them, to measure them again (default: a temporary folder).",
    )
    parser.add_argument(
        "--reopen",
        type=Path,
        metavar="COLLECTION",
        help="Measure a collection kept by --keep (of the one size --sizes gives) again: open, cold and warm queries.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="With --keep: go on with a killed build kept there, from the last add it committed.",
    )
    parser.add_argument("--open-only", nargs=2, metavar=("COLLECTION", "QUERY_NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.open_only:
        return open_only(*args.open_only)
    rows, measured = [], []
    started = time.perf_counter()
    make = chunk if args.data == "topics" else Realistic()
    if args.reopen:
        return print(reopen(args.reopen, args.sizes[0], make))
    out = (args.out or DOCS / ("scale.md" if args.data == "topics" else f"scale-{args.data}.md")).resolve()
    print(machine(), flush=True)
    if args.resume and not args.keep:
        parser.error("--resume goes on with a build kept by --keep DIR")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with nullcontext(args.keep) if args.keep else scratch("ri-scale-") as tmp:
        for n in args.sizes:
            for index in args.index:
                row, memory = run(n, Path(tmp), make, index, args.resume)
                rows.append(row)
                measured.append(memory)
                print(" | ".join(rows[-1]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(write_doc(rows, measured, args.sizes, minutes, out, args.data, tuple(args.index)))


if __name__ == "__main__":
    main()

"""Speed benchmark: imprinting, querying and embedding, ours against the approaches users reach for.

In one run, on the same data, prints ratios (ours / theirs; below 1 means ours is faster) and
writes docs/performance.md:

- Build, GEN kmeans k = 5 and 20 with L2 norms: `ImprintClassifier.fit` vs a Python loop calling
  scikit-learn `KMeans` per class (the paper's reference code) and vs a loop calling
  `faiss.Kmeans` per class (FAISS's default threads, and one thread); BANKING77 train and
  synthetic 10k classes x 50 samples x 384-d. Plus k-means quality: summed within-class inertia
  relative to scikit-learn's.
- What choosing costs: a fit with generator, k and aggregation fixed (the temperature fitted) vs the
  same with a fixed temperature; the default, fully `auto` fit vs one k = 20 fit.
- Query, max aggregation, batch 1 and 1000, 10k and 100k classes (k = 5): ours end to end
  (`ImprintClassifier.predict`, `Collection.predict`) vs raw `faiss.IndexFlatIP.search` on the
  same proxies, scikit-learn `KNeighborsClassifier(1, cosine)` and a per-class Python loop.
- Embedding 2,000 BANKING77 texts: our `Embedder` vs bare `SentenceTransformer.encode`; cached.
- Peak RSS of build and query against the bytes of the proxies.

    .venv/bin/python benchmarks/speed.py
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from _common import DOCS, machine, markdown_table, scratch
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from retrieval_imprint import ImprintClassifier
from retrieval_imprint.collection import Collection
from retrieval_imprint.embed import Embedder, EmbeddingCache

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
D = 384
# the baselines make proxies and answers only: ours fits no predict_proba temperature either
# (temperature="auto" adds a fit per held-out fold; docs/calibration.md times it)
FIXED_T = dict(temperature=0.05)


def best_of(fn, repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def interleaved_best(contenders: dict[str, tuple[Callable[[], object], int]]) -> dict[str, float]:
    """Best-of wall time of each ``name: (fn, repeats)``, the contenders taking turns, so that a
    slow spell of this shared machine hits all of them alike rather than whichever ran then."""
    best = dict.fromkeys(contenders, float("inf"))
    for turn in range(max(repeat for _, repeat in contenders.values())):
        for name, (fn, repeat) in contenders.items():
            if turn < repeat:
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def probe(name: str) -> None:
    """Run one memory probe in this (fresh) process; print proxy bytes and peak RSS increase."""
    if name == "build":
        X, y = synthetic(10_000, 50, seed=3)
        proxy_bytes = 10_000 * 5 * D * 4
        run = lambda: ImprintClassifier(generator="kmeans", k=5, aggregation="max", **FIXED_T).fit(X, y)  # noqa: E731
    else:  # "query{n}": 1000 queries; "single{n}": one query, whose first call builds the float16 copy
        n_classes = int(name.removeprefix("query").removeprefix("single"))
        W = l2(np.random.default_rng(1).standard_normal((n_classes * 5, D)).astype(np.float32))
        clf = ImprintClassifier(generator="all", aggregation="max", **FIXED_T).fit(
            W, np.repeat(np.arange(n_classes), 5)
        )
        Q = l2(
            np.random.default_rng(2).standard_normal((1000 if name.startswith("query") else 1, D)).astype(np.float32)
        )
        proxy_bytes = W.nbytes
        del W
        run = lambda: clf.predict(Q)  # noqa: E731
    before = _status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    run()
    print(json.dumps({"proxy_bytes": proxy_bytes, "peak": _status("VmHWM:") - before}))


def peak_rss(name: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--probe", name], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic(n_classes: int, per_class: int, seed: int = 0, modes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, modes, D)).astype(np.float32)
    y = np.repeat(np.arange(n_classes), per_class)
    X = centres[y, rng.integers(0, modes, len(y))] + 0.6 * rng.standard_normal((len(y), D), dtype=np.float32)
    return X, y


def l2(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def inertia(X: np.ndarray, y: np.ndarray, W: np.ndarray, owner: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(y):
        Xc, Wc = X[y == c].astype(np.float64), W[owner == c].astype(np.float64)
        d2 = (Xc**2).sum(1)[:, None] - 2 * Xc @ Wc.T + (Wc**2).sum(1)[None, :]
        total += np.maximum(d2.min(1), 0).sum()
    return total


def build_rows() -> list[list[str]]:
    banking = np.load(SHARED / "banking77" / "embeddings.npz")
    datasets = {"BANKING77": (banking["train_X"], banking["train_y"]), "synthetic 10k x 50": synthetic(10_000, 50)}
    rows = []
    threads = faiss.omp_get_max_threads()
    for name, (X, y) in datasets.items():
        Xn = l2(X)
        classes = np.unique(y)
        for k in (5, 20):
            clf = ImprintClassifier(generator="kmeans", k=k, aggregation="max", **FIXED_T)
            ours = best_of(lambda: clf.fit(X, y), 3)
            codes = np.searchsorted(classes, y)
            ours_inertia = inertia(Xn, codes, _centres(Xn, y, k), np.repeat(np.arange(len(classes)), k))
            t = time.perf_counter()
            sk_centres = [KMeans(k, random_state=0).fit(Xn[codes == c]).cluster_centers_ for c in range(len(classes))]
            sklearn_s = time.perf_counter() - t
            sk_inertia = inertia(Xn, codes, np.concatenate(sk_centres), np.repeat(np.arange(len(classes)), k))
            faiss_s = {}
            for n_threads in (threads, 1):
                faiss.omp_set_num_threads(n_threads)
                t = time.perf_counter()
                for c in range(len(classes)):
                    km = faiss.Kmeans(D, k, seed=0)
                    km.cp.min_points_per_centroid = 1  # only silences the small-class warning
                    km.train(np.ascontiguousarray(Xn[codes == c]))
                faiss_s[n_threads] = time.perf_counter() - t
            faiss.omp_set_num_threads(threads)
            rows.append(
                [
                    name,
                    k,
                    f"{ours:.2f}",
                    f"{sklearn_s:.1f}",
                    f"{faiss_s[threads]:.2f}",
                    f"{faiss_s[1]:.2f}",
                    f"{ours / sklearn_s:.4f} (1/{sklearn_s / ours:.0f})",
                    f"{ours / faiss_s[threads]:.3f} (1/{faiss_s[threads] / ours:.1f})",
                    f"{ours / faiss_s[1]:.3f} (1/{faiss_s[1] / ours:.1f})",
                    f"{ours_inertia / sk_inertia:.4f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


AUTO_FITS = {  # what a fit leaves open, from nothing to everything
    "fixed": dict(generator="kmeans", k=5, aggregation="max", **FIXED_T),
    "fixed, temperature fitted": dict(generator="kmeans", k=5, aggregation="max"),
    "k = 20": dict(generator="kmeans", k=20, aggregation="max", **FIXED_T),
    "auto (the default)": dict(),
}


def auto_rows() -> list[list[str]]:
    """What choosing costs: a fit that fixes generator, k and aggregation (only the temperature
    fitted) against the same fit with a fixed temperature, and the default, fully ``auto`` fit
    against one k = 20 fit; best of two, on BANKING77 and 10k synthetic classes."""
    banking = np.load(SHARED / "banking77" / "embeddings.npz")
    datasets = {"BANKING77": (banking["train_X"], banking["train_y"]), "synthetic 10k x 50": synthetic(10_000, 50)}
    rows = []
    for name, (X, y) in datasets.items():
        fitted = {label: ImprintClassifier(**p) for label, p in AUTO_FITS.items()}
        seconds = interleaved_best({label: (lambda c=c: c.fit(X, y), 2) for label, c in fitted.items()})
        fixed, k20 = seconds["fixed"], seconds["k = 20"]
        t_fit, auto = seconds["fixed, temperature fitted"], seconds["auto (the default)"]
        c = fitted["auto (the default)"].auto_choice_
        chosen = (
            f"ls on {c['features']} features"
            if c["generator"] == "ls"
            else f"{c['generator']} k={c['k']}, {c['aggregation']}"
        )
        rows.append(
            [name, *(f"{seconds[label]:.2f}" for label in AUTO_FITS), f"{t_fit / fixed:.2f}", f"{auto / k20:.2f}", chosen]
        )  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    return rows


def _centres(Xn: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Our k-means centroids before post-norm (inertia is measured on the centroids themselves)."""
    from retrieval_imprint._groups import Grouped
    from retrieval_imprint.generate import generate
    from retrieval_imprint.labels import label_keys

    classes, codes = np.unique(y, return_inverse=True)
    W, _ = generate("kmeans", Grouped.from_codes(Xn, codes, label_keys(classes)), k, 0)
    return W


def query_rows(tmp: Path) -> tuple[list[list[str]], list[list[str]]]:
    rows, memory = [], []
    rng = np.random.default_rng(1)
    for n_classes in (10_000, 100_000):
        W = l2(rng.standard_normal((n_classes * 5, D)).astype(np.float32))
        labels = np.repeat(np.arange(n_classes), 5)
        clf = ImprintClassifier(generator="all", aggregation="max", **FIXED_T).fit(W, labels)  # proxies = W exactly
        col = Collection.create(
            tmp / f"q{n_classes}", model=None, generator="all", aggregation="max", keep_samples=False
        )
        col.add(W, labels)
        blend = Collection.create(
            tmp / f"b{n_classes}", model=None, generator="all", aggregation="blend", alpha=0.5, keep_samples=False
        )
        blend.add(W, labels)
        raw = faiss.IndexFlatIP(D)
        raw.add(W)
        knn = KNeighborsClassifier(1, metric="cosine").fit(W, labels)
        starts = np.arange(0, len(W), 5)

        def loop(Q: np.ndarray) -> np.ndarray:
            best = np.empty((len(Q), n_classes), np.float32)
            for i in range(0, len(Q), 100):
                S = Q[i : i + 100] @ W.T
                for c, s in enumerate(starts):
                    best[i : i + 100, c] = S[:, s : s + 5].max(1)
            return best.argmax(1)

        for batch in (1, 1000):
            Q = l2(rng.standard_normal((batch, D)).astype(np.float32))
            # class-like queries: a proxy plus noise of the same norm (a real query belongs to a class)
            Qc = l2(W[rng.integers(0, len(W), batch)] + 0.8 * l2(rng.standard_normal((batch, D)).astype(np.float32)))
            reps = 30 if batch == 1 else 5
            times = interleaved_best(
                {
                    "ours (estimator)": (lambda: clf.predict(Q), reps),
                    "ours (collection)": (lambda: col.predict(Q), reps),
                    "blend (collection)": (lambda: blend.predict(Q), reps),
                    "max, class-like": (lambda: col.predict(Qc), reps),
                    "blend, class-like": (lambda: blend.predict(Qc), reps),
                    "raw faiss": (lambda: raw.search(Q, 1), reps),
                    "sklearn 1-NN": (lambda: knn.predict(Q), 10 if batch == 1 else 1),
                    "per-class loop": (lambda: loop(Q), 1),
                }
            )
            assert (clf.predict(Q) == labels[raw.search(Q, 1)[1][:, 0]]).all()
            rows.append(
                [f"{n_classes:,}", batch]
                + [f"{times[k] * 1e3:.2f}" for k in times]
                + [
                    f"{times['ours (estimator)'] / times['raw faiss']:.2f}",
                    f"{times['ours (collection)'] / times['raw faiss']:.2f}",
                    f"{times['blend (collection)'] / times['ours (collection)']:.2f}",
                    f"{times['blend, class-like'] / times['max, class-like']:.2f}",
                    f"{times['ours (estimator)'] / times['sklearn 1-NN']:.4f}",
                    f"{times['ours (estimator)'] / times['per-class loop']:.4f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
        for probe_name, what in ((f"query{n_classes}", "batch 1000"), (f"single{n_classes}", "batch 1, first call")):
            m = peak_rss(probe_name)
            memory.append(
                [
                    f"query, {what}, {n_classes:,} classes (estimator)",
                    f"{m['proxy_bytes'] / 2**20:.0f}",
                    f"{m['peak'] / 2**20:.0f}",
                    f"{m['peak'] / m['proxy_bytes']:.2f}",
                ]
            )
    m = peak_rss("build")
    memory.append(
        [
            "build, kmeans k=5, 10k classes x 50 (input X: 732 MiB)",
            f"{m['proxy_bytes'] / 2**20:.0f}",
            f"{m['peak'] / 2**20:.0f}",
            f"{m['peak'] / m['proxy_bytes']:.2f}",
        ]
    )
    return rows, memory


def embed_rows() -> list[list[str]]:
    with (SHARED / "banking77" / "train.csv").open(newline="") as f:
        texts = [r["text"].strip() for _, r in zip(range(2000), csv.DictReader(f))]
    bare = Embedder()._load()  # noqa: SLF001 (the bare model ours wraps: the baseline)
    bare.encode(texts[:64])  # warm up
    ours = Embedder(cache=False)
    ours._st = bare  # noqa: SLF001 (the same loaded model)
    times = interleaved_best(
        {
            "bare": (lambda: bare.encode(texts, batch_size=64, show_progress_bar=False), 3),
            "ours": (lambda: ours.encode(texts), 3),
        }
    )
    bare_s, ours_s = times["bare"], times["ours"]
    with scratch("ri-speed-") as tmp:
        cached = Embedder(cache=EmbeddingCache(Path(tmp) / "cache.sqlite"))
        cached._st = bare  # noqa: SLF001
        cold = best_of(lambda: cached.encode(texts), 1)
        warm = best_of(lambda: cached.encode(texts), 3)
    return [
        ["bare SentenceTransformer.encode", f"{bare_s:.2f}", "1.00"],
        ["ours, no cache", f"{ours_s:.2f}", f"{ours_s / bare_s:.3f}"],
        ["ours, cache cold (embed + store)", f"{cold:.2f}", f"{cold / bare_s:.3f}"],
        ["ours, cache warm", f"{warm:.3f}", f"{warm / bare_s:.4f} (1/{bare_s / warm:.0f})"],
    ]


def targets(build: list[list[str]], query: list[list[str]], embed: list[list[str]], auto: list[list[str]]) -> str:
    """The issue's targets, each marked met or missed from this run's numbers, and why for a miss."""

    def ratio(cell: str) -> float:
        return float(cell.split()[0])

    lines, missed = [], set()

    def mark(line: str, ok: bool, why: str | None = None) -> None:
        lines.append(f"{line}: {'met' if ok else 'missed'}")
        if not ok and why:
            missed.add(why)

    for r in (r for r in build if r[0].startswith("synthetic")):
        for name, cell, need in (("scikit-learn loop", r[6], 1 / 30), ("faiss loop (default threads)", r[7], 1 / 5)):
            x = ratio(cell)
            mark(f"- Build k={r[1]} vs {name}: {1 / x:.1f}x faster (target >= {1 / need:.0f}x)", x <= need, "build")
        inertia = float(r[9])
        mark(f"- k-means inertia k={r[1]}: {inertia:.4f} of scikit-learn's (target within 2%)", inertia <= 1.02)
    for r in query:
        bound = 1.10 if r[1] == 1000 else 1.5
        for col, who in ((10, "estimator"), (11, "collection")):
            x = float(r[col])
            mark(f"- Query {r[0]} classes, batch {r[1]}, {who}: {x:.2f}x raw faiss (target <= {bound})", x <= bound)
        x, worst = float(r[13]), float(r[12])
        mark(
            f"- Blend query {r[0]} classes, batch {r[1]}, class-like queries: {x:.2f}x the max query (target <= "
            f"1.5; random queries, the worst case: {worst:.2f}x)",
            x <= 1.5,
            "blend",
        )
        if r[1] == 1:
            x = float(r[14])
            mark(
                f"- Query {r[0]} classes, batch 1: {1 / x:.1f}x faster than scikit-learn 1-NN (target >= 10x)",
                1 / x >= 10,
                "query",
            )
    for r in auto:
        x = float(r[5])
        mark(f"- {r[0]}: generator, k, aggregation fixed: {x:.2f}x the fixed build (target <= 2)", x <= 2)
        if r[0].startswith("synthetic"):
            x = float(r[6])
            mark(f"- {r[0]}: a fully auto fit: {x:.2f}x a k = 20 fit (target <= 3)", x <= 3)
    x = float(embed[1][2])
    mark(f"- Embedding pipeline: {x:.3f}x bare encode (target <= 1.05)", x <= 1.05, "embed")
    warm = 1 / float(embed[3][2].split()[0])
    mark(f"- Cached re-run: {warm:.0f}x faster than bare encode (target >= 50x)", warm >= 50)
    text = "## Targets (from this run)\n\n" + "\n".join(lines) + "\n"
    if missed:
        text += "\nWhere a target is missed, why:\n\n" + "\n".join(WHY[key] for key in WHY if key in missed) + "\n"
    return text


WHY = {
    "build": """- **Build against the scikit-learn loop.** Our time splits into the per-class Gram matrices,
  greedy k-means++ seeding (k steps of 2 + ln k candidates, as scikit-learn does) and Lloyd; at
  k = 20 the seeding is about a third of it, while scikit-learn's cost per 50-point class grows
  little with k. Plain k-means++ seeding (one candidate per step) or a compiled seeding loop would
  close the gap (either must be checked against the 2% inertia bar).""",
    "blend": """- **Blend against max.** A blend scans the proxies as max does, then the class means, and
  looks up the other term of every class either list names (its mean's or its best proxy's
  similarity). Where the scans are fast (numpy's BLAS in blocks, gemm.py, which on some CPUs is
  several times FAISS's own) the second scan and the look-ups are the larger share; a blend of
  many random queries also searches deeper where the bound settles late.""",
    "query": """- **One query against scikit-learn 1-NN.** An exact float32 search reads every proxy once:
  77 MB at 10k classes and 768 MB at 100k (k = 5). Ours runs at the machine's memory bandwidth
  (about 13-17 GB/s here); scikit-learn's brute cosine search also normalises a copy of the proxies
  per call, which is where its extra time goes, and its time varies by a third between runs. More
  than that is not available to an exact float32 search; an IVF collection answers one query at
  100k-1M classes in 0.5-3 ms (docs/scale.md).""",
    "embed": """- **Embedding pipeline against bare encode.** Our pipeline adds text validation, de-duplication,
  a cache lookup and 1,024-text chunks (texts sorted longest first across chunks, as `encode`
  sorts one call) around the same `encode` call; runs have differed by 5-10% from one to the next,
  so the difference is within this machine's run-to-run noise.""",
}


def main() -> None:
    start = time.perf_counter()
    build = build_rows()
    auto = auto_rows()
    with scratch("ri-speed-") as tmp:
        query, memory = query_rows(Path(tmp))
    embed = embed_rows()
    took = time.perf_counter() - start
    tables = [
        "## Build (GEN kmeans, L2 norms)\n\nSeconds for all classes; ratio = ours / theirs (below 1: ours "
        "faster). Inertia: summed within-class k-means inertia of our centroids / scikit-learn's.\n\n"
        + markdown_table(
            [
                "data",
                "k",
                "ours s",
                "sklearn loop s",
                f"faiss loop s ({faiss.omp_get_max_threads()} threads)",
                "faiss loop s (1 thread)",
                "vs sklearn",
                "vs faiss",
                "vs faiss 1 thread",
                "inertia / sklearn",
            ],
            build,
        ),
        "## What choosing costs (`auto`)\n\nBest-of-two fit seconds, the fits taking turns. *fixed*: kmeans "
        'k = 5, max, temperature 0.05; *temperature fitted*: the same with `temperature="auto"` (the default), '
        "one more fit without a held-out fold; *k = 20*: kmeans k = 20, max, temperature 0.05; *auto*: "
        "`ImprintClassifier()`, everything chosen (cross-validation past 1,000 classes on a sample of them, "
        "`auto.cv_sample`, and on fewer held-out rows past 2^27 candidate scores, `auto.CV_CELLS`) and the "
        "temperature fitted; on data of up to 25,000 rows and 1,000 classes (BANKING77 here, not the synthetic "
        "set) it also weighs the ls head on 4,000 random features by its leave-one-out accuracy "
        "(`auto.choose_head`), whose one fit is then most of the time.\n\n"
        + markdown_table(
            [
                "data",
                *(f"{label} s" for label in AUTO_FITS),
                "temperature fitted / fixed",
                "auto / k = 20",
                "auto chose",
            ],
            auto,
        ),
        "## Query (max aggregation, k = 5 proxies per class)\n\nBest-of wall time in ms per call; ratios "
        "= ours / theirs. Queries are random unit vectors, except the class-like ones: a random proxy plus noise of "
        "its norm. Blend: the same proxies in a collection with aggregation blend (alpha 0.5), its exact answer "
        "from the class means and the proxies (`aggregate.blend_rank`); random queries are its worst case (every "
        "class scores alike, so the bound settles late), class-like ones its use.\n\n"
        + markdown_table(
            [
                "classes",
                "batch",
                "ours (estimator) ms",
                "ours (collection) ms",
                "blend (collection) ms",
                "max, class-like ms",
                "blend, class-like ms",
                "raw faiss ms",
                "sklearn 1-NN ms",
                "per-class loop ms",
                "estimator / faiss",
                "collection / faiss",
                "blend / max, random",
                "blend / max, class-like",
                "estimator / sklearn",
                "estimator / loop",
            ],
            query,
        ),
        "## Embedding (2,000 BANKING77 texts, packaged MiniLM, CPU)\n\n"
        + markdown_table(["pipeline", "seconds", "ratio to bare encode"], embed),
        "## Peak memory (RSS above the process's RSS before the call)\n\nbatch 1, first call: builds the float16 "
        "copy that small batches scan first (kept until the index changes).\n\n"
        + markdown_table(["operation", "proxy bytes MiB", "peak RSS increase MiB", "ratio"], memory),
    ]
    tables.insert(0, targets(build, query, embed, auto))
    for t in tables:
        print(t + "\n")
    (DOCS / "performance.md").write_text(
        "# Performance\n\n"
        "Command: `.venv/bin/python benchmarks/speed.py`  \n"
        f"Machine: {machine()}  \nWhole run: {took / 60:.1f} min.\n\n" + "\n\n".join(tables) + "\n"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2])
    else:
        main()

"""Streaming least-squares collections (issue #29): accuracy against the estimator's ls, a grown
collection against one built in one add, and what an add and a query cost. Writes docs/lshead.md.

- Accuracy on full CLINC150 and BANKING77 (precomputed MiniLM embeddings in
  ../shared/data/*/embeddings.npz), ls on 2,000 random ReLU features, mean +- std over seeds (the
  random features' seed): the estimator's ls (ridge by leave-one-out, L2 NORMpost: docs/results.md's
  row), the estimator with post_norm none, and collections: built in one add, grown class by class
  in 10 batches (lambda set by the first batch, chosen again whenever the samples double), and that
  grown collection after ``tune``.
- The grown collection against one built in one add with the same lambda, and against a
  collection of 4 shards grown alike (its ridge the whole's, shardhead.py): share of equal top-1
  answers and the largest score difference.
- Cost at 10,000 synthetic classes (20 samples each, 384-d, 2,000 features), exact and with IVF
  lists of the class means: adding one class (p50 / p99 over the adds), one held-out query (p50 / p99),
  the first add, and how often the IVF answer is the exact one.

    .venv/bin/python benchmarks/lshead.py           # full run, a few minutes
    .venv/bin/python benchmarks/lshead.py --quick   # one seed, BANKING77, 500 features, 500 classes timed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch

from retrieval_imprint import Collection, ImprintClassifier, ShardedCollection
from retrieval_imprint.ivf import ivf_lists

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FEATURES = 2000
BATCHES = 10  # the grown collection's adds, each a tenth of the classes
SHARDS = 4  # the sharded collection grown beside it
SAMPLES, D = 20, 384  # the timed collection's samples per class and dimension
TIMED_ADDS, TIMED_QUERIES = 40, 300


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(SHARED / name / "embeddings.npz") as z:
        return {key: z[key] for key in z.files}


def collection(
    path: Path, X: np.ndarray, y: np.ndarray, batches: int, seed: int, width: int, shards: int = 0, **settings
) -> Collection | ShardedCollection:
    """A streaming ls collection of ``X`` (of ``shards`` shards, if any), its classes added in
    ``batches`` adds of whole classes."""
    settings = dict(model=None, generator="ls", features=width, random_state=seed, **settings)
    col = ShardedCollection.create(path, shards=shards, **settings) if shards else Collection.create(path, **settings)
    for part in np.array_split(np.unique(y), batches):
        rows = np.isin(y, part)
        col.add(X[rows], y[rows].tolist())
    return col


def accuracy(col: Collection | ShardedCollection | ImprintClassifier, X: np.ndarray, y: np.ndarray) -> float:
    pred = col.predict(X) if isinstance(col, ImprintClassifier) else col.query(X).labels[:, 0].astype(y.dtype)
    return 100 * float(np.mean(pred == y))


def real(name: str, seeds: list[int], root: Path, width: int) -> tuple[list[list[str]], list[str]]:
    """Accuracy rows of dataset ``name`` (mean +- std over ``seeds``) and the grown-vs-one-add checks."""
    data = load(name)
    X, y, Xt, yt = data["train_X"], data["train_y"], data["test_X"], data["test_y"]
    acc: dict[str, list[float]] = {}
    checks = []
    for seed in seeds:
        fits = {
            "estimator ls (L2 NORMpost)": ImprintClassifier(generator="ls", features=width, random_state=seed),
            "estimator ls, post_norm none": ImprintClassifier(
                generator="ls", features=width, post_norm="none", random_state=seed
            ),
        }
        for label, est in fits.items():
            acc.setdefault(label, []).append(accuracy(est.fit(X, y), Xt, yt))
        one = collection(root / f"{name}-{seed}-one", X, y, 1, seed, width)
        acc.setdefault("collection, one add", []).append(accuracy(one, Xt, yt))
        grown = collection(root / f"{name}-{seed}-grown", X, y, BATCHES, seed, width)
        acc.setdefault(f"collection grown in {BATCHES} adds", []).append(accuracy(grown, Xt, yt))
        lam = grown.config["ridge"]
        same = collection(root / f"{name}-{seed}-same", X, y, 1, seed, width, ls_reg=lam / len(X))
        sharded = collection(root / f"{name}-{seed}-sharded", X, y, BATCHES, seed, width, shards=SHARDS)
        a = grown.query(Xt)
        for what, other in (("one add with its lambda", same), (f"{SHARDS} shards grown alike", sharded)):
            b = other.query(Xt)
            checks.append(
                f"{name}, seed {seed}: grown in {BATCHES} adds (lambda {lam:.4g}) vs {what} (lambda "
                f"{other.config['ridge']:.4g}): top-1 equal {np.mean(a.labels[:, 0] == b.labels[:, 0]):.4f}, "
                f"largest score difference {np.abs(a.scores[:, 0] - b.scores[:, 0]).max():.2e}"
            )
        grown.tune()
        acc.setdefault(f"grown, then tune ({BATCHES} adds)", []).append(accuracy(grown, Xt, yt))
        for col in (one, grown, same, sharded):
            col.close()
    rows = [[name, label, f"{np.mean(v):.2f} ± {np.std(v):.2f}", len(v)] for label, v in acc.items()]
    return rows, checks


def synthetic(n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_classes`` classes of ``SAMPLES`` samples around random centres, and one held-out sample each."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((n_classes, D), dtype=np.float32)
    X = centre[:, None, :] + 0.8 * rng.standard_normal((n_classes, SAMPLES + 1, D), dtype=np.float32)
    return X[:, :SAMPLES].reshape(-1, D), np.repeat(np.arange(n_classes), SAMPLES), X[:, SAMPLES]


def cost(n_classes: int, root: Path, width: int) -> list[list[str]]:
    """Per index (exact, and IVF lists of the means with nprobe tuned): the first add of ``n_classes``
    classes, then one class at a time, then one held-out query at a time, and how often its answer
    is the exact index's."""
    X, y, held = synthetic(n_classes + TIMED_ADDS)
    first = y < n_classes
    Q = held[np.random.default_rng(1).choice(len(held), TIMED_QUERIES)]
    rows, exact = [], None
    for index in ("Flat", f"IVF{ivf_lists(n_classes)},Flat"):
        col = Collection.create(root / index, model=None, generator="ls", features=width, index=index)
        t = time.perf_counter()
        col.add(X[first], y[first].tolist())
        bulk = time.perf_counter() - t
        adds = []
        for c in range(n_classes, n_classes + TIMED_ADDS):
            t = time.perf_counter()
            col.add(X[y == c], [c] * SAMPLES)
            adds.append(time.perf_counter() - t)
        col.query(Q[:1])  # warm
        queries = []
        for q in Q:
            t = time.perf_counter()
            col.query(q[None])
            queries.append(time.perf_counter() - t)
        answers = col.query(Q).labels[:, 0]
        exact = answers if exact is None else exact
        ms = 1e3 * np.array(adds), 1e3 * np.array(queries)
        rows.append(
            [f"{n_classes:,}", index, col.search_params.get("nprobe", "-"), f"{bulk:.1f}",
             f"{np.percentile(ms[0], 50):.1f}", f"{np.percentile(ms[0], 99):.1f}", f"{np.percentile(ms[1], 50):.2f}",
             f"{np.percentile(ms[1], 99):.2f}", f"{np.mean(answers == exact):.3f}"]
        )  # fmt: skip
        col.close()
    return rows


COST = ["classes", "index", "nprobe", "first add s", "add one p50 ms", "p99", "query p50 ms", "p99", "top-1 as exact"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, BANKING77, 500 features, 500 classes timed")
    parser.add_argument("--out", type=Path, default=DOCS / "lshead.md")
    args = parser.parse_args()
    seeds, names, timed = ([0], ["banking77"], 500) if args.quick else ([0, 1, 2], ["clinc150", "banking77"], 10_000)
    width = 500 if args.quick else FEATURES
    started = time.perf_counter()
    rows, checks = [], []
    with scratch("lshead-") as root:
        for name in names:
            r, c = real(name, seeds, root, width)
            rows += r
            checks += c
            print(markdown_table(["dataset", "head", "accuracy %", "seeds"], r), *c, sep="\n", flush=True)
        timing = cost(timed, root, width)
    print(markdown_table(COST, timing))
    args.out.write_text(
        "# Streaming least-squares collections (benchmarks/lshead.py)\n\n"
        f"Command: `.venv/bin/python benchmarks/lshead.py{' --quick' if args.quick else ''}`  \n"
        f"Machine: {machine()}  \nWhole run: {(time.perf_counter() - started) / 60:.1f} min.\n\n"
        f"## Accuracy, full training sets, ls on {width:,} random ReLU features\n\n"
        "Test accuracy in %, mean ± std over the random features' seeds. The estimator chooses its ridge by "
        "leave-one-out on all the data; a collection on its first add (lambda = n rho), again whenever its "
        "samples have doubled since, and `tune` chooses it again on every kept sample.\n\n"
        + markdown_table(["dataset", "head", "accuracy %", "seeds"], rows)
        + "\n\n## Grown against one add with the same lambda, and against 4 shards grown alike\n\n"
        + "\n".join(f"- {c}" for c in checks)
        + f"\n\n## Cost ({SAMPLES} samples a class, {D}-d, {width:,} features)\n\n"
        f"Adding one new class ({TIMED_ADDS} adds) and answering one held-out query ({TIMED_QUERIES} queries), "
        "wall time, with an exact index and with IVF lists of the class means (nprobe tuned by the first add "
        "on its mapped samples); the first add chooses the ridge by leave-one-out and sums G. Top-1 as exact: "
        "the share of the queries answered as the exact index answers them.\n\n" + markdown_table(COST, timing) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

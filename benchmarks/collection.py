"""Collection benchmark: add-one-class latency, open time and query latency at 1k, 10k, 100k classes.

Synthetic classes (seeded, 384-d, 10 samples per class around 2 modes), GEN kmeans k = 5, L2
norms, max aggregation, exact Flat index, samples not kept. Prints the table and writes
docs/collection-benchmark.md.

    .venv/bin/python benchmarks/collection.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch, timed

from retrieval_imprint.collection import Collection

D, PER_CLASS, K, CHUNK = 384, 10, 5, 10_000


def synthetic(first: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_classes`` classes starting at number ``first``: two modes each, samples around them."""
    rng = np.random.default_rng([seed, first])
    modes = rng.standard_normal((n_classes, 2, D)).astype(np.float32)
    which = rng.integers(0, 2, (n_classes, PER_CLASS))
    X = modes[np.arange(n_classes)[:, None], which] + 0.3 * rng.standard_normal(
        (n_classes, PER_CLASS, D), dtype=np.float32
    )
    y = np.repeat(np.arange(first, first + n_classes), PER_CLASS)
    return X.reshape(-1, D), y


def run(n_classes: int, root: Path) -> list[object]:
    path = root / f"c{n_classes}"
    col = Collection.create(path, model=None, generator="kmeans", k=K, aggregation="max", keep_samples=False)
    t = time.perf_counter()
    for first in range(0, n_classes, CHUNK):
        X, y = synthetic(first, min(CHUNK, n_classes - first))
        col.add(X, y)
    build = time.perf_counter() - t
    col.compact()
    open_s = min(timed(lambda: Collection.open(path), 3))
    col = Collection.open(path)
    adds = []
    for i in range(20):
        X, y = synthetic(n_classes + i, 1, seed=1)
        adds += timed(lambda: col.add(X, y))
    Q, _ = synthetic(0, 200, seed=2)
    Q = Q[::PER_CLASS]
    single = [timed(lambda q=q: col.predict(q[None]))[0] for q in Q]
    Qb, _ = synthetic(0, 100, seed=3)
    batch = min(timed(lambda: col.predict(Qb), 3))
    size = col.info()["bytes_on_disk"]
    return [
        f"{n_classes:,}",
        f"{build:.1f}",
        f"{open_s * 1e3:.0f}",
        f"{np.median(adds) * 1e3:.1f}",
        f"{np.percentile(adds, 90) * 1e3:.1f}",
        f"{np.median(single) * 1e3:.2f}",
        f"{len(Qb) / batch:,.0f}",
        f"{size / 2**20:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    args = parser.parse_args()
    header = [
        "classes",
        "build s",
        "open ms",
        "add-one-class p50 ms",
        "add-one-class p90 ms",
        "query batch-1 p50 ms",
        "query batch-1000 q/s",
        "disk MiB",
    ]
    rows = []
    with scratch("ri-collection-") as tmp:
        for n in args.sizes:
            rows.append(run(n, Path(tmp)))
            print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(header, rows)
    print(table)
    (DOCS / "collection-benchmark.md").write_text(
        "# Collection benchmark\n\n"
        f"Command: `.venv/bin/python benchmarks/collection.py --sizes {' '.join(map(str, args.sizes))}`  \n"
        f"Machine: {machine()}  \n"
        f"Setup: synthetic classes, 384-d, {PER_CLASS} samples per class, GEN kmeans k = {K}, L2 norms, "
        "max aggregation, exact Flat index, samples not kept; built in adds of up to 10,000 classes, then "
        "compacted. add-one-class: 20 adds of one new 10-sample class (one segment file and one "
        "transaction each). Query: `Collection.predict` end to end.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()

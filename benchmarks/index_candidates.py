"""Which IVF codes reach recall@1 0.99 fastest on realistic classes: the candidates for a 10M-class index.

Builds the proxies of 100,000 realistic classes (``scale.Realistic``: real sentence embeddings
mixed and spread by real within-intent residuals; GEN kmeans k = 4, L2 norms, as scale.py) and
indexes them in plain FAISS with each candidate: the collections' IVF-SQfp16 today, and fast-scan
4-bit product quantisation (``PQ{M}x4fs``) with an exact re-rank of its 16 best (``RFlat``, the
refine stage a 10M index would read from memory-mapped vectors). One held-out query for each of
``N_QUERIES`` classes: recall@1 against the exact top-1 proxy, and the mean latency of one query at
a time on one thread, at each nprobe. Writes docs/index-candidates.md (or --out).

    .venv/bin/python benchmarks/index_candidates.py [--classes 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from _common import DOCS, machine, markdown_table
from scale import CHUNK, K, Realistic, reference_proxies

from retrieval_imprint.ivf import ivf_lists
from retrieval_imprint.normalize import l2_normalize

N_QUERIES = 400
NPROBES = (8, 32, 64, 128)
REFINE = 16  # candidates the fast-scan codes hand to the exact re-rank (k_factor)


def candidates(nlist: int) -> list[str]:
    return [f"IVF{nlist},SQfp16", f"IVF{nlist},PQ48x4fs,RFlat", f"IVF{nlist},PQ96x4fs,RFlat"]


def parameters(factory: str, nprobe: int) -> faiss.SearchParameters:
    ivf = faiss.SearchParametersIVF(nprobe=nprobe)
    return faiss.IndexRefineSearchParameters(k_factor=REFINE, base_index_params=ivf) if "RFlat" in factory else ivf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=DOCS / "index-candidates.md")
    args = parser.parse_args()
    started = time.perf_counter()
    make = Realistic()
    proxies, queries = [], []
    step = max(1, args.classes // N_QUERIES)
    for first in range(0, args.classes, CHUNK):
        X, y, q = make(first, min(CHUNK, args.classes - first))
        proxies.append(reference_proxies(X, y))
        queries.append(q[::step])
    W, Q = np.concatenate(proxies), l2_normalize(np.concatenate(queries))[:N_QUERIES]
    exact = np.argmax(Q @ W.T, 1)
    nlist = ivf_lists(len(W))
    sample = W[np.sort(np.random.default_rng(0).permutation(len(W))[: 40 * nlist])]
    faiss.omp_set_num_threads(1)  # one query at a time on one core, as a server's engine thread answers
    rows = []
    for factory in candidates(nlist):
        index = faiss.index_factory(W.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.add(W)
        for nprobe in NPROBES:
            params = parameters(factory, nprobe)
            t = time.perf_counter()
            found = np.array([index.search(q[None], 1, params=params)[1][0, 0] for q in Q])
            ms = (time.perf_counter() - t) / len(Q) * 1e3
            rows.append([factory, nprobe, f"{np.mean(found == exact):.3f}", f"{ms:.2f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    text = (
        "# IVF codes on realistic classes\n\n"
        f"Command: `.venv/bin/python benchmarks/index_candidates.py --classes {args.classes}` "
        f"({(time.perf_counter() - started) / 60:.0f} min)  \nMachine: {machine()}  \n"
        f"Setup: the proxies of {args.classes:,} realistic classes ([scale-realistic.md](scale-realistic.md); "
        f"GEN kmeans k = {K}, L2 norms: {len(W):,} proxies) in plain FAISS, {nlist} lists trained on "
        f"{len(sample):,} of them; one held-out query for each of {len(Q)} classes, answered one at a time on one "
        f"thread. recall@1: the top-1 proxy equals the exact top-1. `RFlat`: the {REFINE} best by the "
        "fast-scan codes re-ranked exactly.\n\n"
        + markdown_table(["index", "nprobe", "recall@1", "ms per query"], rows)
        + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

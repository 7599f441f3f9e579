"""GPU benchmark: the engine's two heavy kernels on numpy/FAISS, on the torch backend on the CPU, and
on CUDA, side by side in one run (device.py). Writes docs/gpu.md and keeps each machine's run in
docs/gpu.json, so a GPU machine's run sits beside this 2-core machine's CPU path.

- Fit and predict on CLINC150 and BANKING77 embeddings (GEN kmeans k = 20, max; and the default
  ``auto``, whose cross-validation runs a batched k-means per k and fold): seconds per backend,
  and agreement of each backend's predictions with numpy's.
- Batched k-means of C synthetic classes x 8 samples x 384-d, k = 4 (C = 100k and 1M): seconds,
  share of centroids within 1e-4 of numpy's (on the first 20k classes: a class's centroids do not
  depend on the others) and the k-means objective against numpy's. On each torch device the
  k-means alone (rows there, centroids left there); on a GPU also the same k-means with the rows
  already there but the centroids landed in host memory, and the copies alone (rows in, centroids
  out): the bus's floor.
- Exact search, batch 1,000, top-1 over N proxies (N = 100k and 1M): seconds, and agreement of
  the ids with FAISS's (float32 near-ties aside); with faiss-gpu installed, also FAISS's GPU index.
  And the search's matrix product alone, in each backend's BLAS: the floor under its search.

Columns without the hardware say so ("-"). A GPU machine runs it as is in a few minutes; with
the kept runs copied beside ``--out`` first, its table holds this machine's CPU run too:

    .venv/bin/python benchmarks/gpu.py
    cp docs/gpu.json $OUT/ && python benchmarks/gpu.py --out $OUT/gpu.md    # elsewhere
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from _common import DOCS, machine, markdown_table

from retrieval_imprint import ImprintClassifier
from retrieval_imprint._groups import Grouped
from retrieval_imprint.device import BLOCK_BYTES, copy_to_host, prefetched, to_device, use_device
from retrieval_imprint.index import ProxyIndex
from retrieval_imprint.kmeans import batched_kmeans, block_kmeans
from retrieval_imprint.labels import label_keys

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
D, SAMPLES, K, QUERIES = 384, 8, 4, 1000
CHECKED = 20_000  # classes whose centroids are compared across backends


def fit_name(n_classes: int, on_gpu: str = "") -> str:
    """The k-means rows' workloads: from host memory, ``"alone"`` (kmeans_alone), ``"resident"`` or
    ``"copies"`` (on_the_gpu)."""
    what = f"{n_classes:,} classes x {SAMPLES} x {D}-d"
    return {
        "": f"k-means k={K}: {what}",
        "alone": f"k-means alone: {what}, rows on the device and centroids left there",
        "resident": f"k-means k={K}: {what}, rows already on the GPU",
        "copies": f"copies alone: {what} rows in, centroids out (the floor of a fit from host memory)",
    }[on_gpu]


def search_name(n: int) -> str:
    return f"exact search, batch {QUERIES:,}, top-1 over {n:,} proxies"


# the targets at 1M: (the CPU path's workload, the CUDA run's workload)
TARGETS = [(fit_name(10**6), fit_name(10**6, on_gpu)) for on_gpu in ("", "resident", "alone", "copies")] + [
    (search_name(10**6), search_name(10**6))
]


def backends() -> dict[str, str | None]:
    """Name -> device: numpy always, torch on the CPU always, CUDA where torch sees a GPU."""
    out = {"numpy": None, "torch cpu": "cpu"}
    if torch.cuda.is_available():
        out["cuda"] = "cuda"
    return out


def best(fn: Callable[[], object], repeat: int, warm_up: bool = True) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, after one warm-up call (CUDA start-up, device copies)
    unless ``warm_up`` is False; and the last result."""
    result = fn() if warm_up else None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), result


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random unit vectors, made a chunk at a time (8M x 384 floats are 12 GB: no temporaries)."""
    X = np.empty((n, D), np.float32)
    for lo in range(0, n, 1 << 20):
        part = X[lo : lo + (1 << 20)]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part /= np.sqrt(np.einsum("ij,ij->i", part, part))[:, None]
    return X


def real_data(names: list[str], repeat: int, data: Path = SHARED) -> list[dict]:
    rows = []
    for name in names:
        with np.load(data / name / "embeddings.npz") as z:
            X, y, Xq, yq = z["train_X"], z["train_y"], z["test_X"], z["test_y"]
        for setting, params in (
            ("kmeans k=20, max", dict(generator="kmeans", k=20, aggregation="max")),
            ("auto (default)", {}),
        ):
            row = {"workload": f"{name}: fit {setting}", "n": len(X)}
            pred_row = {"workload": f"{name}: predict {len(Xq):,} queries ({setting})", "n": len(Xq)}
            reference = None
            for backend, device in backends().items():
                seconds, clf = best(lambda: ImprintClassifier(**params, device=device).fit(X, y), repeat)
                row[backend] = seconds
                seconds, pred = best(lambda: clf.predict(Xq), repeat)
                pred_row[backend] = seconds
                reference = pred if reference is None else reference
                pred_row[f"{backend} agreement"] = float(np.mean(pred == reference))
                pred_row[f"{backend} accuracy"] = float(np.mean(pred == yq))
            rows += [row, pred_row]
            print(row, pred_row, flush=True)
    return rows


def inertia(X: np.ndarray, C: np.ndarray) -> float:
    """Summed squared distance of each class's samples to its nearest centroid, in float64."""
    X, C = X.reshape(len(C), SAMPLES, D).astype(np.float64), C.astype(np.float64)
    return float(((X[:, :, None, :] - C[:, None]) ** 2).sum(-1).min(-1).sum())


def synthetic_fit(sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    for n_classes in sizes:
        X = unit_rows(np.random.default_rng(n_classes), n_classes * SAMPLES)
        classes = np.arange(n_classes)
        groups = Grouped.from_codes(X, np.repeat(classes, SAMPLES), label_keys(classes))
        head = groups.take(classes[:CHECKED])
        row = {"workload": fit_name(n_classes), "n": n_classes}
        reference = None
        for backend, device in backends().items():

            def fit(g: Grouped, device: str | None = device) -> np.ndarray:
                with use_device(device):
                    return batched_kmeans(g, K, 0)

            C = fit(head)  # the check, and the warm-up of the timed runs
            reference = C if reference is None else reference
            row[f"{backend} centroids within 1e-4"] = float(np.mean(np.abs(C - reference).max(-1) <= 1e-4))
            row[f"{backend} objective / numpy"] = inertia(head.X, C) / inertia(head.X, reference)
            # the centroids are dropped as soon as they are made: at 1M classes they are 6 GB
            row[backend], _ = best(lambda: fit(groups).shape, 1 if n_classes > 200_000 else repeat, warm_up=False)
            gc.collect()
        rows.append(row)
        print(row, flush=True)
        rows.append(kmeans_alone(groups, repeat))
        if "cuda" in backends():
            rows += on_the_gpu(groups, head, reference, repeat)
        X = groups = head = None  # 12 GB at 1M classes: freed before the next size
        gc.collect()
    return rows


def kmeans_alone(groups: Grouped, repeat: int) -> dict:
    """The k-means itself on each torch device: the classes' rows already there and the centroids
    left there (dropped block by block), so neither bus copies nor the landing of the centroids in
    host memory are counted; what a fit adds to this is moving data."""
    row = {"workload": fit_name(groups.n_classes, "alone"), "n": groups.n_classes}
    for backend, device in backends().items():
        if device is None:
            continue
        resident = Grouped(torch.from_numpy(groups.X).to(device), groups.offsets, groups.keys)  # not via pinned memory

        def run() -> None:
            for classes, P, mask in resident.padded(BLOCK_BYTES[device]):
                block_kmeans(P, to_device(mask, device), groups.keys[classes], K, 0)

        row[backend], _ = best(run, 1 if groups.n_classes > 200_000 else repeat)
        resident = None
        gc.collect()
    print(row, flush=True)
    return row


def on_the_gpu(groups: Grouped, head: Grouped, reference: np.ndarray, repeat: int) -> list[dict]:
    """What a fit from host memory spends on the bus: the same k-means with the classes' rows
    already on the GPU (centroids still copied back), and the copies alone (rows in, block by
    block as ``map_blocks`` sends them, and the centroids out), page-locked and pageable."""
    n_classes = groups.n_classes
    resident = Grouped(torch.from_numpy(groups.X).cuda(), groups.offsets, groups.keys)
    with use_device("cuda"):
        C = batched_kmeans(Grouped(resident.X[: len(head.X)], head.offsets, head.keys), K, 0)
        fit = {
            "workload": fit_name(n_classes, "resident"),
            "n": n_classes,
            "cuda centroids within 1e-4": float(np.mean(np.abs(C - reference).max(-1) <= 1e-4)),
        }
        fit["cuda"], _ = best(lambda: batched_kmeans(resident, K, 0).shape, 1, warm_up=False)
    resident = None
    gc.collect()
    out = np.empty((n_classes, K, D), np.float32)
    centroids = torch.zeros(out.shape, device="cuda")
    step = BLOCK_BYTES["cuda"] // (SAMPLES * D * 4)

    def copies(pinned: bool) -> None:
        blocks = ((lo, groups.X[lo * SAMPLES : (lo + step) * SAMPLES]) for lo in range(0, n_classes, step))
        if pinned:
            for _ in prefetched(blocks, "cuda"):
                pass
        else:
            for _, P in blocks:
                torch.from_numpy(P).to("cuda")
        for lo in range(0, n_classes, step):
            copy_to_host(out[lo : lo + step], centroids[lo : lo + step])

    floor = {"workload": fit_name(n_classes, "copies"), "n": n_classes}
    floor["cuda"], _ = best(lambda: copies(True), repeat)
    floor["pageable copies (s)"], _ = best(lambda: copies(False), repeat)
    print(fit, floor, flush=True)
    return [fit, floor]


def search(sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n + 1)
        W, Q = unit_rows(rng, n), unit_rows(rng, QUERIES)
        index = ProxyIndex.build(W)
        row = {"workload": search_name(n), "n": n}
        reference = None
        for backend, device in backends().items():

            def run(device=device):
                with use_device(device):
                    return index.search(Q, 1)[2]

            row[backend], ids = best(run, repeat)
            reference = ids if reference is None else reference
            row[f"{backend} agreement"] = float(np.mean(ids == reference))
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus():
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index.index)
            row["faiss-gpu"], (_, ids) = best(lambda: gpu.search(Q, 1), repeat)
            row["faiss-gpu agreement"] = float(np.mean(ids == reference))
        rows.append(row)
        print(row, flush=True)
        W = index = None
        gc.collect()
    return rows


def gemm(n: int, repeat: int) -> dict:
    """The score product of a search alone, ``(1,000 x 384) @ (384 x n)``: each backend's own BLAS
    (numpy: OpenBLAS; torch on the CPU: MKL; CUDA: cuBLAS), the floor under its search."""
    rng = np.random.default_rng(7)
    W, Q = unit_rows(rng, n), unit_rows(rng, QUERIES)
    row = {"workload": f"GEMM alone: {QUERIES:,} x {D} x {n:,} (the product under a search)", "n": n}
    for backend, device in backends().items():
        if device is None:
            row[backend], _ = best(lambda: Q @ W.T, repeat)
        else:
            Wt, Qt = torch.from_numpy(W).to(device), torch.from_numpy(Q).to(device)
            row[backend], _ = best(lambda: Qt @ Wt.T, repeat)
    print(row, flush=True)
    return row


def fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v < 100 else f"{v:,.0f}"
    return str(v)


def summary(rows: list[dict]) -> str:
    """The run in words: torch on the CPU against numpy, per kind of work (ratios from the table)."""

    def span(kind: str) -> str:
        ratios = [
            r["torch cpu"] / r["numpy"] for r in rows if kind in r["workload"] and "torch cpu" in r and "numpy" in r
        ]
        if not ratios:
            return "-"
        return f"{min(ratios):.2f}x" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}x"

    agree = min(r.get("torch cpu agreement", 1.0) for r in rows)
    return (
        f"torch on the CPU against numpy/FAISS: fits {span(': fit ')} and k-means {span('k-means')} the time; "
        f"predictions and searches {span('predict')} and {span('exact search')}, with the matrix product "
        f"alone at {span('GEMM')} (torch's BLAS against numpy's: the floor under its searches). Lowest "
        f"agreement with numpy's answers: {agree:.4f}."
    )


def render(runs: dict[str, dict]) -> str:
    """docs/gpu.md from every machine's stored run."""
    out = [
        "# The torch backend and the GPU (benchmarks/gpu.py)",
        "",
        "Seconds are the best of the repeats after one warm-up call (CUDA start-up and the copy of the "
        "proxies to the device are not counted). numpy = today's numpy/FAISS path (`device=None`); "
        'torch cpu = `device="cpu"`; cuda = `device="cuda"`. Agreement: share of predictions or ids equal '
        "to numpy's; centroids: share within 1e-4 of numpy's (first 20k classes), objective: the k-means "
        'objective over numpy\'s. "-": not measured on that machine (no GPU, or no faiss-gpu).',
        "",
    ]
    reference = next((r for r in runs.values() if "cuda" not in r["backends"]), None)
    for label, run in runs.items():
        names = ["numpy", "torch cpu", "cuda", "faiss-gpu"]
        header = (
            ["workload"]
            + [f"{b} (s)" for b in names]
            + ["torch cpu / numpy", "numpy / cuda", "torch cpu agreement", "cuda agreement", "checks"]
        )
        rows = []
        for r in run["rows"]:
            checks = ", ".join(
                f"{key} {fmt(r[key], 4)}"
                for key in r
                if key.endswith(" accuracy")
                or (key.endswith(("within 1e-4", "objective / numpy", "(s)")) and not key.startswith("numpy "))
            )
            rows.append(
                [r["workload"]]
                + [fmt(r.get(b)) for b in names]
                + [
                    fmt(r["torch cpu"] / r["numpy"], 2) if "torch cpu" in r and "numpy" in r else "-",
                    fmt(r["numpy"] / r["cuda"], 1) if r.get("cuda") and "numpy" in r else "-",
                    fmt(r.get("torch cpu agreement"), 4),
                    fmt(r.get("cuda agreement"), 4),
                    checks or "-",
                ]
            )
        at = f" at commit {run['commit']}" if run.get("commit") else ""
        out += [
            f"## {label}",
            "",
            f"Command: `{run['command']}`{at}",
            "",
            markdown_table(header, rows),
            "",
            summary(run["rows"]),
            "",
        ]
    cuda_runs = {label: run for label, run in runs.items() if "cuda" in run["backends"]}
    out += ["## Targets (issue #14)", ""]
    if not cuda_runs or reference is None:
        out += [
            "Not measured yet: the targets compare a CUDA run with the CPU path of the 2-core machine; "
            "no run here has " + ("a GPU." if not cuda_runs else "a CPU-only reference."),
            "",
        ]
    else:
        for label, run in cuda_runs.items():
            for target, what in TARGETS:
                cpu = next((r for r in reference["rows"] if r["workload"] == target), None)
                gpu = next((r for r in run["rows"] if r["workload"] == what), None)
                if cpu and gpu:
                    ratio = cpu["numpy"] / gpu["cuda"]
                    verdict = (
                        "the bound on a fit from host memory"
                        if what.startswith("copies")
                        else f"target >= 20x: {'met' if ratio >= 20 else 'not met'}"
                    )
                    out.append(
                        f"- {what}: CPU path {cpu['numpy']:.2f} s (the run without a GPU above) vs CUDA "
                        f"{gpu['cuda']:.3f} s ({label.rpartition('; ')[2]}): {ratio:.0f}x ({verdict})"
                    )
        out += [
            "",
            "A fit from host memory moves the classes' rows to the GPU and the centroids back (12.3 GB "
            "and 6.1 GB at 1M classes); the copies-alone row is that floor, and the rows-already-on-the-GPU "
            "row leaves out the way in. The k-means-alone row leaves out both ways: the kernels themselves. "
            "A fit's time above the floor is the k-means itself and the landing of the centroids in fresh "
            "host memory (`device.copy_to_host`).",
            "",
        ]
    return "\n".join(out)


def commit() -> str | None:
    """The commit measured, where the script runs in a git checkout (a device's copy may have none)."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return done.stdout.strip() if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=["clinc150", "banking77"])
    parser.add_argument("--data", type=Path, default=SHARED, help="where DATASET/embeddings.npz lie")
    parser.add_argument("--fit-classes", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--search-proxies", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--out",
        type=Path,
        default=DOCS / "gpu.md",
        help="the table; the runs are kept beside it (gpu.json), one per machine",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the kept runs")
    args = parser.parse_args()
    store = args.out.with_suffix(".json")
    if args.render:
        args.out.write_text(render(json.loads(store.read_text())))
        return
    warnings.simplefilter("default")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    label = f"{machine()}; torch {torch.__version__}; {gpu}"
    rows = (
        real_data(args.datasets, args.repeat, args.data)
        + synthetic_fit(args.fit_classes, args.repeat)
        + search(args.search_proxies, args.repeat)
        + [gemm(min(args.search_proxies), args.repeat)]
    )
    command = "benchmarks/gpu.py" + "".join(
        f" --{key.replace('_', '-')} {' '.join(map(str, value))}"
        for key, value in vars(args).items()
        if key in ("datasets", "fit_classes", "search_proxies") and value != parser.get_default(key)
    )
    runs = json.loads(store.read_text()) if store.exists() else {}
    runs[label] = {"backends": list(backends()), "rows": rows, "command": command, "commit": commit()}
    store.write_text(json.dumps(runs, indent=1) + "\n")
    args.out.write_text(render(runs))
    print(f"wrote {args.out} and {store}")


if __name__ == "__main__":
    main()

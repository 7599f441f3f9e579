"""The benchmark scripts run end to end: accuracy in its quick mode (one seed, full BANKING77), scale
on a small size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from retrieval_imprint.collection import Collection

pytestmark = pytest.mark.slow  # a subprocess on real data

ROOT = Path(__file__).resolve().parents[1]


def benchmark(script: str, *args: str) -> None:
    """Run ``benchmarks/SCRIPT`` with ``args`` to its end (ten minutes at most); its failure fails the test."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_accuracy_benchmark_quick_mode(tmp_path):
    shared_data("banking77", "embeddings.npz")
    benchmark("accuracy.py", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())
    fields = {
        "dataset",
        "shots",
        "generator",
        "k",
        "pre_norm",
        "post_norm",
        "inf_norm",
        "aggregation",
        "m",
        "accuracy",
        "accuracy_std",
        "seeds",
        "fit_seconds",
    }
    assert rows and all(fields <= set(r) for r in rows)
    acc = {r["generator"]: r["accuracy"] for r in rows}
    assert acc["kmeans"] > acc["mean"], acc  # the paper's main finding, on full data
    assert acc["ls"] > acc["kmeans"], acc  # ls on random features: the most accurate head on full data
    assert all(0 <= r["accuracy"] <= 1 and r["dataset"] == "banking77" and r["shots"] == 0 for r in rows)
    text = (tmp_path / "results.md").read_text()
    assert "banking77" in text and "### banking77: ls on random features, by width (full data)" in text
    assert (tmp_path / "accuracy_vs_k.png").stat().st_size > 1000


@pytest.mark.parametrize("data", ["topics", "realistic"])
def test_scale_benchmark_runs_small(tmp_path, data):
    """benchmarks/scale.py end to end on 3,000 classes of either distribution, on both indexes:
    every column filled, the targets listed (realistic classes mix real sentence embeddings, so
    they need the data); a kept collection measured again by ``--reopen``, adds included."""
    if data == "realistic":
        shared_data("clinc150", "embeddings.npz")
        shared_data("banking77", "embeddings.npz")
    out = tmp_path / "scale.md"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            "--sizes",
            "3000",
            "--data",
            data,
            "--out",
            str(out),
            "--index",
            "refined",
            "sqfp16",
            "--keep",
            str(tmp_path / "kept"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.read_text()
    lines = [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| 3,000")
    ]
    rows = [cells for cells in lines if cells[1].startswith("IVF")]  # the results, not the memory check
    assert [cells[1] for cells in rows] == ["IVF256,PQ96x4fs,Refine(SQfp16)", "IVF256,SQfp16"]
    for cells in rows:
        assert len(cells) == 22 and all(cells) and float(cells[17]) >= 0.95  # recall@1 after the compaction
        assert f"## Targets at 3,000 classes, {cells[1]}" in text
    assert "FAISS SIMD" in text and "--index refined sqfp16" in text
    assert ("realistic classes" in text) == (data == "realistic")
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "3000", "--data", data, "--reopen"]
        + [str(tmp_path / "kept" / "c3000-refined")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    header, _, row = [[c.strip() for c in line.strip("|").split("|")] for line in again.splitlines()[-3:]]
    assert header[:3] == ["classes", "upgrade s", "open s"] and len(row) == len(header) == 13
    assert header[-5:] == [
        "first pass here p50 ms",
        "warm batch-1 p50 ms",
        "warm p99 ms",
        "add-one p50 ms",
        "add-one p99 ms",
    ]
    assert row[:2] == ["3,000", "-"]  # written by this code: no schema upgrade
    assert all(float(v) >= 0 for v in row[2:])


def test_gpu_benchmark_runs_small(tmp_path):
    """benchmarks/gpu.py end to end, small: numpy and torch CPU columns filled and agreeing (a CUDA
    column where a GPU is present), the run kept in the JSON beside the table."""
    shared_data("banking77", "embeddings.npz")
    out = tmp_path / "gpu.md"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--datasets",
            "banking77",
            "--fit-classes",
            "2000",
            "--search-proxies",
            "5000",
            "--repeat",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    runs = json.loads(out.with_suffix(".json").read_text())
    (run,) = runs.values()
    on_gpu = "cuda" in run["backends"]  # a GPU adds the k-means with rows on it and the copies alone
    assert {"numpy", "torch cpu"} <= set(run["backends"]) and len(run["rows"]) == 8 + 2 * on_gpu
    for row in run["rows"]:
        if "numpy" in row:
            assert row["numpy"] > 0 and row["torch cpu"] > 0, row
        elif "alone" in row["workload"]:  # the k-means alone: every torch device, no numpy
            assert row["torch cpu"] > 0 and (row["cuda"] > 0 if on_gpu else "cuda" not in row), row
        else:
            assert row["cuda"] > 0, row
        assert row.get("torch cpu agreement", 1.0) >= 0.99 and row.get("torch cpu centroids within 1e-4", 1.0) >= 0.99
    text = out.read_text()
    assert "| k-means k=4: 2,000 classes x 8 x 384-d |" in text and "## Targets (issue #14)" in text
    assert "| k-means alone: 2,000 classes x 8 x 384-d, rows on the device and centroids left there | - |" in text


def test_gpu_table_is_rendered_from_the_kept_runs(tmp_path):
    """docs/gpu.md is what ``gpu.py --render`` makes of docs/gpu.json (the runs of every machine,
    a GPU machine's among them), so the table and its targets never drift from the kept figures."""
    runs = json.loads((ROOT / "docs" / "gpu.json").read_text())
    (tmp_path / "gpu.json").write_text(json.dumps(runs))
    benchmark("gpu.py", "--render", "--out", str(tmp_path / "gpu.md"))
    text = (tmp_path / "gpu.md").read_text()
    assert text == (ROOT / "docs" / "gpu.md").read_text()
    if any("cuda" in run["backends"] for run in runs.values()):
        # the fit from host memory, with the rows resident, the kernels alone, and the search
        assert text.count("(target >= 20x: ") == 4 and "the bound on a fit from host memory" in text


def test_calibration_benchmark_runs_small(tmp_path):
    """benchmarks/calibration.py end to end on one small cell: the fitted temperature's row beside
    the fixed one's and the scikit-learn wrapper's, with the same accuracy as the fixed one."""
    shared_data("banking77", "embeddings.npz")
    out = tmp_path / "calibration.md"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "calibration.py"),
            "--datasets",
            "banking77",
            "--shots",
            "5",
            "--seeds",
            "0",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| banking77 |")]
    assert [r[2] for r in rows] == [
        "temperature 0.05 (fixed)",
        "temperature auto (default)",
        "CalibratedClassifierCV (sigmoid, 3 folds)",
    ]
    assert rows[0][3] == rows[1][3] and 0 < float(rows[1][7]) < 1  # one accuracy; a fitted T


def test_serving_benchmark_quick_mode(tmp_path):
    """benchmarks/serving.py end to end, quick: every server row answered without errors, the
    targets listed, the working folder gone."""
    shared_data("banking77", "embeddings.npz")
    out = tmp_path / "serving.md"
    benchmark("serving.py", "--quick", "--out", str(out))
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| this") or line.startswith("| batching off")]
    assert len(rows) == 18 and all(line.split("|")[9].strip() == "0" for line in rows)  # no errors
    assert "## Against the targets" in text and "cold `imprint query DIR" in text


def test_a_benchmarks_scratch_folder_goes_even_on_sigterm(tmp_path):
    script = (
        f"import sys, time; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from _common import scratch\n"
        "with scratch('ri-test-') as folder:\n"
        "    (folder / 'big').write_bytes(b'x' * 1000); print(folder, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert (folder / "big").is_file()
    proc.terminate()
    assert proc.wait(30) == 143 and not folder.exists()


def test_fuzz_benchmark_runs_small(tmp_path):
    """benchmarks/fuzz.py end to end, small: no silent wrong answer, no traceback, every kill recovered."""
    out = tmp_path / "reliability.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--mutations", "30", "--kills", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    total = json.loads(done.stdout.strip().splitlines()[-1])
    assert total["silent wrong"] == 0 and total["traceback"] == 0 and total["refused"] + total["harmless"] == 30
    assert "| 1 |" in out.read_text() and "| NO |" not in out.read_text()


def test_index_candidates_benchmark_runs_small(tmp_path):
    """benchmarks/index_candidates.py end to end on 3,000 realistic classes: a row per candidate
    and nprobe, recall within [0, 1]."""
    shared_data("clinc150", "embeddings.npz")
    shared_data("banking77", "embeddings.npz")
    out = tmp_path / "candidates.md"
    benchmark("index_candidates.py", "--classes", "3000", "--out", str(out))
    rows = [line for line in out.read_text().splitlines() if line.startswith("| IVF")]
    assert len(rows) == 12 and all(0 <= float(r.split("|")[3]) <= 1 for r in rows)


def test_a_bulk_scale_build_trains_its_lists_on_a_sample_spread_over_every_class(tmp_path, monkeypatch):
    """Past ``BULK_BYTES`` (made 0 here) ``scale.run`` trains the lists before its first add on runs of
    classes at even steps over all of them (``Collection.train``), then adds chunk by chunk: the
    template is the first version's and no add trains again; the sample's labels are no classes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import scale

    X, labels = scale.training_sample(3000, scale.chunk, 100)
    assert len(X) == len(labels) == 7 * scale.SAMPLE_RUN * scale.TRAIN and labels[-1] == "sample 111"
    monkeypatch.setattr(scale, "BULK_BYTES", 0)
    monkeypatch.setattr(scale, "CHUNK", 1000)
    row, _ = scale.run(3000, tmp_path)
    queries, exact = np.load(tmp_path / "c3000-refined.queries.npy"), np.load(tmp_path / "c3000-refined.exact.npz")
    assert queries.shape == (scale.N_QUERIES, scale.D) and exact["next"] == 3000  # kept for --resume, --reopen
    col = Collection.open(tmp_path / "c3000-refined")
    assert [f for f in col.info()["segments"] if f.startswith("template")] == ["template-00000001.faiss"]
    assert len(col) == 3000 + scale.ADDS and "sample 0" not in set(col.classes)
    recall = row[scale.COLUMNS.index("recall@1")]
    assert float(recall) >= 0.95 and row[scale.COLUMNS.index("of which compact s")] == "0"


def test_a_killed_exact_reference_goes_on_from_its_last_save(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import scale

    monkeypatch.setattr(scale, "CHUNK", 500)
    monkeypatch.setattr(scale, "STATE_CHUNKS", 1)
    _, queries = scale.held_out(2000, scale.chunk)
    Qn = scale.l2_normalize(queries)
    whole = scale.exact_top1(Qn, 2000)
    made = []

    def killed(first, n):  # dies at the third chunk
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(first)
        return scale.chunk(first, n)

    with pytest.raises(KeyboardInterrupt):
        scale.exact_top1(Qn, 2000, killed, tmp_path / "exact.npz")
    again = []
    resumed = scale.exact_top1(
        Qn, 2000, lambda first, n: again.append(first) or scale.chunk(first, n), tmp_path / "exact.npz"
    )
    np.testing.assert_array_equal(resumed, whole)
    assert again == [1000, 1500]  # the two chunks the kill left


def test_a_killed_scale_build_resumes_from_its_last_add(tmp_path, monkeypatch):
    """``scale.py --resume``: the batches left after the classes a collection committed, and the
    build's figures carried over (the adds of every run, plus the time the kill lost, none when the
    kill came after the last add); a count of classes that no add ends at is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from scale import CHUNK, Progress

    batches = [[0, CHUNK], [2 * CHUNK], [3 * CHUNK]]  # a first add of two chunks, then one at a time
    first = Progress(tmp_path / "c.build.json")
    first.added(10.0, 2**30)
    first.added(5.0, 2**29)
    (tmp_path / "c.build.alive").write_text(repr(first.at + 7.0))  # the killed run's last mark: 7 s after its add
    again = Progress(tmp_path / "c.build.json")
    assert again.resume(batches, 3 * CHUNK, 4 * CHUNK - 7) == [[3 * CHUNK]]
    assert again.peak == 2**30 and again.build == pytest.approx(22.0)  # the adds, and the 7 s the kill lost
    assert len(again.resumed) == 1 and "killed after 150,000 classes and resumed (7 s lost" in again.resumed[0]
    assert Progress(tmp_path / "c.build.json").resume(batches, 3 * CHUNK, 4 * CHUNK)[0] == [3 * CHUNK]
    assert Progress(tmp_path / "none.json").resume(batches, 0, 4 * CHUNK) == batches
    built = Progress(tmp_path / "c.build.json")  # killed once every add was in: measuring, nothing lost
    assert built.resume(batches, 4 * CHUNK - 7, 4 * CHUNK - 7) == [] and "(0 s lost" in built.resumed[-1]
    with pytest.raises(SystemExit, match="not where an add ends"):
        Progress(tmp_path / "c.build.json").resume(batches, CHUNK, 4 * CHUNK)


def test_lshead_benchmark_quick_mode(tmp_path):
    """benchmarks/lshead.py --quick: the collection built in one add scores as the estimator's ls with
    post_norm none (same rho), and the grown one as a one-add collection with its lambda and as a
    sharded collection grown alike."""
    shared_data("banking77", "embeddings.npz")
    out = tmp_path / "lshead.md"
    benchmark("lshead.py", "--quick", "--out", str(out))
    text = out.read_text()
    accuracy = dict(re.findall(r"\| banking77 \| ([^|]+?) \| ([\d.]+) ±", text))
    # the same head up to float32 near-ties: a few of 3,080 test queries at most
    assert abs(float(accuracy["collection, one add"]) - float(accuracy["estimator ls, post_norm none"])) <= 0.1
    pairs = re.findall(r"vs (one add|\d+ shards).*top-1 equal ([\d.]+), largest score difference ([\d.e+-]+)", text)
    assert len(pairs) == 2, text
    for _, equal, difference in pairs:
        assert float(equal) >= 0.999 and float(difference) <= 1e-4
    for index in ("Flat", r"IVF\d+,Flat"):  # an exact index's answers are its own; IVF's mostly the same
        found = re.search(rf"\| 500 \| {index} \| [\w-]+ \|( [\d.]+ \|){{5}} ([\d.]+) \|", text)
        assert found and float(found.group(2)) >= (1.0 if index == "Flat" else 0.9), text

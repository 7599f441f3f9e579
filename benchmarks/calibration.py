"""Calibration of ``predict_proba`` on CLINC150 and BANKING77: the fitted temperature (the default,
``temperature="auto"``) against the fixed 0.05 it replaced and against scikit-learn's
``CalibratedClassifierCV`` (sigmoid, 3 folds) around the fixed one. Writes docs/calibration.md.

Every classifier is the default ``ImprintClassifier()`` (auto chooses k and AGG, or the ls head on
random features: the head column) fitted on the
training rows only, at 5, 10 and 20 shots per class (seeds 0-2) and on full data; figures are on
the test split, means over seeds: accuracy, log loss (NLL), expected calibration error (ECE: 15
equal-width bins of the top probability, the gap between confidence and accuracy weighted by the
bin's share), the mean top probability, and the fit time (best of 2). Nothing is chosen on the
test split.

    .venv/bin/python benchmarks/calibration.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import log_loss

from retrieval_imprint import ImprintClassifier
from retrieval_imprint.experiments import few_shot

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHOTS = (5, 10, 20, 0)
SEEDS = (0, 1, 2)
FIXED = 0.05  # the former default
BINS = 15
TIMED = 2  # fits per classifier: the fit time is the best of them (this machine's timings are noisy)


def ece(P: np.ndarray, truth: np.ndarray) -> float:
    """Expected calibration error of the top probability over ``BINS`` equal-width bins."""
    confidence, right = P.max(1), P.argmax(1) == truth
    which = np.minimum((confidence * BINS).astype(int), BINS - 1)
    gap = [
        abs(right[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
        for b in range(BINS)
        if np.any(which == b)
    ]
    return float(np.sum(gap))


def scores_of(P: np.ndarray, truth: np.ndarray, seconds: float) -> dict[str, float]:
    return {
        "accuracy": float(np.mean(P.argmax(1) == truth)),
        "nll": float(log_loss(truth, P, labels=range(P.shape[1]))),
        "ece": ece(P, truth),
        "confidence": float(P.max(1).mean()),
        "fit s": seconds,
    }


def run(name: str, shots: int, seed: int) -> dict[str, dict[str, float]]:
    with np.load(SHARED / name / "embeddings.npz") as z:
        X, y, Xq, yq = z["train_X"], z["train_y"], z["test_X"], z["test_y"]
    idx = few_shot(y, shots, seed)
    out = {}
    for method, make in (
        (f"temperature {FIXED} (fixed)", lambda: ImprintClassifier(temperature=FIXED)),
        ("temperature auto (default)", ImprintClassifier),
        (
            "CalibratedClassifierCV (sigmoid, 3 folds)",
            lambda: CalibratedClassifierCV(ImprintClassifier(temperature=FIXED), method="sigmoid", cv=3),
        ),
    ):
        seconds = np.inf
        for _ in range(TIMED):
            t = time.perf_counter()
            clf = make().fit(X[idx], y[idx])
            seconds = min(seconds, time.perf_counter() - t)
        out[method] = scores_of(clf.predict_proba(Xq), np.searchsorted(clf.classes_, yq), seconds)
        if hasattr(clf, "temperature_"):
            out[method]["T"] = clf.temperature_
            choice = clf.auto_choice_
            out[method]["head"] = (
                f"ls on {choice['features']} features" if choice["generator"] == "ls" else "imprinted"
            )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=["clinc150", "banking77"])
    parser.add_argument("--shots", nargs="*", type=int, default=list(SHOTS), help="per class; 0: full data")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=DOCS / "calibration.md")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for name in args.datasets:
        for shots in args.shots:
            runs = [run(name, shots, seed) for seed in (args.seeds if shots else args.seeds[:1])]
            for method in runs[0]:
                mean = {key: np.mean([r[method][key] for r in runs]) for key in runs[0][method] if key != "head"}
                heads = sorted({r[method]["head"] for r in runs if "head" in r[method]})
                rows.append(
                    [
                        name,
                        shots or "full",
                        method,
                        f"{mean['accuracy']:.4f}",
                        f"{mean['nll']:.3f}",
                        f"{mean['ece']:.3f}",
                        f"{mean['confidence']:.3f}",
                        f"{mean['T']:.4f}" if method.startswith("temperature auto") else "",
                        " / ".join(heads),
                        f"{mean['fit s']:.2f}",
                    ]
                )
                print(rows[-1], flush=True)
    header = [
        "dataset",
        "shots",
        "probabilities",
        "accuracy",
        "NLL",
        "ECE",
        "mean top probability",
        "fitted T",
        "head",
        "fit s",
    ]
    command = "benchmarks/calibration.py" + "".join(
        f" --{key} {' '.join(map(str, value))}"
        for key, value in vars(args).items()
        if key in ("datasets", "shots", "seeds") and value != parser.get_default(key)
    )
    text = [
        "# Calibration of predict_proba (benchmarks/calibration.py)",
        "",
        f"Command: `.venv/bin/python {command}` ({(time.perf_counter() - started) / 60:.0f} min)  ",
        f"Machine: {machine()}",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        markdown_table(header, rows),
        "",
        '`temperature="auto"` fits one scalar to held-out scores of the training rows (temperature.py): '
        "for an imprinted head, the first fold of a seeded sample of classes, up to 1,000 rows, scored by "
        "the fitted head with those classes imprinted again without them; that and the Newton steps are "
        "the difference in fit time. For the ls head (where auto chose it), the leave-one-out scores its "
        "own fit computes to choose its ridge (up to 4,000 rows, lsfit.py): no second fit. "
        "A temperature only rescales the scores, so both rank the classes alike and have one accuracy. "
        "CalibratedClassifierCV fits one sigmoid per class (one class against the rest) on each of 3 folds "
        "and averages the 3 fitted models.",
        "",
    ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

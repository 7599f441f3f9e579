"""Few-shot experiments: subsets with a given number of shots per class, accuracy sweeps over
settings, and the accuracy-vs-k plot (``imprint sweep``, benchmarks/accuracy.py)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .classifier import ImprintClassifier


def few_shot(y: Sequence[Any], shots: int, seed: int) -> np.ndarray:
    """Row indices keeping ``shots`` random samples per class (all of a smaller class; 0 = all rows)."""
    y = np.asarray(y)
    if shots == 0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def sweep(X_train: np.ndarray, y_train: Sequence[Any], X_test: np.ndarray, y_test: Sequence[Any],
          configs: Sequence[dict[str, Any]], shots: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Accuracy (mean and std over seeds) of each ``ImprintClassifier`` config at each shots setting.

    Seed s draws the few-shot subset and seeds the generator. One row per (shots, config).
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    rows = []
    for n_shots in shots:
        subsets = {seed: few_shot(y_train, n_shots, seed) for seed in seeds}
        for config in configs:
            accuracy, seconds = [], []
            for seed, rows_ in subsets.items():
                clf = ImprintClassifier(**{**config, "random_state": seed})
                t = time.perf_counter()
                clf.fit(X_train[rows_], y_train[rows_])
                seconds.append(time.perf_counter() - t)
                accuracy.append(float(np.mean(clf.predict(X_test) == y_test)))
            rows.append({"shots": n_shots, **config, "accuracy": float(np.mean(accuracy)),
                         "accuracy_std": float(np.std(accuracy)), "seeds": len(accuracy),
                         "fit_seconds": float(np.mean(seconds))})
    return rows


def plot_accuracy_vs_k(rows: Sequence[dict[str, Any]], ax: Any) -> None:
    """Draw accuracy (%) against k on a matplotlib ``ax``: one line per (generator, shots) of the
    max-aggregation rows of a ``sweep``."""
    for shots in dict.fromkeys(r["shots"] for r in rows):
        for gen in dict.fromkeys(r["generator"] for r in rows):
            pts = sorted((r["k"], 100 * r["accuracy"]) for r in rows
                         if r["shots"] == shots and r["generator"] == gen and r["aggregation"] == "max")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{gen}, {'all data' if shots == 0 else f'{shots} shots'}")
    ax.set_xlabel("k (proxies per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)

"""Few-shot experiments: subsets with a given number of shots per class, accuracy sweeps over
settings, and the accuracy-vs-k plot (``imprint sweep``, benchmarks/accuracy.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .classifier import ImprintClassifier
from .params import GENERATOR_KINDS


def few_shot(labels: Sequence[Any] | np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Row indices keeping ``shots`` random samples per class (all of a smaller class; 0 = all rows)."""
    y = np.asarray(labels)
    if shots == 0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def sweep(
    X_train: np.ndarray,
    labels_train: Sequence[Any] | np.ndarray,
    X_test: np.ndarray,
    labels_test: Sequence[Any] | np.ndarray,
    configs: Sequence[dict[str, Any]],
    shots: Sequence[int],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """Accuracy (mean and std over seeds) of each ``ImprintClassifier`` config at each shots setting.

    Seed s draws the few-shot subset and seeds the generator. One row per (shots, config).
    """
    y_train, y_test = np.asarray(labels_train), np.asarray(labels_test)
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
            rows.append(
                {
                    "shots": n_shots,
                    **config,
                    "accuracy": float(np.mean(accuracy)),
                    "accuracy_std": float(np.std(accuracy)),
                    "seeds": len(accuracy),
                    "fit_seconds": float(np.mean(seconds)),
                }
            )
    return rows


def plot_accuracy_vs_k(rows: Sequence[dict[str, Any]], ax: Any) -> None:
    """Draw accuracy (%) against k on a matplotlib ``ax`` from the max-aggregation rows of a
    ``sweep``: a colour per shots setting; a generator with k (kmeans...) as a line with the seeds'
    standard deviation as error bars; one without (mean, all samples) as a horizontal line of its
    own style across the k range, its error bar just right of it, so that no series hides another. Integer k ticks on a log axis;
    the legend outside the axes."""
    rows = [r for r in rows if r["aggregation"] == "max"]
    ks = sorted({r["k"] for r in rows if GENERATOR_KINDS[r["generator"]].takes_k and r["k"] > 0}) or [1]
    colours = {shots: f"C{i}" for i, shots in enumerate(dict.fromkeys(r["shots"] for r in rows))}
    series = {_series(r): r["generator"] for r in rows}
    styles = iter(["--", ":", "-."])
    style = {name: next(styles, "--") for name, gen in series.items() if not GENERATOR_KINDS[gen].takes_k}
    for shots, colour in colours.items():
        shot_name = "all data" if shots == 0 else f"{shots} shots"
        for name, gen in series.items():
            pts = sorted(
                (r["k"], 100 * r["accuracy"], 100 * r["accuracy_std"])
                for r in rows
                if r["shots"] == shots and _series(r) == name
            )
            if not pts:
                continue
            if not GENERATOR_KINDS[gen].takes_k:
                _, acc, std = pts[0]
                ax.hlines(acc, ks[0], ks[-1], colors=colour, linestyles=style[name], label=f"{name}, {shot_name}")
                nudge = 1.06 ** (1 + list(style).index(name))  # its error bar just right of the last k
                ax.errorbar([ks[-1] * nudge], [acc], yerr=[std], color=colour, capsize=3, lw=1)
            else:
                k, acc, std = zip(*pts)
                ax.errorbar(k, acc, yerr=std, color=colour, marker="o", ms=4, capsize=3, label=f"{name}, {shot_name}")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (proxies per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _series(row: dict[str, Any]) -> str:
    """A plotted series: the generator, named as in the docs, and the random features it ran on."""
    name = {"all": "all samples (1-NN)"}.get(row["generator"], row["generator"])
    return name + (f" on {row['features']} features" if row.get("features") else "")

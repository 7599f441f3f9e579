"""The README's main job until collections and the full CLI land: embed the packaged demo intents
with the packaged MiniLM model and compare the published imprinting methods on its test split."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .classifier import PRESETS, ImprintClassifier
from .embed import Embedder
from .evaluate import Evaluation, evaluate


@dataclass(frozen=True)
class DemoRow:
    method: str
    setting: str
    n_proxies: int
    evaluation: Evaluation


def load_demo() -> dict[str, tuple[list[str], np.ndarray]]:
    """The demo dataset (written for this project): ``{split: (texts, labels)}``."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    with resources.files(__package__).joinpath("data/demo_intents.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            texts, labels = out.setdefault(row["split"], ([], []))
            texts.append(row["text"])
            labels.append(row["label"])
    return {split: (texts, np.asarray(labels)) for split, (texts, labels) in out.items()}


def _setting(clf: ImprintClassifier) -> str:
    gen = clf.generator if clf.generator == "mean" else f"{clf.generator} k={clf.k}"
    agg = "max" if clf.aggregation == "max" else f"{clf.m}-NN {clf.metric} {clf.vote}"
    return f"{clf.pre_norm}/{gen}/{clf.post_norm}/{clf.inf_norm}/{agg}"


def run_demo(embedder: Embedder | None = None) -> list[DemoRow]:
    """Fit each preset (and k-means with k = 3) on the demo train split, score the test split."""
    data = load_demo()
    embedder = embedder or Embedder()
    (train_texts, y_train), (test_texts, y_test) = data["train"], data["test"]
    X_train, X_test = embedder.encode(train_texts), embedder.encode(test_texts)
    methods = {name: ImprintClassifier.from_preset(name) for name in PRESETS}
    methods["imprint k=3"] = ImprintClassifier.from_preset("imprint", k=3)
    rows = []
    for name, clf in methods.items():
        clf.fit(X_train, y_train)
        rows.append(DemoRow(name, _setting(clf), len(clf.proxies_), evaluate(y_test, clf.predict(X_test))))
    return rows

"""The installed `imprint` executable on a BANKING77 subset, checked against the Python API."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from retrieval_imprint import ImprintClassifier
from retrieval_imprint.embed import Embedder, EmbeddingCache

pytestmark = pytest.mark.slow  # a subprocess on real data

CLASSES = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "cash_withdrawal_charge"]


def subset(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    with src.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in CLASSES]
    with dst.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows([r["text"], r["category"]] for r in rows)
    return [r["text"].strip() for r in rows], [r["category"] for r in rows]


def imprint(*args: str) -> str:
    exe = shutil.which("imprint", path=str(Path(sys.executable).parent)) or shutil.which("imprint")
    assert exe, "the imprint executable is installed"
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_index_and_eval_match_the_python_api(tmp_path):
    train_texts, train_y = subset(shared_data("banking77", "train.csv"), tmp_path / "train.csv")
    test_texts, test_y = subset(shared_data("banking77", "test.csv"), tmp_path / "test.csv")
    col = tmp_path / "bank"
    imprint("index", str(col), str(tmp_path / "train.csv"), "--quiet")
    report = json.loads(imprint("eval", str(col), str(tmp_path / "test.csv"), "--json", "--quiet"))
    embed = Embedder(cache=EmbeddingCache.default())  # texts stripped as the readers do
    clf = ImprintClassifier().fit(embed.encode(train_texts), train_y)
    expected = float(np.mean(clf.predict(embed.encode(test_texts)) == np.array(test_y)))
    assert report["n"] == len(test_y) == 200
    assert report["accuracy"] == expected
    assert report["accuracy"] > 0.85

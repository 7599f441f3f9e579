"""The packaged MiniLM model loads offline and reproduces the shared embeddings; the demo runs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared_data
from retrieval_imprint.cli import main
from retrieval_imprint.embed import Embedder


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_packaged_model_matches_the_shared_embeddings(embedder):
    path = shared_data("banking77", "train.csv")
    with path.open(newline="") as f:
        texts = [row["text"].strip() for _, row in zip(range(16), csv.DictReader(f))]
    with np.load(shared_data("banking77", "embeddings.npz")) as z:
        expected = z["train_X"][:16]
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    got = embedder.encode(texts)
    assert got.shape == (16, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert embedder.dimension == 384 and embedder.name == "all-MiniLM-L6-v2"


def test_encode_rejects_non_text(embedder):
    with pytest.raises(ValueError, match=r"texts\[1\] is int, expected str"):
        embedder.encode(["fine", 3])


def test_demo_command_prints_every_preset():
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("qi", "hosoda", "janson", "imprint"):
        row = next(line for line in lines if line.startswith(name + " "))
        accuracy = float(row.split()[-2])
        assert 0.8 <= accuracy <= 1.0, row  # 8 well-separated intents: every method does well

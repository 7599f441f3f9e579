"""The packaged MiniLM model loads offline, reproduces the shared embeddings, and caches."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import shared_data
from retrieval_imprint.embed import Embedder, EmbeddingCache


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_packaged_model_matches_the_shared_embeddings(embedder):
    with shared_data("banking77", "train.csv").open(newline="") as f:
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


def test_the_cache_answers_without_the_model(tmp_path, embedder):
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    texts = ["where is my card", "play some jazz", "where is my card"]
    first = Embedder(cache=cache)
    first._st = embedder._load()
    vectors = first.encode(texts)
    np.testing.assert_array_equal(vectors[0], vectors[2])

    class NoModel:
        def encode(self, *args, **kwargs):
            raise AssertionError("a cached text was embedded again")

    second = Embedder(cache=EmbeddingCache(tmp_path / "cache.sqlite"))
    second._st = NoModel()
    np.testing.assert_array_equal(second.encode(texts[:2]), vectors[:2])
    other_model = Embedder(str(tmp_path / "other-model"), cache=cache)
    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "config.json").write_text("{}")
    assert cache.get(other_model.identity, texts) == {}

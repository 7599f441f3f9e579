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


PROBES = [
    "where is my card",
    "  Put on some QUEEN, please!  ",
    "Ünïcödé ßtraße 東京 ☕",
    "",
    "one",
    " ".join(["a long text well past the model's window of 256 tokens"] * 60),
]


def cosine(A, B):
    return np.einsum("ij,ij->i", A, B) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))


def test_onnx_runtime_gives_torchs_vectors():
    onnx, torch = Embedder(backend="onnx", cache=False), Embedder(backend="torch", cache=False)
    got, want = onnx.encode(PROBES), torch.encode(PROBES)
    assert (onnx.backend_, torch.backend_) == ("onnx", "torch")
    assert got.shape == want.shape == (len(PROBES), 384) and got.dtype == np.float32
    assert np.min(cosine(got, want)) >= 1 - 1e-5
    np.testing.assert_allclose(np.concatenate([onnx.encode([t]) for t in PROBES]), got, atol=1e-5)  # alone = batched


@pytest.mark.slow
def test_a_cold_text_query_does_not_import_torch(tmp_path):
    """Once a model is exported, a new process embeds and answers with ONNX Runtime alone."""
    import subprocess
    import sys

    from conftest import DEMO

    from retrieval_imprint import ingest

    ingest(tmp_path / "c", [str(DEMO / "demo_train.csv")])  # exports the model (if this run has not yet)
    script = (
        "import sys, json; from retrieval_imprint.cli import main\n"
        "try:\n    main(['--no-cache', 'query', sys.argv[1], 'a text no cache holds', '--json'])\n"
        "except SystemExit:\n    pass\n"
        "print(json.dumps(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c")], capture_output=True, text=True, check=True
    ).stdout
    assert '"labels"' in out and out.strip().splitlines()[-1] == "[]"


def test_a_model_the_export_cannot_reproduce_stays_on_torch(tmp_path):
    """A model that prepends a prompt by default is refused by the export (its graph would not
    hold the prompt): auto warns and stays on torch, onnx is an error saying why."""
    import json

    from retrieval_imprint.embed import default_model_path
    from retrieval_imprint.errors import DataError

    src, model = default_model_path(), tmp_path / "prompted"
    model.mkdir()
    for f in __import__("pathlib").Path(src).rglob("*"):
        if f.is_file():
            target = model / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    config = model / "config_sentence_transformers.json"
    settings = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**settings, "prompts": {"query": "query: "}, "default_prompt_name": "query"}))
    with pytest.warns(UserWarning, match="stays on torch: the model prepends prompt 'query' by default"):
        auto = Embedder(str(model), cache=False)
        vectors = auto.encode(["where is my card"])
    assert auto.backend_ == "torch" and vectors.shape == (1, 384)
    with pytest.raises(DataError, match="cannot run on ONNX Runtime: the model prepends prompt"):
        Embedder(str(model), cache=False, backend="onnx").encode(["x"])

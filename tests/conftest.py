"""Shared fixtures: the real datasets in ../shared/data (skipped in a user's clone, required in CI)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = Path(__file__).resolve().parents[1] / "retrieval_imprint" / "data"


_CACHE_DIR = Path(tempfile.mkdtemp(prefix="ri-test-"))


def pytest_configure(config) -> None:
    """Keep the embedding cache and the ONNX exports of a test run out of the user's ~/.cache."""
    os.environ["RETRIEVAL_IMPRINT_CACHE"] = str(_CACHE_DIR / "embeddings.sqlite")
    os.environ["RETRIEVAL_IMPRINT_ONNX"] = str(_CACHE_DIR / "onnx")


def pytest_unconfigure(config) -> None:
    """Remove the test run's embedding cache and exports (runs left one folder each in the temp dir)."""
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skip when absent, but fail under CI=true where it must exist."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} is absent: the shared CLINC150/BANKING77 data sits beside the repository in CI"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def banking77() -> dict[str, np.ndarray]:
    with np.load(shared_data("banking77", "embeddings.npz")) as z:
        return {key: z[key] for key in z.files}


def blobs(n_classes: int, n_per_class: int, d: int, seed: int = 0, modes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A seeded mixture: each class has ``modes`` Gaussian modes (so k > 1 proxies matter)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, modes, d)) * 2.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    which = rng.integers(0, modes, len(y))
    X = centers[y, which] + rng.standard_normal((len(y), d))
    return X.astype(np.float32), y

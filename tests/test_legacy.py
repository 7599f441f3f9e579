"""Collections written by an earlier version still open, answer as they did, and take new writes.

``data/collections-0.1.0.tar.gz`` holds two collections written by retrieval-imprint 0.1.0
(commit 252622d) with ``data/make_legacy_0.1.0.py``: an exact one grown over several adds (a class
re-imprinted, one removed, a threshold stored; str, int and non-ASCII labels) and an
``IVF16,Flat`` one with a trained template. ``expected.json`` holds what 0.1.0 answered.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from retrieval_imprint import Collection
from retrieval_imprint.errors import SchemaVersionError

ARCHIVE = Path(__file__).resolve().parent / "data" / "collections-0.1.0.tar.gz"


@pytest.fixture
def legacy(tmp_path):
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path, json.loads((tmp_path / "expected.json").read_text()), np.load(tmp_path / "queries.npy")


@pytest.mark.parametrize("name", ["flat", "ivf"])
def test_a_collection_written_by_0_1_0_answers_as_it_did(legacy, name):
    root, expected, Q = legacy
    want = expected[name]
    with pytest.raises(SchemaVersionError, match="schema revision 0004, older than"):
        Collection.open(root / name)  # the schema has grown since: an explicit upgrade, as documented
    col = Collection.open(root / name, upgrade=True)
    assert col.check().ok
    assert col.classes == want["classes"]
    assert [{key: row[key] for key in ("label", "samples", "proxies")} for row in col.class_table()] == want[
        "class_table"
    ]
    assert {key: col.config[key] for key in want["config"]} == want["config"]
    assert col.auto_choice is None  # made before auto: its settings are the ones it was created with
    got = col.query(Q, 3, threshold=-np.inf)
    assert got.labels.tolist() == want["labels"]
    np.testing.assert_allclose(got.scores, np.array(want["scores"], np.float32), rtol=1e-5, atol=1e-6)
    assert col.predict(Q).tolist() == want["predict"]


@pytest.mark.parametrize("name", ["flat", "ivf"])
def test_a_collection_written_by_0_1_0_takes_new_writes(legacy, name):
    root, expected, Q = legacy
    col = Collection.open(root / name, upgrade=True)
    rng = np.random.default_rng(0)
    col.add(rng.standard_normal((5, Q.shape[1])).astype(np.float32) + 9, ["newcomer"] * 5)
    col.remove([expected[name]["classes"][0]])
    col.compact()
    reopened = Collection.open(root / name)
    assert reopened.check().ok
    assert reopened.classes == expected[name]["classes"][1:] + ["newcomer"]
    assert reopened.predict(np.full((1, Q.shape[1]), 9, np.float32))[0] == "newcomer"

"""One label codec: numpy and Python scalars are the same label everywhere they meet."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs

from retrieval_imprint import Collection, ImprintClassifier
from retrieval_imprint.errors import DataError
from retrieval_imprint.evaluate import evaluate
from retrieval_imprint.labels import encode_stored, entry, label_key, stored_entry


@pytest.mark.parametrize("kind", [str, int])
def test_evaluate_agrees_with_score_on_numpy_labels(kind):
    X, y = blobs(5, 30, 8, seed=1)
    y = np.array([f"c{v}" for v in y]) if kind is str else y.astype(np.int64)
    clf = ImprintClassifier(k=3).fit(X[::2], y[::2])
    Q, truth = X[1::2], y[1::2]
    expected = clf.score(Q, truth)
    assert 0.5 < expected < 1.0
    assert evaluate(truth, clf.predict(Q)).accuracy == pytest.approx(expected)  # numpy arrays on both sides
    assert evaluate(truth.tolist(), clf.predict(Q)).accuracy == pytest.approx(expected)  # Python vs numpy
    assert evaluate(list(truth), list(clf.predict(Q))).accuracy == pytest.approx(expected)  # numpy scalars


def test_numpy_and_python_scalars_share_an_entry_and_a_key():
    for python, numpy in [("a", np.str_("a")), (7, np.int64(7)), (7, 7.0), (True, np.bool_(True))]:
        assert entry(python) == entry(numpy) and label_key(python) == label_key(numpy)
    assert entry(1) != entry("1") and entry(True) != entry(1)


def test_a_collection_finds_its_classes_by_numpy_labels(tmp_path):
    X, y = blobs(3, 10, 4)
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    col.add(X, y.astype(np.int32))
    col.add(X[:5], np.full(5, np.int64(0)))  # grows class 0, no new class
    assert col.classes == [0, 1, 2] and col.class_table()[0]["samples"] == 15
    col.remove(np.array([1]))
    assert col.classes == [0, 2]


def test_a_bare_string_is_never_a_list_of_labels(tmp_path):
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    with pytest.raises(DataError, match="labels is a single string 'abcdef'"):
        col.add(np.ones((6, 3), np.float32), "abcdef")
    col.add(np.ones((2, 3), np.float32), ["ab", "ab"])
    with pytest.raises(DataError, match="single string"):
        col.remove("ab")
    assert col.classes == ["ab"]


def test_stored_labels_are_checked_once_per_distinct_label_and_named_by_row():
    codes, entries = encode_stored(["b", "a", "b", "c"])
    assert codes.tolist() == [0, 1, 0, 2] and entries == [("str", "b"), ("str", "a"), ("str", "c")]
    with pytest.raises(DataError, match="label at row 2 is blank"):
        encode_stored(["x", "y", " "])
    with pytest.raises(DataError, match="label at row 1 is float 1.5"):
        encode_stored(["x", 1.5])


def test_a_stored_label_refuses_every_control_character_but_the_tab():
    for code in range(32):
        label = f"a{chr(code)}b"
        if code == 9:
            assert stored_entry(label) == ("str", label)
        else:
            with pytest.raises(DataError, match="holds a control character"):
                stored_entry(label, "row 3")
    assert stored_entry("caf\u00e9 \x7f") == ("str", "caf\u00e9 \x7f")


@pytest.mark.parametrize("few", [True, False])  # each label compared with the column, or one dict of the table
def test_class_ids_of_labels_match_a_scan_of_the_table(few, monkeypatch):
    from retrieval_imprint import classtable

    monkeypatch.setattr(classtable, "FEW_LABELS", 100 if few else 0)
    stored = ["1", 1, "a", 2, "b", np.str_("c")]  # "1" and 1 are two classes
    table = classtable.ClassTable(
        np.arange(10, 16), np.array(stored, object), *(np.zeros(6, np.int64),) * 3, *(np.full(6, np.nan),) * 2
    )
    asked = [1, "1", np.int64(2), "c", None, "missing", 3, 1.0, True, "a", "1"]
    want = [
        next((10 + i for i, v in enumerate(stored) if entry(v) == entry(a)), -1) if a is not None else -1 for a in asked
    ]
    np.testing.assert_array_equal(table.ids_of(asked), want)
    assert want[:4] == [11, 10, 13, 15] and want[8] == -1  # True is no int label
    assert table.find(np.int64(1)) == 11 and table.find("missing") is None
    with pytest.raises(DataError, match="labels must be str or int"):
        table.find(2.5)

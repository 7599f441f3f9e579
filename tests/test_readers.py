"""Data readers: every format, column detection, and errors that name file, row and column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_imprint.readers import DataError, read


def test_csv_with_quoted_newlines_and_tsv(tmp_path):
    (tmp_path / "a.csv").write_text('text,category\n"two\nlines",x\n  padded  , y \n')
    ds = read(tmp_path / "a.csv")
    assert ds.texts == ["two\nlines", "padded"] and ds.labels == ["x", "y"]
    (tmp_path / "b.tsv").write_text("utterance\tintent\nhello there\tgreet\n")
    assert read(tmp_path / "b.tsv").labels == ["greet"]


def test_jsonl_and_parquet_texts_and_vectors(tmp_path):
    rows = [{"text": "a b", "label": 3, "vector": [1.0, 2.0]}, {"text": "c", "label": 4, "vector": [3.0, 4.0]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read(tmp_path / "d.jsonl", text_column="text")
    assert ds.texts == ["a b", "c"] and ds.labels == [3, 4]
    vec = read(tmp_path / "d.jsonl", vector_column="vector")
    np.testing.assert_array_equal(vec.vectors, [[1, 2], [3, 4]])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read(tmp_path / "d.parquet").vectors.shape == (2, 2)  # a vector column is used when present
    assert read(tmp_path / "d.parquet", text_column="text").texts == ["a b", "c"]


@pytest.mark.parametrize("list_type", ["list", "fixed"])
def test_parquet_vector_columns_come_from_arrow_buffers(tmp_path, list_type, monkeypatch):
    import retrieval_imprint.readers as readers

    X = np.random.default_rng(0).standard_normal((50, 6))
    kind = pa.list_(pa.float64(), 6) if list_type == "fixed" else pa.list_(pa.float64())
    table = pa.table({"embedding": pa.array(X.tolist(), type=kind), "intent": [f"c{i % 4}" for i in range(50)]})
    pq.write_table(table, tmp_path / "v.parquet", row_group_size=16)  # several chunks
    per_row = []
    monkeypatch.setattr(readers, "_vector", lambda *a: per_row.append(a) or np.zeros(6, np.float32))
    ds = read(tmp_path / "v.parquet")
    assert not per_row  # no Python list per row
    np.testing.assert_allclose(ds.vectors, X, rtol=1e-6)
    assert ds.vectors.dtype == np.float32 and ds.labels == [f"c{i % 4}" for i in range(50)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_refused_label_names_the_first_row_that_holds_it(tmp_path, fmt):
    rows = [{"vector": [1.0, 2.0], "label": v} for v in ["a", " b ", "a", 7, "a\nb", "a\nb"]]
    path = tmp_path / f"d.{fmt}"
    if fmt == "parquet":  # one type per Arrow column: the int becomes text there
        pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in rows]), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError,
        match=rf"d.{fmt}: (row|line) 5: label 'a\\nb' holds a control character .* "
        r"\(column 'label'\)",
    ):
        read(path)
    path.unlink()
    rows[4:] = [{"vector": [1.0, 2.0], "label": None}, {"vector": [3.0, 4.0], "label": "c"}]
    if fmt == "parquet":
        pq.write_table(
            pa.Table.from_pylist([{**r, "label": None if r["label"] is None else str(r["label"])} for r in rows]), path
        )
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"d.{fmt}: (row|line) 5: label column 'label' is blank"):
        read(path)
    rows.pop(4)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in rows]), path)
        assert read(path).labels == ["a", "b", "a", "7", "c"]
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert read(path).labels == ["a", "b", "a", 7, "c"]


def test_a_parquet_label_column_of_lists_is_refused_by_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"vector": [1.0], "label": [1, 2]}]), tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"l.parquet: row 1: label \[1, 2\] in column 'label' must be text"):
        read(tmp_path / "l.parquet")


def test_parquet_vector_columns_with_gaps_are_reported_by_row(tmp_path):
    rows = [{"vector": [1.0, 2.0], "label": "a"}, {"vector": None, "label": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gap.parquet")
    with pytest.raises(DataError, match="gap.parquet: row 2: column 'vector' is not a non-empty list of numbers"):
        read(tmp_path / "gap.parquet")
    rows[1]["vector"] = [1.0]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="row 2: column 'vector' has 2 different vector lengths"):
        read(tmp_path / "ragged.parquet")


def test_npz_splits_and_npy(tmp_path):
    np.savez(
        tmp_path / "e.npz",
        train_X=np.ones((3, 4)),
        train_y=np.array(["a", "b", "a"]),
        test_X=np.ones((1, 4)),
        test_y=np.array(["a"]),
    )
    assert read(tmp_path / "e.npz", split="train").labels == ["a", "b", "a"]
    with pytest.raises(DataError, match=r"choose a split with --split \(arrays found"):
        read(tmp_path / "e.npz")
    np.save(tmp_path / "q.npy", np.ones((2, 4)))
    assert read(tmp_path / "q.npy", need_labels=False).vectors.shape == (2, 4)
    with pytest.raises(DataError, match="holds vectors only"):
        read(tmp_path / "q.npy")


@pytest.mark.parametrize("order", ["C", "F"])
def test_npz_and_npy_vectors_are_memory_mapped_not_loaded(tmp_path, order):
    X = np.asarray(np.random.default_rng(0).standard_normal((300, 7)), order=order)  # float64, as often saved
    y = np.arange(300) % 5
    np.savez(tmp_path / "raw.npz", X=X, y=y)
    np.savez_compressed(tmp_path / "zip.npz", X=X, y=y)
    np.save(tmp_path / "q.npy", X)
    raw, packed = read(tmp_path / "raw.npz"), read(tmp_path / "zip.npz")
    queries = read(tmp_path / "q.npy", need_labels=False)
    assert isinstance(raw.vectors, np.memmap) and isinstance(queries.vectors, np.memmap)
    assert not isinstance(packed.vectors, np.memmap)  # compressed members cannot be mapped: loaded
    for ds in (raw, packed, queries):
        np.testing.assert_array_equal(ds.vectors, X)
    assert raw.labels == y.tolist() and raw.vectors[10:20].dtype == np.float64


def test_non_finite_vectors_are_found_block_by_block(tmp_path, monkeypatch):
    import retrieval_imprint.readers as readers

    monkeypatch.setattr(readers, "_CHECK_ROWS", 16)
    X = np.ones((100, 3), np.float32)
    X[57, 1] = np.nan
    np.savez(tmp_path / "bad.npz", X=X, y=np.zeros(100))
    with pytest.raises(DataError, match="bad.npz: row 58 of the vectors holds NaN or infinity"):
        read(tmp_path / "bad.npz")
    np.savez(tmp_path / "huge.npz", X=np.full((2, 3), 1e300), y=np.zeros(2))  # finite in float64, not float32
    with pytest.raises(DataError, match="row 1 of the vectors holds NaN or infinity"):
        read(tmp_path / "huge.npz")


@pytest.mark.parametrize(
    "name,content,options,match",
    [
        (
            "v.jsonl",
            '{"vector": [1, 2], "label": "a"}\n{"vector": [1], "label": "b"}\n',
            {},
            "line 2: column 'vector' has 2 different vector lengths",
        ),
        ("v.jsonl", '{"vector": "nope", "label": "a"}\n', {}, "line 1: column 'vector' is not a JSON list"),
        ("t.csv", "text,label\nhi,a\n,b\n", {}, r"row 2 \(line 3\): text column 'text' is blank"),
        (
            "l.jsonl",
            '{"text": "a", "label": 1.5}\n',
            {},
            "line 1: label 1.5 in column 'label' must be text or an integer",
        ),
        # labels are checked once per distinct value: 1 before 1.0 or true does not let those through
        ("l.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n', {}, "line 2: label 1.0 in column"),
        ("l.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": true}\n', {}, "line 2: label True in column"),
        ("l.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x"]}\n', {}, r"line 2: label \['x'\]"),
        ("x.jsonl", "[1, 2]\n", {}, "line 1 is not a JSON object"),
    ],
)
def test_errors_name_the_place(tmp_path, name, content, options, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read(tmp_path / name, **options)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "npz"])
def test_every_reader_refuses_a_label_over_the_limit(tmp_path, fmt):
    from retrieval_imprint.labels import MAX_LABEL_BYTES

    long = "é" * (MAX_LABEL_BYTES // 2 + 1)  # two bytes each: over by one character's worth
    labels, texts = ["ok", long, "fine"], ["a", "b", "c"]
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts, "label": labels}), path)
    else:
        np.savez(path, X=np.ones((3, 4), np.float32), y=np.array(labels))
    with pytest.raises(
        DataError,
        match=rf"(row|line) 2.*is {len(long.encode()):,} bytes long; a label may hold at most "
        rf"{MAX_LABEL_BYTES:,} bytes",
    ):
        read(path)


def test_csv_errors_name_the_line_where_the_bad_row_starts_and_why(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('text,label\nhello,a\n"never closed,b\nmore,c\nstill more,d\n')
    with pytest.raises(
        DataError,
        match=r"open.csv: line 3: not valid CSV: a quoted field that starts in this row is "
        "never closed",
    ):
        read(path)
    path = tmp_path / "wide.csv"
    path.write_text("text,label\nhello,a\nhi,b\n" + "x" * 200_000 + ",c\n")
    with pytest.raises(DataError, match=r"wide.csv: line 4: a field of this row is longer than 131,072 characters"):
        read(path)
    path = tmp_path / "spans.csv"
    path.write_text('text,label\n"two\nlines",a\nnext,\n')
    with pytest.raises(DataError, match=r"row 2 \(line 4\): label column 'label' is blank"):
        read(path)

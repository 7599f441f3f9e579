"""The imprint CLI through click's CliRunner: every command, every documented error path."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO, blobs

from retrieval_imprint import schema, segments
from retrieval_imprint.classifier import ImprintClassifier
from retrieval_imprint.cli import main
from retrieval_imprint.collection import Collection
from retrieval_imprint.embed import Embedder
from retrieval_imprint.evaluate import evaluate

TRAIN, TEST = str(DEMO / "demo_train.csv"), str(DEMO / "demo_test.csv")


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", [p for p, _ in commands(main)], ids=" ".join)
def test_every_command_has_help_with_an_example(path):
    cmd = dict(commands(main))[path]
    out = run(*path, "--help").output
    assert "Usage:" in out
    if not isinstance(cmd, click.Group):
        assert "Example" in out


def test_every_command_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for path, _ in commands(main):
        assert f"## imprint {' '.join(path)}" in doc, f"docs/cli.md has no section for imprint {' '.join(path)}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "demo"
    out = json.loads(run("index", str(path), TRAIN, "--k", "4", "--quiet", "--json").output)
    choice = out.pop("auto_choice")
    assert out == {
        "collection": str(path),
        "rows": 96,
        "resumed_after": 0,
        "new_classes": 8,
        "classes": 8,
        "proxies": 32,
        "retrained": False,
        "skipped": [],
        "created": True,
    }
    assert (choice["generator"], choice["k"]) == ("kmeans", 4)  # k given: auto chose max or blend only
    assert {(r["aggregation"], r["alpha"]) for r in choice["cv_results"]} == {
        ("max", None),
        ("blend", 0.25),
        ("blend", 0.5),
        ("blend", 0.75),
        ("blend", 0.9),
    }
    return path


def snapshot(path):
    col = Collection.open(path)
    return col.info()["version"], col.class_table()


def test_query_texts_json_and_file(demo, tmp_path):
    rows = json.loads(run("query", str(demo), "my card was stolen", "wake me at 7", "--top", "3", "--json").output)
    assert [r["labels"][0] for r in rows] == ["lost_card", "set_alarm"]
    assert all(
        len(r["labels"]) == len(r["scores"]) == 3 and r["scores"] == sorted(r["scores"], reverse=True) for r in rows
    )
    lines = tmp_path / "q.txt"
    lines.write_text("play some jazz\n\nbook a flight to Rome\n")
    out = run("query", str(demo), "--file", str(lines)).output
    assert "play_music" in out and "book_flight" in out
    out = run("query", str(demo), "play some jazz", "--threshold", "0.99").output
    assert "(no class: play_music scored" in out
    rejected = json.loads(run("query", str(demo), "play some jazz", "--threshold", "0.99", "--json").output)
    assert rejected[0]["labels"] == [None] and rejected[0]["scores"] == [None]


def test_query_vectors(demo, tmp_path):
    Q = Embedder().encode(["order a pizza"])
    np.save(tmp_path / "q.npy", Q)
    rows = json.loads(run("query", str(demo), "--vectors", str(tmp_path / "q.npy"), "--json").output)
    assert rows[0]["query"] == 0 and rows[0]["labels"] == ["order_food"]


def test_eval_matches_the_python_api(demo):
    report = json.loads(run("eval", str(demo), TEST, "--json").output)
    import csv

    with open(TEST, newline="") as f:
        rows = list(csv.DictReader(f))
    col = Collection.open(demo)
    expected = evaluate([r["label"] for r in rows], col.predict(Embedder().encode([r["text"] for r in rows])).tolist())
    assert report["accuracy"] == pytest.approx(expected.accuracy) and 0 <= report["accuracy"] <= 1
    assert report["macro_f1"] == pytest.approx(expected.macro_f1) and 0 <= report["macro_f1"] <= 1
    assert report["n"] == 40 and len(report["per_class"]) == 8
    human = run("eval", str(demo), TEST).output
    assert f"accuracy  {expected.accuracy:.4f}" in human


def test_info_classes_check_diagnose(demo):
    info = json.loads(run("info", str(demo), "--json").output)
    assert info["classes"] == 8 and info["config"]["k"] == 4 and info["embedder"]["name"] == "all-MiniLM-L6-v2"
    table = json.loads(run("classes", str(demo), "--json").output)
    assert sum(r["samples"] for r in table) == 96 and {r["proxies"] for r in table} == {4}
    assert "ok:" in run("check", str(demo)).output
    report = json.loads(run("diagnose", TRAIN, "--json").output)
    assert report["paper_rule"]["k"] == 1 and "few-shot" in report["paper_rule"]["reason"] and report["classes"] == 8
    from retrieval_imprint import ImprintClassifier
    from retrieval_imprint.readers import read

    ds = read(TRAIN)
    auto = ImprintClassifier().fit(Embedder().encode(ds.texts), np.array(ds.labels))
    assert {key: report["auto_choice"][key] for key in ("generator", "k", "aggregation", "alpha")} == {
        key: auto.auto_choice_[key] for key in ("generator", "k", "aggregation", "alpha")
    }  # what index would pick
    assert Collection.open(demo).auto_choice["cv_results"] and "auto chooses" in run("diagnose", TRAIN).output
    assert "NC1" in run("diagnose", TRAIN, "--paper-compatible").output


def test_remove_and_extend(tmp_path):
    path = tmp_path / "c"
    run("index", str(path), TRAIN, "--generator", "mean", "--quiet")
    run("index", str(path), TEST, "--quiet")  # adds samples to every class: re-imprinted
    assert sum(r["samples"] for r in Collection.open(path).class_table()) == 136
    assert "removed 2 classes; 6 remain" in run("remove", str(path), "lost_card", "order_food").output
    assert "lost_card" not in Collection.open(path).classes
    assert "4 files -> 2" in run("compact", str(path)).output  # proxies and samples: one file each
    assert Collection.open(path).check().ok and len(Collection.open(path)) == 6
    assert "has an exact index" in run("compact", str(path), "--retrain", code=2).stderr


def test_db_upgrade(tmp_path):
    from retrieval_imprint import store

    path = tmp_path / "c"
    X, y = blobs(3, 5, 4)
    np.savez(tmp_path / "v.npz", train_X=X, train_y=y)
    run("index", str(path), str(tmp_path / "v.npz"), "--split", "train", "--model", "none", "--quiet")
    engine = store.connect(path / "imprint.db")
    head = schema.schema_revision_of(engine, path)[1]
    store.migrate(engine, "0001", down=True)
    assert f"older than {head}" in run("info", str(path), code=2).stderr
    assert f"schema 0001 -> {head}" in run("db", "upgrade", str(path)).output
    assert f"already at {head}" in run("db", "upgrade", str(path)).output
    assert Collection.open(path).classes == [0, 1, 2]


def test_sweep_on_vectors_with_plot(tmp_path):
    X, y = blobs(6, 30, 8, seed=1)
    Xt, yt = blobs(6, 10, 8, seed=1)
    np.savez(tmp_path / "d.npz", train_X=X, train_y=y, test_X=Xt, test_y=yt)
    rows = json.loads(
        run(
            "sweep",
            str(tmp_path / "d.npz"),
            str(tmp_path / "d.npz"),
            "--split",
            "train",
            "--k",
            "1,3",
            "--shots",
            "5,0",
            "--seeds",
            "2",
            "--plot",
            str(tmp_path / "k.png"),
            "--json",
        ).output
    )
    assert (tmp_path / "k.png").stat().st_size > 1000
    assert {(r["shots"], r["generator"], r["k"]) for r in rows} == {
        (s, g, k) for s in (5, 0) for g, k in (("mean", 1), ("kmeans", 1), ("kmeans", 3))
    }
    assert all(0 <= r["accuracy"] <= 1 and r["seeds"] == 2 for r in rows)


def test_sweep_maps_to_random_features_when_asked(tmp_path):
    X, y = blobs(4, 20, 8, seed=2)
    np.savez(tmp_path / "d.npz", train_X=X, train_y=y)
    args = (
        "sweep",
        str(tmp_path / "d.npz"),
        str(tmp_path / "d.npz"),
        "--split",
        "train",
        "--generator",
        "ls",
        "--shots",
        "0",
        "--seeds",
        "1",
    )
    rows = json.loads(run(*args, "--features", "0,50", "--json").output)
    assert [(r["generator"], r["features"]) for r in rows] == [("ls", None), ("ls", 50)]
    direct = ImprintClassifier(generator="ls", aggregation="max", features=50, random_state=0).fit(X, y)
    assert rows[1]["accuracy"] == direct.score(X, y)
    text = run(*args, "--features", "50").output
    assert "features" in text.splitlines()[0] and text.splitlines()[1].split()[5] == "50"
    plotted = run(
        *args[:6],
        "ls,all,kmeans",
        "--k",
        "2",
        "--features",
        "0,50",
        "--shots",
        "0",
        "--seeds",
        "1",
        "--plot",
        str(tmp_path / "k.png"),
    )  # a line per generator and width
    assert plotted.exit_code == 0 and (tmp_path / "k.png").stat().st_size > 1000


# ------------------------------------------------------------------ errors: exit 2, one line, nothing changed
def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda d, t: ["index", d, str(t / "absent.csv")], "absent.csv: no such file"),
        (
            lambda d, t: ["index", d, write(t, "cols.csv", "sentence,intent_name\nhi,x\n"), "--label-column", "lab"],
            "no label column 'lab'; columns found: sentence, intent_name",
        ),
        (
            lambda d, t: ["index", d, write(t, "nolabel.csv", "text,other\nhi,x\n")],
            "no label column (looked for label, category, intent, class; use --label-column); columns found: text, other",
        ),
        (lambda d, t: ["index", d, write(t, "empty.csv", "")], "empty.csv: the file is empty"),
        (lambda d, t: ["index", d, write(t, "header.csv", "text,label\n")], "header.csv: no rows"),
        (
            lambda d, t: ["index", d, write(t, "blank.csv", 'text,label\nhi,a\n"multi\nline",  \n')],
            "blank.csv: row 2 (lines 3-4): label column 'label' is blank",
        ),
        (
            lambda d, t: ["index", d, write(t, "bad.parquet", "not parquet at all")],
            "bad.parquet: unreadable Parquet file",
        ),
        (
            lambda d, t: ["index", d, write(t, "bad.jsonl", '{"text": "a", "label": "b"}\n{oops\n')],
            "bad.jsonl: line 2 is not valid JSON",
        ),
        (
            lambda d, t: ["index", d, str(vectors(t, 5)), "--vectors-model", "all-MiniLM-L6-v2"],
            "X has dimension 5, but this collection holds 384-d vectors",
        ),
        (lambda d, t: ["index", d, str(vectors(t, 384))], "vectors of unknown origin for a collection of"),
        (lambda d, t: ["index", d, str(vectors(t, 384)), "--vectors-model", "other"], "vectors made by 'other'"),
        (lambda d, t: ["index", d, TRAIN, "--k", "7"], "already exists with other settings: k=7 (collection: 4)"),
        (lambda d, t: ["remove", d, "lost_card", "nope"], "no class 'nope' in collection"),
        (lambda d, t: ["query", d], "nothing to query"),
        (lambda d, t: ["query", d, "--vectors", str(vectors(t, 7))], "Q has dimension 7"),
        (lambda d, t: ["info", str(t)], "is not a collection"),
        (lambda d, t: ["index", d, write(t, "data.xlsx", "x")], "unknown format '.xlsx'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(demo, tmp_path, make_args, message):
    before = snapshot(demo)
    result = CliRunner().invoke(main, make_args(str(demo), tmp_path))
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(demo) == before


def vectors(tmp_path, d):
    X, y = blobs(2, 3, d)
    path = tmp_path / f"v{d}.npz"
    np.savez(path, X=X, y=y.astype(str))
    return path


def test_calibrate_stores_a_threshold(tmp_path):
    path = tmp_path / "c"
    run("index", str(path), TRAIN, "--k", "4", "--quiet")
    oos = write(tmp_path, "oos.txt.csv", "text\nwhat is the meaning of life\ntell me a joke\nwho won the game\n")
    out = json.loads(
        run("calibrate", str(path), TEST, "--oos", oos, "--json", "--plot", str(tmp_path / "t.png")).output
    )
    assert set(out) == {"rule", "threshold", "in_scope_accuracy", "oos_recall", "criterion", "auroc", "curve"}
    assert 0 <= out["in_scope_accuracy"] <= 1 and 0 <= out["oos_recall"] <= 1 and (tmp_path / "t.png").stat().st_size
    assert set(out["auroc"]) == set(out["curve"]) == {"max", "shift"}
    assert Collection.open(path).config["threshold"] == pytest.approx(out["threshold"], abs=1e-6)  # JSON: 6 decimals
    human = run("calibrate", str(path), TEST, "--target-accuracy", "0.9").output
    assert "highest threshold keeping in-scope accuracy >= 0.9" in human
    kept = Collection.open(path).config["threshold"]
    assert "no threshold reaches" in run("calibrate", str(path), TEST, "--target-accuracy", "1.0", code=2).stderr
    assert kept is not None and Collection.open(path).config["threshold"] == kept  # the good one stays
    assert (
        "rejects 0.05 of the training samples" in run("calibrate", str(path), "--target-false-rejection", "0.05").output
    )
    mixed = write(
        tmp_path,
        "mixed.csv",
        "text,label\nwhere is my card,lost_card\nwhat is love,oos\n"
        "play some jazz,play_music\nhow tall is everest,oos\n",
    )
    report = json.loads(run("eval", str(path), mixed, "--oos-label", "oos", "--json").output)
    assert report["open_set"]["oos"] == 2 and 0 <= report["open_set"]["auroc"] <= 1
    assert report["threshold_used"]["source"] == "stored" and report["n"] == 2
    rows = json.loads(run("query", str(path), "what is love", "--json", "--threshold", "0.99").output)
    assert rows[0]["rejected"] == [True] and rows[0]["candidates"][0] is not None
    assert "set to none" in run("threshold", str(path), "none").output
    assert Collection.open(path).config["threshold"] is None


def test_chunked_index_resumes_after_an_interruption(tmp_path, monkeypatch):
    X, y = blobs(12, 10, 6, seed=4)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    args = [
        "index",
        str(tmp_path / "c"),
        str(tmp_path / "v.npz"),
        "--model",
        "none",
        "--k",
        "3",
        "--chunk-size",
        "25",
        "--quiet",
        "--json",
    ]
    writes = []

    def power_cut(name):  # the third chunk's files are written, its commit never happens
        writes.append(name)
        if writes.count("add: segments written") == 3:
            raise OSError("power cut")

    monkeypatch.setattr(segments, "crash_point", power_cut)
    assert CliRunner().invoke(main, args).exit_code != 0
    monkeypatch.undo()
    partial = Collection.open(tmp_path / "c")
    assert len(partial) == 4 and partial.check().ok  # two chunks of 20 rows: cut between classes of 10
    out = json.loads(run(*args).output)
    assert out["resumed_after"] == 40 and out["rows"] == 80 and out["classes"] == 12
    one_go = tmp_path / "one"
    run("index", str(one_go), str(tmp_path / "v.npz"), "--model", "none", "--k", "3", "--quiet")
    np.testing.assert_array_equal(Collection.open(tmp_path / "c").predict(X), Collection.open(one_go).predict(X))


def test_a_chunked_ivf_index_retrains_its_lists_on_everything(tmp_path):
    X, y = blobs(200, 8, 16, seed=5)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    out = json.loads(
        run(
            "index",
            str(tmp_path / "c"),
            str(tmp_path / "v.npz"),
            "--model",
            "none",
            "--k",
            "2",
            "--index",
            "IVF16,Flat",
            "--chunk-size",
            "320",
            "--quiet",
            "--json",
        ).output
    )
    assert out["retrained"] and out["proxies"] == 400  # lists first trained on a sample's 80 proxies (40 classes)
    col = Collection.open(tmp_path / "c")
    assert col.info()["trained_on"] == 400 and not col.outgrown and col.check().ok
    assert "IVF lists retrained" not in run("compact", str(tmp_path / "c")).output  # nothing outgrown now
    forced = run("compact", str(tmp_path / "c"), "--retrain").output
    assert "3 files -> 3; IVF lists retrained" in forced  # template, proxies, samples


def test_check_exits_1_and_lists_problems(tmp_path):
    import sqlite3

    path = tmp_path / "c"
    X, y = blobs(3, 5, 4)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    run("index", str(path), str(tmp_path / "v.npz"), "--model", "none", "--quiet")
    with sqlite3.connect(path / "imprint.db") as db:
        db.execute("UPDATE classes SET n_samples = n_samples + 1 WHERE id = (SELECT MIN(id) FROM classes)")
    result = run("check", str(path), code=1)
    assert "samples: the index files hold 15 live vectors and the classes' ranges name 16" in result.stderr


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_chunked_text_index_loads_the_model_once(tmp_path, monkeypatch, backend):
    import sentence_transformers

    from retrieval_imprint import embed_onnx

    monkeypatch.setenv("RETRIEVAL_IMPRINT_CACHE", str(tmp_path / "fresh-cache.sqlite"))  # nothing cached yet
    # torch: ONNX turned off; onnx: a fresh exports folder, so the model is exported (torch loads once) first
    monkeypatch.setenv("RETRIEVAL_IMPRINT_ONNX", "off" if backend == "torch" else str(tmp_path / "onnx"))
    loads, exported = [], []
    real, real_onnx = sentence_transformers.SentenceTransformer, embed_onnx.OnnxModel.__init__

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    def counting_onnx(self, folder):
        if not Path(folder).name.startswith("."):  # not the export's own check, in its staging folder
            exported.append(folder)
        real_onnx(self, folder)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", counting)
    monkeypatch.setattr(embed_onnx.OnnxModel, "__init__", counting_onnx)
    out = json.loads(run("index", str(tmp_path / "c"), TRAIN, "--chunk-size", "30", "--quiet", "--json").output)
    assert out["rows"] == 96 and out["classes"] == 8
    assert len(loads) == 1 and len(exported) == (backend == "onnx")


def test_only_user_errors_exit_2_and_bugs_show_their_traceback(tmp_path, monkeypatch):
    Collection.create(tmp_path / "c", model=None)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "absent")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1  # an ImprintError: one line
    monkeypatch.setattr(Collection, "info", lambda self: 1 / 0)  # a bug in the library
    result = CliRunner().invoke(main, ["info", str(tmp_path / "c")])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_tune_and_info_report_what_auto_chose(tmp_path):
    path = tmp_path / "c"
    out = run("index", str(path), TRAIN, "--quiet").output
    assert "auto chose " in out and "held-out accuracy" in out
    info = json.loads(run("info", str(path), "--json").output)
    assert info["config"]["generator"] == "auto" and info["auto_choice"]["cv_results"]
    assert "auto_choice: " in run("info", str(path)).output
    tuned = json.loads(run("tune", str(path), "--json").output)
    assert tuned["before"]["generator"] == info["auto_choice"]["generator"] and tuned["after"]["cv_results"]
    assert Collection.open(path).check().ok
    no_samples = tmp_path / "n"
    run("index", str(no_samples), TRAIN, "--no-keep-samples", "--quiet")
    assert "keeps no samples" in run("tune", str(no_samples), code=2).stderr


def test_describe_names_the_ls_head_and_its_leave_one_out():
    from retrieval_imprint.cli.app import describe

    choice = {"generator": "ls", "k": 1, "aggregation": "max", "alpha": None, "features": 4000}
    row = {**choice, "accuracy": 0.95, "correct": 3800, "scored": 4000, "classes": 150, "held_out": "leave-one-out"}
    assert describe({**choice, "cv_results": [row]}) == (
        "ls on 4000 features, max (leave-one-out accuracy 0.9500 on 4000 rows of 150 classes, best of 1)"
    )
    assert describe({**choice, "features": None}, cv=False) == "ls, max"

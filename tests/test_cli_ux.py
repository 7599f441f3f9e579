"""The command line as a tool people keep open: pipes, a quick start, the cache, offline models,
JSON everywhere, quiet libraries and progress that suits a log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO

from retrieval_imprint import ImprintClassifier, progress
from retrieval_imprint.cli import main

TRAIN = str(DEMO / "demo_train.csv")
IMPRINT = [sys.executable, "-c", "from retrieval_imprint.cli import main; main()"]


def run(*args: str, code: int = 0, input: str | None = None):
    result = CliRunner().invoke(main, list(args), input=input)
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("ux") / "demo"
    run("index", str(path), TRAIN, "--k", "2", "--aggregation", "max", "--quiet")
    return path


def test_queries_from_stdin_are_answered_as_json_lines(demo):
    out = run("query", str(demo), "--file", "-", "--top", "2", input="my card was stolen\n\nwake me at 7\n").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in rows] == ["my card was stolen", "wake me at 7"]
    assert [r["labels"][0] for r in rows] == ["lost_card", "set_alarm"] and all(len(r["labels"]) == 2 for r in rows)
    assert "give no TEXT" in run("query", str(demo), "hello", "--file", "-", code=2, input="x\n").stderr


@pytest.mark.slow
def test_a_piped_query_is_answered_before_the_input_ends_and_a_closed_pipe_is_not_an_error(demo):
    proc = subprocess.Popen(
        [*IMPRINT, "query", str(demo), "--file", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdin.write("play some jazz\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # while stdin is still open
        assert first["labels"] == ["play_music"]
        proc.stdin.write("book a flight to Rome\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["labels"] == ["book_flight"]
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    lines = "\n".join(f"question number {i}" for i in range(3000))
    shell = f"{' '.join(map(repr, IMPRINT))} query {demo} --file - | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], input=lines, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr and done.stdout.startswith('{"query"')


def test_version_names_what_answers_depend_on():
    out = run("--version").output
    assert out.startswith("imprint 0.1.0") and all(
        name in out for name in ("faiss", "numpy", "torch", "sentence-transformers")
    )


def test_an_unavailable_model_is_one_line_naming_what_is_available(tmp_path):
    err = run("index", str(tmp_path / "c"), TRAIN, "--model", "someone/not-downloaded", code=2).stderr
    assert "not available offline" in err and "all-MiniLM-L6-v2" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
    assert "does not exist" in run("index", str(tmp_path / "c"), TRAIN, "--model", "./no/such/folder", code=2).stderr
    rows = json.loads(run("models", "--json").output)
    assert rows[0]["name"] == "all-MiniLM-L6-v2" and Path(rows[0]["path"], "modules.json").is_file()


def test_the_cache_is_inspectable_clearable_and_can_be_turned_off(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_IMPRINT_CACHE", str(tmp_path / "cache.sqlite"))
    run("query", str(demo), "a question nobody asked before")
    info = json.loads(run("cache", "info", "--json").output)
    assert info["path"] == str(tmp_path / "cache.sqlite") and info["vectors"] == 1 and info["bytes"] > 0
    run("--no-cache", "query", str(demo), "another new question")
    monkeypatch.setenv("RETRIEVAL_IMPRINT_CACHE", str(tmp_path / "cache.sqlite"))  # (--no-cache set it off)
    assert json.loads(run("cache", "info", "--json").output)["vectors"] == 1  # --no-cache wrote nothing
    from retrieval_imprint import Embedder

    Embedder().encode(["from python"])  # Python uses the same cache by default
    assert json.loads(run("cache", "info", "--json").output)["vectors"] == 2
    assert json.loads(run("cache", "clear", "--json").output)["deleted"] == 2
    assert json.loads(run("cache", "info", "--json").output)["vectors"] == 0


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


@pytest.mark.parametrize("path", [p for p, _ in _leaves(main)], ids=" ".join)
def test_every_command_takes_json(path):
    cmd = dict(_leaves(main))[path]
    assert any(p.name == "as_json" for p in cmd.params), f"imprint {' '.join(path)} has no --json"


def test_json_of_the_maintenance_commands(demo, tmp_path):
    import shutil

    col = tmp_path / "c"
    shutil.copytree(demo, col)
    assert json.loads(run("check", str(col), "--json").output) == {"ok": True, "problems": []}
    assert json.loads(run("remove", str(col), "order_food", "--json").output) == {"removed": 1, "classes": 7}
    assert json.loads(run("threshold", str(col), "0.25", "--json").output) == {"threshold": 0.25, "label": None}
    out = json.loads(run("compact", str(col), "--json").output)
    assert out["retrained"] is False and len(out["after"]) <= len(out["before"])
    assert (
        json.loads(run("db", "upgrade", str(col), "--json").output)["before"]
        == json.loads(run("db", "upgrade", str(col), "--json").output)["after"]
    )


def test_few_shot_data_raises_no_regression_warning():
    X = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 shot: every label unique, which scikit-learn takes for regression
        ImprintClassifier(generator="mean").fit(X, list("abcdef"))


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.05)
    with progress.bar(total=4, desc="quick", unit="row", enabled=True) as shown:
        shown.update(4)  # done before the first interval: nothing printed
    with progress.bar(total=4, desc="slow", unit="row", enabled=True) as shown:
        for _ in range(4):
            time.sleep(0.06)
            shown.update(1)
    err = capsys.readouterr().err
    assert "quick" not in err and "\r" not in err
    lines = err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("slow:") for line in lines) and "4/4" in lines[-1]


def test_indexing_the_same_file_twice_skips_it_and_says_so(tmp_path):
    import shutil

    run("index", str(tmp_path / "c"), TRAIN, "--quiet")
    shutil.copy(TRAIN, tmp_path / "copy.csv")
    second = run("index", str(tmp_path / "c"), str(tmp_path / "copy.csv"), "--quiet")
    assert "skipped" in second.stderr and "--again" in second.stderr and "indexed 0 rows" in second.stdout
    counts = {r["label"]: r["samples"] for r in json.loads(run("classes", str(tmp_path / "c"), "--json").output)}
    assert set(counts.values()) == {12}
    run("index", str(tmp_path / "c"), TRAIN, "--again", "--quiet")
    counts = {r["label"]: r["samples"] for r in json.loads(run("classes", str(tmp_path / "c"), "--json").output)}
    assert set(counts.values()) == {24}
    run("index", str(tmp_path / "c"), TRAIN, "--again", "--upsert", "--quiet")
    counts = {r["label"]: r["samples"] for r in json.loads(run("classes", str(tmp_path / "c"), "--json").output)}
    assert set(counts.values()) == {12}


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--index", "IVF4,Flat", "--metric", "manhattan"], "needs index='Flat'"),
        (["--index", "IVF400,Flat"], "needs at least 400 proxies"),
        (["--index", "auto", "--memory-budget", "1KB"], "cannot hold"),
    ],
)
def test_a_failed_first_index_leaves_no_folder_and_the_corrected_rerun_works(tmp_path, bad, message):
    assert message in run("index", str(tmp_path / "c"), TRAIN, "--quiet", *bad, code=2).stderr
    assert not (tmp_path / "c").exists()
    assert "8 new classes" in run("index", str(tmp_path / "c"), TRAIN, "--quiet").output


def test_classes_lines_do_not_grow_with_the_longest_label(tmp_path):
    from click.testing import CliRunner

    from retrieval_imprint.cli import main
    from retrieval_imprint.collection import Collection

    Collection.create(tmp_path / "c", model=None).add(np.eye(3, dtype=np.float32), ["a", "b", "x" * 1000])
    lines = CliRunner().invoke(main, ["classes", str(tmp_path / "c")]).output.splitlines()
    assert len(lines) == 4 and max(len(line) for line in lines[:3]) < 70 and len(lines[3]) > 1000

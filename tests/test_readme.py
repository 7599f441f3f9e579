"""The README's snippets run as written on the demo intents: its Python block, and each line of its
command-line block in a folder holding the data files the lines name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block(language: str, after: str) -> str:
    start = README.index(after)
    return re.search(rf"```{language}\n(.*?)```", README[start:], re.S).group(1)


def test_the_python_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block("python", "## Python"), "README.md", "exec"), scope)
    assert scope["col"].classes and "lost_card" not in scope["col"].classes
    assert scope["report"].classes == 8 and scope["clf"].auto_choice_


@pytest.mark.slow
def test_every_command_line_runs_as_written(tmp_path):
    for split, name in (("train", "train.csv"), ("test", "test.csv"), ("test", "val.csv"), ("oos", "oos.csv")):
        shutil.copy(DEMO / f"demo_{split}.csv", tmp_path / name)
    (tmp_path / "more.csv").write_text("text,label\nmy card is gone,lost_card\nsomeone took my card,lost_card\n")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "vectors.npz",
        X=rng.standard_normal((300, 16)).astype(np.float32),
        y=np.repeat([f"c{i}" for i in range(30)], 10),
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    lines = [line for line in block("bash", "## Command line").splitlines() if line and not line.startswith("#")]
    assert len(lines) >= 15
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
    assert (tmp_path / "k.png").is_file() and (tmp_path / "intents.parquet").is_file()

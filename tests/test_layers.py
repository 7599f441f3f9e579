"""The package's layers as docs/design.md draws them: every import goes to the same layer or one
above it in the table, and ``imprint --help`` needs neither numpy nor FAISS."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrieval_imprint"


def layers() -> dict[str, int]:
    """Module -> its layer's row number in design.md's Layout table."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## Layout") :].split("\n\n")[2]
    out: dict[str, int] = {}
    for row, line in enumerate(line for line in table.splitlines()[2:] if line.startswith("|")):
        cell = line.split("|")[2]
        if "`cli/`" in cell:
            continue
        for name in re.findall(r"`(\w+)`", cell):
            assert name not in out, f"{name} is in two layers of design.md"
            out[name] = row
    return out


def imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at the top or in a function (not those only
    a type checker reads)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrieval_imprint."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    table = layers()
    assert modules - set(table) == set(), "modules missing from design.md's Layout table"
    assert set(table) - modules == set(), "design.md's Layout table names modules that do not exist"


def test_imports_go_down_the_layers():
    table = layers()
    upward = [
        f"{path.stem} (layer {table[path.stem]}) imports {other} (layer {table[other]})"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "__init__"
        for other in sorted(imports(path))
        if other in table and table[other] > table[path.stem]
    ]
    assert upward == []


def test_help_imports_neither_numpy_nor_faiss():
    code = (
        "import sys\nfrom retrieval_imprint.cli import main\nsys.argv = ['imprint', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('numpy', 'faiss', 'torch', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Commands:" in out and out.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_both_kinds_of_collection_are_an_imprint_collection(tmp_path):
    """At run time the members are there; mypy checks the signatures of both against the Protocol."""
    import retrieval_imprint as ri
    from retrieval_imprint.interface import ImprintCollection

    plain = ri.Collection.create(tmp_path / "plain", model=None)
    sharded = ri.ShardedCollection.create(tmp_path / "sharded", shards=2, model=None)
    for col in (plain, sharded):
        assert isinstance(col, ImprintCollection)
    assert type(ri.open(tmp_path / "sharded")) is ri.ShardedCollection
    assert type(ri.open(tmp_path / "plain")) is ri.Collection
    snippet = tmp_path / "conforms.py"
    snippet.write_text(
        "from retrieval_imprint.collection import Collection\n"
        "from retrieval_imprint.interface import ImprintCollection\n"
        "from retrieval_imprint.sharded import ShardedCollection\n\n"
        "def check(a: Collection, b: ShardedCollection) -> list[ImprintCollection]:\n"
        "    return [a, b]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", str(snippet)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout


def test_the_readme_layout_names_every_module_in_the_same_layers():
    text = (ROOT / "README.md").read_text()
    rows = [line for line in text[text.index("## Layout") :].splitlines() if line.startswith("| `retrieval_imprint/")]
    readme = {}
    for row, line in enumerate(rows):
        for name in re.findall(r"`(?:retrieval_imprint/)?(\w+)\.py`", line.split("|")[1]):
            readme[name] = row
    assert readme == layers()


def test_every_error_a_user_can_cause_is_typed_in_errors_py():
    """Each error class lives in errors.py with its own code, HTTP status and exit code; the two
    that were plain ValueErrors (NC1 of one class, a Mahalanobis map of one proxy) are typed now."""
    import numpy as np

    from retrieval_imprint import errors, neural_collapse
    from retrieval_imprint.index import mahalanobis_map

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ImprintError)]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), "two error classes share a code"
    assert all(400 <= c.http_status < 600 and c.exit_code for c in classes)
    defined_elsewhere = [
        f"{path.stem}: {node.name}"
        for path in PACKAGE.glob("*.py")
        if path.stem != "errors"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and not node.name.startswith("_")  # private: caught inside
        and any("Error" in ast.unparse(b) for b in node.bases)
    ]
    assert defined_elsewhere == []
    with pytest.raises(errors.DataError, match="at least 2 classes"):
        neural_collapse(np.ones((3, 4), np.float32), np.zeros(3))
    with pytest.raises(errors.DataError, match="at least 2 proxies"):
        mahalanobis_map(np.ones((1, 4), np.float32))


def test_the_estimator_docstring_lists_every_parameter_from_its_declaration():
    """As scikit-learn checks its own estimators' docstrings: every parameter of the signature,
    in order, with its default and the help text declared in params.py."""
    import inspect
    import textwrap

    from retrieval_imprint import ImprintClassifier
    from retrieval_imprint.params import DEFAULTS, IMPRINT, RUNTIME

    doc = inspect.getdoc(ImprintClassifier)
    section = doc[doc.index("Parameters\n----------\n") :].split("\n\n")[0].splitlines()[2:]
    entries = [line for line in section if line and not line.startswith(" ")]
    names = [line.split(" : ")[0] for line in entries]
    assert names == list(inspect.signature(ImprintClassifier).parameters)
    for line, name in zip(entries, names):
        assert line.endswith(f"default={DEFAULTS[name]!r}")
        declared = (IMPRINT | RUNTIME)[name]
        body = " ".join(
            text.strip() for text in section[section.index(line) + 1 :][: len(textwrap.wrap(declared.help, 92))]
        )
        assert body == " ".join(declared.help.split())


def test_no_module_is_over_450_lines():
    """One job per module: a module that outgrows this has two."""
    long = {p.name: n for p in [*PACKAGE.glob("*.py"), *(ROOT / "cli").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > 450}  # fmt: skip
    assert long == {}

"""The repository keeps its own promises: docs that match the code, layers without cycles, and
nothing that points outside the repository."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_imprint.params import COLLECTION, IMPRINT

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrieval_imprint"


def _internal_imports(file: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_the_package_modules_import_without_cycles():
    graph = {f.stem: _internal_imports(f) for f in PACKAGE.glob("*.py") if f.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_the_command_line_starts_without_the_heavy_libraries():
    """`imprint --help`, `--version` and a typo answer at once: loading the CLI imports neither
    scikit-learn, SQLAlchemy, torch nor sentence-transformers (a command imports what it uses)."""
    code = (
        "import sys, retrieval_imprint.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'sqlalchemy', 'alembic', 'torch', "
        "'sentence_transformers', 'scipy', 'pandas'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_lazy_public_names_resolve():
    import retrieval_imprint

    for name in retrieval_imprint.__all__:
        assert getattr(retrieval_imprint, name) is not None
    assert set(retrieval_imprint.__all__) == set(retrieval_imprint._HOME) | {"__version__"}


@pytest.mark.slow
def test_docs_cli_md_is_what_the_build_script_writes():
    spec = importlib.util.spec_from_file_location("build_cli_docs", ROOT / "docs" / "build_cli_docs.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build() == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is out of date: run .venv/bin/python docs/build_cli_docs.py"
    )


def test_the_design_page_lists_every_setting_with_its_default():
    page = (ROOT / "docs" / "design.md").read_text()
    for p in [*IMPRINT.values(), *COLLECTION.values()]:
        shown = f"`{p.default}`" if isinstance(p.default, str) else "none" if p.default is None else p.default
        assert f"| `{p.name}` | {shown} |" in page, p.name


def test_nothing_cites_a_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    design = "DESIGN"  # spelled apart, so that this file does not match what it looks for
    for name in tracked:
        if name.endswith((".py", ".md", ".cfg", ".toml")):
            text = (ROOT / name).read_text(errors="replace")
            assert f"{design} §" not in text and f"{design}.md" not in text, name


def test_the_design_page_lists_every_public_name():
    import retrieval_imprint

    page = (ROOT / "docs" / "design.md").read_text()
    contract = page[page.index("## Public contract") : page.index("## Settings")]
    missing = [n for n in retrieval_imprint.__all__ if n != "__version__" and f"`{n}" not in contract]
    assert missing == []

"""The engine's layers are contracts (``[tool.importlinter]`` in pyproject.toml), checked on every test run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = ("from importlinter.cli import lint_imports; import sys; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_are_kept():
    result = lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    """The contracts are not vacuous: the IR importing the rule library, or the analysis importing the
    transformation layer, is reported as broken (checked on a copy of the tree)."""
    import shutil

    for package in ("rewrite", "passes"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    graph = tmp_path / "rewrite" / "ir" / "graph.py"
    graph.write_text(graph.read_text() + "\nimport passes  # forbidden\n")
    dims = tmp_path / "rewrite" / "analysis" / "dims.py"
    dims.write_text(dims.read_text() + "\nfrom rewrite.transform import apply  # upward\n")
    result = subprocess.run([sys.executable, "-c", LINT, str(tmp_path / "pyproject.toml")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "only the application layer imports the rule library BROKEN" in result.stdout
    assert "rewrite is layered: each layer imports only the layers below it BROKEN" in result.stdout
    assert "rewrite.ir.graph -> passes" in result.stdout
    assert "rewrite.analysis.dims -> rewrite.transform" in result.stdout

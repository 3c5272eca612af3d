"""The code style gate: ruff over the project's Python (the rules in pyproject.toml), and the direction of imports."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "ttrv", "operators", "tests", "bench", "docs"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ttrv_never_imports_operators():
    """Dependencies go one way: the operator builds on ttrv, never the reverse (`ttrv experiment` reaches
    operators/local/command.py through the entry-point group `ttrv.commands`, not an import)."""
    found = []
    for path in sorted((ROOT / "ttrv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {module}" for module in modules
                      if module.split(".")[0] == "operators"]
    assert found == []

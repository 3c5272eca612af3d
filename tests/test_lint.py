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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, lazily inside functions too (a cycle hidden in a function is
    still two modules that need each other). `from package import name` counts as the submodule where one exists."""
    paths = sorted(path for package in ("ttrv", "operators") for path in (ROOT / package).rglob("*.py"))
    modules = {_module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                            for alias in node.names}
        graph[module] = {target for target in targets if target in modules and target != module}
    return graph


def test_no_import_cycles():
    """No two modules of ttrv/ or operators/ import each other, directly or through others: each layer builds on
    the one below (the structural pass split `cli` from `launch`, which imported each other)."""
    graph = _import_graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            # A package's __init__ re-exporting its own submodules is not a cycle with them.
            if target.startswith(module + "."):
                continue
            if state.get(target) == "open" and not module.startswith(target + "."):
                cycles.append(" -> ".join(stack[stack.index(target):] + [module, target]))
            elif target not in state:
                visit(target, stack + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []

"""One-way layers: library code never imports the CLI (it returns results and raises
errors; ``tdxvm/cli/`` prints), imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tdxvm"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_library_module_imports_the_cli():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(m for m in _imports(path) if m == "tdxvm.cli" or m.startswith("tdxvm.cli."))
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}

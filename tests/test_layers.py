"""One-way layers (``docs`` DESIGN, package layout), read from every module's imports.

Every import counts: at the top, inside functions, under ``if TYPE_CHECKING``; relative
imports are resolved, and ``from tdxvm.pkg import mod`` counts as an import of the module
``tdxvm.pkg.mod`` (else of ``tdxvm.pkg`` itself). Importing a module is not counted as
importing its parent packages. The checks:

* no import cycle between tdxvm's modules;
* no import from a lower layer to a higher one: the top-level modules (``tdxvm/*.py``)
  are the bottom and import no package, then :data:`LAYERS` low to high;
* library code never imports the CLI (it returns results and raises; ``tdxvm/cli/``
  prints); ``provision/`` and ``fleet/`` reach ``emulate/`` only through
  :mod:`tdxvm.provision.trust`;
* what the image ships into the guest (:data:`tdxvm.image.configure.GUEST_MODULES`)
  imports, when it runs, nothing the image does not ship.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tdxvm.image.configure import GUEST_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "tdxvm"
LAYERS = ("attest", "guest", "image", "launch", "emulate", "provision", "fleet", "cli")  # low to high

Edge = tuple[str, str]


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, *, runtime_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth; ``runtime_only`` leaves out the
    bodies of ``if TYPE_CHECKING:`` (their ``else`` runs, so it stays)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if runtime_only and _is_type_checking(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def imports(
    source: str, module: str, *, is_package: bool, known: set[str], runtime_only: bool = False
) -> dict[str, int]:
    """The tdxvm modules (of ``known``) that ``source``, the module ``module``, imports,
    each with the line of its first import."""
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in known and target != module:
            found.setdefault(target, line)

    for node in sorted(_import_nodes(ast.parse(source), runtime_only=runtime_only), key=lambda n: n.lineno):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        for alias in node.names:
            add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
    return found


@cache
def _modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def _graph(runtime_only: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}."""
    known = set(_modules())
    return {
        name: imports(
            path.read_text(), name, is_package=path.name == "__init__.py", known=known, runtime_only=runtime_only
        )
        for name, path in _modules().items()
    }


def _where(edge: Edge, graph: dict[str, dict[str, int]] | None = None) -> str:
    source, target = edge
    line = (graph or _graph())[source][target]
    return f"{source} -> {target} ({_modules()[source].relative_to(PACKAGE.parent)}:{line})"


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer(module: str) -> int:
    """0 for the top-level modules, then 1 + the index in :data:`LAYERS`."""
    parts = module.split(".")
    if len(parts) == 1 or _modules()[module].parent == PACKAGE:
        return 0
    assert parts[1] in LAYERS, f"package tdxvm.{parts[1]} has no place in LAYERS (tests/test_layers.py): give it one"
    return 1 + LAYERS.index(parts[1])


def _shipped() -> set[str]:
    return {_name(path) for pattern in GUEST_MODULES for path in PACKAGE.glob(pattern)}


def test_the_walker_sees_function_level_relative_and_submodule_imports():
    known = {"tdxvm", "tdxvm.errors", "tdxvm.a", "tdxvm.a.b", "tdxvm.a.c", "tdxvm.d", "tdxvm.d.e"}
    source = """
import os
import tdxvm.errors
from typing import TYPE_CHECKING
from . import c
from .c import thing
if TYPE_CHECKING:
    from tdxvm.d import e
def f():
    from tdxvm.d import not_a_module
    from .. import errors
"""
    assert imports(source, "tdxvm.a.b", is_package=False, known=known) == {
        "tdxvm.errors": 3,
        "tdxvm.a.c": 5,
        "tdxvm.d.e": 8,
        "tdxvm.d": 10,
    }
    assert imports(source, "tdxvm.a.b", is_package=False, known=known, runtime_only=True) == {
        "tdxvm.errors": 3,
        "tdxvm.a.c": 5,
        "tdxvm.d": 10,
    }
    assert imports("from . import b\nfrom .b import x\n", "tdxvm.a", is_package=True, known=known) == {"tdxvm.a.b": 1}
    assert cycles({"x": {"y": 1}, "y": {"z": 1}, "z": {"x": 1}, "w": {"x": 1}}) == [["x", "y", "z"]]
    assert layer("tdxvm") == layer("tdxvm.errors") == 0 < layer("tdxvm.attest") == layer("tdxvm.attest.binding")
    assert (
        layer("tdxvm.attest.quote") < layer("tdxvm.image.measure") < layer("tdxvm.emulate.qgs") < layer("tdxvm.cli.vm")
    )
    # and the real tree is read: a few edges every version has
    graph = _graph()
    assert "tdxvm.provision.handshake" in graph["tdxvm.provision.bringup"]
    assert "tdxvm.attest.binding" in graph["tdxvm.guest.agent"]


def test_no_import_cycles():
    graph = _graph()
    found = [
        " <-> ".join(component)
        + ":\n    "
        + "\n    ".join(_where((a, b)) for a in component for b in sorted(graph[a]) if b in component)
        for component in cycles(graph)
    ]
    assert not found, "import cycles between tdxvm modules:\n" + "\n".join(found)


def test_imports_point_down_the_layers():
    graph = _graph()
    up = [_where((a, b)) for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    assert not up, (
        f"imports from a lower layer to a higher one (top-level modules < {' < '.join(LAYERS)}):\n  " + "\n  ".join(up)
    )


def test_top_level_modules_import_no_package():
    graph = _graph()
    found = [_where((a, b)) for a in sorted(graph) if layer(a) == 0 for b in sorted(graph[a]) if layer(b) != 0]
    assert not found, "top-level modules (tdxvm/*.py) import packages:\n  " + "\n  ".join(found)


def test_what_the_guest_image_ships_imports_only_what_it_ships():
    graph, shipped = _graph(runtime_only=True), _shipped()
    assert {"tdxvm.guest.agent", "tdxvm.attest.binding", "tdxvm.fileio"} <= shipped
    outside = [_where((a, b), graph) for a in sorted(shipped) for b in sorted(graph[a]) if b not in shipped]
    assert not outside, (
        "modules the image ships into the guest import what it does not ship (add it to "
        "tdxvm/image/configure.py GUEST_MODULES, or import it elsewhere):\n  " + "\n  ".join(outside)
    )


def test_provision_and_fleet_reach_the_emulator_only_through_the_trust():
    """Emulation is a backend: :mod:`tdxvm.provision.trust` is its one door."""
    graph = _graph()
    found = [
        _where((a, b))
        for a in sorted(graph)
        if a.startswith(("tdxvm.provision.", "tdxvm.fleet.")) and a != "tdxvm.provision.trust"
        for b in sorted(graph[a])
        if b.startswith("tdxvm.emulate")
    ]
    assert not found, "provision/fleet modules import tdxvm.emulate (use tdxvm.provision.trust):\n  " + "\n  ".join(
        found
    )


def test_no_library_module_imports_the_cli():
    graph = _graph()
    offenders = [
        _where((a, b))
        for a in sorted(graph)
        if not a.startswith("tdxvm.cli")
        for b in sorted(graph[a])
        if b == "tdxvm.cli" or b.startswith("tdxvm.cli.")
    ]
    assert not offenders, "library modules import the CLI:\n  " + "\n  ".join(offenders)

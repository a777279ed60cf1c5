"""The layers of reading, judging and rendering runs: results <- history <- report, no cycle.

``quantgate.results`` (the JSON's layout, reading, merging) imports neither ``history`` nor
``report``; ``quantgate.history`` (compare, regate, spread) does not import ``report``; none
imports the pytest plugin; and no two modules of these packages import each other, however
indirectly. Imports inside functions count: a lazy import is still a dependency. And the
recorded runs hold only ``quantgate`` section keys that ``quantgate.results.schema`` names.
"""

from __future__ import annotations

import ast
import json

from quantgate.results.schema import SECTION, SECTION_KEYS
from tests.conftest import REPO

SRC = REPO / "src"
PACKAGES = ("results", "history", "report")


def _module_name(path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules: set[str]) -> set[str]:
    """The quantgate modules ``path`` imports (``from pkg import mod`` resolved to ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layer check reads absolute ones)"
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return {name for name in found if name.split(".")[0] == "quantgate"}


def _graph() -> dict[str, set[str]]:
    files = sorted(f for package in PACKAGES for f in (SRC / "quantgate" / package).rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_each_layer_imports_only_the_layers_below_it():
    graph = _graph()
    forbidden = {"quantgate.results": ("quantgate.history", "quantgate.report"),
                 "quantgate.history": ("quantgate.report",)}
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   for layer, above in forbidden.items() if _within(module, layer)
                   if any(_within(target, a) for a in above))
    assert wrong == []
    assert sorted(m for m, targets in graph.items() if any(_within(t, "quantgate.plugin") for t in targets)) == []


def test_no_import_cycle_between_these_modules():
    full = _graph()
    graph = {m: {t for t in targets if t in full and t != m} for m, targets in full.items()}
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"

    def visit(module: str, path: tuple[str, ...]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join((*path, module, target))
            if target not in state:
                visit(target, (*path, module))
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, ())
    assert len(state) == len(graph) > 10



def test_recorded_runs_hold_only_the_keys_the_schema_names():
    """The writers of the ``quantgate`` section spell its keys out; each must be in ``SECTION_KEYS``."""
    files = sorted([*(REPO / "tests" / "fixtures" / "history").glob("*.json"), *(REPO / "reports").glob("*/*.json")])
    sections = [json.loads(f.read_text(encoding="utf-8")).get(SECTION) for f in files]
    unnamed = sorted({key for q in sections if isinstance(q, dict) for key in q} - SECTION_KEYS)
    assert unnamed == [] and sum(isinstance(q, dict) for q in sections) > 10

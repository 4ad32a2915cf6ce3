"""The package's shape, checked over the `ast` of src/cadence (DESIGN.md, "Layout and layers").

- Dependencies point one way: a top-level unit (`cadence.config`, `cadence.training`, ...)
  imports at run time only units in lower layers (or, inside the bottom layer, units that do not
  import it back). Imports under ``if TYPE_CHECKING:`` are free; imports inside functions count,
  since they run.
- One concern per file: no file above 500 lines and no class above 250.

``python tests/unit/test_architecture.py`` prints the import graph, one line per unit.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "src" / "cadence"

# Bottom to top. A unit may import units of lower layers; within a layer only without a cycle.
LAYERS: list[set[str]] = [
    {"io", "runtime", "schedules", "optim", "models", "data", "track"},  # leaves
    {"config"},
    {"workloads"},
    {"training"},
    {"tune"},
    {"run"},
    {"bench", "deploy"},
    {"cli"},
    {"__init__", "__main__"},  # the curated public API and `python -m cadence`
]
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 250


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _type_checking_block(node: ast.If) -> bool:
    test = node.test
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return name == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST, module: str) -> Iterator[str]:
    """Dotted names of cadence modules imported at run time by this file."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("cadence"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.startswith("cadence"):
                yield name
                # `from cadence import config` imports the unit cadence.config
                if name == "cadence":
                    yield from (f"cadence.{a.name}" for a in node.names)
        stack.extend(ast.iter_child_nodes(node))


def _module_name(path: Path) -> str:
    parts = ["cadence", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports at run time."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        unit = unit_of(path)
        deps = graph.setdefault(unit, set())
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _runtime_imports(tree, _module_name(path)):
            parts = name.split(".")
            if len(parts) < 2:
                continue  # `import cadence` / `from cadence import X` (X handled above)
            target = parts[1]
            if target != unit and ((ROOT / target).is_dir() or (ROOT / f"{target}.py").is_file()):
                deps.add(target)
    return graph


def layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"cadence.{unit}: not placed in a layer; add it to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (enough to name the knot)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def long_files_and_classes() -> list[str]:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT.parent)
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            problems.append(f"{rel}: {n} lines (at most {MAX_FILE_LINES}); split it by concern")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    problems.append(
                        f"{rel}: class {node.name} is {size} lines (at most {MAX_CLASS_LINES})"
                    )
    return problems


def test_no_import_cycle_between_units() -> None:
    found = cycles(import_graph())
    assert not found, "run-time import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_dependencies_point_down_the_layers() -> None:
    upward = [
        f"cadence.{unit} imports cadence.{dep}"
        for unit, deps in import_graph().items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(unit)
        or (layer_of(dep) == layer_of(unit) and layer_of(unit) != 0)
    ]
    assert not upward, "imports against the layers: " + "; ".join(upward)


def test_files_and_classes_stay_small() -> None:
    problems = long_files_and_classes()
    assert not problems, "; ".join(problems)


def test_the_checker_sees_imports_and_ignores_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import cadence.optim\n"
        "from cadence.config import Config\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from cadence.training import Trainer\n"
        "def f():\n"
        "    from cadence.tune import suggest_lr\n"
    )
    names = set(_runtime_imports(tree, "cadence.run.session"))
    assert names == {"cadence.optim", "cadence.config", "cadence.run", "cadence.tune"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def main() -> int:
    graph = import_graph()
    placed = [u for layer in LAYERS for u in sorted(layer & set(graph))]
    for unit in placed + sorted(set(graph) - set(placed)):
        deps = ", ".join(sorted(graph[unit])) or "-"
        print(f"{unit:<10} imports {deps}")
    found = cycles(graph)
    print("cycles:", "; ".join(" -> ".join(c) for c in found) if found else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's shape, checked over the `ast` of src/cadence (DESIGN.md, "Layout and layers").

- Dependencies point one way: a top-level unit (`cadence.config`, `cadence.training`, ...)
  imports at run time only units in lower layers (or, inside the bottom layer, units that do not
  import it back). Imports under ``if TYPE_CHECKING:`` are free; imports inside functions count,
  since they run.
- No run-time import loop between two modules either (file level: ``cadence.training.sharded``
  -> ``cadence.training.checkpoint`` -> ``cadence.training.sharded``), with the same rules. A loop
  inside a unit works only while every import in it happens to run in the right order; a shared
  piece belongs one level down, in a module both import.
- One concern per file: no file above 500 lines and no class above 250.

``python tests/unit/test_architecture.py`` prints the import graph, one line per unit, then
the module-level loops with the line of each import in them.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "src" / "cadence"

# Bottom to top. A unit may import units of lower layers; within a layer only without a cycle.
LAYERS: list[set[str]] = [
    {"io", "runtime", "schedules", "optim", "models", "data", "track"},  # leaves
    {"config"},
    {"keras"},  # cadence's strategies for Keras' own loop: schedules and config only
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


# --- module level -------------------------------------------------------------------------
#
# What an import runs, modelled on Python's import system:
# - ``import cadence.a.b`` and ``from cadence.a.b import x`` run cadence.a.b, and first the
#   __init__ of every package on the way (cadence.a) unless that package is an ancestor of the
#   importing module: an ancestor is already in sys.modules while its submodules run.
# - ``from cadence.a import b`` runs the submodule cadence.a.b when b is a module (Python loads
#   it even from a half-initialised package); any other name is read from cadence.a's __init__,
#   which must then have run.
# - A package's __init__ depends on what it imports, so one that re-exports its submodules
#   depends on each of them and an import of the package reaches them through it.


@dataclass(frozen=True)
class Edge:
    line: int
    in_function: bool


def _runtime_import_nodes(
    tree: ast.AST, typing: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run (``typing``: also those for the type checker only),
    and whether it sits inside a function."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, ast.If) and _type_checking_block(node) and not typing:
            stack.extend((n, in_function) for n in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        stack.extend((n, inner) for n in ast.iter_child_nodes(node))


def _import_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_ancestor(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is a cadence module (None outside cadence)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def module_imports(
    tree: ast.AST, module: str, modules: set[str], is_package: bool = False, typing: bool = False
) -> dict[str, Edge]:
    """The cadence modules whose code runs when this module's imports run, each with the
    import that runs it (the first at module level, else the first in a function); with
    ``typing``, also the modules it imports for the type checker only."""
    found: dict[str, Edge] = {}
    for node, in_function in _runtime_import_nodes(tree, typing):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _import_base(node, module, is_package)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in targets:
            target = _known(name, modules)
            if target is None:
                continue
            parts = target.split(".")
            run = [".".join(parts[:i]) for i in range(1, len(parts))]
            run = [p for p in run if not _is_ancestor(p, module)] + [target]
            for dep in run:
                edge = Edge(node.lineno, in_function)
                first = found.get(dep)
                if dep != module and (
                    first is None or (edge.in_function, edge.line) < (first.in_function, first.line)
                ):
                    found[dep] = edge
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def module_graph(typing: bool = False) -> dict[str, dict[str, Edge]]:
    """module -> the cadence modules it runs at run time (dotted; a package is its __init__);
    with ``typing``, also those it imports for the type checker only."""
    paths = _modules()
    names = set(paths)
    return {
        name: module_imports(
            ast.parse(path.read_text(), filename=str(path)),
            name,
            names,
            is_package=path.name == "__init__.py",
            typing=typing,
        )
        for name, path in paths.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that can reach each other (Tarjan), each a loop or a knot of
    loops; sorted, so a report names them in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def shortest_loop(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """The shortest loop through the group's first module, staying inside the group."""
    start, inside = group[0], set(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for dep in sorted(graph.get(node, set()) & inside):
            if dep == start:
                loop = [node]
                while loop[-1] != start:
                    loop.append(came_from[loop[-1]])
                return [*reversed(loop), start]
            if dep not in came_from:
                came_from[dep] = node
                queue.append(dep)
    raise AssertionError(f"{group} is not a loop")


def _where(edge: Edge) -> str:
    return f"line {edge.line}{', in a function' if edge.in_function else ''}"


def module_loops(graph: dict[str, dict[str, Edge]]) -> list[str]:
    """One line per knot: a loop in it, each step with the line that imports."""
    plain = {m: set(deps) for m, deps in graph.items()}
    lines = []
    for group in strongly_connected(plain):
        loop = shortest_loop(plain, group)
        steps = [loop[0]]
        for a, b in zip(loop, loop[1:]):
            steps.append(f"-({_where(graph[a][b])})-> {b}")
        others = f" (the knot also holds {', '.join(m for m in group if m not in loop)})"
        lines.append(" ".join(steps) + (others if len(group) > len(set(loop)) else ""))
    return lines


def knot_imports(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Per knot, every import between its modules: a knot can hold several loops, and
    untying it takes all of them in sight."""
    plain = {m: set(deps) for m, deps in graph.items()}
    return [
        [
            f"{a} -({_where(graph[a][b])})-> {b}"
            for a in group
            for b in sorted(graph[a])
            if b in group
        ]
        for group in strongly_connected(plain)
    ]


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


def test_no_import_loop_between_modules() -> None:
    loops = module_loops(module_graph())
    assert not loops, "run-time import loops between modules: " + "; ".join(loops)


def test_deploy_imports_run_one_way_even_for_types() -> None:
    """The engine and the routes' shared pieces sit below the app and the kinds that assemble
    them: no module of cadence.deploy imports back up, not even for a type annotation (the
    serve <-> engine circle through ServeSettings was one)."""
    graph = {
        module: {dep: edge for dep, edge in deps.items() if dep.startswith("cadence.deploy")}
        for module, deps in module_graph(typing=True).items()
        if module.startswith("cadence.deploy")
    }
    loops = module_loops(graph)
    assert not loops, "import loops in cadence.deploy: " + "; ".join(loops)


def kind_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare a ``.kind`` (not numpy's ``dtype.kind``) with a string or a
    ModelKind member."""

    def is_kind(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.Attribute)
            and n.attr == "kind"
            and not (isinstance(n.value, ast.Attribute) and n.value.attr == "dtype")
        )

    def is_value(n: ast.AST) -> bool:
        member = (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "ModelKind"
        )
        return member or (isinstance(n, ast.Constant) and isinstance(n.value, str))

    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(is_kind(n) for n in [node.left, *node.comparators])
        and any(is_value(n) for n in ast.walk(node))
    ]


def test_deploy_asks_the_kind_instead_of_comparing_it() -> None:
    """Serving and export dispatch on the run's task (cadence.deploy.kinds), so no code in
    deploy compares a ``.kind`` with a string or a ModelKind, and create_app stays the
    assembly of shared pieces: under 80 lines."""
    found = []
    for path in sorted((ROOT / "deploy").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [f"{path.relative_to(ROOT.parent)}:{line}" for line in kind_comparisons(tree)]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "create_app":
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size < 80, f"create_app is {size} lines; mount pieces, do not inline them"
    assert not found, "comparisons of the model kind: " + ", ".join(found)


def test_the_kind_checker_sees_comparisons_and_not_dtypes() -> None:
    tree = ast.parse(
        "if run.kind == 'lm':\n    pass\n"
        "if x.kind is ModelKind.ASR:\n    pass\n"
        "if 'classifier' != self.run.kind:\n    pass\n"
        "if arr.dtype.kind not in 'fiu':\n    pass\n"
        "if task.kind is other.kind:\n    pass\n"
    )
    assert kind_comparisons(tree) == [1, 3, 5]


def test_dependencies_point_down_the_layers() -> None:
    upward = [
        f"cadence.{unit} imports cadence.{dep}"
        for unit, deps in import_graph().items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(unit)
        or (layer_of(dep) == layer_of(unit) and layer_of(unit) != 0)
    ]
    assert not upward, "imports against the layers: " + "; ".join(upward)


def test_nothing_of_cadence_imports_keras() -> None:
    """cadence.keras loads Keras (and TensorFlow with its default backend): it is for users'
    Keras runs only, so no unit of cadence's own imports it, not even inside a function."""
    users = sorted(unit for unit, deps in import_graph().items() if "keras" in deps)
    assert not users, "cadence.keras imported by: " + ", ".join(f"cadence.{u}" for u in users)


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


def test_the_module_checker_catches_a_loop_through_a_function() -> None:
    """The shape of the loop that sharded.py and checkpoint.py had: one side imports at the
    top, the other inside a function; a TYPE_CHECKING import stays free."""
    modules = {"cadence", "cadence.pkg", "cadence.pkg.a", "cadence.pkg.b", "cadence.other"}
    sources = {
        "cadence.pkg.a": "from cadence.pkg.b import helper\n",
        "cadence.pkg.b": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from cadence.other import Thing\n"
            "def helper():\n"
            "    from cadence.pkg.a import Error\n"
        ),
        "cadence.other": "from cadence.pkg.b import helper\n",
    }
    graph = {m: module_imports(ast.parse(src), m, modules) for m, src in sources.items()}
    # cadence.pkg's __init__ runs first when a module outside the package imports into it
    assert graph["cadence.other"] == {
        "cadence.pkg": Edge(1, False),
        "cadence.pkg.b": Edge(1, False),
    }
    assert graph["cadence.pkg.b"] == {"cadence.pkg.a": Edge(5, True)}
    assert module_loops(graph) == [
        "cadence.pkg.a -(line 1)-> cadence.pkg.b -(line 5, in a function)-> cadence.pkg.a"
    ]


def test_the_module_checker_resolves_package_imports() -> None:
    """``from package import name`` runs the submodule `name` when it is one, else the
    package's __init__; that __init__ reaches what it re-exports, so a loop through it counts."""
    modules = {"cadence", "cadence.pkg", "cadence.pkg.a", "cadence.pkg.b"}
    init = module_imports(
        ast.parse("from cadence.pkg.a import A\nfrom . import b\n"),
        "cadence.pkg",
        modules,
        is_package=True,
    )
    assert set(init) == {"cadence.pkg.a", "cadence.pkg.b"}
    submodule = module_imports(ast.parse("from cadence.pkg import a\n"), "cadence.pkg.b", modules)
    assert set(submodule) == {"cadence.pkg.a"}  # the package is an ancestor: already running
    reexport = module_imports(ast.parse("from cadence.pkg import A\n"), "cadence.pkg.b", modules)
    assert set(reexport) == {"cadence.pkg"}
    graph = {"cadence.pkg": init, "cadence.pkg.b": reexport}
    assert strongly_connected({m: set(d) for m, d in graph.items()}) == [
        ["cadence.pkg", "cadence.pkg.b"]
    ]


def main() -> int:
    graph = import_graph()
    placed = [u for layer in LAYERS for u in sorted(layer & set(graph))]
    for unit in placed + sorted(set(graph) - set(placed)):
        deps = ", ".join(sorted(graph[unit])) or "-"
        print(f"{unit:<10} imports {deps}")
    found = cycles(graph)
    print("cycles:", "; ".join(" -> ".join(c) for c in found) if found else "none")
    modules = module_graph()
    loops = module_loops(modules)
    edges = sum(len(deps) for deps in modules.values())
    print(f"modules: {len(modules)}, run-time imports between them: {edges}")
    print(f"module-level loops: {len(loops) or 'none'}")
    for line, imports in zip(loops, knot_imports(modules)):
        print("  " + line)
        if len(imports) > 2:
            print("    the imports inside this knot:")
            print("\n".join(f"      {i}" for i in imports))
    return 0


if __name__ == "__main__":
    sys.exit(main())

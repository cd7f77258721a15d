"""The package's layers, read from every module's imports: none imports a layer above its own, none goes round.

plugin (what a Lightning user imports) is the ground; methods and evaluation build on it, side by side; the app
builds on all three; the face (``lightning_forget/__init__.py`` and ``verify.py``) hands their names on. Imports
inside functions and under ``TYPE_CHECKING`` count: they tie modules together as much as any other.
"""

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_forget"
FACE = {"lightning_forget", "lightning_forget.verify"}
# Each layer and the layers it may import (methods and evaluation know nothing of each other).
MAY_IMPORT = {
    "plugin": set(),
    "methods": {"plugin"},
    "evaluation": {"plugin"},
    "app": {"plugin", "methods", "evaluation"},
    "face": {"plugin", "methods", "evaluation", "app"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer a module of the package sits in; ``None`` for one outside every layer."""
    if module in FACE:
        return "face"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT.keys() - {"face"} else None


def imported(module: str, path: Path) -> Iterable[tuple[str, int]]:
    """The package's modules that ``module`` imports, each with the line of the import."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            # "from package import name" imports the submodule ``name`` where there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # "import a.b.c" of a name inside a module: that module
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name, node.lineno


EDGES = sorted({(m, target, line) for m, path in MODULES.items() for target, line in imported(m, path)})


def upward(edges: Iterable[tuple[str, str, int]]) -> list[str]:
    """The imports of a layer it may not import: one above it, or beside it."""
    return [
        f"{source} (layer {layer_of(source)}) line {line} imports {target} (layer {layer_of(target)})"
        for source, target, line in edges
        if layer_of(source) != layer_of(target) and layer_of(target) not in MAY_IMPORT.get(layer_of(source), set())
    ]


def circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` (node to the nodes it points at), as the nodes along it; ``[]`` when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it was walked
    path: list[str] = []

    def walk(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return []


def graph_of(pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for source, target in pairs:
        graph.setdefault(source, set()).add(target)
    return graph


def test_the_imports_are_read():
    assert ("lightning_forget.plugin.module", "lightning_forget.plugin.callback") in {(s, t) for s, t, _ in EDGES}
    assert ("lightning_forget.app.pipeline", "lightning_forget.methods.base") in {(s, t) for s, t, _ in EDGES}


def test_every_module_sits_in_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_layer_imports_a_layer_above_it_or_beside_it():
    assert upward(EDGES) == []


def test_no_circle_between_layers():
    pairs = ((str(layer_of(s)), str(layer_of(t))) for s, t, _ in EDGES)
    layers = graph_of((s, t) for s, t in pairs if s != t)
    assert circle(layers) == []


def test_no_circle_between_modules():
    assert circle(graph_of((s, t) for s, t, _ in EDGES)) == []


@pytest.mark.parametrize(
    ("edges", "found"),
    [
        ([("lightning_forget.plugin.module", "lightning_forget.evaluation.metrics", 3)], True),
        ([("lightning_forget.methods.base", "lightning_forget.evaluation.metrics", 3)], True),
        ([("lightning_forget.plugin.masks", "lightning_forget", 3)], True),
        ([("lightning_forget.app.runs", "lightning_forget.plugin.record", 3)], False),
    ],
    ids=["up", "beside", "to_the_face", "down"],
)
def test_the_layer_check_finds_an_import_up_or_beside(edges, found):
    assert bool(upward(edges)) is found


def test_the_circle_check_finds_a_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []

"""The package's import graph, read from the source with ``ast``: no module imports one that imports it back, at
module level or inside a function (a lazy import in a circle only moves the failure to run time), and the
dispatch layers of ``kldwrm_fast/ops`` import only downward: table → operations → backends → routing → dispatch."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "kldwrm_fast"
OPS_LAYERS = ["table", "operations", "backends", "routing", "dispatch"]


def module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (``from P import m`` with ``P.m`` a module counts as ``P.m``;
    parents a Python import initialises first are not edges)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.add(f"{base}.{alias.name}")
                    elif base in modules:
                        edges.add(base)
        graph[name] = {edge for edge in edges if edge != name and not name.startswith(edge + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and "kldwrm_fast.optim.base" in graph["kldwrm_fast.optim.kfac"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("layer", OPS_LAYERS)
def test_the_ops_dispatch_layers_import_only_downward(layer):
    graph = import_graph()
    below = {f"{PACKAGE}.ops.{name}" for name in OPS_LAYERS[: OPS_LAYERS.index(layer)]}
    above = {f"{PACKAGE}.ops.{name}" for name in OPS_LAYERS} - below - {f"{PACKAGE}.ops.{layer}"}
    imported = graph[f"{PACKAGE}.ops.{layer}"]
    assert not imported & above, f"ops/{layer}.py imports {sorted(imported & above)}, a layer above it"

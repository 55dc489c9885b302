"""The import-layering contract (README, "Layout"): a lower layer never imports a higher
one, and no two modules import each other, directly or around a loop. Every import counts:
module-level, inside functions, and behind ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opt"

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = {
    1: ("errors", "fsutil", "dist", "hardware", "device", "host_memory", "faults"),
    2: ("config", "models"),
    3: ("data", "parallel", "checkpoint", "supervisor"),
    4: ("job", "dry_run", "run", "eval"),
    5: ("train", "finetune"),
    6: ("launch", "plan", "convert", "cli", "score", "__main__"),
}
LAYER_NAMES = {1: "base", 2: "description", 3: "mechanisms", 4: "run", 5: "training", 6: "drivers"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    if module == "opt":
        return 0  # the package itself: imports nothing
    top = module.split(".")[1]
    return next((n for n, names in LAYERS.items() if top in names), None)


def imports_of(module: str) -> set[str]:
    """The opt modules ``module`` imports (packages resolved to their __init__)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from opt.x import y`: y may be a submodule or a name in opt.x.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n == "opt" or n.startswith("opt.")}
    return {_existing(n) for n in found} - {module}


def _existing(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_points_up_the_layers(module):
    mine = layer_of(module)
    upward = sorted(
        f"{target} (layer {layer_of(target)}, {LAYER_NAMES[layer_of(target)]})"
        for target in GRAPH[module]
        if layer_of(target) > mine
    )
    assert upward == [], f"{module} (layer {mine}, {LAYER_NAMES[mine]}) imports {upward}"


def test_no_import_cycles():
    cycles = [sorted(c) for c in _strongly_connected(GRAPH) if len(c) > 1]
    assert cycles == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (the graph is small, but recursion depth is not free)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_contract_can_fail():
    """The checker itself: a made-up upward import and a made-up cycle are caught."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert sorted(map(sorted, _strongly_connected(graph))) == [["a", "b", "c"], ["d"]]
    assert layer_of("opt.train.trainer") > layer_of("opt.models.model")

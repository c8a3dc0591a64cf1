"""The one dependency rule, read off the source: run -> checkpoint, dist, recipe -> core.

Every `import` of every functrain module counts, at module level or inside a function
(an import inside a function that dodges a cycle is still a cycle); only imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "functrain"
#: The pure core: what recipes name. It imports only itself (and torch, tensordict, ...).
CORE = {
    "functrain",
    "functrain.errors",
    "functrain.hashing",
    "functrain.parallel",
    "functrain.transform",
    "functrain.state",
    "functrain.step",
    "functrain.optim",
    "functrain.schedule",
    "functrain.rng",
    "functrain.losses",
    "functrain.recompute",
    "functrain.precision",
    "functrain.determinism",
    "functrain.canonical",
}
CORE_PACKAGES = ("functrain.models", "functrain.data")
#: The machinery's layers, bottom up; each may import the core and itself only, and `run`
#: everything.
LAYERS = ("functrain.checkpoint", "functrain.dist", "functrain.recipe", "functrain.run")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, name: str, modules: set[str]) -> set[str]:
    """The modules `source` (the module `name`) imports, `functrain.x.y` resolved to the
    deepest module in `modules`; others (torch, stdlib) as written."""
    found: set[str] = set()
    package = name if name in _packages(modules) else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if base == "functrain" or base.startswith("functrain."):
                    found.add(full if full in modules else base)
                else:  # `from torch import distributed` imports torch.distributed
                    found.update((base, full))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _packages(modules: set[str]) -> set[str]:
    return {m.rpartition(".")[0] for m in modules if "." in m}


def graph_of(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the functrain modules it imports."""
    modules = set(sources)
    return {
        name: {m for m in imports_of(src, name, modules) if m in modules and m != name}
        for name, src in sources.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layer_of(module: str) -> str:
    if module == "functrain.__main__":  # `python -m functrain`: the CLI's
        return "functrain.run"
    if module in CORE or module.startswith(tuple(p + "." for p in CORE_PACKAGES)):
        return "core"
    if module in CORE_PACKAGES:
        return "core"
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to CORE or a layer")


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that points the wrong way, and every torch.distributed import of the core."""
    modules = set(sources)
    problems = []
    for name, src in sorted(sources.items()):
        mine = layer_of(name)
        for target in sorted(imports_of(src, name, modules)):
            if mine == "core" and target.startswith("torch.distributed"):
                problems.append(f"{name} (core) imports {target}")
            if target not in modules:
                continue
            theirs = layer_of(target)
            allowed = {"core", mine} if mine != "functrain.run" else {"core", *LAYERS}
            if theirs not in allowed:
                problems.append(f"{name} ({mine}) imports {target} ({theirs})")
    return problems


def functrain_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    for name in functrain_sources():
        layer_of(name)


def test_the_core_imports_nothing_of_the_machinery():
    assert violations(functrain_sources()) == []


def test_no_functrain_module_takes_part_in_an_import_cycle():
    assert cycles(graph_of(functrain_sources())) == []


# ---------------------------------------------------------------- the checks can fail


CONTROL = {
    "functrain": "from functrain.state import TrainState\n",
    "functrain.state": (
        "from torch import distributed as td\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from functrain.run.cli import main\n"
        "def f():\n    from functrain.checkpoint import save\n"
    ),
    "functrain.checkpoint": "from . import raw\n",
    "functrain.checkpoint.raw": "from functrain.state import TrainState\n",
    "functrain.dist": "from functrain.checkpoint import raw\n",
    "functrain.run": "from functrain import checkpoint, dist, state\n",
}


def test_a_wrong_way_import_and_a_cycle_are_caught():
    assert violations(CONTROL) == [
        "functrain.dist (functrain.dist) imports functrain.checkpoint.raw (functrain.checkpoint)",
        "functrain.state (core) imports functrain.checkpoint (functrain.checkpoint)",
        "functrain.state (core) imports torch.distributed",
    ]
    assert cycles(graph_of(CONTROL)) == [
        ["functrain.checkpoint", "functrain.checkpoint.raw", "functrain.state"]
    ]


@pytest.mark.parametrize("module", ["functrain.nowhere", "functrain.checkpointing"])
def test_a_module_outside_the_layers_is_refused(module):
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of(module)

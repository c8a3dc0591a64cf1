"""The one dependency rule, read off the source (docs/architecture.md):

    cli -> run -> checkpoint, distributed, recipe -> core

Every `import` of every functrain module counts, at module level or inside a function
(an import inside a function that dodges a cycle is still a cycle); only imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "functrain"
#: The pure core: what recipes name. It imports only itself (and torch, tensordict, ...).
CORE = {
    "functrain",
    "functrain.errors",
    "functrain.hashing",
    "functrain.names",
    "functrain.parallel",
    "functrain.transform",
    "functrain.state",
    "functrain.steps",
    "functrain.optim",
    "functrain.schedule",
    "functrain.rng",
    "functrain.losses",
    "functrain.metrics",
    "functrain.recompute",
    "functrain.precision",
    "functrain.determinism",
    "functrain.deferred",
    "functrain.canonical",
}
CORE_PACKAGES = ("functrain.models", "functrain.data")
#: The machinery's layers; each may import the core and itself only, but for the two on top.
LAYERS = ("functrain.checkpoint", "functrain.distributed", "functrain.recipe")
#: The engine may import every layer; the CLI the engine too; nothing imports the CLI.
ENGINE, CLI = "functrain.run", "functrain.cli"
ALLOWED = {
    **{layer: {"core", layer} for layer in LAYERS},
    "core": {"core"},
    ENGINE: {"core", *LAYERS, ENGINE},
    CLI: {"core", *LAYERS, ENGINE, CLI},
}


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
        return CLI
    if module in CORE or module.startswith(tuple(p + "." for p in CORE_PACKAGES)):
        return "core"
    if module in CORE_PACKAGES:
        return "core"
    for layer in (*LAYERS, ENGINE, CLI):
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
            if theirs not in ALLOWED[mine]:
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
        "if TYPE_CHECKING:\n    from functrain.cli import main\n"
        "def f():\n    from functrain.checkpoint import save\n"
    ),
    "functrain.checkpoint": "from . import raw\n",
    "functrain.checkpoint.raw": "from functrain.state import TrainState\n",
    "functrain.distributed": "from functrain.checkpoint import raw\n",
    "functrain.run": "from functrain import checkpoint, distributed, state\n",
    "functrain.run.trainer": "from functrain.cli import main\n",
    "functrain.cli": "from functrain.run import trainer\n",
}


def test_a_wrong_way_import_and_a_cycle_are_caught():
    assert violations(CONTROL) == [
        "functrain.distributed (functrain.distributed) imports functrain.checkpoint.raw "
        "(functrain.checkpoint)",
        "functrain.run.trainer (functrain.run) imports functrain.cli (functrain.cli)",
        "functrain.state (core) imports functrain.checkpoint (functrain.checkpoint)",
        "functrain.state (core) imports torch.distributed",
    ]
    assert cycles(graph_of(CONTROL)) == [
        ["functrain.checkpoint", "functrain.checkpoint.raw", "functrain.state"],
        ["functrain.cli", "functrain.run.trainer"],
    ]


@pytest.mark.parametrize("module", ["functrain.nowhere", "functrain.checkpointing"])
def test_a_module_outside_the_layers_is_refused(module):
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of(module)


# ---------------------------------------------------------------- what the tools see

REPO = PACKAGE.parent
#: Folder names that common tools (ruff, setuptools, pytest, editors, .gitignore templates)
#: take for build output or environments, and skip.
BUILD_OUTPUT = {"build", "dist", "_build", "out", "target", "site-packages", "node_modules",
                "venv", "env", "__pypackages__", "buck-out", "wheelhouse"}  # fmt: skip


def test_no_package_folder_bears_a_build_output_name():
    folders = {p.name for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert folders & BUILD_OUTPUT == set()


def _tracked_python_files() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_lint_and_format_see_every_tracked_python_file():
    """ruff's default `exclude` skips folders named `dist` and `build` even inside the paths
    it is given: pyproject.toml sets its own list, and the noxfile lints and formats `.`
    (`ruff format` finds files as `ruff check` does)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--show-files", "."],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seen = {
        str(Path(line.strip()).resolve().relative_to(REPO))
        for line in out.stdout.splitlines()
        if line.strip().endswith(".py")
    }
    tracked = _tracked_python_files()
    assert tracked, "git lists no Python files"
    assert tracked - seen == set(), "ruff skips tracked Python files"


def test_one_load_into():
    """A snapshot's or a state's weights go into a module one way: `functrain.load_into`."""
    defined = [
        module_name(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "load_into"
    ]
    assert defined == ["functrain.state"]

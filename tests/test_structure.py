"""The package's import graph is layered and acyclic.

Every ``import`` statement of every module counts, wherever it sits (module level, inside a function,
under ``TYPE_CHECKING``): a module may import only modules of its own layer or of lower layers, and
the whole graph has no cycle. A lower layer that must name a higher one uses a ``Protocol``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (pyproject's package-dir)
SOURCES = {ROOT / "mesimp_gpu": "mesimp_gpu", ROOT / "kernels": "mesimp_gpu.kernels", ROOT / "bench": "mesimp_gpu.bench"}

#: lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("mesimp_gpu.io", "mesimp_gpu.machine", "mesimp_gpu.data", "mesimp_gpu.parsing", "mesimp_gpu.plots"),
    ("mesimp_gpu.kernels",),
    ("mesimp_gpu.backends",),
    ("mesimp_gpu.touched_rows",),
    ("mesimp_gpu.optim", "mesimp_gpu.lazy_optim"),
    ("mesimp_gpu.mesimp",),
    ("mesimp_gpu.meprop", "mesimp_gpu.lstm"),
    ("mesimp_gpu.models", "mesimp_gpu.convert"),
    ("mesimp_gpu.train",),
    ("mesimp_gpu.bench",),
    ("mesimp_gpu.cli",),
]


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules: dict[str, Path] = {}
    for folder, package in SOURCES.items():
        for path in folder.rglob("*.py"):
            if "results" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` (source ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` imports the submodule when one exists, else a name of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix matching ``module``."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS")
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_every_import_goes_downwards(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module != "mesimp_gpu"  # the package root re-exports the public layer classes
        for target in targets
        if target == "mesimp_gpu" or layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports must go downwards:\n" + "\n".join(sorted(upward))


def test_import_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mesimp_gpu.train import trainer\n"
        "def f():\n    from mesimp_gpu.cli.errors import user_errors\n    import mesimp_gpu.models.mlp\n"
        "from . import records\n"
    )
    known = {"mesimp_gpu.train", "mesimp_gpu.train.trainer", "mesimp_gpu.train.records", "mesimp_gpu.cli",
             "mesimp_gpu.cli.errors", "mesimp_gpu.models", "mesimp_gpu.models.mlp"}
    found = imports_of("mesimp_gpu.train.probe", source, known)
    assert found == {"mesimp_gpu.train.trainer", "mesimp_gpu.cli.errors", "mesimp_gpu.models.mlp",
                     "mesimp_gpu.train.records"}

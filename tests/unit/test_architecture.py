"""The house rules of docs/ARCHITECTURE.md, read off the code: every module sits in one layer, imports
run only downward (imports inside functions count too), and no two modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hftk"

# Lowest first; a module may import its own layer or any below. docs/ARCHITECTURE.md names the same.
LAYERS = {
    "foundation": ["hftk", "hftk.errors", "hftk.cache", "hftk.logs", "hftk.recipe_yaml", "hftk.recipe", "hftk.schema",
                   "hftk.file_digest"],
    "parallel": ["hftk.parallel", "hftk.parallel.*"],
    "model": ["hftk.tasks", "hftk.tasks.*", "hftk.objective", "hftk.metrics", "hftk.generation", "hftk.tokenizer",
              "hftk.tokenizer_files", "hftk.models", "hftk.adapters", "hftk.data",
              "hftk.sources", "hftk.streaming", "hftk.intervals", "hftk.precision"],
    "train": ["hftk.train", "hftk.train.*"],
    "run": ["hftk.checkpoint", "hftk.run_dir", "hftk.experiment_trackers", "hftk.hub", "hftk.report",
            "hftk.comparison", "hftk.pictures"],
    "assembly": ["hftk.preflight", "hftk.prepare", "hftk.validate", "hftk.planning", "hftk.planning.*"],
    "commands": ["hftk.run", "hftk.eval_split", "hftk.followups", "hftk.cli", "hftk.__main__"],
}
# (importer, imported): an upward import allowed, with the reason. None today.
UPWARD_ALLOWED: dict[tuple[str, str], str] = {}


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The hftk modules one file imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hftk"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "hftk":
                continue
            for alias in node.names:  # `from hftk import data` imports the module hftk.data
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(package)
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def layer_of(module: str) -> int | None:
    for rank, patterns in enumerate(LAYERS.values()):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return rank
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((importer, imported) for importer, targets in graph.items() for imported in targets
                  if (layer_of(imported) or 0) > (layer_of(importer) or 0)
                  and (importer, imported) not in UPWARD_ALLOWED)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first search)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_has_a_layer():
    assert [name for name in module_names() if layer_of(name) is None] == []


def test_imports_run_downward():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checks_see_lazy_imports_circles_and_upward_imports(tmp_path):
    """The checker itself can fail: a circle made by an import inside a function, and an upward import."""
    package = tmp_path / "hftk"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from hftk.train import loop\n")
    (package / "train" / "loop.py").write_text("from hftk import errors\nfrom . import state\n")
    (package / "train" / "state.py").write_text("")
    graph = import_graph(package)
    assert graph["hftk.train.loop"] == {"hftk.errors", "hftk.train.state"}
    assert circles(graph) == [["hftk.errors", "hftk.train.loop", "hftk.errors"]]
    assert upward_imports(graph) == [("hftk.errors", "hftk.train.loop")]


@pytest.mark.parametrize("module", ["hftk.parallel.strategies", "hftk.planning.scaling", "hftk.tasks.dialogue"])
def test_layer_patterns_cover_subpackages(module):
    assert layer_of(module) is not None

"""The shape of the package, guarded: no import cycle, no private name used across modules, one batch type,
one training loop, one timing helper, and every utils.<module>.<name> the docs and notebooks mention exists."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "utils"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported utils module, names) for every `from .x import ...` anywhere in a module, nested ones too."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.append((node.module, [alias.name for alias in node.names]))
            elif node.level == 0 and node.module and node.module.startswith("utils."):
                found.append((node.module.split(".", 1)[1], [alias.name for alias in node.names]))
    return found


def test_the_import_graph_has_no_cycle():
    graph = {module: {imported for imported, _ in _imports(module)} for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        state[module] = "open"
        for imported in graph.get(module, ()):
            visit(imported, path + [module])
        state[module] = "done"

    for module in MODULES:
        visit(module, [])


def test_no_private_name_crosses_a_module_boundary():
    crossings = [f"{module} imports {name} from {imported}" for module in MODULES
                 for imported, names in _imports(module) for name in names if name.startswith("_")]
    for test in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
                crossings += [f"{test.name} imports {a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossings


def _assigned_names(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_one_name_one_place():
    """Each public top-level name is defined by one module only (the batch type, the history, the timers)."""
    owners: dict[str, list[str]] = {}
    for module in MODULES:
        for name in _assigned_names(module):
            if not name.startswith("_") and name != "logger":
                owners.setdefault(name, []).append(module)
    # bypass_modeling is copied verbatim into saved folders and may import only torch and transformers
    twice = {name: where for name, where in owners.items() if len(where) > 1}
    assert not twice, twice
    assert owners["Batch"] == ["batches"]


def test_one_training_loop_and_one_timer():
    """Only utils.training steps an optimizer on a model, and only utils.speed reads clocks to time code
    (its `stopwatch`; utils.models keeps its loading and conversion messages)."""
    for module in MODULES:
        source = (PACKAGE / f"{module}.py").read_text()
        if module != "training":
            assert "get_cosine_schedule_with_warmup" not in source, module
            # bias: gradients of neuron gates (attribution, nothing trains); routing: the router is a linear
            # classifier fitted by full-batch L-BFGS, a convex fit rather than a training run
            assert ".backward(" not in source or module in ("bias", "routing"), module
        if module not in ("speed", "models"):
            assert "perf_counter" not in source and "process_time" not in source, module


REFERENCE = re.compile(r"\butils\.([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)")


DOCUMENTS = sorted(str(path.relative_to(ROOT)) for path in
                   [*PACKAGE.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("CH*/README.md"), *ROOT.glob("CH*/*.ipynb"),
                    *ROOT.glob("appendix/*.ipynb"), *ROOT.glob("benchmarks/*.py")])


def _text(where: str) -> str:
    path = ROOT / where
    if path.suffix != ".ipynb":
        return path.read_text()
    return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])


@pytest.mark.parametrize("where", DOCUMENTS)
def test_every_mentioned_name_exists(where):
    text = _text(where)
    missing = []
    for module, name in set(REFERENCE.findall(text)):
        if module in MODULES and not hasattr(importlib.import_module(f"utils.{module}"), name):
            missing.append(f"utils.{module}.{name}")
        elif module not in MODULES and module not in ("py",):
            missing.append(f"utils.{module} (no such module)")
    assert not missing, f"{where} mentions {sorted(missing)}"


def test_the_readme_lists_every_module_after_the_modules_it_imports():
    """The README's module table is a reading order: each module imports only modules listed above it."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### The package `utils/`", 1)[1].split("\n\n", 2)[2]
    order = [name for line in table.splitlines() if line.startswith("| `")
             for name in re.findall(r"`(\w+)`", line.split("|")[1])]
    assert sorted(order) == MODULES, "the README's module table must list every module of utils once"
    for position, module in enumerate(order):
        later = {imported for imported, _ in _imports(module)} - set(order[:position])
        assert not later, f"{module} imports {sorted(later)}, listed below it in the README"

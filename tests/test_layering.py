"""The import directions of docs/concepts.md ("Layout and layering"), checked on every module's imports, lazy ones
inside functions included. A new import that crosses a layer the wrong way fails here with the line that made it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "trainer", "taxonomies")

# Each unit and the units it may import (itself always). A unit is a folder: pipeline/<role>, or a top-level package.
ALLOWED: dict[str, set[str]] = {
    "pipeline": set(),  # pipeline/__init__.py: the version only
    "pipeline.core": set(),
    "taxonomies": set(),
    "pipeline.models": {"pipeline.core"},
    "pipeline.sources": {"pipeline.core"},
    "pipeline.store": {"pipeline.core", "pipeline"},
    "stages": {"pipeline.core", "pipeline.models", "pipeline.sources", "taxonomies"},
    "pipeline.postpass": {"pipeline.core", "pipeline.models", "pipeline.store", "stages"},
    "pipeline.inspection": {"pipeline.core", "pipeline.store"},
    "pipeline.run": {"pipeline", "pipeline.core", "pipeline.models", "pipeline.sources", "pipeline.store", "stages",
                     "pipeline.postpass"},
    "trainer": {"pipeline.core", "pipeline.models", "pipeline.store"},
    # On top: the command line drives everything; the test harnesses use everything but the command line.
    "pipeline.cli": {"pipeline", "pipeline.core", "pipeline.models", "pipeline.sources", "pipeline.store", "stages",
                     "pipeline.run", "pipeline.postpass", "pipeline.inspection", "trainer", "taxonomies"},
    "pipeline.testing": {"pipeline", "pipeline.core", "pipeline.models", "pipeline.sources", "pipeline.store",
                         "stages", "pipeline.run", "pipeline.postpass", "pipeline.inspection", "trainer", "taxonomies"},
}


def unit_of(module: str) -> str:
    """`pipeline.store.shards` -> `pipeline.store`; `stages.faces` -> `stages`; `pipeline` -> `pipeline`."""
    parts = module.split(".")
    if parts[0] == "pipeline" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project module, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pipeline.store import shards` names a submodule: count it as that module.
            found += [(node.lineno, f"{target}.{alias.name}" if target in ("pipeline", *ALLOWED) else target)
                      for alias in node.names]
    return sorted({(line, name) for line, name in found if name.split(".")[0] in PACKAGES})


def violations(source: str, module: str) -> list[str]:
    unit = unit_of(module)
    allowed = ALLOWED[unit] | {unit}
    out = []
    for line, target in imports_of(source, module):
        target_unit = "pipeline" if target == "pipeline" or target == "pipeline.__version__" else unit_of(target)
        if target_unit not in allowed:
            out.append(f"{module}:{line} imports {target} ({unit} may import {', '.join(sorted(allowed))})")
        elif unit == "stages" and target_unit == "stages" and module != "stages" and target != "stages":
            # Stages never import each other: what two stages share lives in pipeline.core or pipeline.models.
            out.append(f"{module}:{line} imports {target} (a stage module may not import another stage)")
    return out


def project_modules() -> list[tuple[Path, str]]:
    return [(path, module_name(path, ROOT)) for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def test_every_module_belongs_to_a_unit_of_the_rule():
    units = {unit_of(module) for _, module in project_modules()}
    assert units <= set(ALLOWED), f"folders without a place in the layering rule: {sorted(units - set(ALLOWED))}"
    assert set(ALLOWED) <= units, f"the rule names folders that do not exist: {sorted(set(ALLOWED) - units)}"


def test_no_module_imports_against_the_layering_rule():
    found = [v for path, module in project_modules() for v in violations(path.read_text(), module)]
    assert not found, "imports against the layering rule (docs/concepts.md):\n" + "\n".join(found)


@pytest.mark.parametrize(("module", "source", "expected"), [
    # The core importing upwards, lazily inside a function: still found.
    ("pipeline.core.record", "def f():\n    from pipeline.run.runner import curate\n", "pipeline.run.runner"),
    # A stage importing another stage.
    ("stages.metrics", "from stages.clip_score import ClipScore\n", "a stage module may not import another stage"),
    # The product importing the test harness or the command line.
    ("pipeline.run.runner", "import pipeline.testing.faulty\n", "pipeline.testing.faulty"),
    ("pipeline.store.ledger", "from pipeline.cli import main\n", "pipeline.cli.main"),
    # The trainer reaching into the runner.
    ("trainer.train", "from pipeline.run import pools\n", "pipeline.run.pools"),
])
def test_a_planted_violation_is_caught(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0]


def test_allowed_imports_pass():
    assert violations("from pipeline.core.record import Record\nfrom pipeline.models.clip import ClipScorer\n",
                      "stages.metrics") == []
    assert violations("from pipeline.store.shards import ShardSink\nfrom stages import build_flow\n",
                      "pipeline.run.runner") == []


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (lazy imports included; `from a import b` names a.b when
    b is a module)."""
    modules = {module: path for path, module in project_modules()}
    graph = {}
    for module, path in modules.items():
        deps = set()
        for _line, target in imports_of(path.read_text(), module):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
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
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(module_graph()) == []


def test_a_planted_cycle_is_found():
    graph = {"pipeline.run.a": {"pipeline.run.b"}, "pipeline.run.b": {"pipeline.run.c"},
             "pipeline.run.c": {"pipeline.run.a"}, "pipeline.core.d": set()}
    assert cycles(graph) == [["pipeline.run.a", "pipeline.run.b", "pipeline.run.c"]]

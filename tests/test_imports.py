"""The package's import graph: no cycles, no upward imports, a core free of the training stack.

Every ``import`` of an sgexp module counts, at module level or inside a function: an import hidden
in a function still ties the two modules together, it only defers the failure to run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sgexp"

# Lower layers never import higher ones; a module may import its own layer (the cycle test keeps that honest).
LAYERS = [
    ("sgexp.checks", "sgexp.config"),  # validation primitives, the typed config schemas
    ("sgexp.models", "sgexp.diffusion"),  # the core: networks, flow matching, guidance, samplers
    ("sgexp.flops", "sgexp.runs", "sgexp.run_lock", "sgexp.progress"),  # cost model; run dirs; progress display
    ("sgexp.data", "sgexp.vae", "sgexp.weights"),  # datasets; the VAE; fetching pretrained weights
    ("sgexp.eval",),
    ("sgexp.tracking", "sgexp.run_record", "sgexp.slurm"),
    ("sgexp.lit",),  # Lightning glue
    ("sgexp.train", "sgexp.evaluate", "sgexp.convert", "sgexp.sweeps"),  # entry points and sweeps
]
CORE = ("sgexp.models", "sgexp.diffusion", "sgexp.flops")
TRAINING_STACK = ("lightning", "hydra", "mlflow", "optuna", "omegaconf")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, sgexp or not, wherever the import statement is."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            # ``from sgexp.data import shards``: the submodule itself, not only the package.
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def sgexp_imports(name: str) -> set[str]:
    targets = set()
    for target in imports_of(name):
        while target and target not in MODULES:  # ``import sgexp.data.shards as s``, ``from sgexp.x import func``
            target = target.rpartition(".")[0]
        if target and target != name and target != "sgexp":
            targets.add(target)
    return targets


GRAPH = {name: sgexp_imports(name) for name in MODULES}


def layer_of(name: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return level
    return None


def find_cycle() -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None. Depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "sgexp" and layer_of(m) is None] == []


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_imports():
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in GRAPH.items()
        if not name.endswith("__main__") and name != "sgexp"  # command-line entry points may import anything
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_the_cycle_finder_finds_cycles():
    """The search itself, on the real graph plus one edge that closes a loop (flops imports models.dit)."""
    saved = dict(GRAPH)
    try:
        GRAPH["sgexp.models.dit"] = GRAPH["sgexp.models.dit"] | {"sgexp.flops"}  # flops imports models.dit
        cycle = find_cycle()
        assert cycle is not None and "sgexp.flops" in cycle and "sgexp.models.dit" in cycle
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_of_the_training_stack(core):
    """Directly (every import statement of the core's files) and transitively (a fresh interpreter)."""
    direct = {
        f"{name} imports {target}"
        for name in MODULES
        if name == core or name.startswith(core + ".")
        for target in imports_of(name)
        if target.split(".")[0] in TRAINING_STACK
    }
    assert direct == set()
    code = f"import sys, {core}; print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

"""drivers/sim/mujoco imports as a DAG: each module can be read (and loaded) on its own.

A cycle (world -> expert -> world, even one hidden under TYPE_CHECKING or inside a
function) means no module of it can be understood or changed alone, and a lazy import in
the cycle fails at run time the day someone moves it to the top. The graph is read from
every import statement, type-only and lazy ones included.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "drivers.sim.mujoco"
PACKAGE_DIR = ROOT / "drivers" / "sim" / "mujoco"
INIT = "__init__"


def _modules(package_dir: Path) -> list[str]:
    return sorted(p.stem for p in package_dir.glob("*.py"))


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. `from drivers.sim.mujoco import X` is an
    edge to submodule X when X is one, else to the package's __init__ (its facade)."""
    modules = set(_modules(package_dir))
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name in modules:
        tree = ast.parse((package_dir / f"{name}.py").read_text())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level:  # relative: resolve against the package
                    base = PACKAGE if node.level == 1 else ""
                    module = f"{base}.{node.module}" if base else node.module
                else:
                    module = node.module
                if module == PACKAGE:
                    targets = [
                        f"{PACKAGE}.{a.name}" if a.name in modules else PACKAGE for a in node.names
                    ]
                else:
                    targets = [module]
            for target in targets:
                if target == PACKAGE:
                    graph[name].add(INIT)
                elif target.startswith(f"{PACKAGE}."):
                    graph[name].add(target.removeprefix(f"{PACKAGE}.").split(".")[0])
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_mujoco_package_imports_form_a_dag() -> None:
    graph = import_graph()
    assert {"world", "expert", "tasks", "scene"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {PACKAGE}: {' -> '.join(cycle or [])}"
    # The facade imports the modules; no module imports the facade back.
    assert all(INIT not in deps for name, deps in graph.items() if name != INIT)


@pytest.mark.parametrize(
    "sources",
    [
        {
            "a": "from drivers.sim.mujoco.b import B\n",
            "b": "def f():\n    import drivers.sim.mujoco.a\n",
        },
        {
            "a": "from drivers.sim.mujoco import b\n",
            "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
        },
        {
            "__init__": "from drivers.sim.mujoco.a import A\n",
            "a": "from drivers.sim.mujoco import A\n",
        },
    ],
)
def test_the_cycle_check_catches_lazy_and_type_only_cycles(
    sources: dict[str, str], tmp_path: Path
) -> None:
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert find_cycle(import_graph(tmp_path)) is not None


@pytest.mark.parametrize("module", [m for m in _modules(PACKAGE_DIR) if m != INIT])
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}.{module}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_world_offers_everything_its_views_declare() -> None:
    """MujocoWorld satisfies the protocols the tasks and the expert are written against (no
    type checker runs in CI, so the members are checked on a real world here)."""
    from drivers.sim.mujoco.world import MujocoWorld
    from drivers.sim.mujoco.world_view import ExpertWorld, TaskWorld

    world = MujocoWorld(seed=0)
    for view in (TaskWorld, ExpertWorld):
        members = set(view.__annotations__) | {
            n
            for n, v in vars(view).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property))
        }
        missing = sorted(n for n in members if not hasattr(world, n))
        assert missing == [], f"MujocoWorld lacks {view.__name__} members {missing}"
    world.close()

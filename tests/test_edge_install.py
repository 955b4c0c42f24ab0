"""A cell installs only `.[edge]`: the edge (actors/, drivers/ and what they take from
fleet/) must never import Ray, Redis or learner/, and the `fleet` command must work there.

Each check runs in a fresh interpreter whose imports of those modules raise (a meta-path
finder installed through a sitecustomize on PYTHONPATH, so interpreters that `fleet` execs
into carry it too): what passes here runs on an edge-only install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "redis", "learner")

_BLOCKER = f"""
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class _EdgeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"edge-only install: {{name}} is not installed here")
        return None


sys.meta_path.insert(0, _EdgeOnly())
"""

_IMPORT_ALL = (
    f"BLOCKED = {BLOCKED!r}\n"
    + """
import importlib, pkgutil, sys
import actors, drivers
failed = []
for pkg in (actors, drivers):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(mod.name)
        except ImportError as exc:
            # Only the learner side counts; another extra this install lacks (mujoco of
            # .[sim] on an .[edge]-only cell) is not the edge reaching for the centre.
            root = (getattr(exc, "name", None) or "").split(".")[0]
            if "edge-only install" in str(exc) or root in BLOCKED:
                failed.append(f"{mod.name}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
)


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("edge-only")
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_blocker_blocks(edge_env: dict[str, str]) -> None:
    """Without this, every other test here would pass for nothing."""
    for name in BLOCKED:
        got = _run(edge_env, "-c", f"import {name}")
        assert got.returncode != 0 and "edge-only install" in got.stderr, name


def test_every_edge_module_imports_without_ray_redis_or_learner(edge_env) -> None:
    got = _run(edge_env, "-c", _IMPORT_ALL)
    assert got.returncode == 0, f"edge modules that need the learner side:\n{got.stdout}"


def test_fleet_help_and_actor_help_work_on_a_cell(edge_env) -> None:
    top = _run(edge_env, "-m", "fleet.cli", "--help")
    assert top.returncode == 0, top.stderr
    assert "actor" in top.stdout and "doctor" in top.stdout
    actor = _run(edge_env, "-m", "fleet.cli", "actor", "--help")
    assert actor.returncode == 0, actor.stderr
    assert "--cell-config" in actor.stdout


@pytest.mark.parametrize("command", [["status", "--redis-url", "redis://127.0.0.1:1"], ["up"]])
def test_central_commands_say_they_need_the_learner_extra(edge_env, command) -> None:
    got = _run(edge_env, "-m", "fleet.cli", *command)
    assert got.returncode == 2
    assert "Traceback" not in got.stderr
    assert ".[learner]" in got.stderr and "redis" in got.stderr

"""The layering rule of docs/architecture.md, read from every import in the product code.

The edge (actors/, drivers/) must install and run without the learner, Ray or Redis, and
drivers/ must not know what runs above it. A runtime check only sees the modules one test
happens to import; this reads every `import` statement, at module level or inside a
function, so a lazy import cannot slip an edge past it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which of our packages each package may import (docs/architecture.md). fleet/ has two
# roles: fleet.common is what a cell and the centre both use, fleet.control the central
# control plane (Redis registry, rollout, dashboard, `fleet up`); the `fleet` entry point
# (fleet/cli.py) dispatches to both. A file belongs to the longest package naming it.
MAY_IMPORT: dict[str, set[str]] = {
    "protos": set(),
    "drivers": {"protos"},
    "fleet.common": {"protos"},
    "fleet.control": {"fleet.common", "protos"},
    "fleet": {"fleet.common", "fleet.control", "protos"},
    "actors": {"drivers", "fleet.common", "protos"},
    "learner": {"fleet.common", "fleet.control", "protos"},
}
# The folders our product code lives in (each package above is one of them or inside one).
PRODUCT_FOLDERS = ("protos", "drivers", "fleet", "actors", "learner")

# The documented exceptions: (importing file, imported package). Each needs a reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    # The dashboard reads the store (episode browser, disk use) through the store's own code,
    # imported inside the functions that need it (the dashboard runs on the centre).
    ("fleet/control/dashboard/store_reader.py", "learner"): "the dashboard reads the zarr store",
    # `fleet eval --redis-url` resolves versions from and stores results in the registry; it
    # is imported inside main() only when that flag is given, which only the centre does (a
    # cell has no Redis client).
    ("actors/evaluate.py", "fleet.control"): "fleet eval reads and writes the registry",
}


def package_of(module: str) -> str | None:
    """The package of MAY_IMPORT a dotted module belongs to (the longest that names it)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MAY_IMPORT:
            return ".".join(parts[:n])
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every absolute import in a file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _product_files(package: str) -> list[Path]:
    return sorted(
        p
        for p in (ROOT / package).rglob("*.py")
        if "_pb2" not in p.name  # generated stubs
    )


def layering_violations() -> list[str]:
    """Every import that crosses the rule, as 'file:line: imports module'."""
    bad: list[str] = []
    for folder in PRODUCT_FOLDERS:
        for path in _product_files(folder):
            rel = path.relative_to(ROOT).as_posix()
            package = package_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
            assert package is not None, rel
            for line, module in _imports(path):
                target = package_of(module)
                if target is None or target == package or target in MAY_IMPORT[package]:
                    continue
                if (rel, target) in EXCEPTIONS:
                    continue
                bad.append(f"{rel}:{line}: imports {module}")
    return bad


# zarr's private modules (zarr.core.*, or any name starting with "_") change without notice
# between releases; the one module that uses them is pinned to the tested zarr range and
# its bytes layout is checked by tests/test_zarr_layout.py.
ZARR_PRIVATE_ALLOWED = "learner/zarr_direct.py"
# Where our Python lives: the product packages, ops scripts and the tests.
CODE_FOLDERS = (*PRODUCT_FOLDERS, "ops", "tests")


def _is_private_zarr(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "zarr" and (
        (len(parts) > 1 and parts[1] == "core") or any(p.startswith("_") for p in parts[1:])
    )


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for an attribute chain on a plain name, else None."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(names)])


def private_zarr_uses() -> list[str]:
    """Every import of a private zarr module or name (and every `zarr.core...` attribute
    reached from `import zarr`) outside learner/zarr_direct.py, as 'file:line: what'."""
    bad: list[str] = []
    for folder in CODE_FOLDERS:
        for path in _product_files(folder):
            rel = path.relative_to(ROOT).as_posix()
            if rel == ZARR_PRIVATE_ALLOWED:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                found: list[str] = []
                if isinstance(node, ast.Import):
                    found = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                elif isinstance(node, ast.Attribute) and not isinstance(node.value, ast.Attribute):
                    dotted = _dotted(node)
                    found = [dotted] if dotted else []
                hits = [n for n in found if _is_private_zarr(n)]
                if hits:
                    bad.append(f"{rel}:{node.lineno}: {hits[0]}")
    return sorted(set(bad))


def test_no_package_imports_across_the_layering_rule() -> None:
    assert layering_violations() == []


def test_every_exception_is_still_needed() -> None:
    """An exception nobody uses any more is a hole waiting for the next import."""
    for (rel, target), reason in EXCEPTIONS.items():
        used = any(package_of(m) == target for _, m in _imports(ROOT / rel))
        assert used, f"{rel} no longer imports {target} ({reason}): drop the exception"


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("drivers", "from actors.control_loop import ControlLoop\n", "imports actors.control_loop"),
        ("fleet", "def f():\n    import learner.store\n", "imports learner.store"),
        ("actors", "import learner\n", "imports learner"),
        # The edge uses fleet.common, never the control plane (Redis, rollout, dashboard).
        (
            "actors",
            "from fleet.control.registry import Registry\n",
            "imports fleet.control.registry",
        ),
        ("fleet/common", "from fleet.control import rollout\n", "imports fleet.control"),
        ("fleet/common", "import fleet.cli\n", "imports fleet.cli"),
        ("fleet/control", "from fleet.cli import main\n", "imports fleet.cli"),
    ],
)
def test_the_check_catches_a_crossing_import(
    package: str, source: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule is not vacuous: a planted crossing import, even a lazy one, is reported."""
    fake_root = tmp_path
    for name in MAY_IMPORT:
        (fake_root / name.replace(".", "/")).mkdir(parents=True, exist_ok=True)
    (fake_root / package / "planted.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    found = layering_violations()
    assert found == [f"{package}/planted.py:{source.count(chr(10))}: {expected}"]


def test_zarr_private_modules_are_used_in_the_direct_writer_only() -> None:
    assert private_zarr_uses() == []
    # ... and the allowed module does use them (else the exception is stale).
    assert any(m.startswith("zarr.core") for _, m in _imports(ROOT / ZARR_PRIVATE_ALLOWED)), (
        f"{ZARR_PRIVATE_ALLOWED} no longer uses zarr internals: drop the exception"
    )


@pytest.mark.parametrize(
    ("where", "source"),
    [
        ("learner/planted.py", "from zarr.core.sync import sync\n"),
        ("learner/planted.py", "import zarr.core.buffer\n"),
        ("fleet/planted.py", "def f():\n    from zarr.storage import _utils\n"),
        ("tests/planted.py", "import zarr\nx = zarr.core.group.GroupMetadata\n"),
    ],
)
def test_the_zarr_check_catches_a_private_use(
    where: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is not vacuous: a planted private zarr use, lazy or by attribute, is found
    anywhere but in the direct writer."""
    for name in CODE_FOLDERS:
        (tmp_path / name).mkdir()
    (tmp_path / where).write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    line = source.count(chr(10))
    assert [u.rsplit(": ", 1)[0] for u in private_zarr_uses()] == [f"{where}:{line}"]
    (tmp_path / "learner" / "zarr_direct.py").write_text(source)
    (tmp_path / where).unlink()
    assert private_zarr_uses() == []

"""Regenerate the Python stubs from the .proto files.

The stubs are committed so an edge install needs no protoc; tests/test_protos.py fails when
they drift from the .proto sources. Run: python -m protos.generate
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "fleetlearn" / "v1"


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Compile every .proto under protos/fleetlearn/v1 into out_dir; return the files made."""
    from grpc_tools import protoc  # dev-only dependency

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))
    made = out_dir / "protos" / "fleetlearn" / "v1"
    return sorted(p for p in made.iterdir() if "_pb2" in p.name)


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)

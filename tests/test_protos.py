"""The committed stubs must be exactly what grpcio-tools makes of the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    made = generate(tmp_path)
    assert made, "protoc produced no stubs"
    stale = []
    for path in made:
        committed = ROOT / "protos" / "fleetlearn" / "v1" / path.name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(path.name)
    assert not stale, f"regenerate with `python -m protos.generate`: {stale} differ"

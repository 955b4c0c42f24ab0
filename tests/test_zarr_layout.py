"""The store's bytes layout is zarr's own, and does not change without a test failing.

learner/zarr_direct.py writes zarr's files itself (metadata templates from zarr's private
modules, chunk files encoded by hand). A zarr release that changes its defaults or its
encoding would make the store write something zarr no longer writes, or silently push
appends onto the slow path. So a small fixed episode is stored and its files compared:
- with what zarr's public API writes for the same arrays and values (same files, same
  metadata, same chunk bytes), and
- with tests/data/zarr_layout.json, the layout as committed: every file's path, every
  zarr.json (less the commit's timestamps) and every chunk's size and sha256 (of the
  decoded bytes where a chunk is zstd-compressed, which pins the layout, not the zstd
  build).
If a zarr upgrade changes the layout on purpose, check the store against it, then rewrite
the expectation: `python tests/test_zarr_layout.py --write`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.dtype import VariableLengthBytes

from learner import zarr_direct
from learner.chunks import CameraColumn, DecodedChunk
from learner.store import EpisodeRef, EpisodeStore

EXPECTED = Path(__file__).parent / "data" / "zarr_layout.json"
T = 4  # steps per chunk; two chunks make the episode
VOLATILE = ("created_at", "updated_at")  # the commit's wall-clock times


def fixed_chunk(seq: int) -> DecodedChunk:
    """Chunk `seq` of a fixed episode: every value derives from the step number."""
    steps = np.arange(seq * T, seq * T + T)
    last = seq == 1
    return DecodedChunk(
        cell_id="c1",
        episode_id="e1",
        seq=seq,
        first_step=seq * T,
        task="pick",
        policy_version="v0001",
        timestamp=100.0 + steps * 0.05,
        joint_pos=(steps[:, None] + np.arange(14) / 16).astype(np.float32),
        action=-(steps[:, None] + np.arange(14) / 8).astype(np.float32),
        intervention=steps % 3 == 0,
        reward=(steps / 8).astype(np.float32),
        cameras={
            "overhead": CameraColumn(
                "overhead", "jpeg", 2, 3, 3, [b"img" + bytes([s]) * (s + 1) for s in steps]
            ),
            "depth": CameraColumn(
                "depth", "raw", 2, 3, 1, [bytes((s + i) % 7 for i in range(6)) for s in steps]
            ),
        },
        last=last,
        outcome=(
            {"success": True, "reason": "success", "started_at": 100.0, "ended_at": 100.4}
            if last
            else None
        ),
    )


def store_episode(root: Path) -> Path:
    store = EpisodeStore(root)
    for seq in (0, 1):
        store.append(fixed_chunk(seq))
    return root / EpisodeRef("c1", "e1").path


def _zstd_arrays(ep: Path) -> set[str]:
    out = set()
    for meta in ep.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if any(c["name"] == "zstd" for c in doc.get("codecs", [])):
            out.add(meta.parent.relative_to(ep).as_posix())
    return out


def layout(ep: Path, *, decode_zstd: bool) -> dict[str, Any]:
    """Path -> parsed zarr.json (timestamps dropped) or chunk {size, sha256}, for every file
    under an episode group."""
    zstd = _zstd_arrays(ep)
    out: dict[str, Any] = {}
    for path in sorted(p for p in ep.rglob("*") if p.is_file()):
        rel = path.relative_to(ep).as_posix()
        if path.name == "zarr.json":
            doc = json.loads(path.read_text())
            for key in VOLATILE:
                doc.get("attributes", {}).pop(key, None)
            out[rel] = doc
            continue
        data = path.read_bytes()
        if decode_zstd and rel.split("/c/")[0] in zstd:
            data = bytes(Zstd().decode(data))
        out[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def write_with_public_zarr(root: Path, attrs: dict[str, Any]) -> Path:
    """The same episode written through zarr's public API alone, the way the store lays it
    out (capacity-sized arrays, step columns in one uncompressed chunk, frames chunked at
    the upload length, raw frames zstd-compressed)."""
    chunks = [fixed_chunk(0), fixed_chunk(1)]
    n = 2 * T
    top = zarr.open_group(zarr.storage.LocalStore(root), mode="w")
    cell = top.create_group("episodes").create_group("c1")
    group = cell.create_group("e1", attributes=attrs)
    cams = group.create_group("cameras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vlen-bytes has no ratified spec yet
        for name in ("timestamp", "joint_pos", "action", "intervention", "reward"):
            values = np.concatenate([getattr(c, name) for c in chunks])
            arr = group.create_array(
                name,
                shape=(1024, *values.shape[1:]),
                chunks=(1024, *values.shape[1:]),
                dtype=values.dtype,
                compressors=None,
            )
            arr[:n] = values
        for cam in ("depth", "overhead"):
            frames = np.empty(n, dtype=object)
            frames[:] = [f for c in chunks for f in c.cameras[cam].frames]
            arr = cams.create_array(
                cam,
                shape=(1024,),
                chunks=(T,),
                dtype=VariableLengthBytes(),
                compressors="auto" if cam == "depth" else None,
            )
            arr[:n] = frames
    return root / "episodes" / "c1" / "e1"


def test_store_files_match_zarrs_own_output(tmp_path: Path) -> None:
    ours = store_episode(tmp_path / "store")
    attrs = json.loads((ours / "zarr.json").read_text())["attributes"]
    theirs = write_with_public_zarr(tmp_path / "zarr", attrs)
    got, want = layout(ours, decode_zstd=False), layout(theirs, decode_zstd=False)
    assert sorted(got) == sorted(want), "the store writes other files than zarr would"
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs from zarr's own"
    # The cell group above the episode, too.
    assert json.loads((ours.parent / "zarr.json").read_text()) == json.loads(
        (theirs.parent / "zarr.json").read_text()
    )


def test_store_layout_matches_the_committed_expectation(tmp_path: Path) -> None:
    got = layout(store_episode(tmp_path / "store"), decode_zstd=True)
    want = json.loads(EXPECTED.read_text())
    assert sorted(got) == sorted(want), "the set of files an episode writes changed"
    for rel in want:
        assert got[rel] == want[rel], (
            f"{rel} changed; if a zarr upgrade meant it, see this file's docstring"
        )


def test_every_layout_the_store_creates_takes_the_direct_path(tmp_path: Path) -> None:
    """zarr's own templates for the store's arrays stay ones the direct writer can encode;
    otherwise appends would fall back to zarr's slow path without a word."""
    for dtype in ("float64", "float32", "bool"):
        for tail in ((), (14,)):
            meta = zarr_direct.array_template(dtype, tail, 1024, False)
            assert zarr_direct.DirectArray.of(meta, tmp_path) is not None, (dtype, tail)
    for compressed in (False, True):
        meta = zarr_direct.array_template(zarr_direct.VLEN, (), 20, compressed)
        assert zarr_direct.DirectArray.of(meta, tmp_path) is not None, compressed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check or rewrite tests/data/zarr_layout.json.")
    p.add_argument("--write", action="store_true", help="rewrite the committed expectation")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        got = layout(store_episode(Path(tmp) / "store"), decode_zstd=True)
    if args.write:
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {EXPECTED} ({len(got)} files)")
        return 0
    same = got == json.loads(EXPECTED.read_text())
    print("layout unchanged" if same else "layout CHANGED")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""`fleet export --format lerobot` and `fleet episode --rerun`, read back against the store.

A dataset is only useful if other tools read it and it says what the store says: the
parquet and mp4 files open, each episode's rows and frames sit exactly where the metadata
says, and incomplete episodes stay out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import simplejpeg

from learner.chunks import CameraColumn, DecodedChunk
from learner.store import EpisodeStore
from tests.expert_episodes import CAMERAS, record_expert_episodes

REPO = Path(__file__).resolve().parents[1]


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `fleet` command line (it hands over to `python -m learner.export`)."""
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "store"
    store = EpisodeStore(root)
    record_expert_episodes(store, task="touch_target", episodes=2, seed=1, max_steps=60)
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=2, max_steps=60)
    # An episode still in flight: its last chunk never arrived, so it must not be exported.
    frame = simplejpeg.encode_jpeg(np.zeros((96, 128, 3), np.uint8), colorspace="RGB")
    store.append(
        DecodedChunk(
            cell_id="cell-u",
            episode_id="ep-partial",
            seq=0,
            first_step=0,
            task="pick_cube",
            policy_version="v1",
            timestamp=np.arange(5, dtype=np.float64) * 0.05,
            joint_pos=np.zeros((5, 14), np.float32),
            action=np.zeros((5, 14), np.float32),
            intervention=np.zeros(5, bool),
            reward=np.zeros(5, np.float32),
            cameras={c: CameraColumn(c, "jpeg", 96, 128, 3, [frame] * 5) for c in CAMERAS},
            last=False,
            outcome=None,
        )
    )
    return root


@pytest.fixture(scope="module")
def dataset(store_root: Path) -> Path:
    out = store_root.parent / "lerobot"
    done = _fleet("export", "--format", "lerobot", "--store", str(store_root), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_metadata_describes_the_complete_episodes(store_root: Path, dataset: Path) -> None:
    store = EpisodeStore(store_root)
    refs = store.episodes()
    assert len(refs) == 3 and all(r.cell_id == "cell-t" for r in refs)
    lengths = [store.read_episode(r, frames=False).joint_pos.shape[0] for r in refs]
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(lengths)
    assert info["fps"] == 20 and info["total_tasks"] == 2
    for cam in CAMERAS:
        assert info["features"][f"observation.images.{cam}"]["shape"] == [96, 128, 3]
    tasks = pd.read_parquet(dataset / "meta" / "tasks.parquet")
    assert sorted(tasks.index) == ["pick_cube", "touch_target"]
    stats = json.loads((dataset / "meta" / "stats.json").read_text())
    assert stats["observation.state"]["count"] == [sum(lengths)]
    assert np.asarray(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)

    episodes = pq.read_table(dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    eps = episodes.to_pylist()
    assert [e["length"] for e in eps] == lengths
    assert [e["fleet/episode_id"] for e in eps] == [r.episode_id for r in refs]
    starts = np.cumsum([0, *lengths])
    assert [e["dataset_from_index"] for e in eps] == starts[:-1].tolist()
    assert [e["dataset_to_index"] for e in eps] == starts[1:].tolist()


def test_data_rows_match_the_store_episode_by_episode(store_root: Path, dataset: Path) -> None:
    store = EpisodeStore(store_root)
    data = pq.read_table(dataset / "data" / "chunk-000" / "file-000.parquet").to_pandas()
    eps = pq.read_table(dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    tasks = pd.read_parquet(dataset / "meta" / "tasks.parquet")
    for e, ref in zip(eps.to_pylist(), store.episodes(), strict=True):
        ep = store.read_episode(ref, frames=False)
        rows = data.iloc[e["dataset_from_index"] : e["dataset_to_index"]]
        assert (rows["episode_index"] == e["episode_index"]).all()
        assert rows["frame_index"].tolist() == list(range(len(ep.joint_pos)))
        np.testing.assert_array_equal(np.stack(rows["observation.state"]), ep.joint_pos)
        np.testing.assert_array_equal(np.stack(rows["action"]), ep.action)
        assert rows["next.done"].tolist()[-1] and not any(rows["next.done"].tolist()[:-1])
        assert (rows["task_index"] == tasks.loc[ep.attrs["task"], "task_index"]).all()
    assert data["index"].tolist() == list(range(len(data)))


def test_videos_hold_each_episodes_frames_in_its_time_window(
    store_root: Path, dataset: Path
) -> None:
    store = EpisodeStore(store_root)
    eps = pq.read_table(dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    for cam in CAMERAS:
        key = f"observation.images.{cam}"
        path = dataset / "videos" / key / "chunk-000" / "file-000.mp4"
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            decoded = [
                (float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)
            ]
        assert len(decoded) == sum(e["length"] for e in eps.to_pylist())
        for e, ref in zip(eps.to_pylist(), store.episodes(), strict=True):
            lo, hi = e[f"videos/{key}/from_timestamp"], e[f"videos/{key}/to_timestamp"]
            window = [img for t, img in decoded if lo - 1e-3 <= t < hi - 1e-3]
            assert len(window) == e["length"]
            stored = store.read_episode(ref).frames[cam]
            for i in (0, len(window) - 1):  # first and last frame are this episode's
                want = simplejpeg.decode_jpeg(stored[i], colorspace="RGB").astype(np.int16)
                assert np.abs(window[i].astype(np.int16) - want).mean() < 8.0


def test_export_refuses_a_non_empty_directory(store_root: Path, dataset: Path) -> None:
    again = _fleet(
        "export", "--format", "lerobot", "--store", str(store_root), "--out", str(dataset)
    )
    assert again.returncode == 1 and "not empty" in again.stderr


def test_rerun_readers_open_the_episode_and_the_dataset(
    store_root: Path, dataset: Path, tmp_path: Path
) -> None:
    pytest.importorskip("rerun", reason="rerun-sdk is the optional .[rerun] extra")
    from rerun.chunk import RrdReader
    from rerun.experimental import LeRobotReader

    store = EpisodeStore(store_root)
    ref = store.episodes()[1]
    n = store.read_episode(ref, frames=False).joint_pos.shape[0]
    out = tmp_path / "ep.rrd"
    done = _fleet(
        "episode", ref.episode_id, "--rerun", "--store", str(store_root), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    reader = RrdReader(out)
    (rec,) = reader.recordings()
    assert rec.recording_id == f"{ref.cell_id}/{ref.episode_id}"
    rows: dict[str, int] = {}
    for chunk in reader.stream():
        rows[chunk.entity_path] = rows.get(chunk.entity_path, 0) + chunk.num_rows
    for entity in ("/cameras/front", "/cameras/overhead", "/joints/state/left_waist", "/reward"):
        assert rows[entity] == n
    missing = _fleet(
        "episode", "no-such-episode", "--rerun", "--store", str(store_root), "--out", str(out)
    )
    assert missing.returncode == 1

    # Rerun's own LeRobot v3 reader takes the dataset as is and cuts every episode's video
    # window without an ffmpeg transcode (no B-frames, a key frame at each episode start).
    lerobot = LeRobotReader(dataset)
    assert lerobot.version == "v3" and lerobot.episodes() == [0, 1, 2]
    for e in lerobot.episodes():
        paths = {c.entity_path for c in lerobot.stream(e)}
        assert "/observation.images.front" in paths and "/observation.state" in paths

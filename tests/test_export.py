"""`fleet export --format lerobot` and `fleet episode --rerun`, read back against the store.

A dataset is only useful if other tools read it and it says what the store says: the
parquet and mp4 files open, each episode's rows and frames sit exactly where the metadata
says, and incomplete episodes stay out.
"""

from __future__ import annotations

import itertools
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


# -- the store the default fleet writes: colour plus exact depth, against LeRobot's v3 schema --

DEPTH_H, DEPTH_W = 48, 64
STATS = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")


def _depth_episode(store: EpisodeStore, episode: str, n: int, seed: int) -> None:
    """One complete episode with a JPEG colour camera and its zstd16 depth column, in two
    chunks, with a takeover in the middle."""
    from actors.recorder import encode_depth

    rng = np.random.default_rng(seed)
    flags = np.zeros(n, bool)
    flags[n // 3 : n // 2] = True
    for seq, (lo, hi) in enumerate(((0, n // 2), (n // 2, n))):
        k = hi - lo
        colour = [
            simplejpeg.encode_jpeg(
                np.full((DEPTH_H, DEPTH_W, 3), (i * 7) % 256, np.uint8), colorspace="RGB"
            )
            for i in range(lo, hi)
        ]
        depth = []
        for _ in range(k):
            d = rng.integers(250, 3000, (DEPTH_H, DEPTH_W)).astype(np.uint16)
            d[:4, :4] = 0  # no reading
            depth.append(encode_depth(d))
        store.append(
            DecodedChunk(
                cell_id="cell-d",
                episode_id=episode,
                seq=seq,
                first_step=lo,
                task="pick_cube",
                policy_version="v0007",
                timestamp=np.arange(lo, hi, dtype=np.float64) * 0.05,
                joint_pos=rng.normal(size=(k, 14)).astype(np.float32),
                action=rng.normal(size=(k, 14)).astype(np.float32),
                intervention=flags[lo:hi],
                reward=(np.arange(lo, hi) == n - 1).astype(np.float32),
                cameras={
                    "overhead": CameraColumn("overhead", "jpeg", DEPTH_H, DEPTH_W, 3, colour),
                    "overhead_depth": CameraColumn(
                        "overhead_depth", "zstd16", DEPTH_H, DEPTH_W, 1, depth
                    ),
                },
                last=seq == 1,
                outcome={"success": True, "reason": "", "started_at": 0.0, "ended_at": n * 0.05}
                if seq == 1
                else None,
            )
        )


@pytest.fixture(scope="module")
def depth_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("depth") / "store"
    store = EpisodeStore(root)
    for i, n in enumerate((24, 30, 18)):
        _depth_episode(store, f"ep-{i}", n, seed=i)
    return root


@pytest.fixture(scope="module")
def depth_dataset(depth_store: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = depth_store.parent / "lerobot"
    done = _fleet("export", "--format", "lerobot", "--store", str(depth_store), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done


def test_export_with_depth_matches_lerobots_v3_schema(depth_dataset) -> None:
    """LeRobot v3.0 as documented: info.json fields and path templates, every feature with
    dtype/shape/names, the data file holding exactly the non-video features, the episodes
    file holding the index, video and stats columns, stats.json with quantiles for all."""
    dataset, _ = depth_dataset
    info = json.loads((dataset / "meta" / "info.json").read_text())
    for key in (
        "codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks",
        "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits",
        "data_path", "video_path", "features",
    ):  # fmt: skip
        assert key in info, key
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == (
        "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    )
    features = info["features"]
    for name, ft in features.items():
        assert {"dtype", "shape", "names"} <= set(ft), name
    colour = features["observation.images.overhead"]
    depth = features["observation.images.overhead_depth"]
    assert colour["shape"] == [DEPTH_H, DEPTH_W, 3] and colour["info"]["is_depth_map"] is False
    # Depth as LeRobot writes depth maps: one channel, 12-bit HEVC, flagged, with its
    # quantisation parameters; never JPEG, never the old `video.is_depth_map` key.
    assert depth["dtype"] == "video" and depth["shape"] == [DEPTH_H, DEPTH_W, 1]
    d = depth["info"]
    assert d["is_depth_map"] is True and d["depth_unit"] == "mm"
    assert (d["video.codec"], d["video.pix_fmt"]) == ("hevc", "gray12le")
    assert (d["video.depth_min"], d["video.depth_max"], d["video.shift"], d["video.use_log"]) == (
        0.01,
        10.0,
        3.5,
        True,
    )
    assert all("video.is_depth_map" not in ft.get("info", {}) for ft in features.values())

    data = pq.read_table(dataset / "data" / "chunk-000" / "file-000.parquet")
    non_video = {k for k, ft in features.items() if ft["dtype"] != "video"}
    assert set(data.column_names) == non_video
    assert data.num_rows == info["total_frames"] == 24 + 30 + 18

    eps = pq.read_table(dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    columns = set(eps.column_names)
    for key in (
        "episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
        "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
        "meta/episodes/file_index",
    ):  # fmt: skip
        assert key in columns, key
    for cam in ("overhead", "overhead_depth"):
        for part in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            assert f"videos/observation.images.{cam}/{part}" in columns
    stats = json.loads((dataset / "meta" / "stats.json").read_text())
    for name in features:
        assert set(STATS) <= set(stats[name]), f"stats.json lacks some stats of {name}"
        for stat in STATS:
            assert f"stats/{name}/{stat}" in columns, f"episode stats lack {name}/{stat}"
        q = [np.asarray(stats[name][k], dtype=float) for k in ("q01", "q10", "q50", "q90", "q99")]
        assert all((a <= b + 1e-9).all() for a, b in itertools.pairwise(q)), name
        lo, hi = np.asarray(stats[name]["min"]), np.asarray(stats[name]["max"])
        assert (lo <= q[0] + 1e-9).all() and (q[-1] <= hi + 1e-9).all(), name
    # The flags a learner needs (rewards, episode ends, operator steps) are described too.
    assert stats["intervention"]["mean"][0] == pytest.approx(
        float(np.mean(data.column("intervention").to_numpy(zero_copy_only=False)))
    )
    assert stats["next.done"]["max"] == [1.0] and stats["next.reward"]["count"] == [72]
    assert np.asarray(stats["observation.images.overhead_depth"]["mean"]).shape == (1, 1, 1)


def test_depth_video_holds_the_stored_depth_losslessly_coded(depth_store, depth_dataset) -> None:
    from learner.export.lerobot import dequantize_depth, quantize_depth

    dataset, _ = depth_dataset
    store = EpisodeStore(depth_store)
    path = dataset / "videos" / "observation.images.overhead_depth" / "chunk-000" / "file-000.mp4"
    with av.open(str(path)) as container:
        codes = [f.to_ndarray() for f in container.decode(video=0)]
    stored = []
    for ref in store.episodes():
        ep = store.read_episode(ref)
        stored += [_unzstd(f) for f in ep.frames["overhead_depth"]]
    assert len(codes) == len(stored) == 72
    for got, want in zip(codes, stored, strict=True):
        np.testing.assert_array_equal(got, quantize_depth(want))  # the video adds no loss
        mm = dequantize_depth(got)
        valid = want > 0
        # 12-bit log codes: a fraction of a millimetre to 2 mm over a cell's working range.
        assert np.abs(mm[valid] - want[valid]).max() < 2.5


def test_lerobot_roundtrip_trains_act_on_state_and_colour_only(depth_dataset) -> None:
    """LeRobot's ACT runs every visual input through a 3-channel ResNet; a depth map (one
    channel, as LeRobot stores it) given to it fails its first training step. roundtrip.sh
    names ACT's inputs with act_features.py: the state and the colour cameras, channel-first."""
    dataset, _ = depth_dataset
    done = subprocess.run(
        [sys.executable, str(REPO / "ops" / "lerobot" / "act_features.py"), str(dataset)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    inputs = json.loads(done.stdout)
    assert inputs == {
        "observation.state": {"type": "STATE", "shape": [14]},
        "observation.images.overhead": {"type": "VISUAL", "shape": [3, DEPTH_H, DEPTH_W]},
    }
    script = (REPO / "ops" / "lerobot" / "roundtrip.sh").read_text()
    assert '--policy.input_features="$inputs"' in script


def test_act_features_refuses_a_dataset_act_cannot_train_on() -> None:
    from ops.lerobot.act_features import act_input_features

    depth_only = {
        "observation.state": {"dtype": "float32", "shape": [14]},
        "observation.images.wrist_depth": {
            "dtype": "video",
            "shape": [8, 8, 1],
            "info": {"is_depth_map": True},
        },
    }
    with pytest.raises(ValueError, match="no colour camera"):
        act_input_features({"features": depth_only})
    with pytest.raises(ValueError, match=r"observation\.state"):
        act_input_features({"features": {}})


def test_roundtrip_checks_the_frames_the_export_took_its_image_stats_from() -> None:
    """check_dataset.py (in LeRobot's venv) compares LeRobot's frames with the exported
    per-episode image stats, so it must pick the very frames the exporter sampled."""
    from learner.export import lerobot
    from ops.lerobot import check_dataset

    assert check_dataset.IMAGE_STATS_SAMPLES == lerobot.IMAGE_STATS_SAMPLES
    for n in range(1, 200):
        k = min(n, lerobot.IMAGE_STATS_SAMPLES)
        want = sorted({int(i) for i in np.linspace(0, n - 1, k).astype(int)})
        assert check_dataset._picks(n) == want, n


def _unzstd(frame: bytes) -> np.ndarray:
    from actors.recorder import decode_depth

    return decode_depth(frame, DEPTH_H, DEPTH_W)


def test_export_draws_a_progress_bar(depth_dataset) -> None:
    _, done = depth_dataset
    assert "export" in done.stderr and "3/3" in done.stderr
    assert "3 episodes" in done.stdout


def test_failed_export_leaves_nothing_and_a_rerun_resumes(
    depth_store: Path, depth_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learner.export import lerobot

    out = tmp_path / "resumed"
    real = lerobot._write_segment
    calls = []

    def crash_on_second(seg_dir, ep, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(ep.ref)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(seg_dir, ep, *args, **kwargs)

    monkeypatch.setattr(lerobot, "_write_segment", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        lerobot.export_lerobot(depth_store, out)
    assert not out.exists(), "a failed export must leave nothing at --out"
    monkeypatch.setattr(lerobot, "_write_segment", real)
    result = lerobot.export_lerobot(depth_store, out)
    assert result.resumed == 1 and result.episodes == 3
    assert not (tmp_path / "resumed.partial").exists()
    fresh, _ = depth_dataset
    for rel in ("data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet"):
        assert pq.read_table(out / rel).equals(pq.read_table(fresh / rel)), rel
    assert (out / "meta" / "stats.json").read_text() == (fresh / "meta" / "stats.json").read_text()

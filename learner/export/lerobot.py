"""Write stored episodes as a LeRobotDataset v3.0, for the Hugging Face tooling labs use.

Layout (codebase_version "v3.0"): many episodes per file, located through the episodes
metadata rather than one file per episode:

    meta/info.json                 features, fps, path templates, totals
    meta/stats.json                per-feature min/max/mean/std/count
    meta/tasks.parquet             task string (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: length, row range in
                                   the data file, time range in each camera's video, stats
    data/chunk-000/file-000.parquet            one row per frame
    videos/observation.images.<cam>/chunk-000/file-000.mp4   all episodes back to back

Only complete episodes are exported (a truncated one is not a demonstration). Frames are
re-encoded from the store's JPEGs to H.264 (yuv420p) at the control rate, so frame i of an
episode sits at `from_timestamp + i / fps` in its camera's video.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg

from learner.store import EpisodeData, EpisodeRef, EpisodeStore
from protos.joint_layout import JOINT_DIM, JOINT_NAMES

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
DEFAULT_FPS = 20
CODEC = "libx264"
PIX_FMT = "yuv420p"
IMAGE_STATS_SAMPLES = 32  # frames per episode and camera sampled for image stats


def image_key(camera: str) -> str:
    return f"observation.images.{camera}"


@dataclass
class ExportResult:
    out: Path
    episodes: int
    frames: int
    cameras: tuple[str, ...]
    fps: int
    skipped: list[str] = field(default_factory=list)


def export_lerobot(
    store_root: Path | str,
    out: Path | str,
    *,
    fps: int | None = None,
    cells: Sequence[str] | None = None,
    robot_type: str = "aloha",
) -> ExportResult:
    """Export every complete episode in the store (optionally only some cells) to `out`."""
    store = EpisodeStore(store_root)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a fresh directory")
    refs = [r for r in store.episodes() if cells is None or r.cell_id in cells]
    if not refs:
        raise ValueError(f"no complete episodes in {store_root}")
    first = store.read_episode(refs[0], frames=False)
    cameras = tuple(sorted(first.attrs.get("cameras", {})))
    fps = fps or _guess_fps(first.timestamp)
    shapes = {c: _shape(first.attrs["cameras"][c]) for c in cameras}

    tasks: dict[str, int] = {}
    writers = {c: _VideoWriter(out / _video_rel(c), fps, shapes[c]) for c in cameras}
    data_tables: list[pa.Table] = []
    episode_rows: list[dict[str, Any]] = []
    collected: dict[str, list[np.ndarray]] = {"observation.state": [], "action": []}
    image_samples: dict[str, list[np.ndarray]] = {c: [] for c in cameras}
    skipped: list[str] = []
    index = 0
    try:
        for ref in refs:
            ep = store.read_episode(ref, frames=True)
            if tuple(sorted(ep.frames)) != cameras or any(
                _shape(ep.attrs["cameras"][c]) != shapes[c] for c in cameras
            ):
                log.warning(
                    "cell %s episode %s: cameras differ from the dataset's; skipped",
                    ref.cell_id,
                    ref.episode_id,
                )
                skipped.append(f"{ref.cell_id}/{ref.episode_id}")
                continue
            e = len(episode_rows)
            n = int(ep.joint_pos.shape[0])
            task = str(ep.attrs.get("task", ""))
            task_index = tasks.setdefault(task, len(tasks))
            row: dict[str, Any] = {
                "episode_index": e,
                "tasks": [task],
                "length": n,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": index,
                "dataset_to_index": index + n,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
                # Where the frames came from, so an exported episode can be traced back.
                "fleet/cell_id": ref.cell_id,
                "fleet/episode_id": ref.episode_id,
                "fleet/policy_version": str(ep.attrs.get("policy_version") or ""),
                "fleet/success": bool((ep.attrs.get("outcome") or {}).get("success", False)),
            }
            for cam in cameras:
                start = writers[cam].frames / fps
                frames = [_decode(f) for f in ep.frames[cam]]
                writers[cam].write(frames)
                key = image_key(cam)
                row[f"videos/{key}/chunk_index"] = 0
                row[f"videos/{key}/file_index"] = 0
                row[f"videos/{key}/from_timestamp"] = start
                row[f"videos/{key}/to_timestamp"] = start + n / fps
                picks = np.linspace(0, n - 1, min(n, IMAGE_STATS_SAMPLES)).astype(int)
                sample = np.stack([frames[i] for i in picks]) if n else np.zeros((0, 1, 1, 3))
                image_samples[cam].append(sample)
                row.update(_flat_stats(key, _image_stats(sample)))
            data_tables.append(_episode_table(ep, e, index, task_index, fps))
            row.update(_flat_stats("observation.state", _stats(ep.joint_pos)))
            row.update(_flat_stats("action", _stats(ep.action)))
            collected["observation.state"].append(ep.joint_pos)
            collected["action"].append(ep.action)
            episode_rows.append(row)
            index += n
    finally:
        for w in writers.values():
            w.close()

    (out / DATA_PATH.format(chunk_index=0, file_index=0)).parent.mkdir(parents=True, exist_ok=True)
    data = pa.concat_tables(data_tables)
    pq.write_table(data, out / DATA_PATH.format(chunk_index=0, file_index=0))
    (out / EPISODES_PATH).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), out / EPISODES_PATH)
    task_frame = pd.DataFrame(
        {"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")
    )
    task_frame.to_parquet(out / "meta" / "tasks.parquet")

    stats: dict[str, Any] = {k: _stats(np.concatenate(v)) for k, v in collected.items()}
    for cam in cameras:
        stats[image_key(cam)] = _image_stats(np.concatenate(image_samples[cam]))
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        stats[name] = _stats(data.column(name).to_numpy().reshape(-1, 1))
    (out / "meta" / "stats.json").write_text(json.dumps(_jsonable(stats), indent=2))
    info = _info(len(episode_rows), index, len(tasks), fps, cameras, shapes, robot_type)
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    log.info(
        "exported %d episodes (%d frames, cameras %s) from %s to %s as LeRobot %s",
        len(episode_rows),
        index,
        ",".join(cameras),
        store_root,
        out,
        CODEBASE_VERSION,
    )
    return ExportResult(out, len(episode_rows), index, cameras, fps, skipped)


def _episode_table(
    ep: EpisodeData, episode_index: int, start: int, task_index: int, fps: int
) -> pa.Table:
    n = int(ep.joint_pos.shape[0])
    frame_index = np.arange(n, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    if n:
        done[-1] = True
    return pa.table(
        {
            "observation.state": _fixed_list(ep.joint_pos.astype(np.float32)),
            "action": _fixed_list(ep.action.astype(np.float32)),
            "timestamp": pa.array((frame_index / fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.full(n, episode_index, dtype=np.int64)),
            "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, task_index, dtype=np.int64)),
            "next.reward": pa.array(ep.reward.astype(np.float32)),
            "next.done": pa.array(done),
            "intervention": pa.array(ep.intervention.astype(bool)),
        }
    )


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _info(
    episodes: int,
    frames: int,
    tasks: int,
    fps: int,
    cameras: Sequence[str],
    shapes: dict[str, tuple[int, int, int]],
    robot_type: str,
) -> dict[str, Any]:
    scalar = {"shape": [1], "names": None}
    features: dict[str, Any] = {
        "observation.state": {
            "dtype": "float32",
            "shape": [JOINT_DIM],
            "names": list(JOINT_NAMES),
        },
        "action": {"dtype": "float32", "shape": [JOINT_DIM], "names": list(JOINT_NAMES)},
    }
    for cam in cameras:
        h, w, c = shapes[cam]
        features[image_key(cam)] = {
            "dtype": "video",
            "shape": [h, w, c],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": h,
                "video.width": w,
                "video.codec": "h264",
                "video.pix_fmt": PIX_FMT,
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": c,
                "has_audio": False,
            },
        }
    features.update(
        {
            "timestamp": {"dtype": "float32", **scalar},
            "frame_index": {"dtype": "int64", **scalar},
            "episode_index": {"dtype": "int64", **scalar},
            "index": {"dtype": "int64", **scalar},
            "task_index": {"dtype": "int64", **scalar},
            "next.reward": {"dtype": "float32", **scalar},
            "next.done": {"dtype": "bool", **scalar},
            "intervention": {"dtype": "bool", **scalar},
        }
    )
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": episodes,
        "total_frames": frames,
        "total_tasks": tasks,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps,
        "splits": {"train": f"0:{episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": features,
    }


class _VideoWriter:
    """One camera's mp4: H.264, constant frame rate, frames appended episode after episode."""

    def __init__(self, path: Path, fps: int, shape: tuple[int, int, int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(CODEC, rate=fps)
        self.stream.height, self.stream.width = shape[0], shape[1]
        self.stream.pix_fmt = PIX_FMT
        # No B-frames and an IDR frame at every episode start: a reader can cut any
        # episode's window out of the shared file without re-encoding (Rerun's LeRobot reader
        # needs exactly that), and a key frame every 2 s keeps seeking cheap.
        self.stream.options = {"g": str(2 * fps), "bf": "0", "forced-idr": "1", "crf": "23"}
        self.frames = 0

    def write(self, frames: Sequence[np.ndarray]) -> None:
        """Append one episode's frames; its first frame becomes a key frame."""
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I
            frame.pts = self.frames
            self.frames += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _video_rel(camera: str) -> str:
    return VIDEO_PATH.format(video_key=image_key(camera), chunk_index=0, file_index=0)


def _decode(jpeg: bytes) -> np.ndarray:
    return np.ascontiguousarray(simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))


def _shape(cam: dict[str, Any]) -> tuple[int, int, int]:
    return int(cam["height"]), int(cam["width"]), int(cam.get("channels", 3) or 3)


def _guess_fps(timestamp: np.ndarray) -> int:
    """The control rate the episode was recorded at (median step), else DEFAULT_FPS."""
    if timestamp.shape[0] < 2:
        return DEFAULT_FPS
    step = float(np.median(np.diff(timestamp)))
    return max(1, round(1.0 / step)) if step > 0 else DEFAULT_FPS


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64).reshape(x.shape[0], -1)
    if x.shape[0] == 0:
        z = np.zeros(x.shape[1])
        return {"min": z, "max": z, "mean": z, "std": z, "count": np.array([0])}
    return {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "count": np.array([x.shape[0]]),
    }


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of images in [0, 1], shaped (C, 1, 1) as LeRobot keeps them."""
    px = frames.reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    out = {k: v.reshape(-1, 1, 1) for k, v in _stats(px).items() if k != "count"}
    out["count"] = np.array([frames.shape[0]])
    return out


def _flat_stats(key: str, stats: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Episode stats as `stats/<feature>/<stat>` columns, nested lists keeping the shape."""
    return {f"stats/{key}/{k}": np.asarray(v).tolist() for k, v in stats.items()}


def _jsonable(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def episode_refs(store_root: Path | str) -> list[EpisodeRef]:
    """The episodes an export of this store would hold, in dataset order."""
    return EpisodeStore(store_root).episodes()

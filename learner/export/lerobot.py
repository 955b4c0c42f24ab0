"""Write stored episodes as a LeRobotDataset v3.0, for the Hugging Face tooling labs use.

Layout (codebase_version "v3.0"): many episodes per file, located through the episodes
metadata rather than one file per episode:

    meta/info.json                 features, fps, path templates, totals
    meta/stats.json                per feature: min, max, mean, std, count and the quantiles
                                   q01, q10, q50, q90, q99 (quantile normalisation needs them)
    meta/tasks.parquet             task string (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: length, row range in
                                   the data file, time range in each camera's video, and
                                   `stats/<feature>/<stat>` for every feature
    data/chunk-000/file-000.parquet            one row per frame
    videos/observation.images.<cam>/chunk-000/file-000.mp4   all episodes back to back

Colour cameras are re-encoded from the store's JPEGs to H.264 (yuv420p). Depth cameras
(`<cam>_depth`, stored exactly as zstd or PNG 16-bit millimetres) are written the way
LeRobot writes depth maps: one channel of 12-bit codes, log-quantised between
`depth_min` and `depth_max` metres, in a *lossless* HEVC gray12le video whose feature says
`"is_depth_map": true` with the quantisation parameters, so LeRobot's reader turns the codes
back into millimetres. Frame i of an episode sits at `from_timestamp + i / fps`.

The export is atomic and resumable: episodes are encoded one by one into
`<out>.partial/segments/` (each finished segment is kept), then joined into
`<out>.partial/dataset/` and renamed to `<out>` at the very end. A failed or interrupted
export leaves nothing at `<out>`; running the same command again picks up after the last
finished episode. Only complete episodes are exported (a truncated one is not a
demonstration).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
from numcodecs import Zstd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}

# Depth maps as LeRobot stores them (its DepthEncoderConfig defaults): 12-bit codes, log
# quantised over [DEPTH_MIN_M, DEPTH_MAX_M] metres with DEPTH_SHIFT_M, in a 12-bit video.
DEPTH_CODEC = "libx265"
DEPTH_PIX_FMT = "gray12le"
DEPTH_QMAX = 4095
DEPTH_MIN_M = 0.01
DEPTH_MAX_M = 10.0
DEPTH_SHIFT_M = 3.5
DEPTH_ENCODINGS = ("zstd16", "png16")
PARTIAL_SUFFIX = ".partial"
_REQUEST_FILE = "request.json"


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
    resumed: int = 0  # episodes a previous, unfinished run had already encoded


@dataclass(frozen=True)
class _Camera:
    name: str
    height: int
    width: int
    channels: int
    depth: bool

    @classmethod
    def of(cls, name: str, attrs: dict[str, Any]) -> _Camera:
        encoding = str(attrs.get("encoding", "jpeg"))
        depth = encoding in DEPTH_ENCODINGS
        channels = 1 if depth else int(attrs.get("channels", 3) or 3)
        return cls(name, int(attrs["height"]), int(attrs["width"]), channels, depth)

    @property
    def shape(self) -> list[int]:
        return [self.height, self.width, self.channels]


def export_lerobot(
    store_root: Path | str,
    out: Path | str,
    *,
    fps: int | None = None,
    cells: Sequence[str] | None = None,
    robot_type: str = "aloha",
    progress: bool = False,
) -> ExportResult:
    """Export every complete episode in the store (optionally only some cells) to `out`.

    `progress` draws a rich progress bar (one step per episode)."""
    store = EpisodeStore(store_root)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty; export into a fresh directory")
    work = out.with_name(out.name + PARTIAL_SUFFIX)
    request = _request(store, store_root, fps, cells, robot_type)
    refs = _resume_or_start(work, request)
    if not refs:
        raise ValueError(f"no complete episodes in {store_root}")
    first = store.read_episode(refs[0], frames=False)
    cameras = tuple(_Camera.of(n, a) for n, a in sorted(first.attrs.get("cameras", {}).items()))
    fps = fps or _guess_fps(first.timestamp)

    segments: list[dict[str, Any]] = []
    skipped: list[str] = []
    resumed = 0
    with _progress_bar(progress, len(refs)) as advance:
        for ref in refs:
            seg_dir = work / "segments" / f"{len(segments):06d}"
            done = _read_json(seg_dir / "done.json")
            if done is not None and done["ref"] == [ref.cell_id, ref.episode_id]:
                segments.append(done)
                resumed += 1
                advance(ref)
                continue
            ep = store.read_episode(ref, frames=True)
            if _cameras_of(ep) != cameras:
                log.warning(
                    "cell %s episode %s: cameras differ from the dataset's; skipped",
                    ref.cell_id,
                    ref.episode_id,
                )
                skipped.append(f"{ref.cell_id}/{ref.episode_id}")
                advance(ref)
                continue
            segments.append(_write_segment(seg_dir, ep, len(segments), cameras, fps))
            advance(ref)
    if not segments:
        raise ValueError(f"no episode in {store_root} has the cameras {[c.name for c in cameras]}")
    staged = work / "dataset"
    if staged.exists():
        shutil.rmtree(staged)  # an assembly that did not finish: redo it from the segments
    frames = _assemble(staged, work / "segments", segments, cameras, fps, robot_type)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(staged, out)
    shutil.rmtree(work)
    log.info(
        "exported %d episodes (%d frames, cameras %s, %d resumed) from %s to %s as LeRobot %s",
        len(segments),
        frames,
        ",".join(c.name for c in cameras),
        resumed,
        store_root,
        out,
        CODEBASE_VERSION,
    )
    names = tuple(c.name for c in cameras)
    return ExportResult(out, len(segments), frames, names, fps, skipped, resumed)


# -- work directory: what is being exported, and what is done -------------------------------


def _request(
    store: EpisodeStore,
    store_root: Path | str,
    fps: int | None,
    cells: Sequence[str] | None,
    robot_type: str,
) -> dict[str, Any]:
    refs = [r for r in store.episodes() if cells is None or r.cell_id in cells]
    return {
        "store": str(Path(store_root).resolve()),
        "fps": fps,
        "cells": sorted(cells) if cells is not None else None,
        "robot_type": robot_type,
        "episodes": [[r.cell_id, r.episode_id] for r in refs],
    }


def _resume_or_start(work: Path, request: dict[str, Any]) -> list[EpisodeRef]:
    """The episodes to export: a previous unfinished run's list when its request matches
    (episodes stored since then wait for the next export), else a fresh work directory."""
    previous = _read_json(work / _REQUEST_FILE)
    if previous is not None:
        same = all(previous.get(k) == request[k] for k in ("store", "fps", "cells", "robot_type"))
        if not same:
            raise FileExistsError(
                f"{work} holds an unfinished export with other options "
                f"({ {k: previous.get(k) for k in ('store', 'fps', 'cells', 'robot_type')} }); "
                "rerun with those options to finish it, or delete it to start over"
            )
        log.info("resuming the unfinished export in %s", work)
        return [EpisodeRef(c, e) for c, e in previous["episodes"]]
    if work.exists():
        shutil.rmtree(work)  # no request file: it never got past its first write
    work.mkdir(parents=True)
    _write_json(work / _REQUEST_FILE, request)
    return [EpisodeRef(c, e) for c, e in request["episodes"]]


@contextmanager
def _progress_bar(show: bool, total: int) -> Iterator[Any]:
    if not show:
        yield lambda ref: None
        return
    columns = (
        TextColumn("[bold]export[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("episodes", total=total)

        def advance(ref: EpisodeRef) -> None:
            bar.update(task, advance=1, description=f"{ref.cell_id}/{ref.episode_id}")

        yield advance


def _write_segment(
    seg_dir: Path,
    ep: EpisodeData,
    episode_index: int,
    cameras: Sequence[_Camera],
    fps: int,
) -> dict[str, Any]:
    """One episode's rows and videos in its own directory; `done.json` is written last, so
    a segment without it is redone on resume."""
    if seg_dir.exists():
        shutil.rmtree(seg_dir)
    seg_dir.mkdir(parents=True)
    n = int(ep.joint_pos.shape[0])
    pq.write_table(_episode_table(ep, episode_index, fps), seg_dir / "data.parquet")
    image_stats: dict[str, dict[str, Any]] = {}
    for cam in cameras:
        images = [_decode_frame(f, cam) for f in ep.frames[cam.name]]
        _encode_video(seg_dir / f"{cam.name}.mp4", images, cam, fps)
        picks = np.linspace(0, n - 1, min(n, IMAGE_STATS_SAMPLES)).astype(int)
        sample = np.stack([images[i] for i in picks]) if n else np.zeros((0, *cam.shape))
        image_stats[image_key(cam.name)] = _jsonable(_image_stats(sample, cam))
    outcome = ep.attrs.get("outcome") or {}
    versions = ep.attrs.get("policy_versions") or [ep.attrs.get("policy_version") or ""]
    done = {
        "ref": [ep.ref.cell_id, ep.ref.episode_id],
        "length": n,
        "task": str(ep.attrs.get("task", "")),
        "policy_version": str(versions[-1] or ""),
        "success": bool(outcome.get("success", False)),
        "image_stats": image_stats,
    }
    _write_json(seg_dir / "done.json", done)
    return done


# -- assembly ---------------------------------------------------------------------------------


def _assemble(
    staged: Path,
    seg_root: Path,
    segments: list[dict[str, Any]],
    cameras: Sequence[_Camera],
    fps: int,
    robot_type: str,
) -> int:
    """Join the segments into the dataset layout under `staged`; returns the frame count."""
    tasks: dict[str, int] = {}
    tables = []
    start = 0
    for e, seg in enumerate(segments):
        table = pq.read_table(seg_root / f"{e:06d}" / "data.parquet")
        n = table.num_rows
        task_index = tasks.setdefault(seg["task"], len(tasks))
        table = table.append_column("index", pa.array(np.arange(start, start + n, dtype=np.int64)))
        table = table.append_column("task_index", pa.array(np.full(n, task_index, np.int64)))
        tables.append(table)
        start += n
    data = pa.concat_tables(tables)
    data_path = staged / DATA_PATH.format(chunk_index=0, file_index=0)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, data_path)

    numeric = _numeric_features(data)
    rows: list[dict[str, Any]] = []
    start = 0
    for e, seg in enumerate(segments):
        n = int(seg["length"])
        row: dict[str, Any] = {
            "episode_index": e,
            "tasks": [seg["task"]],
            "length": n,
            "data/chunk_index": 0,
            "data/file_index": 0,
            "dataset_from_index": start,
            "dataset_to_index": start + n,
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
            # Where the frames came from, so an exported episode can be traced back.
            "fleet/cell_id": seg["ref"][0],
            "fleet/episode_id": seg["ref"][1],
            "fleet/policy_version": seg["policy_version"],
            "fleet/success": seg["success"],
        }
        for cam in cameras:
            key = image_key(cam.name)
            row[f"videos/{key}/chunk_index"] = 0
            row[f"videos/{key}/file_index"] = 0
            row[f"videos/{key}/from_timestamp"] = start / fps
            row[f"videos/{key}/to_timestamp"] = (start + n) / fps
            row.update(_flat_stats(key, seg["image_stats"][key]))
        for name, values in numeric.items():
            row.update(_flat_stats(name, _stats(values[start : start + n])))
        rows.append(row)
        start += n
    for cam in cameras:
        parts = [seg_root / f"{e:06d}" / f"{cam.name}.mp4" for e in range(len(segments))]
        _concat_videos(parts, staged / _video_rel(cam.name))

    (staged / EPISODES_PATH).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), staged / EPISODES_PATH)
    task_frame = pd.DataFrame(
        {"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")
    )
    task_frame.to_parquet(staged / "meta" / "tasks.parquet")
    stats: dict[str, Any] = {name: _stats(values) for name, values in numeric.items()}
    for cam in cameras:
        key = image_key(cam.name)
        stats[key] = _pooled([seg["image_stats"][key] for seg in segments])
    _write_json(staged / "meta" / "stats.json", _jsonable(stats))
    info = _info(len(segments), start, len(tasks), fps, cameras, robot_type)
    _write_json(staged / "meta" / "info.json", info)
    return start


def _episode_table(ep: EpisodeData, episode_index: int, fps: int) -> pa.Table:
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
            "next.reward": pa.array(ep.reward.astype(np.float32)),
            "next.done": pa.array(done),
            "intervention": pa.array(ep.intervention.astype(bool)),
        }
    )


def _numeric_features(data: pa.Table) -> dict[str, np.ndarray]:
    """Every non-image column as (rows, dims) float64, bools as 0/1."""
    out = {}
    for name in data.column_names:
        column = data.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = values.reshape(len(column), column.type.list_size).astype(np.float64)
        else:
            values = column.to_numpy(zero_copy_only=False)
            out[name] = values.astype(np.float64).reshape(-1, 1)
    return out


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _info(
    episodes: int,
    frames: int,
    tasks: int,
    fps: int,
    cameras: Sequence[_Camera],
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
        video = {
            "video.height": cam.height,
            "video.width": cam.width,
            "video.codec": "hevc" if cam.depth else "h264",
            "video.pix_fmt": DEPTH_PIX_FMT if cam.depth else PIX_FMT,
            "video.fps": fps,
            "video.channels": cam.channels,
            "has_audio": False,
            "is_depth_map": cam.depth,
        }
        if cam.depth:
            video.update(
                {
                    "depth_unit": "mm",
                    "video.depth_min": DEPTH_MIN_M,
                    "video.depth_max": DEPTH_MAX_M,
                    "video.shift": DEPTH_SHIFT_M,
                    "video.use_log": True,
                }
            )
        features[image_key(cam.name)] = {
            "dtype": "video",
            "shape": cam.shape,
            "names": ["height", "width", "channels"],
            "info": video,
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


# -- frames and videos ------------------------------------------------------------------------


def _cameras_of(ep: EpisodeData) -> tuple[_Camera, ...]:
    return tuple(_Camera.of(n, a) for n, a in sorted(ep.attrs.get("cameras", {}).items()))


def _decode_frame(frame: bytes, cam: _Camera) -> np.ndarray:
    """A stored frame as (H, W, 3) uint8 colour or (H, W) uint16 millimetres of depth."""
    if not cam.depth:
        if frame[:2] == b"\xff\xd8":
            return np.ascontiguousarray(simplejpeg.decode_jpeg(frame, colorspace="RGB"))
        pixels = np.frombuffer(frame, np.uint8).reshape(cam.height, cam.width, -1)
        return np.ascontiguousarray(pixels[..., :3])
    if frame[:4] == b"\x28\xb5\x2f\xfd":  # zstd16
        raw = bytes(Zstd().decode(frame))
        return np.frombuffer(raw, "<u2").reshape(cam.height, cam.width).copy()
    codec = av.CodecContext.create("png", "r")  # png16
    (image,) = codec.decode(av.Packet(frame))
    return image.to_ndarray(format="gray16le").reshape(cam.height, cam.width)


def quantize_depth(depth_mm: np.ndarray) -> np.ndarray:
    """Millimetres to LeRobot's 12-bit log depth codes (0 = DEPTH_MIN_M or nearer)."""
    shift = DEPTH_SHIFT_M * 1000.0
    lo = math.log(DEPTH_MIN_M * 1000.0 + shift)
    hi = math.log(DEPTH_MAX_M * 1000.0 + shift)
    norm = (np.log(depth_mm.astype(np.float64) + shift) - lo) / (hi - lo)
    return np.rint(norm * DEPTH_QMAX).clip(0, DEPTH_QMAX).astype(np.uint16)


def dequantize_depth(codes: np.ndarray) -> np.ndarray:
    """12-bit log depth codes back to millimetres as LeRobot's reader returns them (whole
    millimetres, as float), so the depth stats describe what a LeRobot user gets."""
    lo = math.log(DEPTH_MIN_M + DEPTH_SHIFT_M)
    hi = math.log(DEPTH_MAX_M + DEPTH_SHIFT_M)
    metres = np.exp(codes.astype(np.float64) * (hi - lo) / DEPTH_QMAX + lo) - DEPTH_SHIFT_M
    return np.rint(np.clip(metres, DEPTH_MIN_M, DEPTH_MAX_M) * 1000.0)


def _encode_video(path: Path, images: Sequence[np.ndarray], cam: _Camera, fps: int) -> None:
    """One episode's frames as an mp4 starting with a key frame, no B-frames: segments can
    be joined without re-encoding and a reader can cut any episode's window out."""
    container = av.open(str(path), mode="w")
    try:
        stream = container.add_stream(DEPTH_CODEC if cam.depth else CODEC, rate=fps)
        stream.height, stream.width = cam.height, cam.width
        stream.pix_fmt = DEPTH_PIX_FMT if cam.depth else PIX_FMT
        if cam.depth:  # lossless: the 12-bit codes come back exactly
            stream.options = {"g": str(2 * fps), "bf": "0", "x265-params": "lossless=1:log-level=1"}
        else:
            stream.options = {"g": str(2 * fps), "bf": "0", "forced-idr": "1", "crf": "23"}
        for i, image in enumerate(images):
            if cam.depth:
                frame = av.VideoFrame.from_ndarray(quantize_depth(image), format=DEPTH_PIX_FMT)
            else:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if i == 0:
                frame.pict_type = av.video.frame.PictureType.I
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def _concat_videos(parts: Sequence[Path], out: Path) -> None:
    """Join per-episode mp4s (same codec and size, each opening on a key frame) into one,
    packet by packet with shifted timestamps: no re-encoding, no quality lost."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as target:
        stream = None
        offset = 0
        for part in parts:
            with av.open(str(part)) as source:
                src = source.streams.video[0]
                if stream is None:
                    stream = target.add_stream_from_template(src)
                last = offset
                for packet in source.demux(src):
                    if packet.dts is None:
                        continue  # the demuxer's end-of-stream marker
                    packet.pts = (packet.pts or 0) + offset
                    packet.dts = packet.dts + offset
                    last = max(last, packet.pts + (packet.duration or 0))
                    packet.stream = stream
                    target.mux(packet)
                offset = last


def _video_rel(camera: str) -> str:
    return VIDEO_PATH.format(video_key=image_key(camera), chunk_index=0, file_index=0)


def _guess_fps(timestamp: np.ndarray) -> int:
    """The control rate the episode was recorded at (median step), else DEFAULT_FPS."""
    if timestamp.shape[0] < 2:
        return DEFAULT_FPS
    step = float(np.median(np.diff(timestamp)))
    return max(1, round(1.0 / step)) if step > 0 else DEFAULT_FPS


# -- statistics -------------------------------------------------------------------------------


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """min, max, mean, std, count and the QUANTILES per dimension of (rows, ...) values."""
    x = x.astype(np.float64).reshape(x.shape[0], -1)
    if x.shape[0] == 0:
        z = np.zeros(x.shape[1])
        return {"min": z, "max": z, "mean": z, "std": z, "count": np.array([0])} | {
            q: z for q in QUANTILES
        }
    out = {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "count": np.array([x.shape[0]]),
    }
    qs = np.quantile(x, list(QUANTILES.values()), axis=0)
    out.update({name: qs[i] for i, name in enumerate(QUANTILES)})
    return out


def _image_stats(frames: np.ndarray, cam: _Camera) -> dict[str, np.ndarray]:
    """Per-channel stats shaped (C, 1, 1) as LeRobot keeps them: colour in [0, 1], depth in
    the millimetres LeRobot's reader returns (after the 12-bit quantisation)."""
    if cam.depth:
        px = dequantize_depth(quantize_depth(frames)).reshape(-1, 1)
    else:
        px = frames.reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    out = {k: v.reshape(-1, 1, 1) for k, v in _stats(px).items() if k != "count"}
    out["count"] = np.array([frames.shape[0]])
    return out


def _pooled(parts: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Dataset image stats from per-episode ones: exact min, max, mean and std (pooled by
    frame count); quantiles as the count-weighted mean of the episodes' quantiles."""
    arrays = [{k: np.asarray(v, dtype=np.float64) for k, v in p.items()} for p in parts]
    counts = np.array([float(a["count"][0]) for a in arrays])
    w = counts / counts.sum() if counts.sum() else np.full(len(arrays), 1.0 / len(arrays))
    mean = sum(wi * a["mean"] for wi, a in zip(w, arrays, strict=True))
    second = sum(wi * (a["std"] ** 2 + a["mean"] ** 2) for wi, a in zip(w, arrays, strict=True))
    out = {
        "min": np.min([a["min"] for a in arrays], axis=0),
        "max": np.max([a["max"] for a in arrays], axis=0),
        "mean": mean,
        "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
        "count": np.array([int(counts.sum())]),
    }
    for q in QUANTILES:
        out[q] = sum(wi * a[q] for wi, a in zip(w, arrays, strict=True))
    return out


def _flat_stats(key: str, stats: dict[str, Any]) -> dict[str, list[Any]]:
    """Episode stats as `stats/<feature>/<stat>` columns, nested lists keeping the shape."""
    return {f"stats/{key}/{k}": np.asarray(v).tolist() for k, v in stats.items()}


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_jsonable(v) if isinstance(v, dict) else np.asarray(v).tolist())
        for k, v in stats.items()
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_json(path: Path, value: Any) -> None:
    """Written to a temp name and renamed: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def episode_refs(store_root: Path | str) -> list[EpisodeRef]:
    """The episodes an export of this store would hold, in dataset order."""
    return EpisodeStore(store_root).episodes()

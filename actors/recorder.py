"""Buffers one episode's steps and cuts them into StepChunk messages for the uplink.

Frames are JPEG-encoded as each step is added, so the encoding cost is spread evenly over
the ticks instead of landing on the tick that closes a chunk. A full chunk is emitted only
when the next step arrives (one step is always held back), so `finish` always has at least
one step for the closing `last=True` chunk. A chunk also closes early when the policy
version changes, because a StepChunk names a single version for all of its steps.

Shadow evaluation: a step may carry the shadow version's action (what a candidate running in
shadow would have commanded on this step's observation; logged, never executed). A chunk
carries `shadow_action` (float32 [T, 14]) and `shadow_version` only when every one of its
steps has a finite shadow action from one and the same version; otherwise it goes without
(the learner's scores then simply have fewer steps). A shadow's coverage never cuts a chunk.

Colour is JPEG-encoded with libjpeg-turbo (simplejpeg) at the cell's configured quality.
Depth, when a camera's frames carry it, must stay exact (a lossy depth map invents
geometry), so it travels losslessly as its own camera column `<camera>_depth`, encoding
"zstd16": the (H, W) uint16 millimetres, little-endian, compressed as one zstd frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg

from actors.thread_priority import lower_this_thread
from drivers.interfaces import Frame
from fleet.common.wire import to_tensor
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2
from protos.joint_layout import JOINT_DIM


@dataclass(frozen=True)
class _Step:
    stamp: float
    joint_pos: np.ndarray  # (14,) float32
    action: np.ndarray  # (14,) float32
    intervention: bool
    reward: float
    jpegs: dict[str, bytes]
    depths: dict[str, bytes]  # camera -> zstd16 depth, for cameras whose frames carry it
    version: str
    shadow: np.ndarray | None = None  # (14,) float32, the shadow version's action
    shadow_version: str = ""


DEPTH_SUFFIX = "_depth"
DEPTH_ENCODING = "zstd16"
DEPTH_ZSTD_LEVEL = 1  # fast enough for every tick; depth maps compress well even so


def _zstd_compressor() -> Callable[[bytes], bytes]:
    """zstd from the `zstandard` package when installed, else numcodecs' (a zarr
    dependency); both write standard zstd frames that any zstd decoder reads."""
    try:
        import zstandard

        return zstandard.ZstdCompressor(level=DEPTH_ZSTD_LEVEL).compress
    except ImportError:
        import numcodecs

        codec = numcodecs.Zstd(level=DEPTH_ZSTD_LEVEL)
        return lambda data: bytes(codec.encode(data))


_compress: Callable[[bytes], bytes] | None = None


def encode_depth(depth: np.ndarray) -> bytes:
    """(H, W) uint16 depth to a "zstd16" frame: exact, little-endian, zstd-compressed."""
    global _compress
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    if _compress is None:
        _compress = _zstd_compressor()
    return _compress(np.ascontiguousarray(depth, dtype="<u2").tobytes())


def decode_depth(data: bytes, height: int, width: int) -> np.ndarray:
    """Inverse of encode_depth (for readers and tests)."""
    try:
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=height * width * 2)
    except ImportError:
        import numcodecs

        raw = bytes(numcodecs.Zstd().decode(data))
    return np.frombuffer(raw, dtype="<u2").reshape(height, width)


def _vector(name: str, value: object) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.shape != (JOINT_DIM,):
        raise ValueError(f"{name} must have {JOINT_DIM} values, got shape {np.shape(value)}")
    return arr


class EpisodeRecorder:
    """One episode's steps; `add_step` returns a StepChunk whenever one is complete."""

    def __init__(
        self,
        cell_id: str,
        episode_id: str,
        task: str,
        chunk_steps: int,
        jpeg_quality: int,
    ) -> None:
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        self.cell_id = cell_id
        self.episode_id = episode_id
        self.task = task
        self.chunk_steps = int(chunk_steps)
        self.jpeg_quality = int(jpeg_quality)
        self.steps_recorded = 0
        self.chunks_emitted = 0
        self.shadow_chunks = 0  # chunks emitted with shadow actions
        self.finished = False
        self._buffer: list[_Step] = []
        self._first_step = 0  # episode index of the buffer's first step
        self._shapes: dict[str, tuple[int, int]] | None = None  # camera -> (height, width)
        self._depth_shapes: dict[str, tuple[int, int]] | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def add_step(
        self,
        *,
        stamp: float,
        joint_pos: np.ndarray,
        action: np.ndarray,
        intervention: bool,
        reward: float,
        frames: Mapping[str, Frame],
        policy_version: str,
        shadow_action: np.ndarray | None = None,
        shadow_version: str = "",
    ) -> trajectory_pb2.StepChunk | None:
        """Buffer one step; returns the chunk this step closed, if any. `shadow_action`: the
        shadow version's (14,) action for this step, None without one."""
        if self.finished:
            raise RuntimeError(f"episode {self.episode_id} is finished; no more steps")
        shadow = None
        if shadow_action is not None and shadow_version:
            shadow = _vector("shadow_action", shadow_action)
            if not np.isfinite(shadow).all():
                shadow = None  # the learner would reject the whole chunk for it
        step = _Step(
            stamp=float(stamp),
            joint_pos=_vector("joint_pos", joint_pos),
            action=_vector("action", action),
            intervention=bool(intervention),
            reward=float(reward),
            jpegs=self._encode(frames),
            depths=self._encode_depth(frames),
            version=policy_version,
            shadow=shadow,
            shadow_version=shadow_version if shadow is not None else "",
        )
        out = None
        if self._buffer and (
            len(self._buffer) >= self.chunk_steps or self._buffer[0].version != policy_version
        ):
            out = self._emit(last=False)
        self._buffer.append(step)
        self.steps_recorded += 1
        return out

    def finish(
        self, *, success: bool, reason: str, started_at: float, ended_at: float
    ) -> trajectory_pb2.StepChunk:
        """The closing chunk (last=True, with the outcome) holding the remaining steps."""
        if self.finished:
            raise RuntimeError(f"episode {self.episode_id} is already finished")
        if not self._buffer:
            raise RuntimeError(f"episode {self.episode_id} has no steps to finish with")
        outcome = trajectory_pb2.EpisodeOutcome(
            success=bool(success), reason=reason, started_at=started_at, ended_at=ended_at
        )
        self.finished = True
        return self._emit(last=True, outcome=outcome)

    def _encode(self, frames: Mapping[str, Frame]) -> dict[str, bytes]:
        shapes = {}
        jpegs = {}
        for name in sorted(frames):
            color = np.ascontiguousarray(frames[name].color, dtype=np.uint8)
            if color.ndim != 3 or color.shape[2] != 3:
                raise ValueError(f"camera {name}: color must be (H, W, 3), got {color.shape}")
            shapes[name] = (int(color.shape[0]), int(color.shape[1]))
            jpegs[name] = simplejpeg.encode_jpeg(color, quality=self.jpeg_quality, colorspace="RGB")
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(
                f"episode {self.episode_id}: cameras changed mid-episode "
                f"({self._shapes} -> {shapes})"
            )
        return jpegs

    def _encode_depth(self, frames: Mapping[str, Frame]) -> dict[str, bytes]:
        depths = {}
        shapes = {}
        for name in sorted(frames):
            depth = frames[name].depth
            if depth is None:
                continue
            if depth.dtype != np.uint16 or depth.ndim != 2:
                raise ValueError(
                    f"camera {name}: depth must be (H, W) uint16, got {depth.dtype} {depth.shape}"
                )
            shapes[name] = (int(depth.shape[0]), int(depth.shape[1]))
            depths[name] = encode_depth(depth)
        if self._depth_shapes is None:
            self._depth_shapes = shapes
        elif shapes != self._depth_shapes:
            raise ValueError(
                f"episode {self.episode_id}: depth cameras changed mid-episode "
                f"({self._depth_shapes} -> {shapes})"
            )
        return depths

    def _emit(
        self, *, last: bool, outcome: trajectory_pb2.EpisodeOutcome | None = None
    ) -> trajectory_pb2.StepChunk:
        steps, self._buffer = self._buffer, []
        cameras = [
            arrays_pb2.CameraFrames(
                camera=name,
                encoding="jpeg",
                height=height,
                width=width,
                channels=3,
                frames=[s.jpegs[name] for s in steps],
            )
            for name, (height, width) in (self._shapes or {}).items()
        ] + [
            arrays_pb2.CameraFrames(
                camera=name + DEPTH_SUFFIX,
                encoding=DEPTH_ENCODING,
                height=height,
                width=width,
                channels=1,
                frames=[s.depths[name] for s in steps],
            )
            for name, (height, width) in (self._depth_shapes or {}).items()
        ]
        chunk = trajectory_pb2.StepChunk(
            cell_id=self.cell_id,
            episode_id=self.episode_id,
            seq=self.chunks_emitted,
            first_step=self._first_step,
            task=self.task,
            policy_version=steps[0].version,
            timestamp=to_tensor(np.array([s.stamp for s in steps], dtype=np.float64)),
            joint_pos=to_tensor(np.stack([s.joint_pos for s in steps])),
            action=to_tensor(np.stack([s.action for s in steps])),
            intervention=to_tensor(np.array([s.intervention for s in steps], dtype=np.bool_)),
            reward=to_tensor(np.array([s.reward for s in steps], dtype=np.float32)),
            cameras=cameras,
            last=last,
        )
        if outcome is not None:
            chunk.outcome.CopyFrom(outcome)
        shadow_versions = {s.shadow_version for s in steps}
        shadows = [s.shadow for s in steps if s.shadow is not None]
        if len(shadow_versions) == 1 and len(shadows) == len(steps):
            chunk.shadow_action.CopyFrom(to_tensor(np.stack(shadows)))
            chunk.shadow_version = shadow_versions.pop()
            self.shadow_chunks += 1
        self.chunks_emitted += 1
        self._first_step += len(steps)
        return chunk


def chunk_steps_of(chunk: trajectory_pb2.StepChunk) -> int:
    """Number of steps a chunk carries (its timestamp column's length)."""
    return int(chunk.timestamp.shape[0]) if chunk.timestamp.shape else 0


@dataclass(frozen=True)
class _Finish:
    success: bool
    reason: str
    started_at: float
    ended_at: float


class RecordingThread:
    """One episode's recorder on a thread of its own, so that JPEG and depth encoding and
    cutting chunks never run on the control loop's tick thread.

    `add_step` only queues the step (the frames are the observation's own arrays, never
    drawn on again); the thread encodes it and hands every chunk it closes to `submit`, in
    order. `finish` queues the closing chunk and waits until every step and that chunk went
    to `submit`, so an episode is complete before the next one starts. The queue holds at
    most `max_queued` steps: a host that cannot encode in real time at all slows the loop
    down (`waits` counts those ticks) rather than buffering frames without bound. The thread
    runs `nice` steps below its caller's priority. A step the recorder refuses (a camera
    changed shape mid-episode) raises on the loop's thread at its next `add_step` or at
    `finish`, as if it had been recorded there.
    """

    def __init__(
        self,
        recorder: EpisodeRecorder,
        submit: Callable[[trajectory_pb2.StepChunk], None],
        *,
        on_step: Callable[[bool, bool], None] | None = None,
        max_queued: int = 100,
        nice: int = 0,
    ) -> None:
        """`on_step(intervention, has_shadow)` runs on the thread after each step is in."""
        self.recorder = recorder
        self._submit = submit
        self._on_step = on_step
        self._nice = int(nice)
        self._queue: queue.Queue[dict[str, Any] | _Finish | None] = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self.waits = 0  # add_step calls that found the queue full
        self.steps_added = 0
        self._thread = threading.Thread(
            target=self._work, name=f"recorder-{recorder.episode_id}", daemon=True
        )
        self._thread.start()

    def add_step(self, **step: Any) -> None:
        """Queue one step (EpisodeRecorder.add_step's keyword arguments)."""
        self._raise_error()
        try:
            self._queue.put_nowait(step)
        except queue.Full:
            self.waits += 1
            self._queue.put(step)
        self.steps_added += 1

    def finish(self, *, success: bool, reason: str, started_at: float, ended_at: float) -> int:
        """Close the episode (when it has steps) and wait for the thread to be done; the
        number of steps recorded. Raises what the recorder refused, if anything."""
        if self.steps_added:
            self._queue.put(_Finish(success, reason, started_at, ended_at))
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        return self.recorder.steps_recorded

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        lower_this_thread(self._nice, cell_id=self.recorder.cell_id, what="the recorder")
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # the episode's recording already failed: drop the rest
            try:
                if isinstance(item, _Finish):
                    chunk = self.recorder.finish(
                        success=item.success,
                        reason=item.reason,
                        started_at=item.started_at,
                        ended_at=item.ended_at,
                    )
                else:
                    chunk = self.recorder.add_step(**item)
                    if self._on_step is not None:
                        self._on_step(
                            bool(item["intervention"]), item.get("shadow_action") is not None
                        )
                if chunk is not None:
                    self._submit(chunk)
            except BaseException as exc:  # handed to the loop's thread
                self._error = exc

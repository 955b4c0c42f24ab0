"""Frames leave the cell JPEG-encoded at the configured quality and depth leaves it exact:
the learner's validation accepts both, and the depth decodes to the very same millimetres.
The encoding runs on the recorder's thread, never on the control loop's tick."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import simplejpeg

from actors.recorder import DEPTH_SUFFIX, EpisodeRecorder, RecordingThread, decode_depth
from drivers.interfaces import Frame
from learner.chunks import decode_chunk


def _frames(rng: np.random.Generator) -> dict[str, Frame]:
    color = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    depth = rng.integers(0, 8000, (48, 64), dtype=np.uint16)
    return {
        "overhead": Frame(camera="overhead", color=color, stamp=0.0, depth=depth),
        "front": Frame(camera="front", color=color, stamp=0.0),  # no depth on this one
    }


def test_depth_is_lossless_and_colour_is_jpeg_at_the_configured_quality() -> None:
    rng = np.random.default_rng(0)
    steps = [_frames(rng) for _ in range(3)]
    sizes = {}
    for quality in (30, 95):
        recorder = EpisodeRecorder("cell-01", "ep-1", "pick_cube", 10, quality)
        for i, frames in enumerate(steps):
            recorder.add_step(
                stamp=float(i),
                joint_pos=np.zeros(14),
                action=np.zeros(14),
                intervention=False,
                reward=0.0,
                frames=frames,
                policy_version="",
            )
        chunk = recorder.finish(success=False, reason="timeout", started_at=0.0, ended_at=1.0)
        decoded = decode_chunk(chunk, known_tasks={"pick_cube"})
        assert set(decoded.cameras) == {"overhead", "front", "overhead" + DEPTH_SUFFIX}
        depth = decoded.cameras["overhead" + DEPTH_SUFFIX]
        assert (depth.encoding, depth.channels, depth.height, depth.width) == ("zstd16", 1, 48, 64)
        for frames, data in zip(steps, depth.frames, strict=True):
            assert np.array_equal(decode_depth(data, 48, 64), frames["overhead"].depth)
        color = decoded.cameras["overhead"]
        assert color.encoding == "jpeg"
        image = simplejpeg.decode_jpeg(color.frames[0], colorspace="RGB")
        assert image.shape == (48, 64, 3)
        sizes[quality] = sum(len(f) for f in color.frames)
    assert sizes[30] < sizes[95]  # the configured quality is the one used


def _step(i: int, frames: dict[str, Frame], version: str = "v1") -> dict[str, object]:
    return {
        "stamp": float(i),
        "joint_pos": np.full(14, i, np.float32),
        "action": np.full(14, -i, np.float32),
        "intervention": i % 3 == 0,
        "reward": 0.1 * i,
        "frames": frames,
        "policy_version": version if i < 7 else "v2",
    }


def test_recording_thread_gives_the_same_chunks_as_recording_inline_off_the_callers_thread() -> (
    None
):
    """The control loop only queues a step; the recorder's thread encodes it and submits
    exactly the chunks, in the same order, that recording on the loop's thread gave, and
    `finish` returns only once the closing chunk is out."""
    rng = np.random.default_rng(1)
    steps = [_step(i, _frames(rng)) for i in range(12)]
    inline = EpisodeRecorder("cell-01", "ep-1", "pick_cube", 4, 80)
    expected = [c for s in steps if (c := inline.add_step(**s)) is not None]  # type: ignore[arg-type]
    expected.append(inline.finish(success=True, reason="success", started_at=0.0, ended_at=1.0))

    got: list[object] = []
    threads: set[int] = set()
    counted: list[tuple[bool, bool]] = []

    def submit(chunk: object) -> None:
        threads.add(threading.get_ident())
        got.append(chunk)

    recording = RecordingThread(
        EpisodeRecorder("cell-01", "ep-1", "pick_cube", 4, 80),
        submit,  # type: ignore[arg-type]
        on_step=lambda intervention, shadow: counted.append((intervention, shadow)),
    )
    for s in steps:
        recording.add_step(**s)
    n = recording.finish(success=True, reason="success", started_at=0.0, ended_at=1.0)
    assert n == 12
    assert [c.SerializeToString() for c in got] == [c.SerializeToString() for c in expected]  # type: ignore[attr-defined]
    assert threading.get_ident() not in threads  # encoded and cut on the recorder's thread
    assert counted == [(i % 3 == 0, False) for i in range(12)]


def test_recording_thread_raises_a_refused_step_on_the_callers_thread() -> None:
    """A camera that changes shape mid-episode is refused by the recorder; the error
    reaches the control loop (at its next step or at finish), not a silent thread."""
    rng = np.random.default_rng(2)
    recording = RecordingThread(
        EpisodeRecorder("cell-01", "ep-1", "pick_cube", 4, 80), lambda chunk: None
    )
    recording.add_step(**_step(0, _frames(rng)))
    wrong = {"overhead": Frame(camera="overhead", color=np.zeros((10, 10, 3), np.uint8), stamp=0)}
    recording.add_step(**_step(1, wrong))
    with pytest.raises(ValueError, match="cameras changed mid-episode"):
        for i in range(2, 200):  # the error arrives once the thread got to step 1
            recording.add_step(**_step(i, _frames(rng)))
        recording.finish(success=False, reason="fault", started_at=0.0, ended_at=1.0)

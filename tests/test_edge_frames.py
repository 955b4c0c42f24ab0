"""Frames leave the cell JPEG-encoded at the configured quality and depth leaves it exact:
the learner's validation accepts both, and the depth decodes to the very same millimetres."""

from __future__ import annotations

import numpy as np
import simplejpeg

from actors.recorder import DEPTH_SUFFIX, EpisodeRecorder, decode_depth
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

"""JPEG decoding for the sampler, spread over a small pool of Ray actors.

Why optional: on this 2-core machine the trainer, the gateway and Ray itself already use both
cores, and simplejpeg decodes a 128x96 frame in ~0.1 ms, so shipping bytes to another process
costs more than it saves: `--decode-workers 0` (the default) decodes in-process. On a GPU node
with many cores and large frames (base/large presets, 224x224+ cameras, batches of 256+),
decoding dominates the sampler and N actors (`--decode-workers N`) decode slices of each
batch in parallel while the learner steps. Order is preserved, so batches equal in-process
decoding exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
import simplejpeg

log = logging.getLogger(__name__)


class _DecodeWorker:
    """One decoding process; returns frames as numpy (zero-copy through Ray's object store)."""

    def decode(self, jpegs: list[bytes]) -> list[np.ndarray]:
        return [simplejpeg.decode_jpeg(j, colorspace="RGB") for j in jpegs]


class DecodePool:
    """A Decoder (see learner/sampler.py) backed by `workers` Ray actors, one CPU each."""

    def __init__(self, workers: int, *, num_cpus: float = 1.0) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        actor_cls: Any = ray.remote(num_cpus=num_cpus)(_DecodeWorker)
        self._workers = [actor_cls.remote() for _ in range(workers)]
        log.info("decode pool: %d Ray worker(s)", workers)

    def __call__(self, jpegs: list[bytes]) -> list[np.ndarray]:
        if not jpegs:
            return []
        n = len(self._workers)
        size = -(-len(jpegs) // n)
        slices = [jpegs[i : i + size] for i in range(0, len(jpegs), size)]
        refs = [w.decode.remote(s) for w, s in zip(self._workers, slices, strict=False)]
        out: list[np.ndarray] = []
        for part in ray.get(refs):
            out.extend(part)
        return out

    def close(self) -> None:
        for w in self._workers:
            ray.kill(w)
        self._workers = []

"""A trainer alone in a process (no Ray cluster: one local RLlib learner), for tests that
SIGKILL and restart it.

`python tests/trainer_proc.py --data DIR --redis-url URL --prefix P` trains on DIR/store,
publishes to DIR/versions and the registry under prefix P every `--publish-every` updates,
checkpoints to DIR/checkpoints, prints `READY` once built, and runs until SIGTERM (clean
stop, final checkpoint) or SIGKILL (the crash the lineage test is about).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from learner.sampler import SamplerConfig
from learner.trainer import Trainer, TrainerConfig
from tests.expert_episodes import CAMERAS

TASKS = ("pick_cube", "touch_target")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--publish-every", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="trainer %(levelname)s %(message)s")
    cfg = TrainerConfig(
        tasks=TASKS,
        cameras=CAMERAS,
        publish_every_updates=args.publish_every,
        checkpoint_dir=str(args.data / "checkpoints"),
        checkpoint_every_updates=args.checkpoint_every,
        checkpoint_every_s=3600.0,
        sampler=SamplerConfig(batch_size=4, min_steps=1, max_samples_per_insert=1e9),
    )
    data = args.data
    trainer = Trainer(
        cfg, data / "store", data / "versions", args.redis_url, registry_prefix=args.prefix
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    trainer.start()
    print("READY", flush=True)
    stop.wait()
    trainer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

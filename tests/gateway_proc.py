"""A learner gateway alone in a process (no Ray), for tests that SIGKILL and restart it.

`python tests/gateway_proc.py --port P --store DIR --redis-url URL` serves ingest and the
policy service on 127.0.0.1:P, prints `READY <port>` once bound, and runs until SIGTERM
(clean stop) or SIGKILL (the crash the chaos and outage tests are about).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from drivers.sim.tasks import SIM_TASKS
from learner.gateway import Gateway


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="gateway %(levelname)s %(message)s")
    gateway = Gateway(args.store, args.redis_url, SIM_TASKS, port=args.port)
    port = gateway.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"READY {port}", flush=True)
    stop.wait()
    gateway.stop(grace_s=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

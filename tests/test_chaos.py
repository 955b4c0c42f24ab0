"""Chaos: the learner is SIGKILLed and restarted four times at random moments while four
sim cells stream. Afterwards the store must hold, step by step and byte for byte, exactly
what the cells recorded (0 lost, 0 duplicated, 0 corrupt episodes), and no cell's control
loop may have missed a deadline."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from fleet.common.net import free_port
from tests.transport_harness import Cells, GatewayProcess, Ledger, compare_store

pytestmark = pytest.mark.timeout(150)

CELLS = 4
KILLS = 4


def test_learner_sigkilled_repeatedly_loses_nothing(
    tmp_path: Path, redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    port = free_port()
    gateway = GatewayProcess(port, tmp_path / "store", redis_server, tmp_path / "gateway.log")
    ledger = Ledger()
    ledger.install(monkeypatch)
    gateway.start()
    cells = Cells(CELLS, f"127.0.0.1:{port}", tmp_path / "spool")
    downtimes = []
    try:
        cells.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 4.0))
            gateway.kill()
            down = rng.uniform(0.2, 2.5)
            time.sleep(down)
            downtimes.append(round(down + gateway.start(), 2))
        time.sleep(1.0)
    finally:
        cells.stop()
        gateway.stop()
    assert gateway.starts == KILLS + 1
    summaries = cells.summaries
    assert len(summaries) == CELLS
    for s in summaries.values():
        assert s["flushed"] and s["unacked"] == 0, f"{s['cell_id']} (seed {seed})"
        assert s["dropped"] == 0 and s["rejected"] == 0, f"{s['cell_id']} (seed {seed})"
        assert s["late_ticks"] == 0, f"{s['cell_id']}: control loop missed deadlines"
        assert s["spool_chunks"] == 0
    totals = compare_store(tmp_path / "store", ledger)
    resends = sum(s["resends"] for s in summaries.values())
    assert totals["steps"] == sum(s["steps_recorded"] for s in summaries.values())
    print(
        f"\nchaos (seed {seed}): {KILLS} SIGKILLs, learner down {downtimes} s; "
        f"{totals['episodes']} episodes / {totals['steps']} steps stored exactly as recorded; "
        f"{resends} chunks resent"
    )

"""Outage: the learner is down for a while; cells keep their control-loop deadlines and
spool what they record, then the learner comes back, the spools drain, and the store holds
exactly what the cells recorded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fleet.common.net import free_port
from tests.transport_harness import Cells, GatewayProcess, Ledger, compare_store

pytestmark = pytest.mark.timeout(120)


def test_learner_outage_cells_spool_then_drain(
    tmp_path: Path, redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    gateway = GatewayProcess(port, tmp_path / "store", redis_server, tmp_path / "gateway.log")
    ledger = Ledger()
    ledger.install(monkeypatch)
    gateway.start()
    cells = Cells(3, f"127.0.0.1:{port}", tmp_path / "spool")
    try:
        cells.start()
        time.sleep(3.0)
        gateway.kill()  # the learner machine dies
        t_down = time.monotonic()
        time.sleep(8.0)
        spooled_chunks, spooled_bytes = ledger.spooled()
        assert spooled_chunks > 0  # recorded during the outage, on disk, not lost
        assert ledger.pending() >= spooled_chunks
        outage_s = time.monotonic() - t_down
        backlog = ledger.pending()
        t_up = time.monotonic()
        start_s = gateway.start()
        # Drained when everything recorded before the restart has been acked (the cells
        # keep recording meanwhile, so wait for the backlog, not for zero).
        while ledger.pending() > 3 * 2 and time.monotonic() - t_up < 30:
            time.sleep(0.05)
        drain_s = time.monotonic() - t_up
        assert ledger.pending() <= 3 * 2, "the spools did not drain within 30 s"
    finally:
        cells.stop()
        gateway.stop()
    summaries = cells.summaries
    assert len(summaries) == 3
    for s in summaries.values():
        assert s["flushed"] and s["unacked"] == 0
        assert s["dropped"] == 0 and s["rejected"] == 0
        assert s["late_ticks"] == 0, f"{s['cell_id']}: control loop missed deadlines"
        assert s["spool_chunks"] == 0 and s["spool_bytes"] == 0
    totals = compare_store(tmp_path / "store", ledger)
    write_ms = max(s["spool_write_ms"] for s in summaries.values())
    print(
        f"\noutage {outage_s:.1f} s: {spooled_chunks} chunks / {spooled_bytes / 1e6:.2f} MB "
        f"spooled across 3 cells; backlog of {backlog} chunks drained in {drain_s:.2f} s "
        f"(learner start {start_s:.2f} s and reconnect backoff included) = "
        f"{backlog / drain_s:.0f} chunks/s; spool write "
        f"{write_ms:.2f} ms/chunk (worst cell mean); store == ledger: {totals}"
    )

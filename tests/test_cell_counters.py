"""The cell's counters are named once: the heartbeat, the registry and the metrics agree."""

from __future__ import annotations

import dataclasses

import pytest

from actors.servo_client import DROPPED_STEPS_KEY
from drivers.dynamixel.bus import BusStats
from fleet.common import metrics
from fleet.common.cell_counters import CellCounters, LoopCounters
from protos.fleetlearn.v1 import policy_pb2


def _distinct() -> CellCounters:
    """Counters with a different value in every field, so a swapped field shows."""
    values = {
        f.name: (i + 1.5 if f.type == "float" else (i + 1) * 1000)
        for i, f in enumerate(dataclasses.fields(CellCounters))
    }
    return CellCounters(**values)


def test_counters_round_trip_through_the_heartbeat_message() -> None:
    counters = _distinct()
    beat = counters.fill_heartbeat(policy_pb2.Heartbeat(cell_id="cell-1", task="fold"))
    wire = policy_pb2.Heartbeat.FromString(beat.SerializeToString())
    assert CellCounters.from_heartbeat(wire) == counters
    assert (wire.cell_id, wire.task) == ("cell-1", "fold")  # the rest is left alone


def test_counters_round_trip_through_the_redis_hash() -> None:
    counters = _distinct()
    stored = counters.to_redis()
    assert all(isinstance(v, str) for v in stored.values())
    assert CellCounters.from_redis(stored) == counters
    assert CellCounters.from_redis({}) == CellCounters()  # an old hash reads as zeros


def test_a_misspelt_counter_fails_loudly() -> None:
    with pytest.raises(AttributeError):
        CellCounters().fault_cuont  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError):
        CellCounters(fault_cuont=1)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CellCounters().episodes = 3  # type: ignore[misc]
    stats = {**LoopCounters().as_dict(), "loop_hz": 50.0, "task": "fold"}
    assert LoopCounters.from_stats(stats) == LoopCounters()  # other stats are not counters
    del stats["late_ticks"]
    with pytest.raises(KeyError, match="late_ticks"):
        LoopCounters.from_stats(stats)  # a loop that stopped counting one is loud


def test_heartbeat_counters_come_from_the_loop_and_the_uplink() -> None:
    loop = LoopCounters(episodes=4, successes=2, steps_recorded=900, interventions=7, late_ticks=3)
    counters = CellCounters.from_loop(
        loop, loop_hz=49.5, steps_acked=850, fault_count=1, spool_bytes=4096, spool_chunks=2
    )
    assert counters == CellCounters(
        episodes=4,
        successes=2,
        steps_recorded=900,
        steps_acked=850,
        interventions=7,
        late_ticks=3,
        loop_hz=49.5,
        fault_count=1,
        spool_bytes=4096,
        spool_chunks=2,
    )


def test_every_edge_metric_reads_a_counter_the_edge_has() -> None:
    """EDGE_STATS keys name LoopCounters fields or the few numbers actors/edge.py adds."""
    added_by_edge = {"loop_hz", "policy_swaps", "faults"}
    bus = {f"bus_{f.name}" for f in dataclasses.fields(BusStats)}  # drivers/cell.bus_stats
    bus.add(DROPPED_STEPS_KEY)  # a real cell's servo process adds it to bus_stats
    loop_fields = {f.name for f in dataclasses.fields(LoopCounters)}
    unknown = {s.key for s in metrics.EDGE_STATS} - loop_fields - added_by_edge - bus
    assert not unknown, f"EDGE_STATS keys nothing produces: {sorted(unknown)}"

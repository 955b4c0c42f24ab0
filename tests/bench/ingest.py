"""Ingest benchmark: the learner's TrajectoryService against raw gRPC of the same bytes.

Why: ingest must keep up with the fleet on few cores and never be the reason a cell's
outbox grows. Each server runs in its own process (this file with --serve), so its CPU time
is measured alone and the client's work does not count against it. Figures:

- throughput: steps/s through ingest (decode, validate, durable zarr append, ack) over the
  steps/s of a trivial servicer that receives the identical StepChunk bytes and acks
  (goal >= 0.8 of that ceiling); one stream, 3 JPEG 240x320 frames a step, one server
  process each. The servers stay up and their runs alternate (--repeats rounds), so load
  from other work on the machine hits them alike; the ratio is the median of the rounds'.
- fsync write ceiling: a third servicer receives the same bytes, reads one ahead as ingest
  does, writes each message once to a file of its own and acks only after the file and its
  directory entry are fsynced, through the same group commit ingest uses (so the same
  batching): no validation, no zarr. Ingest's ratio to it (goal >= 0.9) is what acks that
  mean "on disk" cost beyond the disk's own flushes; its ratio to raw bounds what any
  durable ingest can reach here.
- fsync cost: ingest with fsync over the same ingest with fsync off (fsync_cost_ratio).
  What a round wrote is deleted after it (outside the timing), so every round writes into
  recycled page cache, as a long-running learner does once memory has filled; otherwise
  each later round pays more of this VM's first-touch cost for fresh memory (measured:
  both ingest and the ceiling fall to ~0.3-0.4 after ~500 MB when nothing is deleted).
- steps per second per ingest core: stored steps / server CPU seconds (goal >= 1,000).
- step-to-durable latency p50/p99: cells record at 20 Hz, send a chunk once its last step is
  recorded, and each step's latency runs from its recording to the chunk's durable ack
  (goal <= 0.5 s / 2 s). The chunk length sets a floor: a step waits for its chunk to fill.
- 64 light cells (joints only, 20 Hz) for a few seconds: steps lost (sent - stored, goal 0)
  and server CPU per cell against 8 cells (goal: flat).

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/ingest.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import psutil
import simplejpeg

from fleet.common.heap import keep_freed_memory
from fleet.common.wire import to_tensor
from learner.read_ahead import read_ahead
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2

METHOD = "/fleetlearn.v1.TrajectoryService/Upload"
CAMERAS = ("overhead", "left_wrist", "right_wrist")
H, W = 240, 320
HZ = 20.0
GOALS = {
    "ratio_to_raw_grpc": 0.8,
    "ratio_to_fsync_write_ceiling": 0.9,
    "steps_per_s_per_core": 1000.0,
    "latency_p50_s": 0.5,
    "latency_p99_s": 2.0,
    "light_cells_lost_steps": 0,
}
OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]

# ----------------------------------------------------------------------------- servers


def _serve(kind: str, store_dir: str) -> None:
    """Child process: serve `kind` (ingest or raw) on a free port, print it, run until stdin
    closes."""
    # Every server gets the allocator setting the learner's gateway makes (fleet/common/heap.py), so
    # the baselines are measured with it too.
    keep_freed_memory()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=96), options=OPTIONS[:2])
    if kind in ("ingest", "ingest-nosync"):
        from learner import ingest
        from learner.ingest import IngestServicer
        from learner.store import EpisodeStore

        store = EpisodeStore(store_dir, fsync=kind == "ingest")
        ingest.add_to_server(server, IngestServicer(store, known_tasks=None))
    else:
        from learner.group_commit import GroupCommit, Touched

        group = GroupCommit()
        ack = trajectory_pb2.ChunkAck(durable=True).SerializeToString()
        written = itertools.count()

        def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            # Same bytes in, an ack out: gRPC and protobuf decoding, nothing else.
            for raw in requests:
                trajectory_pb2.StepChunk.FromString(raw)
                yield ack

        def write(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            # As echo, plus the message's bytes into a new file of their own before the ack.
            for raw in read_ahead(requests):
                trajectory_pb2.StepChunk.FromString(raw)
                path = Path(f"{store_dir}/{next(written)}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
                try:
                    view = memoryview(raw)
                    while view:
                        view = view[os.write(fd, view[: 1 << 20]) :]
                finally:
                    os.close(fd)
                # The file and its directory entry, batched and flushed as ingest's are.
                group.sync(Touched(files={path}, named={path}))
                yield ack

        handler = grpc.method_handlers_generic_handler(
            "fleetlearn.v1.TrajectoryService",
            {"Upload": grpc.stream_stream_rpc_method_handler(echo if kind == "raw" else write)},
        )
        server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(1).wait(2)


class Child:
    def __init__(self, kind: str, store_dir: str) -> None:
        self.store_dir = Path(store_dir) if store_dir else None
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--store", store_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def discard_written(self) -> None:
        """Delete what the throughput runs stored (see the module docstring)."""
        if self.store_dir is None:
            return
        cells = self.store_dir / "episodes"
        for path in [*cells.glob("*/*/"), *self.store_dir.glob("[0-9]*")]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- chunks


def _frames(n: int, rng: np.random.Generator) -> list[bytes]:
    """Camera-like JPEGs: a smooth scene plus sensor noise, quality 90 (as the edge sends)."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for i in range(n):
        base = ((xx + yy + 7 * i) % 256).astype(np.float32)
        img = np.stack([base, np.roll(base, 40 * i, 1), 255 - base], -1)
        img += rng.normal(0, 6, img.shape)
        out.append(simplejpeg.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90))
    return out


def make_chunk(
    cell: str, episode: str, seq: int, n: int, frames: list[bytes] | None
) -> trajectory_pb2.StepChunk:
    first = seq * n
    t = (first + np.arange(n)) / HZ
    msg = trajectory_pb2.StepChunk(
        cell_id=cell,
        episode_id=episode,
        seq=seq,
        first_step=first,
        task="pick",
        policy_version="v0001",
        timestamp=to_tensor(t.astype(np.float64)),
        joint_pos=to_tensor(np.sin(t[:, None] + np.arange(14)).astype(np.float32)),
        action=to_tensor(np.cos(t[:, None] + np.arange(14)).astype(np.float32)),
        intervention=to_tensor(np.zeros(n, bool)),
        reward=to_tensor(np.zeros(n, np.float32)),
    )
    if frames is not None:
        for k, cam in enumerate(CAMERAS):
            msg.cameras.append(
                arrays_pb2.CameraFrames(
                    camera=cam,
                    encoding="jpeg",
                    height=H,
                    width=W,
                    channels=3,
                    frames=[frames[(first + i + k) % len(frames)] for i in range(n)],
                )
            )
    return msg


# ----------------------------------------------------------------------------- clients


def stream_all(port: int, payloads: list[bytes]) -> tuple[float, int]:
    """Send every payload on one stream as fast as flow control allows; (seconds, durable
    acks)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        call = ch.stream_stream(METHOD)
        t0 = time.perf_counter()
        acks = sum(
            trajectory_pb2.ChunkAck.FromString(raw).durable
            for raw in call(iter(payloads), timeout=300)
        )
        return time.perf_counter() - t0, acks


def throughput(child: Child, payloads: list[bytes], steps: int) -> dict[str, float]:
    cpu0 = child.cpu()
    seconds, acks = stream_all(child.port, payloads)
    cpu = child.cpu() - cpu0
    assert acks == len(payloads), (acks, len(payloads))
    return {
        "steps_per_s": steps / seconds,
        "mb_per_s": sum(map(len, payloads)) / seconds / 1e6,
        "server_cpu_s": cpu,
        "steps_per_cpu_s": steps / max(cpu, 1e-9),
    }


def paced_cells(
    port: int, n_cells: int, seconds: float, chunk_steps: int, frames: list[bytes] | None
) -> dict[str, float]:
    """n_cells streams, each recording at HZ and sending each chunk when its last step is
    recorded; returns latencies and counts."""
    period = chunk_steps / HZ
    latencies: list[float] = []
    sent_steps = [0] * n_cells
    acked_steps = [0] * n_cells
    errors: list[str] = []
    lock = threading.Lock()
    n_chunks = max(1, int(seconds / period))
    # Built before the clock starts: the client's own work must not look like latency.
    all_payloads = [
        [
            make_chunk(f"cell-{i:03d}", "ep-0", s, chunk_steps, frames).SerializeToString()
            for s in range(n_chunks)
        ]
        for i in range(n_cells)
    ]
    start = time.monotonic() + 1.0

    def cell(i: int) -> None:
        name = f"cell-{i:03d}"
        payloads = all_payloads[i]
        # Cells start spread over one chunk period, as real ones would be.
        t0 = start + period * i / n_cells
        step_times: dict[int, float] = {}

        def requests() -> Iterator[bytes]:
            for s, p in enumerate(payloads):
                due = t0 + (s + 1) * period  # the chunk's last step is recorded now
                time.sleep(max(0.0, due - time.monotonic()))
                step_times[s] = due
                sent_steps[i] += chunk_steps
                yield p

        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
                mine = []
                for s, ack_raw in enumerate(ch.stream_stream(METHOD)(requests(), timeout=300)):
                    now = time.monotonic()
                    ack = trajectory_pb2.ChunkAck.FromString(ack_raw)
                    if not ack.durable:
                        errors.append(ack.message)
                        continue
                    acked_steps[i] += chunk_steps
                    closed = step_times[s]
                    # Step k of the chunk was recorded (chunk_steps-1-k) periods before close.
                    mine.extend(now - (closed - k / HZ) for k in range(chunk_steps))
            with lock:
                latencies.extend(mine)
        except grpc.RpcError as exc:
            errors.append(f"{name}: {exc.code().name} {exc.details()}")

    threads = [threading.Thread(target=cell, args=(i,)) for i in range(n_cells)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "cells": n_cells,
        "steps_sent": int(sum(sent_steps)),
        "steps_acked": int(sum(acked_steps)),
        "errors": len(errors),
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
    }


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median steps/s (the upper middle one of an even count)."""
    return dict(sorted(runs, key=lambda r: r["steps_per_s"])[len(runs) // 2])


def _figures(runs: list[dict[str, float]]) -> str:
    return ", ".join(f"{r['steps_per_s']:.0f}" for r in runs)


def light_cells(store_root: Path, n_cells: int, seconds: float, chunk_steps: int) -> dict:
    child = Child("ingest", str(store_root))
    try:
        cpu0, t0 = child.cpu(), time.monotonic()
        res = paced_cells(child.port, n_cells, seconds, chunk_steps, None)
        cpu, wall = child.cpu() - cpu0, time.monotonic() - t0
    finally:
        child.close()
    from learner.store import EpisodeStore

    stored, _ = EpisodeStore(store_root).totals()
    res.update(
        steps_stored=stored,
        lost_steps=res["steps_sent"] - stored,
        server_cpu_per_cell_per_s=cpu / wall / n_cells,
        server_cpu_ms_per_step=1e3 * cpu / max(stored, 1),
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="length of each paced run")
    p.add_argument("--chunks", type=int, default=60, help="chunks in the throughput runs")
    p.add_argument("--repeats", type=int, default=5, help="raw/ingest/write throughput rounds")
    p.add_argument("--chunk-steps", type=int, default=20, help="steps a chunk (throughput)")
    p.add_argument(
        "--latency-chunk-steps", type=int, default=5, help="steps a chunk in the paced runs"
    )
    p.add_argument("--light-chunk-steps", type=int, default=20, help="steps a chunk, light cells")
    p.add_argument(
        "--serve", choices=["ingest", "ingest-nosync", "raw", "write"], help=argparse.SUPPRESS
    )
    p.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.store)
        return 0

    rng = np.random.default_rng(0)
    frames = _frames(16, rng)
    n = args.chunk_steps

    def run_payloads(r: int) -> list[bytes]:
        # One episode per pair (ingest stores each once); raw receives the very same bytes.
        return [
            make_chunk("cell-01", f"ep-{r}", s, n, frames).SerializeToString()
            for s in range(args.chunks)
        ]

    steps = n * args.chunks
    print(
        f"{args.repeats} x {args.chunks} chunks of {n} steps, 3 JPEG {H}x{W} frames a step "
        f"({np.mean([len(f) for f in frames]) / 1e3:.1f} kB each), "
        f"{sum(map(len, run_payloads(0))) / 1e6:.1f} MB a run"
    )
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        raw_child = Child("raw", "")
        (tmp_path / "written").mkdir()
        write_child = Child("write", str(tmp_path / "written"))
        child = Child("ingest", str(tmp_path / "store"))
        nosync_child = Child("ingest-nosync", str(tmp_path / "store-nosync"))
        try:
            warm = [
                make_chunk("cell-00", "warm", s, n, frames).SerializeToString() for s in range(3)
            ]
            for server in (raw_child, write_child, child, nosync_child):
                stream_all(server.port, warm)
            raws, ings, writes, nosyncs = [], [], [], []
            order = [
                (raws, raw_child),
                (ings, child),
                (writes, write_child),
                (nosyncs, nosync_child),
            ]
            for r in range(args.repeats):
                payloads = run_payloads(r)
                # Rotate which goes first, so a trend in the machine's load favours none.
                k = r % len(order)
                for out, server in order[k:] + order[:k]:
                    out.append(throughput(server, payloads, steps))
                    server.discard_written()
            ratios = [i["steps_per_s"] / w["steps_per_s"] for i, w in zip(ings, raws, strict=True)]
            ceiling = [
                c["steps_per_s"] / w["steps_per_s"] for c, w in zip(writes, raws, strict=True)
            ]
            to_ceiling = [
                i["steps_per_s"] / c["steps_per_s"] for i, c in zip(ings, writes, strict=True)
            ]
            fsync_cost = [
                i["steps_per_s"] / u["steps_per_s"] for i, u in zip(ings, nosyncs, strict=True)
            ]
            raw = _median_run(raws)
            ing = _median_run(ings)
            for median, all_runs in ((raw, raws), (ing, ings)):
                cpu_s = sum(x["server_cpu_s"] for x in all_runs)
                median["steps_per_cpu_s"] = steps * len(all_runs) / max(cpu_s, 1e-9)
            print(
                f"raw gRPC:  {raw['steps_per_s']:.0f} steps/s (median), "
                f"{raw['mb_per_s']:.0f} MB/s, {raw['steps_per_cpu_s']:.0f} steps per server CPU "
                f"second; runs {_figures(raws)}"
            )
            print(
                f"ingest:    {ing['steps_per_s']:.0f} steps/s (median), "
                f"{ing['mb_per_s']:.0f} MB/s, {ing['steps_per_cpu_s']:.0f} steps per server CPU "
                f"second; runs {_figures(ings)}"
            )
            print(f"ratio per round: {', '.join(f'{x:.2f}' for x in ratios)}")
            print(
                f"fsync write ceiling (receive, write the bytes once, fsync in group commit "
                f"batches, ack): {_median_run(writes)['steps_per_s']:.0f} steps/s (median), "
                f"ratio to raw per round {', '.join(f'{x:.2f}' for x in ceiling)}; ingest to "
                f"it per round {', '.join(f'{x:.2f}' for x in to_ceiling)}"
            )
            print(
                f"fsync cost: ingest without fsync {_median_run(nosyncs)['steps_per_s']:.0f} "
                f"steps/s (median); with over without per round "
                f"{', '.join(f'{x:.2f}' for x in fsync_cost)}"
            )
        except BaseException:
            child.close()
            raise
        finally:
            raw_child.close()
            write_child.close()
            nosync_child.close()
        try:
            lat = paced_cells(child.port, 4, args.seconds, args.latency_chunk_steps, frames)
            print(
                f"latency, 4 camera cells at {HZ:.0f} Hz, {args.latency_chunk_steps}-step "
                f"chunks: p50 {lat['p50_s']:.3f} s, p99 {lat['p99_s']:.3f} s"
            )
        finally:
            child.close()

        few = light_cells(tmp_path / "light8", 8, args.seconds, args.light_chunk_steps)
        many = light_cells(tmp_path / "light64", 64, args.seconds, args.light_chunk_steps)
        for r in (few, many):
            print(
                f"{r['cells']} light cells: sent {r['steps_sent']}, stored {r['steps_stored']}, "
                f"lost {r['lost_steps']}, p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s, "
                f"server CPU {100 * r['server_cpu_per_cell_per_s']:.2f}% a cell, "
                f"{r['server_cpu_ms_per_step']:.3f} ms a step"
            )

    result = {
        "bench": "ingest",
        "cpu_count": psutil.cpu_count(),
        "frames_per_step": len(CAMERAS),
        "frame_shape": [H, W, 3],
        "chunk_steps": n,
        "repeats": args.repeats,
        "raw_grpc_steps_per_s": round(raw["steps_per_s"], 1),
        "raw_grpc_mb_per_s": round(raw["mb_per_s"], 1),
        "ingest_steps_per_s": round(ing["steps_per_s"], 1),
        "ingest_mb_per_s": round(ing["mb_per_s"], 1),
        "ratio_to_raw_grpc": round(float(np.median(ratios)), 3),
        "ratio_runs": [round(x, 3) for x in ratios],
        "fsync_write_ceiling_steps_per_s": round(_median_run(writes)["steps_per_s"], 1),
        "write_ceiling_ratio": round(float(np.median(ceiling)), 3),
        "write_ceiling_runs": [round(x, 3) for x in ceiling],
        "ratio_to_fsync_write_ceiling": round(float(np.median(to_ceiling)), 3),
        "ratio_to_fsync_write_ceiling_runs": [round(x, 3) for x in to_ceiling],
        "ingest_nosync_steps_per_s": round(_median_run(nosyncs)["steps_per_s"], 1),
        "fsync_cost_ratio": round(float(np.median(fsync_cost)), 3),
        # Load-independent view: server CPU per step, ingest against raw (1.0 = free).
        "raw_grpc_steps_per_cpu_s": round(raw["steps_per_cpu_s"], 1),
        "cpu_ratio_to_raw_grpc": round(ing["steps_per_cpu_s"] / raw["steps_per_cpu_s"], 3),
        "steps_per_s_per_core": round(ing["steps_per_cpu_s"], 1),
        "latency_chunk_steps": args.latency_chunk_steps,
        "latency_p50_s": round(lat["p50_s"], 3),
        "latency_p99_s": round(lat["p99_s"], 3),
        "latency_errors": lat["errors"],
        "light_cells": many["cells"],
        "light_cells_lost_steps": many["lost_steps"],
        "light_cells_errors": many["errors"],
        "light_cells_p50_s": round(many["p50_s"], 3),
        "light_cells_p99_s": round(many["p99_s"], 3),
        "server_cpu_per_cell_8": round(few["server_cpu_per_cell_per_s"], 5),
        "server_cpu_per_cell_64": round(many["server_cpu_per_cell_per_s"], 5),
        "light_chunk_steps": args.light_chunk_steps,
        "server_cpu_ms_per_step_8": round(few["server_cpu_ms_per_step"], 4),
        "server_cpu_ms_per_step_64": round(many["server_cpu_ms_per_step"], 4),
        "goals": GOALS,
    }
    result["met"] = {
        "ratio_to_raw_grpc": result["ratio_to_raw_grpc"] >= GOALS["ratio_to_raw_grpc"],
        "ratio_to_fsync_write_ceiling": result["ratio_to_fsync_write_ceiling"]
        >= GOALS["ratio_to_fsync_write_ceiling"],
        "steps_per_s_per_core": result["steps_per_s_per_core"] >= GOALS["steps_per_s_per_core"],
        "latency_p50_s": result["latency_p50_s"] <= GOALS["latency_p50_s"],
        "latency_p99_s": result["latency_p99_s"] <= GOALS["latency_p99_s"],
        "light_cells_lost_steps": result["light_cells_lost_steps"] == 0,
        # Flat: the server's CPU per stored step at 64 cells within 1.5x of that at 8
        # (per cell per second misleads once a saturated server falls behind).
        "flat_cost_per_cell": result["server_cpu_ms_per_step_64"]
        <= 1.5 * max(result["server_cpu_ms_per_step_8"], 1e-6),
        "light_cells_p99_s": result["light_cells_p99_s"] <= GOALS["latency_p99_s"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

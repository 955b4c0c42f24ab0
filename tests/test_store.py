"""The zarr episode store keeps exactly the steps it was given, once, and survives a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import simplejpeg
import zarr

import learner.zarr_direct
from fleet.common.wire import to_tensor
from learner.chunks import ChunkRejected, DecodedChunk, decode_chunk
from learner.store import AppendResult, EpisodeRef, EpisodeStore
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2

T = 8  # steps per chunk
H, W = 16, 24
CAMERAS = ("overhead", "left_wrist")


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), quality=90)


def make_msg(
    seq: int,
    *,
    cell: str = "c1",
    episode: str = "e1",
    n: int = T,
    last: bool = False,
    task: str = "pick",
    cameras: tuple[str, ...] = CAMERAS,
) -> trajectory_pb2.StepChunk:
    """Chunk `seq` of an episode of n-step chunks; values derive from (episode, step)."""
    first = seq * n
    steps = np.arange(first, first + n)
    base = float(sum(episode.encode()))
    msg = trajectory_pb2.StepChunk(
        cell_id=cell,
        episode_id=episode,
        seq=seq,
        first_step=first,
        task=task,
        policy_version="v0001",
        timestamp=to_tensor(100.0 + steps * 0.02),
        joint_pos=to_tensor((base + steps[:, None] + np.arange(14) / 100).astype(np.float32)),
        action=to_tensor((-base - steps[:, None] - np.arange(14) / 100).astype(np.float32)),
        intervention=to_tensor(steps % 3 == 0),
        reward=to_tensor((steps / 10).astype(np.float32)),
        last=last,
    )
    for c, cam in enumerate(cameras):
        msg.cameras.append(
            arrays_pb2.CameraFrames(
                camera=cam,
                encoding="jpeg",
                height=H,
                width=W,
                channels=3,
                frames=[jpeg(1000 * c + int(s)) for s in steps],
            )
        )
    if last:
        msg.outcome.success = True
        msg.outcome.reason = "success"
        msg.outcome.started_at = 100.0
        msg.outcome.ended_at = float(100.0 + (first + n) * 0.02)
    return msg


def chunk(seq: int, **kw) -> DecodedChunk:
    return decode_chunk(make_msg(seq, **kw), known_tasks=None)


def episode_msgs(n_chunks: int, **kw) -> list[trajectory_pb2.StepChunk]:
    return [make_msg(i, last=i == n_chunks - 1, **kw) for i in range(n_chunks)]


def assert_holds_exactly(store: EpisodeStore, msgs: list[trajectory_pb2.StepChunk]) -> None:
    """The episode in `store` is exactly the concatenation of `msgs`."""
    chunks = [decode_chunk(m, known_tasks=None) for m in msgs]
    ref = EpisodeRef(chunks[0].cell_id, chunks[0].episode_id)
    data = store.read_episode(ref)
    for name in ("timestamp", "joint_pos", "action", "intervention", "reward"):
        want = np.concatenate([getattr(c, name) for c in chunks])
        got = getattr(data, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for cam in chunks[0].cameras:
        assert data.frames[cam] == [f for c in chunks for f in c.cameras[cam].frames]
    assert data.attrs["n_steps"] == sum(c.n_steps for c in chunks)
    assert data.attrs["next_seq"] == len(chunks)


@pytest.fixture
def store(tmp_path: Path) -> EpisodeStore:
    return EpisodeStore(tmp_path / "store")


def test_episode_round_trips_exactly_with_its_attributes(store: EpisodeStore) -> None:
    msgs = episode_msgs(3)
    results = [store.append(decode_chunk(m, known_tasks=None)) for m in msgs]

    assert [r.steps_written for r in results] == [T, T, T]
    assert [r.episode_complete for r in results] == [False, False, True]
    assert not any(r.duplicate for r in results)
    assert_holds_exactly(store, msgs)
    attrs = store.read_episode(EpisodeRef("c1", "e1")).attrs
    assert attrs["task"] == "pick" and attrs["cell"] == "c1"
    assert attrs["policy_version"] == "v0001"
    assert attrs["complete"] is True and attrs["truncated"] is False
    assert attrs["outcome"]["success"] is True and attrs["outcome"]["reason"] == "success"
    assert attrs["ended_at"] == pytest.approx(100.0 + 3 * T * 0.02)
    assert attrs["cameras"]["overhead"] == {
        "encoding": "jpeg",
        "height": H,
        "width": W,
        "channels": 3,
    }
    assert store.totals() == (3 * T, 1)


def test_jpeg_frames_round_trip_byte_for_byte(store: EpisodeStore) -> None:
    msgs = episode_msgs(2)
    for m in msgs:
        store.append(decode_chunk(m, known_tasks=None))
    data = store.read_episode(EpisodeRef("c1", "e1"))
    assert data.frames["left_wrist"][5] == jpeg(1000 + 5)
    image = simplejpeg.decode_jpeg(data.frames["overhead"][T + 1], colorspace="RGB")
    assert image.shape == (H, W, 3)
    assert store.read_episode(EpisodeRef("c1", "e1"), frames=False).frames == {}


def test_resent_chunk_is_a_duplicate_and_stored_once(store: EpisodeStore) -> None:
    store.append(chunk(0))
    store.append(chunk(1))
    again = store.append(chunk(0))
    assert again.duplicate and again.steps_written == 0 and not again.episode_complete
    store.append(chunk(2, last=True))
    final = store.append(chunk(2, last=True))
    assert final.duplicate and final.episode_complete
    assert_holds_exactly(store, episode_msgs(3))
    assert store.totals() == (3 * T, 1)


def test_gap_and_wrong_first_step_are_failed_precondition(store: EpisodeStore) -> None:
    with pytest.raises(ChunkRejected) as unknown:
        store.append(chunk(1))
    assert unknown.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected seq 0" in unknown.value.message
    store.append(chunk(0))
    with pytest.raises(ChunkRejected) as gap:
        store.append(chunk(2))
    assert gap.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected seq 1" in gap.value.message and "e1" in gap.value.message

    shifted = make_msg(1)
    shifted.first_step = T + 3
    with pytest.raises(ChunkRejected) as step:
        store.append(decode_chunk(shifted, known_tasks=None))
    assert step.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"expected first_step {T}" in step.value.message
    assert store.totals() == (T, 1)


def test_complete_episode_takes_no_more_chunks(store: EpisodeStore) -> None:
    for m in episode_msgs(2):
        store.append(decode_chunk(m, known_tasks=None))
    with pytest.raises(ChunkRejected) as exc:
        store.append(chunk(2))
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "already complete" in exc.value.message
    assert store.append(chunk(1, last=True)).duplicate
    assert store.totals() == (2 * T, 1)


def test_later_chunk_must_keep_the_episodes_cameras_and_task(store: EpisodeStore) -> None:
    store.append(chunk(0))
    with pytest.raises(ChunkRejected) as cams:
        store.append(chunk(1, cameras=("overhead",)))
    assert cams.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ChunkRejected) as task:
        store.append(chunk(1, task="place"))
    assert task.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert store.totals() == (T, 1)


def test_crash_between_rows_and_commit_is_repaired_by_the_resend(
    store: EpisodeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append(chunk(0))
    commit_file = store.root / EpisodeRef("c1", "e1").path / "zarr.json"
    real = learner.zarr_direct.put_json

    def crash(path: Path, doc: dict) -> None:  # dies after the rows, before the commit
        if path == commit_file:
            raise OSError("simulated crash before commit")
        real(path, doc)

    monkeypatch.setattr(learner.zarr_direct, "put_json", crash)
    with pytest.raises(OSError):
        store.append(chunk(1))
    monkeypatch.setattr(learner.zarr_direct, "put_json", real)
    # The rows of seq 1 did reach their chunk files; only the commit is missing.
    assert (commit_file.parent / "cameras" / "overhead" / "c" / "1").is_file()

    # A reader (here: a fresh instance, as after a restart) trusts only committed rows.
    reopened = EpisodeStore(store.root)
    assert reopened.totals() == (T, 1)
    assert reopened.read_episode(EpisodeRef("c1", "e1")).joint_pos.shape == (T, 14)
    # The actor never got an ack, so it resends seq 1: stored exactly once.
    assert not reopened.append(chunk(1)).duplicate
    reopened.append(chunk(2, last=True))
    assert_holds_exactly(reopened, episode_msgs(3))


def test_episodes_lists_sorted_and_filters_incomplete(store: EpisodeStore) -> None:
    for m in episode_msgs(2, cell="c2", episode="b"):
        store.append(decode_chunk(m, known_tasks=None))
    for m in episode_msgs(1, cell="c1", episode="z"):
        store.append(decode_chunk(m, known_tasks=None))
    store.append(chunk(0, cell="c1", episode="a"))  # still running

    assert store.episodes() == [EpisodeRef("c1", "z"), EpisodeRef("c2", "b")]
    assert store.episodes(complete_only=False) == [
        EpisodeRef("c1", "a"),
        EpisodeRef("c1", "z"),
        EpisodeRef("c2", "b"),
    ]
    assert store.totals() == (4 * T, 3)


def test_another_process_sees_new_episodes_without_restart(store: EpisodeStore) -> None:
    reader = EpisodeStore(store.root)  # opened before anything was written
    assert reader.episodes() == [] and reader.totals() == (0, 0)
    for m in episode_msgs(2):
        store.append(decode_chunk(m, known_tasks=None))
    store.append(chunk(0, episode="e2"))
    assert reader.episodes() == [EpisodeRef("c1", "e1")]
    assert reader.totals() == (3 * T, 2)

    script = (
        "import json, sys\n"
        "from learner.store import EpisodeStore\n"
        "s = EpisodeStore(sys.argv[1])\n"
        "refs = s.episodes(complete_only=False)\n"
        "d = s.read_episode(refs[0])\n"
        "print(json.dumps([s.totals(), [r.episode_id for r in refs], d.attrs['n_steps'],"
        " float(d.joint_pos.sum()), len(d.frames['overhead'])]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(store.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    totals, ids, n, jsum, n_frames = json.loads(out.stdout)
    assert totals == [3 * T, 2] and ids == ["e1", "e2"]
    want = store.read_episode(EpisodeRef("c1", "e1"))
    assert n == 2 * T and n_frames == 2 * T
    assert jsum == pytest.approx(float(want.joint_pos.sum()))


def test_mark_truncated_flags_partial_episodes_only(store: EpisodeStore) -> None:
    store.append(chunk(0, episode="partial"))
    for m in episode_msgs(1, episode="done"):
        store.append(decode_chunk(m, known_tasks=None))

    store.mark_truncated(EpisodeRef("c1", "partial"), "cell c1 went silent")
    store.mark_truncated(EpisodeRef("c1", "done"), "should be ignored")
    partial = store.read_episode(EpisodeRef("c1", "partial")).attrs
    assert partial["truncated"] is True and partial["complete"] is False
    assert partial["truncated_reason"] == "cell c1 went silent"
    assert partial["n_steps"] == T  # kept, not dropped
    assert store.read_episode(EpisodeRef("c1", "done")).attrs["truncated"] is False
    with pytest.raises(KeyError):
        store.mark_truncated(EpisodeRef("c1", "nope"), "x")

    # The cell came back and resent the rest: the episode is whole again.
    store.append(chunk(1, episode="partial", last=True))
    attrs = store.read_episode(EpisodeRef("c1", "partial")).attrs
    assert attrs["complete"] is True and attrs["truncated"] is False


def test_parallel_writers_each_episode_exact_and_duplicates_once(store: EpisodeStore) -> None:
    episodes = [f"e{i}" for i in range(4)]
    msgs = {ep: episode_msgs(3, episode=ep) for ep in episodes}
    errors: list[BaseException] = []

    def write(ep: str) -> None:
        try:
            for m in msgs[ep]:
                # Two streams racing on the same key: one writes, the other is a duplicate.
                results: list[AppendResult] = []
                racers = [
                    threading.Thread(
                        target=lambda m=m, out=results: out.append(
                            store.append(decode_chunk(m, known_tasks=None))
                        )
                    )
                    for _ in range(2)
                ]
                for r in racers:
                    r.start()
                for r in racers:
                    r.join()
                assert sorted(r.duplicate for r in results) == [False, True]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(ep,)) for ep in episodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    for ep in episodes:
        assert_holds_exactly(store, msgs[ep])
    assert store.totals() == (4 * 3 * T, 4)


def test_frame_arrays_do_not_leak_zarr_warnings(store: EpisodeStore) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in episode_msgs(2):
            store.append(decode_chunk(m, known_tasks=None))
        store.read_episode(EpisodeRef("c1", "e1"))


def test_reader_during_writes_sees_only_whole_committed_chunks(store: EpisodeStore) -> None:
    msgs = episode_msgs(12)
    want = np.concatenate([decode_chunk(m, known_tasks=None).joint_pos for m in msgs])
    reader = EpisodeStore(store.root)
    seen: list[int] = []
    problems: list[str] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            if not reader.episodes(complete_only=False):
                continue
            data = reader.read_episode(EpisodeRef("c1", "e1"))
            n = data.attrs["n_steps"]
            if n % T or data.joint_pos.shape[0] != n or len(data.frames["overhead"]) != n:
                problems.append(f"torn read: n_steps {n}, rows {data.joint_pos.shape[0]}")
            elif not np.array_equal(data.joint_pos, want[:n]):
                problems.append(f"rows differ at n_steps {n}")
            seen.append(n)

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for m in msgs:
            store.append(decode_chunk(m, known_tasks=None))
    finally:
        done.set()
        thread.join(timeout=30)
    assert not problems, problems[:3]
    assert seen == sorted(seen)  # the reader never saw the episode shrink


def test_arrays_grow_ahead_and_readers_see_only_committed_rows(
    store: EpisodeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capacity runs ahead of n_steps (rare metadata rewrites); reads stop at n_steps."""
    monkeypatch.setattr("learner.store.MIN_CAPACITY_ROWS", 2 * T)
    msgs = episode_msgs(5)
    ref = EpisodeRef("c1", "e1")
    store.append(decode_chunk(msgs[0], known_tasks=None))
    meta = store.root / ref.path / "joint_pos" / "zarr.json"
    before = meta.read_bytes()
    store.append(decode_chunk(msgs[1], known_tasks=None))
    assert meta.read_bytes() == before  # within capacity: no array metadata rewrite
    for m in msgs[2:]:
        store.append(decode_chunk(m, known_tasks=None))
    assert_holds_exactly(store, msgs)
    group = zarr.open_group(store.root, path=ref.path, mode="r")
    assert group["joint_pos"].shape[0] >= 5 * T
    assert len(store.read_episode(ref).timestamp) == 5 * T


def test_two_store_objects_writing_in_turn_keep_the_episode_exact(tmp_path: Path) -> None:
    """A writer's cached handles are dropped once someone else committed (e.g. a restart)."""
    first, second = EpisodeStore(tmp_path / "s"), EpisodeStore(tmp_path / "s")
    msgs = episode_msgs(6)
    for i, m in enumerate(msgs):
        writer = first if i % 3 != 2 else second
        assert not writer.append(decode_chunk(m, known_tasks=None)).duplicate
    assert first.append(decode_chunk(msgs[-1], known_tasks=None)).duplicate
    assert_holds_exactly(first, msgs)
    assert_holds_exactly(EpisodeStore(tmp_path / "s"), msgs)


# ------------------------------------------------------------------ direct chunk writes


def read_with_plain_zarr(root: Path, ref: EpisodeRef) -> dict[str, object]:
    """The committed rows as zarr itself reads them (what the sampler and export rely on)."""
    group = zarr.open_group(root, path=ref.path, mode="r")
    n = group.attrs["n_steps"]
    out: dict[str, object] = {
        name: np.asarray(group[name][:n])
        for name in ("timestamp", "joint_pos", "action", "intervention", "reward")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cam in group.attrs["cameras"]:
            out[cam] = [bytes(f) for f in group[f"cameras/{cam}"][:n]]
    return out


def test_plain_zarr_reads_what_the_direct_writer_wrote(store: EpisodeStore) -> None:
    msgs = episode_msgs(4)
    for m in msgs:
        store.append(decode_chunk(m, known_tasks=None))
    got = read_with_plain_zarr(store.root, EpisodeRef("c1", "e1"))
    chunks = [decode_chunk(m, known_tasks=None) for m in msgs]
    for name in ("timestamp", "joint_pos", "action", "intervention", "reward"):
        want = np.concatenate([getattr(c, name) for c in chunks])
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert got[name].dtype == want.dtype  # type: ignore[union-attr]
    for cam in CAMERAS:
        assert got[cam] == [f for c in chunks for f in c.cameras[cam].frames]
    # Frame arrays are chunked at the upload's step count: one fresh file per append.
    frame_files = sorted(
        p.name for p in (store.root / "episodes/c1/e1/cameras/overhead/c").iterdir()
    )
    assert frame_files == ["0", "1", "2", "3"]


def test_chunk_files_are_byte_identical_to_zarrs_own(store: EpisodeStore, tmp_path: Path) -> None:
    """Same data written by zarr into an array with the same metadata: the same bytes."""
    msgs = episode_msgs(2)
    for m in msgs:
        store.append(decode_chunk(m, known_tasks=None))
    chunks = [decode_chunk(m, known_tasks=None) for m in msgs]
    ours = store.root / "episodes/c1/e1"
    ref_group = zarr.open_group(tmp_path / "ref", mode="w")
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in ("joint_pos", "intervention", "cameras/overhead"):
            meta = json.loads((ours / key / "zarr.json").read_text())
            (tmp_path / "ref" / key).mkdir(parents=True)
            (tmp_path / "ref" / key / "zarr.json").write_text(json.dumps(meta))
            arr = zarr.open_array(tmp_path / "ref", path=key, mode="r+")
            if key.startswith("cameras/"):
                values = np.empty(2 * T, dtype=object)
                values[:] = [f for c in chunks for f in c.cameras["overhead"].frames]
            else:
                values = np.concatenate([getattr(c, key) for c in chunks])
            arr[: 2 * T] = values
            for theirs in (tmp_path / "ref" / key / "c").rglob("*"):
                if theirs.is_file():
                    mine = ours / key / theirs.relative_to(tmp_path / "ref" / key)
                    assert mine.read_bytes() == theirs.read_bytes(), mine
                    compared += 1
    assert compared == 4  # joint_pos, intervention, two frame chunks
    del ref_group


def test_uneven_chunk_sizes_rewrite_shared_chunks_exactly(store: EpisodeStore) -> None:
    """Frame chunks follow the first upload's length; later uploads of other lengths
    straddle them, so committed frames are read back and rewritten (atomically)."""
    sizes = [T, 5, 11, 3, T, 2 * T + 1]
    msgs, first = [], 0
    for seq, n in enumerate(sizes):
        m = make_msg(seq, n=n, last=seq == len(sizes) - 1)
        # make_msg derives first_step from seq * n; uneven chunks need the real offset.
        m.first_step = first
        msgs.append(m)
        first += n
    for m in msgs:
        store.append(decode_chunk(m, known_tasks=None))
    data = store.read_episode(EpisodeRef("c1", "e1"))
    assert data.attrs["n_steps"] == sum(sizes)
    want = [f for m in msgs for f in decode_chunk(m, known_tasks=None).cameras["overhead"].frames]
    assert data.frames["overhead"] == want
    got = read_with_plain_zarr(store.root, EpisodeRef("c1", "e1"))
    assert got["overhead"] == want
    np.testing.assert_array_equal(
        got["joint_pos"],
        np.concatenate([decode_chunk(m, known_tasks=None).joint_pos for m in msgs]),
    )


def test_arrays_of_other_layouts_are_written_through_zarr(tmp_path: Path) -> None:
    """A store made by other code (zstd-compressed columns, another codec) stays appendable:
    compressed chunks are re-encoded whole, unknown codecs go through zarr itself."""
    root = tmp_path / "s"
    msgs = episode_msgs(4)
    EpisodeStore(root).append(decode_chunk(msgs[0], known_tasks=None))
    group = zarr.open_group(root, path="episodes/c1/e1", mode="r+")
    for name, compressors in (("joint_pos", "auto"), ("reward", zarr.codecs.BloscCodec())):
        old = np.asarray(group[name][:])
        del group[name]
        arr = group.create_array(
            name,
            shape=old.shape,
            chunks=(1024, *old.shape[1:]),
            dtype=old.dtype,
            compressors=compressors,
        )
        arr[:] = old
    store = EpisodeStore(root)  # a fresh writer sees the new layouts
    for m in msgs[1:]:
        store.append(decode_chunk(m, known_tasks=None))
    assert_holds_exactly(store, msgs)
    codecs = json.loads((root / "episodes/c1/e1/reward/zarr.json").read_text())["codecs"]
    assert codecs[-1]["name"] == "blosc"


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import learner.store as st
import learner.zarr_direct as zd
from test_store import chunk
store = st.EpisodeStore(sys.argv[1])
store.append(chunk(0))
where = sys.argv[2]
if where == "before_commit":
    real = zd.put_json
    def put_json(path, doc):
        if path.name == "zarr.json" and path.parent.name == "e1":
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, doc)
    zd.put_json = put_json
else:  # half way through writing a frame file
    def write_fd(fd, pieces):
        os.write(fd, b"".join(pieces[: len(pieces) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    zd.write_fd = write_fd
store.append(chunk(1))
"""


@pytest.mark.parametrize("where", ["before_commit", "mid_frame_write"])
def test_sigkill_during_an_append_leaves_the_old_commit(tmp_path: Path, where: str) -> None:
    root = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(root), where, str(Path(__file__).parent)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    if where == "mid_frame_write":
        # The fresh frame file past the commit was cut half way; no reader looks at it.
        torn = sorted(root.glob("episodes/c1/e1/cameras/*/c/1"))
        assert len(torn) == 1
        assert torn[0].stat().st_size < (torn[0].parent / "0").stat().st_size
    store = EpisodeStore(root)
    assert store.totals() == (T, 1)
    got = read_with_plain_zarr(root, EpisodeRef("c1", "e1"))
    assert got["overhead"] == chunk(0).cameras["overhead"].frames
    assert not store.append(chunk(1)).duplicate  # the resend rewrites the same rows
    store.append(chunk(2, last=True))
    assert_holds_exactly(store, episode_msgs(3))
    assert_holds_exactly(EpisodeStore(root), episode_msgs(3))  # the resend rewrote it whole


def test_raw_frames_are_zstd_compressed_and_read_back_exactly(store: EpisodeStore) -> None:
    """Raw (uncompressed) images go into zstd-compressed frame arrays; a chunk shared by two
    uploads is decompressed, extended and recompressed whole."""
    rng = np.random.default_rng(3)
    msgs, first = [], 0
    for seq, n in enumerate([4, 3, 6]):
        m = make_msg(seq, n=n, cameras=(), last=seq == 2)
        m.first_step = first
        m.cameras.append(
            arrays_pb2.CameraFrames(
                camera="depth",
                encoding="raw",
                height=4,
                width=5,
                channels=1,
                frames=[rng.integers(0, 3, 20, dtype=np.uint8).tobytes() for _ in range(n)],
            )
        )
        msgs.append(m)
        first += n
    for m in msgs:
        store.append(decode_chunk(m, known_tasks=None))
    meta = json.loads((store.root / "episodes/c1/e1/cameras/depth/zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["vlen-bytes", "zstd"]
    want = [f for m in msgs for f in m.cameras[0].frames]
    assert read_with_plain_zarr(store.root, EpisodeRef("c1", "e1"))["depth"] == want
    assert store.read_episode(EpisodeRef("c1", "e1")).frames["depth"] == want

"""The kinematic sim cell: expert success, cameras, CellHardware round trip, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest

from drivers.cell import CellHardware
from drivers.interfaces import ArmBus, Camera, Clock, Frame, JointState, Operator, TaskScene
from drivers.safety import SafetyGate
from drivers.sim import (
    CAMERA_NAMES,
    EPISODE_TIME_S,
    SIM_TASKS,
    SimArmBus,
    SimCamera,
    SimCell,
    SimClock,
    SimOperator,
    SimWorld,
    make_sim_cell,
)
from drivers.sim.render import CUBE_RGB, FINGER_RGB, TARGET_RGB
from drivers.sim.world import (
    ARM_LOWER,
    ARM_UPPER,
    GRASP_CLOSE,
    HOME,
    forward_kinematics,
    inverse_kinematics,
)
from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER

HZ = 20.0
TICKS = round(EPISODE_TIME_S * HZ)


def _episode(
    cell: SimCell,
    task: str,
    seed: int,
    policy=None,
    policy_ticks: int = 0,
    record: list | None = None,
) -> bool:
    """One episode through CellHardware: `policy` for the first ticks, then the operator."""
    cell.scene.reset(task, seed)
    t = cell.clock.now()
    for k in range(TICKS):
        obs = cell.hardware.observe()
        use_policy = policy is not None and k < policy_ticks
        target = policy(obs) if use_policy else cell.operator.action()
        sent = cell.hardware.command(target)
        if record is not None:
            record.append((obs.joint_pos.copy(), sent.copy(), obs.stamp))
        t += 1.0 / HZ
        cell.clock.sleep_until(t)
        if cell.scene.success():
            return True
    return False


def _protocol_members(proto: type) -> set[str]:
    return {m for m in (*vars(proto), *getattr(proto, "__annotations__", {})) if m[0] != "_"}


def test_sim_devices_implement_the_driver_protocols():
    cell = make_sim_cell("c0", realtime_factor=0)
    assert isinstance(cell.hardware, CellHardware) and isinstance(cell.world, SimWorld)
    assert isinstance(cell.clock, SimClock) and isinstance(cell.operator, SimOperator)
    pairs = [(arm, ArmBus) for arm in cell.hardware.arms.values()]
    pairs += [(cam, Camera) for cam in cell.hardware.cameras]
    pairs += [(cell.clock, Clock), (cell.operator, Operator), (cell.scene, TaskScene)]
    for obj, proto in pairs:
        missing = {m for m in _protocol_members(proto) if not hasattr(obj, m)}
        assert not missing, (type(obj).__name__, missing)
    assert all(isinstance(arm, SimArmBus) for arm in cell.hardware.arms.values())
    assert cell.scene.tasks == SIM_TASKS == ("pick_cube", "touch_target")
    assert cell.hardware.camera_names == ("overhead", "front")


@pytest.mark.parametrize("task", SIM_TASKS)
def test_scripted_expert_succeeds(task):
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    cell.operator.force(True)
    seeds = range(30)
    wins = sum(_episode(cell, task, seed) for seed in seeds)
    assert wins / len(seeds) >= 0.9, f"{task}: {wins}/{len(seeds)}"


@pytest.mark.parametrize("task", SIM_TASKS)
def test_expert_recovers_after_a_random_policy(task):
    """The operator takes over from whatever state a (bad) policy left the arms in."""
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    rng = np.random.default_rng(7)

    def random_policy(obs):
        return obs.joint_pos + rng.normal(0.0, 0.3, JOINT_DIM).astype(np.float32)

    seeds = range(20)
    wins = sum(_episode(cell, task, s, random_policy, policy_ticks=40) for s in seeds)
    assert wins / len(seeds) >= 0.9, f"{task}: {wins}/{len(seeds)}"


def test_ik_matches_fk_over_the_task_regions():
    rng = np.random.default_rng(0)
    for side, (xs, ys) in (
        (0, ((-0.22, 0.02), (-0.15, 0.15))),
        (1, ((-0.02, 0.22), (-0.15, 0.15))),
    ):
        for _ in range(200):
            p = np.array([rng.uniform(*xs), rng.uniform(*ys), rng.uniform(0.0, 0.25)])
            q = inverse_kinematics(side, p)
            assert np.all(q >= ARM_LOWER) and np.all(q <= ARM_UPPER)
            np.testing.assert_allclose(forward_kinematics(side, q).tip, p, atol=1e-9)


def test_scene_reset_homes_arms_and_resets_gate():
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    cell.scene.reset("pick_cube", 1)
    cell.hardware.command(np.zeros(JOINT_DIM, dtype=np.float32))
    cell.clock.sleep_until(cell.clock.now() + 1.0)
    assert cell.hardware.gate.last_command is not None
    assert not np.allclose(cell.world.q, HOME)
    cell.scene.reset("touch_target", 2)
    assert cell.hardware.gate.last_command is None
    np.testing.assert_array_equal(
        cell.hardware.observe().joint_pos, np.tile(HOME, 2).astype(np.float32)
    )
    with pytest.raises(ValueError):
        cell.scene.reset("juggle", 0)


def test_reward_is_one_on_success_else_minus_distance():
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    cell.operator.force(True)
    cell.scene.reset("touch_target", 3)
    r0 = cell.scene.reward()
    assert -1.0 < r0 < 0.0
    tip = cell.world.tip(1)
    assert r0 == pytest.approx(-np.linalg.norm(tip - cell.world.target))
    assert _episode(cell, "touch_target", 3)
    assert cell.scene.reward() == 1.0


def test_grasp_needs_closing_near_the_cube_and_release_drops_it():
    world = SimWorld()
    world.reset("pick_cube", 0)
    above = world.cube + np.array([0.0, 0.0, 0.10])
    world.set_goal(0, inverse_kinematics(0, above, gripper=1.0))
    world.step(400)
    world.set_goal(0, inverse_kinematics(0, above, gripper=0.0))  # closes far above: nothing
    world.step(100)
    assert world.holder is None
    world.set_goal(0, inverse_kinematics(0, world.cube, gripper=1.0))
    world.step(400)
    world.set_goal(0, inverse_kinematics(0, world.cube, gripper=0.0))
    world.step(100)
    assert world.holder == 0
    assert world.q[0, -1] >= 0.29  # the fingers stop on the cube
    higher = above + np.array([0.0, 0.0, 0.05])
    world.set_goal(0, inverse_kinematics(0, higher, gripper=0.0))
    world.step(400)
    assert world.cube[2] > 0.12
    world.set_goal(0, inverse_kinematics(0, higher, gripper=1.0))
    world.step(100)
    assert world.holder is None and world.cube[2] == pytest.approx(0.02)
    assert world.q[0, -1] > GRASP_CLOSE


def test_servos_respect_limits_and_velocity():
    world = SimWorld(dt=0.005)
    world.reset("pick_cube", 0)
    world.set_goal(0, np.full(7, 100.0))  # clamped by the servo's own limits
    before = world.q.copy()
    world.step(1)
    moved = np.abs(world.q - before)
    assert np.all(moved[0, :6] <= 3.0 * 0.005 + 1e-12) and moved[0, 6] <= 4.0 * 0.005 + 1e-12
    world.step(2000)
    np.testing.assert_allclose(world.q[0], ARM_UPPER)


@pytest.mark.parametrize("name", CAMERA_NAMES)
def test_camera_frames(name):
    cell = make_sim_cell("c0", realtime_factor=0, cameras=(name,), height=48, width=64)
    cell.scene.reset("pick_cube", 0)
    obs = cell.hardware.observe()
    frame = obs.frames[name]
    assert isinstance(frame, Frame) and frame.camera == name
    assert frame.color.shape == (48, 64, 3) and frame.color.dtype == np.uint8
    assert frame.depth is not None
    assert frame.depth.shape == (48, 64) and frame.depth.dtype == np.uint16
    assert frame.stamp == cell.clock.now() == obs.stamp
    assert (frame.depth > 0).mean() > 0.3  # the table or the floor is in view
    cam = cell.hardware.cameras[0]
    assert cam.read() is frame  # nothing moved: the same frame
    cell.clock.sleep_until(cell.clock.now() + 0.05)
    later = cam.read()
    assert later.stamp == pytest.approx(frame.stamp + 0.05)


def _has(img: np.ndarray, rgb) -> int:
    return int(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1).sum())


def test_overhead_and_front_show_the_scene():
    cell = make_sim_cell("c0", realtime_factor=0)
    cell.scene.reset("pick_cube", 5)
    frames = cell.hardware.observe().frames
    for name in ("overhead", "front"):
        img = frames[name].color
        assert img.shape == (96, 128, 3)
        for rgb in (CUBE_RGB, TARGET_RGB, *FINGER_RGB):
            assert _has(img, rgb) > 0, (name, rgb)
    # Overhead depth: the table top is ~1.2 m away, the cube a little closer.
    d = frames["overhead"].depth
    cube = np.all(frames["overhead"].color == np.array(CUBE_RGB, dtype=np.uint8), axis=-1)
    assert 1150 <= np.median(d[d > 0]) <= 1300
    assert d[cube].max() < np.median(d[d > 0])


def test_unknown_camera_raises():
    with pytest.raises(ValueError, match="unknown sim camera"):
        make_sim_cell("c0", cameras=("thermal",))


def test_render_is_cheap():
    world = SimWorld()
    world.reset("pick_cube", 0)
    for name in ("overhead", "front"):
        cam = SimCamera(world, name)
        cam.read()
        t0 = time.perf_counter()
        for _ in range(20):
            world.revision += 1  # defeat the frame cache
            cam.read()
        per_frame = (time.perf_counter() - t0) / 20
        assert per_frame < 0.02, f"{name}: {per_frame * 1e3:.2f} ms"  # ~0.3 ms here; loose


class _FakeArm:
    def __init__(self, name: str, start: float) -> None:
        self.name = name
        self.position = np.full(7, start)
        self.writes: list[np.ndarray] = []
        self.reads = 0
        self.closed = False

    def read_state(self) -> JointState:
        self.reads += 1
        z = np.zeros(7)
        return JointState(position=self.position.copy(), velocity=z, current=z, stamp=0.0)

    def write_goal(self, position: np.ndarray) -> None:
        self.writes.append(np.array(position))

    def set_torque(self, enabled: bool) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _FakeClock:
    def now(self) -> float:
        return 12.5

    def sleep_until(self, t: float) -> None:
        pass


def test_cell_hardware_with_fake_arms():
    left, right = _FakeArm("left", 0.1), _FakeArm("right", 0.2)
    hw = CellHardware(
        {"left": left, "right": right}, [], _FakeClock(), SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.05)
    )
    obs = hw.observe()
    assert obs.joint_pos.dtype == np.float32 and obs.joint_pos.shape == (JOINT_DIM,)
    np.testing.assert_allclose(obs.joint_pos[:7], 0.1)
    np.testing.assert_allclose(obs.joint_pos[7:], 0.2)
    assert obs.frames == {} and obs.stamp == 12.5
    reads = left.reads
    sent = hw.command(np.ones(JOINT_DIM))  # first command: steps from the present position
    assert left.reads == reads + 1
    assert sent.dtype == np.float32
    assert len(left.writes) == 1 and len(right.writes) == 1
    np.testing.assert_allclose(left.writes[0], 0.15, atol=1e-6)
    np.testing.assert_allclose(right.writes[0], 0.25, atol=1e-6)
    np.testing.assert_array_equal(
        np.concatenate([left.writes[0], right.writes[0]]), sent.astype(np.float64)
    )
    hw.command(np.ones(JOINT_DIM))  # later commands step from the last one: no read
    assert left.reads == reads + 1
    nan = np.full(JOINT_DIM, np.nan)
    held = hw.command(nan)
    np.testing.assert_array_equal(held, np.concatenate([left.writes[1], right.writes[1]]))
    assert hw.gate.held == 1
    hw.hold()
    np.testing.assert_allclose(left.writes[-1], 0.1)
    hw.close()
    assert left.closed and right.closed
    with pytest.raises(ValueError):
        CellHardware({"left": left}, [], _FakeClock(), SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.1))


def test_observe_command_round_trip():
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    cell.scene.reset("pick_cube", 0)
    hw = cell.hardware
    start = hw.observe().joint_pos
    target = start.copy()
    target[0] += 0.5
    target[8] -= 0.3
    target[13] = 0.0
    t = cell.clock.now()
    for _ in range(20):
        sent = hw.command(target)
        assert np.all(np.abs(sent - hw.gate.last_command) == 0)
        t += 1 / HZ
        cell.clock.sleep_until(t)
    np.testing.assert_allclose(hw.observe().joint_pos, target, atol=1e-5)
    # Out-of-limit and non-finite commands never reach the arms.
    hw.command(np.full(JOINT_DIM, 1e9, dtype=np.float32))
    cell.clock.sleep_until(cell.clock.now() + 5.0)
    q = hw.observe().joint_pos
    assert np.all(q <= JOINT_UPPER) and np.all(q >= JOINT_LOWER)
    before = hw.observe().joint_pos
    hw.command(np.full(JOINT_DIM, np.nan))
    cell.clock.sleep_until(cell.clock.now() + 1.0)
    np.testing.assert_array_equal(hw.observe().joint_pos, before)


def test_sim_arm_bus():
    world = SimWorld()
    world.reset("pick_cube", 0)
    bus = SimArmBus(world, "right")
    state = bus.read_state()
    assert state.position.shape == state.velocity.shape == state.current.shape == (7,)
    with pytest.raises(ValueError):
        bus.write_goal(np.full(7, np.nan))
    bus.set_torque(False)
    bus.write_goal(HOME + 0.5)
    world.step(100)
    np.testing.assert_array_equal(bus.read_state().position, HOME)  # torque off: no motion
    bus.set_torque(True)
    world.step(100)
    np.testing.assert_array_equal(bus.read_state().position, HOME)  # enabling never jumps
    bus.close()
    with pytest.raises(RuntimeError):
        bus.read_state()


def test_clock_steps_on_a_fixed_grid_and_paces_to_realtime_factor():
    cell = make_sim_cell("c0", realtime_factor=0, cameras=())
    clock = cell.clock
    assert clock.now() == 0.0
    clock.sleep_until(0.0123)  # to the first substep at or after 0.0123 (dt = 5 ms)
    assert clock.now() == pytest.approx(0.015)
    clock.sleep_until(0.001)  # never backwards
    assert clock.now() == pytest.approx(0.015)

    paced = make_sim_cell("c1", realtime_factor=10.0, cameras=())
    t0 = time.monotonic()
    for k in range(1, 41):  # 2 s of sim time at 10x: ~0.2 s of wall time
        paced.clock.sleep_until(k / HZ)
    assert time.monotonic() - t0 >= 0.15


def _trace(realtime_factor: float, cell_seed: int, episode_seed: int):
    cell = make_sim_cell(
        "c0",
        seed=cell_seed,
        realtime_factor=realtime_factor,
        cameras=("overhead",),
        takeover_prob=0.5,
    )
    cell.scene.reset("pick_cube", episode_seed)
    rng = np.random.default_rng(1)
    out = []
    t = cell.clock.now()
    for _ in range(30):
        obs = cell.hardware.observe()
        if cell.operator.wants_control():
            target = cell.operator.action()
        else:
            target = obs.joint_pos + rng.normal(0, 0.1, JOINT_DIM).astype(np.float32)
        out.append(
            (
                obs.joint_pos,
                obs.frames["overhead"].color,
                obs.frames["overhead"].depth,
                cell.hardware.command(target),
                cell.operator.wants_control(),
                cell.scene.reward(),
            )
        )
        t += 1 / HZ
        cell.clock.sleep_until(t)
    return out, cell.world.cube.copy(), cell.world.target.copy()


def test_deterministic_given_seed_and_independent_of_speed():
    a, cube_a, target_a = _trace(0.0, 3, 11)
    b, cube_b, target_b = _trace(20.0, 3, 11)  # paced: must not change anything
    np.testing.assert_array_equal(cube_a, cube_b)
    np.testing.assert_array_equal(target_a, target_b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)
    _, cube_c, target_c = _trace(0.0, 3, 12)
    assert not np.array_equal(cube_a, cube_c) and not np.array_equal(target_a, target_c)


def _takeover_delays(cell_seed: int, n: int = 100) -> list[float | None]:
    cell = make_sim_cell("c0", seed=cell_seed, realtime_factor=0, cameras=(), takeover_prob=0.5)
    assert not cell.operator.wants_control()  # no episode yet
    delays = []
    for seed in range(n):
        cell.scene.reset("touch_target", seed)
        cell.clock.sleep_until(cell.clock.now() + 0.1)  # episodes start at different times
        at = cell.operator.takeover_at
        delays.append(None if at is None else round(at - cell.world.t_reset, 9))
    return delays


def test_operator_takeover_is_seeded_and_delayed():
    plans = _takeover_delays(5)
    assert 30 <= sum(p is not None for p in plans) <= 70
    assert plans == _takeover_delays(5)  # same cell seed, same episode seeds: same plans
    assert plans != _takeover_delays(6)

    always = make_sim_cell("c0", realtime_factor=0, cameras=(), takeover_prob=1.0)
    always.scene.reset("pick_cube", 0)
    delay = always.operator.takeover_at - always.world.t_reset
    assert 0.5 <= delay <= 3.0
    assert not always.operator.wants_control()
    always.clock.sleep_until(always.world.t_reset + delay)
    assert always.operator.wants_control()
    always.clock.sleep_until(always.clock.now() + 2.0)
    assert always.operator.wants_control()  # keeps control to the end of the episode
    always.scene.reset("pick_cube", 1)
    assert not always.operator.wants_control()

    never = make_sim_cell("c0", realtime_factor=0, cameras=(), takeover_prob=0.0)
    never.scene.reset("pick_cube", 0)
    never.clock.sleep_until(EPISODE_TIME_S)
    assert not never.operator.wants_control()
    never.operator.force(True)
    assert never.operator.wants_control()
    action = never.operator.action()
    assert action.shape == (JOINT_DIM,) and action.dtype == np.float32
    never.operator.force(False)
    assert not never.operator.wants_control()


def _run_with_stall_operator(policy: str, stall_s: float = 1.0) -> tuple[float | None, bool]:
    """Drive touch_target with a 'policy' (expert-like or frozen) under an operator who takes
    over only on a stall; returns (takeover delay or None, success)."""
    cell = make_sim_cell(
        "c0", seed=2, realtime_factor=0, cameras=(), takeover_prob=0.0, takeover_stall_s=stall_s
    )
    cell.scene.reset("touch_target", 4)
    t = cell.clock.now()
    while cell.clock.now() - cell.world.t_reset < EPISODE_TIME_S and not cell.scene.success():
        obs = cell.hardware.observe()
        if cell.operator.wants_control() or policy == "expert":
            target = cell.operator.action()
        else:
            target = obs.joint_pos  # a policy that does nothing
        cell.hardware.command(target)
        t += 1 / HZ
        cell.clock.sleep_until(t)
    at = cell.operator.takeover_at
    return (None if at is None else at - cell.world.t_reset), cell.scene.success()


def test_operator_takes_over_when_the_policy_stalls_and_not_when_it_progresses():
    delay, success = _run_with_stall_operator("frozen", stall_s=1.0)
    assert delay is not None and 1.0 <= delay <= 1.0 + 2 / HZ
    assert success  # the operator's correction finishes the task
    delay, success = _run_with_stall_operator("expert", stall_s=1.0)
    assert delay is None and success  # progress all along: left alone
    with pytest.raises(ValueError, match="progress"):
        SimOperator(make_sim_cell("c0", cameras=()).world, None, stall_s=1.0)  # type: ignore[arg-type]

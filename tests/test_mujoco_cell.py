"""The MuJoCo cell: scripted experts solve every task, runs repeat exactly for a seed, goals
stay inside the joint limits, cameras give RealSense-like frames, and contact is physical."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from drivers.sim.mujoco.scene import CAMERA_NAMES, CUBE_HALF, HOME, TIMESTEP
from drivers.sim.mujoco.tasks import EPISODE_TIME_S, MUJOCO_TASKS
from drivers.sim.mujoco.world import LOWER14, UPPER14, MujocoWorld
from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER

HZ = 20.0  # the slow end of the control rates the cell supports: fewest ticks per episode
SEEDS = range(20)


@pytest.fixture(scope="module")
def world() -> Iterator[MujocoWorld]:
    w = MujocoWorld(0, control_hz=HZ)
    yield w
    w.close()


def _run_expert(world: MujocoWorld, task: str, seed: int) -> bool:
    world.reset(task, seed)
    for _ in range(round(EPISODE_TIME_S[task] * HZ)):
        world.set_goals(world.expert_action())
        world.advance(1.0 / HZ)
        if world.success():
            return True
    return False


def test_world_api_and_sim_clock(world: MujocoWorld) -> None:
    assert world.tasks == MUJOCO_TASKS and len(world.tasks) >= 3
    world.reset("place_cube", 1)
    q = world.joint_positions()
    assert q.shape == (JOINT_DIM,) and q.dtype == np.float64
    np.testing.assert_allclose(q, np.tile(HOME, 2), atol=1e-9)
    assert world.joint_velocities().shape == (JOINT_DIM,)
    assert isinstance(world.success(), bool) and not world.success()
    assert 0.0 <= world.reward() < 1.0
    assert world.expert_action().shape == (JOINT_DIM,)
    # Sim time is a whole number of substeps; 1/30 s ticks neither drift nor depend on the host.
    t0 = world.time
    for _ in range(30):
        world.advance(1.0 / 30.0)
    assert abs(world.time - t0 - 1.0) <= TIMESTEP + 1e-9
    with pytest.raises(ValueError):
        world.reset("no_such_task", 0)


def test_joint_limits_agree_with_the_fleet_layout() -> None:
    assert np.all(LOWER14 >= JOINT_LOWER - 1e-6) and np.all(UPPER14 <= JOINT_UPPER + 1e-6)


@pytest.mark.parametrize("task", MUJOCO_TASKS)
def test_scripted_expert_solves_the_task(world: MujocoWorld, task: str) -> None:
    wins = [seed for seed in SEEDS if _run_expert(world, task, seed)]
    assert len(wins) >= 0.9 * len(SEEDS), f"{task}: solved {len(wins)}/{len(SEEDS)}"


def _trajectory(world: MujocoWorld, task: str, seed: int, ticks: int) -> np.ndarray:
    world.reset(task, seed)
    rows = []
    for _ in range(ticks):
        world.set_goals(world.expert_action())
        world.advance(1.0 / HZ)
        rows.append(np.r_[world.joint_positions(), world.data.qpos])
    return np.array(rows)


def test_a_seed_replays_exactly(world: MujocoWorld) -> None:
    a = _trajectory(world, "handover_bar", 7, 60)
    _trajectory(world, "push_to_target", 3, 20)  # history in between must not matter
    fresh = MujocoWorld(7, "handover_bar", control_hz=HZ)
    b = _trajectory(fresh, "handover_bar", 7, 60)
    np.testing.assert_array_equal(a, b)
    other = _trajectory(world, "handover_bar", 8, 1)
    assert not np.array_equal(a[0], other[0])  # another seed, another layout


def test_goals_are_clamped_to_the_joint_limits(world: MujocoWorld) -> None:
    world.reset("push_to_target", 0)
    sent = world.set_goals(np.full(JOINT_DIM, 50.0))
    np.testing.assert_array_equal(sent, UPPER14)
    sent = world.set_goals(np.full(JOINT_DIM, -50.0))
    np.testing.assert_array_equal(sent, LOWER14)
    # The servos stop at the limits: spin the waists and rolls far past theirs (arms clear
    # of the table) and open the grippers past fully open.
    goal = np.tile(HOME, 2)
    for i in (0, 3, 5, 7, 10, 12):
        goal[i] = 50.0 if i < 7 else -50.0
    goal[[6, 13]] = 50.0
    world.set_goals(goal)
    for _ in range(round(2.0 * HZ)):
        world.advance(1.0 / HZ)
    q = world.joint_positions()
    assert np.all(q <= UPPER14 + 0.01) and np.all(q >= LOWER14 - 0.01)
    np.testing.assert_allclose(q[[0, 3, 5, 6, 13]], [3.0, 3.0, 3.0, 1.0, 1.0], atol=0.01)
    np.testing.assert_allclose(q[[7, 10, 12]], [-3.0, -3.0, -3.0], atol=0.01)
    with pytest.raises(ValueError):
        world.set_goals(np.full(JOINT_DIM, np.nan))
    with pytest.raises(ValueError):
        world.set_goals(np.zeros(7))
    np.testing.assert_array_equal(world.goal.reshape(-1), np.clip(goal, LOWER14, UPPER14))


def test_cameras_give_color_and_millimetre_depth(world: MujocoWorld) -> None:
    world.reset("place_cube", 2)
    for name in CAMERA_NAMES:
        color, depth = world.render(name, 96, 128)
        assert color.shape == (96, 128, 3) and color.dtype == np.uint8
        assert depth.shape == (96, 128) and depth.dtype == np.uint16
        assert color.std() > 5  # a scene, not a blank image
    # The overhead camera is 1 m above the table top, looking straight down at its centre.
    _, depth = world.render("overhead", 96, 128)
    assert abs(float(np.median(depth[44:52, 60:68])) - 1000.0) < 15.0
    # The front camera sees the table about a metre away and the empty sky as 0 (no depth).
    _, depth = world.render("front", 96, 128)
    assert 700 < int(depth[60, 64]) < 1500 and int(depth[0, 0]) == 0
    world.render("front", 96, 128)
    assert len(world._renderers) == 1  # one renderer per image size, reused
    with pytest.raises(ValueError):
        world.render("nowhere", 96, 128)


def test_contact_is_physical(world: MujocoWorld) -> None:
    # Nothing touches the block: it stays put.
    world.reset("push_to_target", 4)
    start = world.object_pos("block")
    world.advance(1.0)
    assert np.linalg.norm(world.object_pos("block") - start) < 1e-3
    # The closed fingers push it: it slides over the table (it is neither carried nor
    # teleported: it stays on the table top and ends up nearer the target).
    before = np.linalg.norm(start[:2] - world.target_pos()[:2])
    for _ in range(round(2.5 * HZ)):
        world.set_goals(world.expert_action())
        world.advance(1.0 / HZ)
    block = world.object_pos("block")
    assert np.linalg.norm(block[:2] - start[:2]) > 0.03
    assert np.linalg.norm(block[:2] - world.target_pos()[:2]) < before - 0.03
    assert abs(block[2] - start[2]) < 0.005
    # A cube let go in the air falls onto the table.
    world.reset("place_cube", 4)
    world.place("cube", np.array([0.1, 0.0, 0.2]), 0.0)
    world.advance(0.6)
    assert abs(world.object_pos("cube")[2] - CUBE_HALF) < 0.003


def test_torque_off_ignores_goals_and_on_never_jumps(world: MujocoWorld) -> None:
    world.reset("place_cube", 5)
    world.set_torque(0, False)
    world.set_goals(np.zeros(JOINT_DIM))
    world.advance(0.5)
    left, right = world.q
    assert np.abs(left - HOME).max() < 0.1  # limp, counterbalanced: stays about where it was
    assert np.abs(right[:6]).max() < 0.05  # the other arm followed its goals
    world.set_torque(0, True)
    np.testing.assert_allclose(world.goal[0], world.q[0], atol=1e-12)


def test_the_sim_clock_and_servo_bus_drive_it_unchanged(world: MujocoWorld) -> None:
    """The hook a simulated servo chain uses: goal writes in, joint state out, sim time."""
    from drivers.sim.devices import SimArmBus, SimClock

    world.reset("place_cube", 6)
    clock = SimClock(world, realtime_factor=0)  # type: ignore[arg-type]
    bus = SimArmBus(world, "right")  # type: ignore[arg-type]
    goal = HOME.copy()
    goal[0] = 0.4
    bus.write_goal(goal)
    t0 = clock.now()
    clock.sleep_until(t0 + 1.0)
    state = bus.read_state()
    assert abs(clock.now() - t0 - 1.0) <= TIMESTEP
    assert state.stamp == clock.now() and state.position.shape == (7,)
    assert abs(state.position[0] - 0.4) < 0.01 and abs(world.q[0, 0]) < 1e-6

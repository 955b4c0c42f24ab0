"""The servo link's command count: what lets the physics skip reading unchanged commands."""

from __future__ import annotations

from drivers.sim.servo_link import ServoLink


def test_command_count_moves_with_every_command_write_and_only_then() -> None:
    with ServoLink.create([1, 2, 3]) as link:
        assert link.command_count == 0
        link.write_measurement(1, 0.5, 0.1)  # the physics side writing: no new command
        assert link.command_count == 0
        link.write_command(2, True, 3, 0.25, 100.0)
        assert link.command_count == 1
        link.write_command(2, True, 3, 0.25, 100.0)  # the same goal again is still a write
        link.write_command(3, False, 5, -0.5, 50.0)
        assert link.command_count == 3
        # A second view of the same block (the peer's, in its own process) agrees.
        other = ServoLink.attach(link.name)
        try:
            assert other.command_count == 3
            other.write_command(1, True, 3, 1.0, 0.0)
            assert link.command_count == 4
            cmd = link.read_command(1)
            assert (cmd.torque_enable, cmd.goal_position, cmd.seq) == (True, 1.0, 1)
        finally:
            other.close()

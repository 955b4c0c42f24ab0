"""Exports of the episode store into formats other tools read (LeRobot, Rerun)."""

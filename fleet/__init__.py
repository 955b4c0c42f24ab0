"""fleetlearn's shared code in two roles: fleet.common (edge and centre), fleet.control (centre)."""

"""The web dashboard: fleet, learning, rollout and episode views over Redis and the store."""

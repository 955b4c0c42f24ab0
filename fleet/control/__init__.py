"""The central control plane: the Redis registry, the rollout rule and its commands,
`fleet status`, the dashboard, `fleet up` and its Redis, connection files and the learner's
lease. Only central machines run it; the edge never imports it (tests/test_layering.py).
"""

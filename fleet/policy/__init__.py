"""The unified policy model, its config, its file format and edge inference (plain torch, no Ray).

The edge imports this package to run a version; the learner imports it to train one. Import
the submodules directly (`fleet.policy.model`, `fleet.policy.weights`, ...).
"""

"""The unified policy model, its config, its file format and edge inference (plain torch, no Ray).

The edge imports this package to run a version; the learner imports it to train one. Import
the submodules directly (`fleet.common.policy.model`, `fleet.common.policy.weights`, ...).
"""

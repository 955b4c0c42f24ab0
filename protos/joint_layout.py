"""The dual-arm cell's joint layout: part of the wire contract, shared by every layer.

It lives beside the .proto files because every 14-value array on the wire and in the store
(joint_pos, action) follows it, and because drivers, fleet and learner may all import
protos/ (drivers import nothing above themselves).

Fourteen values in a fixed order (left arm then right arm, six joints and a gripper each)
is the one convention every array on the wire and in the store follows.
"""

from __future__ import annotations

import numpy as np

ARM_SIDES = ("left", "right")
ARM_JOINT_NAMES = (
    "waist",
    "shoulder",
    "elbow",
    "forearm_roll",
    "wrist_angle",
    "wrist_rotate",
    "gripper",
)
JOINTS_PER_ARM = len(ARM_JOINT_NAMES)
JOINT_DIM = JOINTS_PER_ARM * len(ARM_SIDES)
JOINT_NAMES = tuple(f"{side}_{name}" for side in ARM_SIDES for name in ARM_JOINT_NAMES)
GRIPPER_INDICES = (JOINTS_PER_ARM - 1, 2 * JOINTS_PER_ARM - 1)

# Default joint limits in radians (grippers: 0 = closed, 1 = open, normalised travel).
# A cell's calibration narrows these; the policy normalises by them.
_ARM_LOWER = np.array([-3.0, -1.8, -1.6, -3.0, -1.8, -3.0, 0.0])
_ARM_UPPER = np.array([3.0, 1.8, 1.6, 3.0, 1.8, 3.0, 1.0])
JOINT_LOWER = np.concatenate([_ARM_LOWER, _ARM_LOWER]).astype(np.float32)
JOINT_UPPER = np.concatenate([_ARM_UPPER, _ARM_UPPER]).astype(np.float32)


def arm_slice(side: str) -> slice:
    """The slice of a 14-vector that belongs to one arm."""
    i = ARM_SIDES.index(side)
    return slice(i * JOINTS_PER_ARM, (i + 1) * JOINTS_PER_ARM)

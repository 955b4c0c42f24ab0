"""Dynamixel X-series arms on dynamixel_sdk (Protocol 2.0).

Exports resolve lazily: the simulated servo process imports only the standard-library
modules here (control_table, protocol) and must not pay for numpy or the SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DynamixelArmBus": "drivers.dynamixel.arm_bus",
    "DynamixelBus": "drivers.dynamixel.bus",
    "DynamixelError": "drivers.dynamixel.arm_bus",
    "DynamixelCommError": "drivers.dynamixel.arm_bus",
    "DynamixelConfigError": "drivers.dynamixel.arm_bus",
    "DynamixelHardwareError": "drivers.dynamixel.arm_bus",
    "DynamixelPortError": "drivers.dynamixel.arm_bus",
    "DynamixelPowerLossError": "drivers.dynamixel.arm_bus",
    "LeaderArms": "drivers.dynamixel.leader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drivers.dynamixel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

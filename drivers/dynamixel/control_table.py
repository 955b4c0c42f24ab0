"""The Dynamixel X-series control table (Protocol 2.0) and its units.

One place for addresses, sizes, access rules and unit conversions, shared by the driver
(which talks to real servos through dynamixel_sdk) and the simulated servo chain in
drivers/sim (which holds the same table in memory), so both agree byte for byte.
Standard library only: the simulated servo process imports it and must start fast.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Register:
    """One control-table item: where it is, how wide, and whether it reads signed."""

    name: str
    address: int
    size: int
    signed: bool = False


# EEPROM area (writable only while torque is off).
MODEL_NUMBER = Register("model_number", 0, 2)
FIRMWARE_VERSION = Register("firmware_version", 6, 1)
ID = Register("id", 7, 1)
BAUD_RATE = Register("baud_rate", 8, 1)
RETURN_DELAY_TIME = Register("return_delay_time", 9, 1)  # unit: 2 us
DRIVE_MODE = Register("drive_mode", 10, 1)
OPERATING_MODE = Register("operating_mode", 11, 1)
PROTOCOL_TYPE = Register("protocol_type", 13, 1)
HOMING_OFFSET = Register("homing_offset", 20, 4, signed=True)
MOVING_THRESHOLD = Register("moving_threshold", 24, 4)
TEMPERATURE_LIMIT = Register("temperature_limit", 31, 1)
MAX_VOLTAGE_LIMIT = Register("max_voltage_limit", 32, 2)
MIN_VOLTAGE_LIMIT = Register("min_voltage_limit", 34, 2)
PWM_LIMIT = Register("pwm_limit", 36, 2)
CURRENT_LIMIT = Register("current_limit", 38, 2)
VELOCITY_LIMIT = Register("velocity_limit", 44, 4)
MAX_POSITION_LIMIT = Register("max_position_limit", 48, 4)
MIN_POSITION_LIMIT = Register("min_position_limit", 52, 4)
SHUTDOWN = Register("shutdown", 63, 1)
# RAM area.
TORQUE_ENABLE = Register("torque_enable", 64, 1)
LED = Register("led", 65, 1)
STATUS_RETURN_LEVEL = Register("status_return_level", 68, 1)
REGISTERED_INSTRUCTION = Register("registered_instruction", 69, 1)
HARDWARE_ERROR_STATUS = Register("hardware_error_status", 70, 1)
GOAL_PWM = Register("goal_pwm", 100, 2, signed=True)
GOAL_CURRENT = Register("goal_current", 102, 2, signed=True)
GOAL_VELOCITY = Register("goal_velocity", 104, 4, signed=True)
PROFILE_ACCELERATION = Register("profile_acceleration", 108, 4)
PROFILE_VELOCITY = Register("profile_velocity", 112, 4)
GOAL_POSITION = Register("goal_position", 116, 4, signed=True)
REALTIME_TICK = Register("realtime_tick", 120, 2)
MOVING = Register("moving", 122, 1)
PRESENT_PWM = Register("present_pwm", 124, 2, signed=True)
PRESENT_CURRENT = Register("present_current", 126, 2, signed=True)
PRESENT_VELOCITY = Register("present_velocity", 128, 4, signed=True)
PRESENT_POSITION = Register("present_position", 132, 4, signed=True)
PRESENT_INPUT_VOLTAGE = Register("present_input_voltage", 144, 2)
PRESENT_TEMPERATURE = Register("present_temperature", 146, 1)

REGISTERS = (
    MODEL_NUMBER,
    FIRMWARE_VERSION,
    ID,
    BAUD_RATE,
    RETURN_DELAY_TIME,
    DRIVE_MODE,
    OPERATING_MODE,
    PROTOCOL_TYPE,
    HOMING_OFFSET,
    MOVING_THRESHOLD,
    TEMPERATURE_LIMIT,
    MAX_VOLTAGE_LIMIT,
    MIN_VOLTAGE_LIMIT,
    PWM_LIMIT,
    CURRENT_LIMIT,
    VELOCITY_LIMIT,
    MAX_POSITION_LIMIT,
    MIN_POSITION_LIMIT,
    SHUTDOWN,
    TORQUE_ENABLE,
    LED,
    STATUS_RETURN_LEVEL,
    REGISTERED_INSTRUCTION,
    HARDWARE_ERROR_STATUS,
    GOAL_PWM,
    GOAL_CURRENT,
    GOAL_VELOCITY,
    PROFILE_ACCELERATION,
    PROFILE_VELOCITY,
    GOAL_POSITION,
    REALTIME_TICK,
    MOVING,
    PRESENT_PWM,
    PRESENT_CURRENT,
    PRESENT_VELOCITY,
    PRESENT_POSITION,
    PRESENT_INPUT_VOLTAGE,
    PRESENT_TEMPERATURE,
)

# The per-tick read: present current, velocity and position are contiguous (126..135), so
# one sync read of 10 bytes returns all three for every servo.
STATE_BLOCK_ADDRESS = PRESENT_CURRENT.address
STATE_BLOCK_SIZE = PRESENT_POSITION.address + PRESENT_POSITION.size - STATE_BLOCK_ADDRESS
# ... decoded in one unpack per servo (signed current, velocity, position, little-endian).
STATE_BLOCK = struct.Struct("<hii")
assert STATE_BLOCK.size == STATE_BLOCK_SIZE
# The configuration the driver writes at connect, read back in one sync read (9..55).
CONFIG_BLOCK_ADDRESS = RETURN_DELAY_TIME.address
CONFIG_BLOCK_SIZE = MIN_POSITION_LIMIT.address + MIN_POSITION_LIMIT.size - CONFIG_BLOCK_ADDRESS

EEPROM_END = TORQUE_ENABLE.address  # addresses below this need torque off to write
TABLE_SIZE = 662  # through Indirect Data 56 on XM430/XM540

# Operating modes (address 11).
MODE_CURRENT = 0
MODE_VELOCITY = 1
MODE_POSITION = 3
MODE_EXTENDED_POSITION = 4
MODE_CURRENT_BASED_POSITION = 5
MODE_PWM = 16
OPERATING_MODES = frozenset(
    {
        MODE_CURRENT,
        MODE_VELOCITY,
        MODE_POSITION,
        MODE_EXTENDED_POSITION,
        MODE_CURRENT_BASED_POSITION,
        MODE_PWM,
    }
)
POSITION_MODES = frozenset({MODE_POSITION, MODE_CURRENT_BASED_POSITION})

# Hardware Error Status bits (address 70).
HW_INPUT_VOLTAGE = 0x01
HW_OVERHEATING = 0x04
HW_MOTOR_ENCODER = 0x08
HW_ELECTRICAL_SHOCK = 0x10
HW_OVERLOAD = 0x20
HARDWARE_ERROR_NAMES = {
    HW_INPUT_VOLTAGE: "input voltage",
    HW_OVERHEATING: "overheating",
    HW_MOTOR_ENCODER: "motor encoder",
    HW_ELECTRICAL_SHOCK: "electrical shock",
    HW_OVERLOAD: "overload",
}

# Models (address 0) used in ALOHA-style arms.
MODEL_XM430_W350 = 1020
MODEL_XM540_W270 = 1120
MODEL_XL430_W250 = 1060

# Units.
TICKS_PER_REV = 4096
CENTER_TICK = 2048  # 0 rad
RAD_PER_TICK = 2.0 * math.pi / TICKS_PER_REV  # 0.088 degrees
VELOCITY_UNIT_RPM = 0.229
RAD_S_PER_VELOCITY_UNIT = VELOCITY_UNIT_RPM * 2.0 * math.pi / 60.0
MA_PER_CURRENT_UNIT = 2.69
RETURN_DELAY_UNIT_US = 2
MAX_HOMING_OFFSET = 1_044_479


def describe_hardware_error(status: int) -> str:
    """Hardware Error Status bits as words, e.g. 'overload, overheating'."""
    names = [name for bit, name in HARDWARE_ERROR_NAMES.items() if status & bit]
    unknown = status & ~sum(HARDWARE_ERROR_NAMES)
    if unknown:
        names.append(f"unknown bits 0x{unknown:02x}")
    return ", ".join(names) if names else "none"


def to_signed(value: int, size: int) -> int:
    """Two's complement of an unsigned `size`-byte register value (getData is unsigned)."""
    bits = 8 * size
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def to_unsigned(value: int, size: int) -> int:
    """The unsigned bit pattern of a signed value, as it travels in a packet."""
    return value & ((1 << (8 * size)) - 1)


def encode_value(value: int, size: int) -> bytes:
    """Little-endian register bytes of a (possibly negative) value."""
    return to_unsigned(int(value), size).to_bytes(size, "little")


def decode_value(data: bytes | bytearray, register: Register, offset: int = 0) -> int:
    """A register's value from little-endian bytes (signed where the register is)."""
    raw = int.from_bytes(bytes(data[offset : offset + register.size]), "little")
    return to_signed(raw, register.size) if register.signed else raw


def rad_to_ticks(rad: float) -> int:
    """Radians about the centre to a raw position tick (2048 = 0 rad)."""
    return round(CENTER_TICK + rad / RAD_PER_TICK)


def ticks_to_rad(ticks: float) -> float:
    """A raw position tick to radians about the centre."""
    return (ticks - CENTER_TICK) * RAD_PER_TICK


def write_access_error(address: int, size: int, torque_on: bool) -> str | None:
    """Why a write to [address, address+size) is refused, or None when it is allowed.

    Read-only items: model/firmware (0..6), registered instruction and hardware error
    status (69, 70), and everything from Realtime Tick to the indirect addresses (120..167).
    EEPROM (below 64) is locked while torque is on: the servo answers with an access error.
    """
    end = address + size
    if address < 0 or end > TABLE_SIZE:
        return "outside the control table"
    for lo, hi in ((0, 7), (69, 71), (120, 168)):
        if address < hi and end > lo:
            return "read-only item"
    if torque_on and address < EEPROM_END:
        return "EEPROM area while torque is on"
    return None


def default_table(servo_id: int, model_number: int = MODEL_XM430_W350) -> bytearray:
    """A factory-fresh control table image (what the servo holds after power-on)."""
    table = bytearray(TABLE_SIZE)

    def put(reg: Register, value: int) -> None:
        table[reg.address : reg.address + reg.size] = encode_value(value, reg.size)

    put(MODEL_NUMBER, model_number)
    put(FIRMWARE_VERSION, 48)
    put(ID, servo_id)
    put(BAUD_RATE, 3)  # 1 Mbps
    put(RETURN_DELAY_TIME, 250)  # 500 us, the factory default
    put(OPERATING_MODE, MODE_POSITION)
    put(PROTOCOL_TYPE, 2)
    put(MOVING_THRESHOLD, 10)
    put(TEMPERATURE_LIMIT, 80)
    put(MAX_VOLTAGE_LIMIT, 160)
    put(MIN_VOLTAGE_LIMIT, 95)
    put(PWM_LIMIT, 885)
    put(CURRENT_LIMIT, 1193)
    put(VELOCITY_LIMIT, 200)
    put(MAX_POSITION_LIMIT, TICKS_PER_REV - 1)
    put(MIN_POSITION_LIMIT, 0)
    put(SHUTDOWN, HW_OVERHEATING | HW_ELECTRICAL_SHOCK | HW_OVERLOAD)
    put(STATUS_RETURN_LEVEL, 2)
    put(GOAL_CURRENT, 1193)
    put(GOAL_POSITION, CENTER_TICK)
    put(PRESENT_POSITION, CENTER_TICK)
    put(PRESENT_INPUT_VOLTAGE, 120)
    put(PRESENT_TEMPERATURE, 32)
    return table

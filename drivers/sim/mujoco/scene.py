"""The MuJoCo dual-arm cell as MJCF generated in code (no meshes, no downloads).

World frame as in the kinematic stand-in (drivers/sim/world.py): metres, origin at the
centre of the table top, x to the right seen from the front camera, y away from it, z up.
The left arm stands at x = -BASE_X facing +x, the right arm at +BASE_X facing -x.

Each arm has the servo order of `protos.joint_layout` and the stand-in's link lengths and joint
conventions (all six joints at 0: upper arm straight up, forearm and hand pointing at the
other arm; waist yaws about +z, shoulder/elbow/wrist_angle pitch about the link's +y so
positive tips forward/down, forearm_roll/wrist_rotate roll about the link's +x). The
gripper is two fingers on slide joints, each driven by its own position actuator from the
one normalised gripper value (0 closed, 1 open), so a pair squeezes symmetrically.

Links are counterbalanced (`gravcomp`), as a servo arm's holding torque would be, so a
position servo tracks its goal without steady sag; the actuators' force limit and damping
give the servos a bounded speed (about 3 rad/s) like Dynamixels.

Only the hands, fingers, objects, table and floor collide: arm links are visual (the
experts never steer links through each other, and skipping those contacts keeps a step
at a few microseconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import mujoco
import numpy as np

from protos.joint_layout import ARM_JOINT_NAMES, ARM_SIDES, JOINT_LOWER, JOINT_UPPER, JOINTS_PER_ARM

# --- geometry (metres), shared with the kinematic stand-in ---------------------------------
TABLE_HALF_X = 0.50
TABLE_HALF_Y = 0.40
TABLE_THICK = 0.03
FLOOR_Z = -0.75
BASE_X = 0.42
SHOULDER_HEIGHT = 0.10
UPPER_ARM = 0.30
FOREARM = 0.30
FOREARM_ROLL_AT = 0.12  # the roll joint sits this far along the forearm (kinematically free)
HAND = 0.15  # wrist pitch axis to the gripper site (the middle of the finger pads)
HEADINGS = (0.0, math.pi)  # yaw of each arm's "forward" at waist = 0

# Fingers: boxes along the hand's x (approach), sliding along the hand's y (opening).
FINGER_X0, FINGER_X1 = 0.10, 0.165  # finger extent along the hand
FINGER_HALF_T = 0.005  # half thickness along the opening direction
FINGER_HALF_W = 0.012  # half width along the hand's z (normal)
FINGER_TRAVEL = 0.04  # metres each finger's inner face travels from closed (0) to open
PALM_X0, PALM_X1 = 0.06, 0.10

# Servo tuning (position actuators on counterbalanced links).
ARM_KP = (150.0, 200.0, 150.0, 50.0, 50.0, 25.0)
ARM_KV = (10.0, 13.0, 10.0, 2.4, 2.4, 1.3)
ARM_FORCE = (30.0, 40.0, 30.0, 8.0, 8.0, 5.0)
ARM_ARMATURE = (0.08, 0.1, 0.08, 0.01, 0.01, 0.005)
FINGER_KP = 600.0  # N/m: closing on a 4 cm cube from a closed goal squeezes ~12 N
FINGER_KV = 20.0
FINGER_FORCE = 20.0

TIMESTEP = 0.002

# --- objects --------------------------------------------------------------------------------
CUBE_HALF = 0.02
BAR_HALF = (0.07, 0.015, 0.015)
BLOCK_HALF = (0.03, 0.03, 0.025)
PAD_RADIUS = 0.04  # target pad / zone marker radius
OBJECTS = ("cube", "bar", "block")
OBJECT_HALF = {"cube": (CUBE_HALF,) * 3, "bar": BAR_HALF, "block": BLOCK_HALF}
OBJECT_MASS = {"cube": 0.05, "bar": 0.05, "block": 0.15}
OBJECT_RGBA = {
    "cube": "0.16 0.80 0.27 1",
    "bar": "0.95 0.80 0.10 1",
    "block": "0.55 0.25 0.75 1",
}
TARGET_RGBA = "0.88 0.12 0.12 1"

# Objects a task does not use rest on the floor far outside every camera's view.
PARK = {name: np.array([4.0 + 0.5 * i, 4.0, 0.0]) for i, name in enumerate(OBJECTS)}

CAMERA_NAMES: tuple[str, ...] = ("overhead", "front", "left_wrist", "right_wrist")
MAX_RENDER = (960, 1280)  # (height, width) of the offscreen framebuffer
# Vertical fields of view (degrees), framed on the workspace as a lab aims its cameras: the
# overhead view spans the bases (x = +-BASE_X) and every layout's objects and targets, so a
# 4 cm cube covers about 5 px of a 96 x 128 frame (3 px with the earlier 58 degree views).
OVERHEAD_FOVY = 38.0
FRONT_FOVY = 42.0

#: Rest pose of one arm (the stand-in's HOME): gripper open, hand down in front of the base.
HOME = np.array([0.0, -0.4, 0.8, 0.0, 1.0, 0.0, 1.0])

ARM_LOWER = JOINT_LOWER[:JOINTS_PER_ARM].astype(np.float64)
ARM_UPPER = JOINT_UPPER[:JOINTS_PER_ARM].astype(np.float64)


def _f(values: tuple[float, ...] | np.ndarray) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def _look_at(eye: np.ndarray, at: np.ndarray, up: np.ndarray) -> str:
    """MJCF `xyaxes` of a camera at `eye` looking at `at` (MuJoCo cameras look along -z)."""
    fwd = at - eye
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    right = right / np.linalg.norm(right)
    img_up = np.cross(right, fwd)
    return _f(np.concatenate([right, img_up]))


@dataclass(frozen=True)
class Names:
    """MJCF names of one arm's parts."""

    side: str

    def joint(self, i: int) -> str:
        return f"{self.side}_{ARM_JOINT_NAMES[i]}"

    @property
    def fingers(self) -> tuple[str, str]:
        return (f"{self.side}_finger_a", f"{self.side}_finger_b")

    @property
    def site(self) -> str:
        return f"{self.side}_tip"

    @property
    def palm(self) -> str:
        return f"{self.side}_palm"


def _arm_xml(index: int) -> str:
    side = ARM_SIDES[index]
    n = Names(side)
    x = -BASE_X if index == 0 else BASE_X
    rng = [f"{ARM_LOWER[i]:.4f} {ARM_UPPER[i]:.4f}" for i in range(6)]
    link = "arm_left" if index == 0 else "arm_right"
    fx = (FINGER_X0 + FINGER_X1) / 2
    fhx = (FINGER_X1 - FINGER_X0) / 2
    px = (PALM_X0 + PALM_X1) / 2
    phx = (PALM_X1 - PALM_X0) / 2
    cam_eye = np.array([0.085, 0.0, 0.05])
    cam_xy = _look_at(cam_eye, np.array([0.24, 0.0, -0.01]), np.array([0.0, 0.0, 1.0]))
    return f"""
    <body name="{side}_base" pos="{x} 0 0" euler="0 0 {HEADINGS[index]:.6f}">
      <geom class="visual" material="base" type="cylinder" size="0.06 0.015" pos="0 0 0.015"/>
      <body name="{side}_waist_link" gravcomp="1">
        <inertial pos="0 0 0.05" mass="0.6" diaginertia="0.002 0.002 0.002"/>
        <joint name="{n.joint(0)}" axis="0 0 1" range="{rng[0]}" armature="{ARM_ARMATURE[0]}"/>
        <geom class="visual" material="{link}" type="cylinder" size="0.035 0.04" pos="0 0 0.06"/>
        <body name="{side}_upper_arm" pos="0 0 {SHOULDER_HEIGHT}" gravcomp="1">
          <inertial pos="0 0 0.15" mass="0.5" diaginertia="0.004 0.004 0.0004"/>
          <joint name="{n.joint(1)}" axis="0 1 0" range="{rng[1]}"
                 armature="{ARM_ARMATURE[1]}"/>
          <geom class="visual" material="{link}" type="capsule" size="0.022"
                fromto="0 0 0 0 0 {UPPER_ARM}"/>
          <body name="{side}_forearm" pos="0 0 {UPPER_ARM}" gravcomp="1">
            <inertial pos="0.06 0 0" mass="0.3" diaginertia="0.0003 0.001 0.001"/>
            <joint name="{n.joint(2)}" axis="0 1 0" range="{rng[2]}"
                   armature="{ARM_ARMATURE[2]}"/>
            <geom class="visual" material="{link}" type="capsule" size="0.02"
                  fromto="0 0 0 {FOREARM_ROLL_AT} 0 0"/>
            <body name="{side}_forearm_roll_link" pos="{FOREARM_ROLL_AT} 0 0" gravcomp="1">
              <inertial pos="0.09 0 0" mass="0.25" diaginertia="0.0002 0.0008 0.0008"/>
              <joint name="{n.joint(3)}" axis="1 0 0" range="{rng[3]}"
                     armature="{ARM_ARMATURE[3]}"/>
              <geom class="visual" material="{link}" type="capsule" size="0.018"
                    fromto="0 0 0 {FOREARM - FOREARM_ROLL_AT} 0 0"/>
              <body name="{side}_wrist" pos="{FOREARM - FOREARM_ROLL_AT} 0 0" gravcomp="1">
                <inertial pos="0.02 0 0" mass="0.1" diaginertia="0.0001 0.0001 0.0001"/>
                <joint name="{n.joint(4)}" axis="0 1 0" range="{rng[4]}"
                       armature="{ARM_ARMATURE[4]}"/>
                <geom class="visual" material="{link}" type="cylinder" size="0.02 0.025"
                      euler="1.5708 0 0"/>
                <body name="{side}_hand" gravcomp="1">
                  <inertial pos="0.07 0 0" mass="0.2" diaginertia="0.0003 0.0003 0.0003"/>
                  <joint name="{n.joint(5)}" axis="1 0 0" range="{rng[5]}"
                         armature="{ARM_ARMATURE[5]}"/>
                  <geom class="visual" material="{link}" type="capsule" size="0.016"
                        fromto="0 0 0 {PALM_X0} 0 0"/>
                  <geom name="{n.palm}" class="hand" type="box" pos="{px} 0 0"
                        size="{phx} 0.055 0.02"/>
                  <site name="{n.site}" pos="{HAND} 0 0" size="0.004" rgba="1 1 1 0.3" group="3"/>
                  <camera name="{side}_wrist" pos="{_f(cam_eye)}" xyaxes="{cam_xy}" fovy="75"/>
                  <body name="{n.fingers[0]}" gravcomp="1">
                    <inertial pos="{fx} 0.01 0" mass="0.03" diaginertia="1e-5 1e-5 1e-5"/>
                    <joint name="{n.fingers[0]}" type="slide" axis="0 1 0"
                           range="0 {FINGER_TRAVEL}" armature="0.02"/>
                    <geom name="{n.fingers[0]}" class="finger" type="box"
                          pos="{fx} {FINGER_HALF_T} 0"
                          size="{fhx} {FINGER_HALF_T} {FINGER_HALF_W}"/>
                  </body>
                  <body name="{n.fingers[1]}" gravcomp="1">
                    <inertial pos="{fx} -0.01 0" mass="0.03" diaginertia="1e-5 1e-5 1e-5"/>
                    <joint name="{n.fingers[1]}" type="slide" axis="0 -1 0"
                           range="0 {FINGER_TRAVEL}" armature="0.02"/>
                    <geom name="{n.fingers[1]}" class="finger" type="box"
                          pos="{fx} {-FINGER_HALF_T} 0"
                          size="{fhx} {FINGER_HALF_T} {FINGER_HALF_W}"/>
                  </body>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>"""


def _actuators_xml(index: int) -> str:
    n = Names(ARM_SIDES[index])
    lines = []
    for i in range(6):
        lines.append(
            f'    <position name="{n.joint(i)}" joint="{n.joint(i)}" kp="{ARM_KP[i]}" '
            f'kv="{ARM_KV[i]}" forcerange="{-ARM_FORCE[i]} {ARM_FORCE[i]}" '
            f'ctrlrange="{ARM_LOWER[i]:.4f} {ARM_UPPER[i]:.4f}"/>'
        )
    for finger in n.fingers:
        lines.append(
            f'    <position name="{finger}" joint="{finger}" kp="{FINGER_KP}" kv="{FINGER_KV}" '
            f'forcerange="{-FINGER_FORCE} {FINGER_FORCE}" ctrlrange="0 {FINGER_TRAVEL}"/>'
        )
    return "\n".join(lines)


def _object_xml(name: str) -> str:
    half = OBJECT_HALF[name]
    park = PARK[name] + np.array([0.0, 0.0, FLOOR_Z + half[2]])
    return f"""
    <body name="{name}" pos="{_f(park)}">
      <freejoint name="{name}"/>
      <geom name="{name}" class="object" type="box" size="{_f(half)}"
            mass="{OBJECT_MASS[name]}" rgba="{OBJECT_RGBA[name]}"/>
    </body>"""


def _camera_xml() -> str:
    up = np.array([0.0, 0.0, 1.0])
    overhead = _look_at(np.array([0.0, 0.0, 1.0]), np.zeros(3), np.array([0.0, 1.0, 0.0]))
    front_eye = np.array([0.0, -0.9, 0.45])
    front = _look_at(front_eye, np.array([0.0, 0.0, 0.05]), up)
    return f"""
    <camera name="overhead" pos="0 0 1.0" xyaxes="{overhead}" fovy="{OVERHEAD_FOVY}"/>
    <camera name="front" pos="{_f(front_eye)}" xyaxes="{front}" fovy="{FRONT_FOVY}"/>"""


def mjcf() -> str:
    """The cell's MJCF text."""
    h, w = MAX_RENDER
    arms = "".join(_arm_xml(i) for i in range(len(ARM_SIDES)))
    actuators = "\n".join(_actuators_xml(i) for i in range(len(ARM_SIDES)))
    objects = "".join(_object_xml(name) for name in OBJECTS)
    leg = TABLE_HALF_X - 0.04, TABLE_HALF_Y - 0.04
    leg_h = (-FLOOR_Z - TABLE_THICK) / 2
    legs = "".join(
        f'\n    <geom class="visual" material="table" type="box" size="0.025 0.025 {leg_h:.4f}" '
        f'pos="{sx * leg[0]:.3f} {sy * leg[1]:.3f} {FLOOR_Z + leg_h:.4f}"/>'
        for sx in (-1, 1)
        for sy in (-1, 1)
    )
    return f"""<mujoco model="fleetlearn_dual_arm_cell">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <statistic extent="2" center="0 0 0"/>
  <visual>
    <global offwidth="{w}" offheight="{h}"/>
    <quality shadowsize="0" offsamples="0"/>
    <map znear="0.005" zfar="5"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="table" rgba="0.61 0.49 0.36 1"/>
    <material name="floor" rgba="0.34 0.35 0.36 1"/>
    <material name="base" rgba="0.15 0.15 0.17 1"/>
    <material name="arm_left" rgba="0.24 0.39 0.90 1"/>
    <material name="arm_right" rgba="0.92 0.55 0.16 1"/>
    <material name="finger" rgba="0.12 0.12 0.12 1"/>
  </asset>
  <default>
    <joint damping="0.05"/>
    <geom solref="0.004 1" friction="1 0.005 0.0001"/>
    <default class="visual">
      <geom contype="0" conaffinity="0" group="1"/>
    </default>
    <default class="hand">
      <geom contype="2" conaffinity="1" material="finger" group="1"/>
    </default>
    <default class="finger">
      <geom contype="2" conaffinity="1" material="finger" condim="4" friction="1.5 0.01 0.0001"
            group="1"/>
    </default>
    <default class="object">
      <geom contype="1" conaffinity="3" condim="4" friction="0.6 0.01 0.0001" group="2"/>
    </default>
  </default>
  <worldbody>
    <light name="key" pos="0.3 -0.6 1.6" dir="-0.2 0.4 -1" directional="true" castshadow="false"
           diffuse="0.5 0.5 0.5" specular="0 0 0"/>
    <geom name="floor" type="plane" size="6 6 1" pos="0 0 {FLOOR_Z}" material="floor"
          contype="1" conaffinity="1"/>
    <geom name="table" type="box" size="{TABLE_HALF_X} {TABLE_HALF_Y} {TABLE_THICK / 2}"
          pos="0 0 {-TABLE_THICK / 2}" material="table" contype="1" conaffinity="3"
          friction="0.6 0.005 0.0001"/>{legs}
    <body name="target" mocap="true" pos="0 0 0">
      <geom name="target" class="visual" type="cylinder" size="{PAD_RADIUS} 0.0008"
            pos="0 0 0.0008" rgba="{TARGET_RGBA}"/>
    </body>{_camera_xml()}{arms}{objects}
  </worldbody>
  <actuator>
{actuators}
  </actuator>
</mujoco>
"""


@cache
def _xml() -> str:
    return mjcf()


def build_model() -> mujoco.MjModel:
    """A fresh MjModel of the cell (each world owns one: torque-off edits its gains)."""
    return mujoco.MjModel.from_xml_string(_xml())

"""Cheap numpy rendering of the kinematic cell: colour plus aligned z-depth, no GL.

Every camera is a pinhole (square pixels, horizontal field of view `hfov`) at a pose:

- "overhead": 1.2 m above the table centre looking straight down (image up = far side);
- "front": in front of the table, 1 m back and 0.5 m up, looking at the table centre;
- "left_wrist" / "right_wrist": on that arm's hand, looking past the fingers.

Any other name raises ValueError (`CAMERA_NAMES` lists the known ones).

The static scene (table top, floor, backdrop) is ray-cast per pixel; for the fixed cameras
this is done once and copied. The moving things (arm links, fingers, cube, target marker)
are point samples splatted as small discs whose pixel radius follows their depth, resolved
with a z-buffer, so overlaps are right from any viewpoint. Depth is z-depth along the
optical axis in millimetres (uint16), 0 where nothing is in range, as a RealSense reports.
A 96x128 frame takes well under a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from drivers.sim.world import (
    CUBE_HALF,
    FINGER,
    FLOOR_Z,
    FOREARM,
    GRIPPER_ON_CUBE,
    HAND,
    SHOULDER_HEIGHT,
    TABLE_HALF_X,
    TABLE_HALF_Y,
    TARGET_RADIUS,
    UPPER_ARM,
    SimWorld,
)

CAMERA_NAMES: tuple[str, ...] = ("overhead", "front", "left_wrist", "right_wrist")

SPACING = 0.004  # metres between point samples
NEAR, FAR = 0.02, 8.0  # metres; beyond FAR reads as no depth
MAX_SPLAT = 4  # pixels

TABLE_RGB = (156, 124, 92)
TABLE_EDGE_RGB = (110, 84, 60)
FLOOR_RGB = (86, 88, 92)
BACKDROP_RGB = (34, 36, 44)
LINK_RGB = ((60, 100, 230), (235, 140, 40))  # left arm blue, right arm orange
FINGER_RGB = ((0, 235, 235), (235, 0, 200))  # left cyan, right magenta
CUBE_RGB = (40, 205, 70)
TARGET_RGB = (225, 30, 30)

# Pixels carry a palette label until the end of a render.
_PALETTE = np.array(
    [
        BACKDROP_RGB,
        FLOOR_RGB,
        TABLE_RGB,
        TABLE_EDGE_RGB,
        *LINK_RGB,
        *FINGER_RGB,
        CUBE_RGB,
        TARGET_RGB,
    ],
    dtype=np.uint8,
)
_BACKDROP, _FLOOR, _TABLE, _EDGE = 0, 1, 2, 3
_LINK = (4, 5)
_FINGER_LABEL = (6, 7)
_CUBE, _TARGET = 8, 9

LINK_RADIUS = 0.012
FINGER_RADIUS = 0.006


def _look_at(eye: np.ndarray, at: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Camera-to-world rotation, columns = image right, image down, optical axis."""
    fwd = at - eye
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    n = np.linalg.norm(right)
    if n < 1e-9:  # looking along `up`: any right angle will do
        right = np.cross(fwd, np.array([0.0, 1.0, 0.0]))
        n = np.linalg.norm(right)
    right = right / n
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd], axis=1)


@dataclass(frozen=True)
class _Rig:
    hfov_deg: float
    wrist_of: int | None = None  # arm index for a hand-mounted camera
    eye: tuple[float, float, float] = (0.0, 0.0, 0.0)
    at: tuple[float, float, float] = (0.0, 0.0, 0.0)
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)


_RIGS = {
    "overhead": _Rig(hfov_deg=50.0, eye=(0.0, 0.0, 1.2), at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)),
    "front": _Rig(hfov_deg=62.0, eye=(0.0, -1.0, 0.5), at=(0.0, 0.0, 0.05)),
    "left_wrist": _Rig(hfov_deg=75.0, wrist_of=0),
    "right_wrist": _Rig(hfov_deg=75.0, wrist_of=1),
}


def _disc_offsets(r: int) -> np.ndarray:
    """(K, 2) integer (dv, du) offsets of a pixel disc of radius r."""
    d = np.arange(-r, r + 1)
    dv, du = np.meshgrid(d, d, indexing="ij")
    keep = dv**2 + du**2 <= r * r + r  # a slightly full disc: r=1 gives a plus, 2 a blob
    return np.stack([dv[keep], du[keep]], axis=1)


_OFFSETS = [_disc_offsets(r) for r in range(MAX_SPLAT + 1)]


def _cube_surface(half: float) -> np.ndarray:
    """Points on the surface of an axis-aligned cube of half-size `half` at the origin."""
    n = max(2, math.ceil(2 * half / SPACING) + 1)
    g = np.linspace(-half, half, n)
    a, b = np.meshgrid(g, g, indexing="ij")
    a, b = a.ravel(), b.ravel()
    c = np.full_like(a, half)
    faces = []
    for sign in (-1.0, 1.0):
        faces += [
            np.stack([sign * c, a, b], 1),
            np.stack([a, sign * c, b], 1),
            np.stack([a, b, sign * c], 1),
        ]
    return np.concatenate(faces)


def _disc_surface(radius: float) -> np.ndarray:
    g = np.arange(-radius, radius + 1e-9, SPACING)
    a, b = np.meshgrid(g, g, indexing="ij")
    keep = a**2 + b**2 <= radius**2
    return np.stack([a[keep], b[keep], np.full(int(keep.sum()), 0.001)], 1)


# The segments drawn per arm, with their longest length (for the sample count), colour
# table and blob radius. Endpoints come from forward kinematics each frame (_segments).
_MAX_OPEN = 0.006 + 0.03 * 1.0  # half the finger spread, fully open
_ARM_SEGMENTS = (  # (max length, palette label per side, radius)
    (SHOULDER_HEIGHT, _LINK, LINK_RADIUS),  # base -> shoulder
    (UPPER_ARM, _LINK, LINK_RADIUS),  # shoulder -> elbow
    (FOREARM, _LINK, LINK_RADIUS),  # elbow -> wrist
    (HAND - FINGER, _LINK, LINK_RADIUS * 0.8),  # wrist -> palm
    (FINGER, _FINGER_LABEL, FINGER_RADIUS),  # finger one
    (FINGER, _FINGER_LABEL, FINGER_RADIUS),  # finger two
    (2 * _MAX_OPEN, _FINGER_LABEL, FINGER_RADIUS),  # across the palm
)


def _sample_plan() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Static per-sample data: segment index, position along it (0..1), label, radius."""
    seg_ids, params, labels, radii = [], [], [], []
    for side in range(2):
        for k, (length, label, radius) in enumerate(_ARM_SEGMENTS):
            n = math.ceil(length / SPACING) + 1
            seg_ids.append(np.full(n, side * len(_ARM_SEGMENTS) + k))
            params.append(np.linspace(0.0, 1.0, n))
            labels.append(np.full(n, label[side], dtype=np.uint8))
            radii.append(np.full(n, radius))
    return (
        np.concatenate(seg_ids),
        np.concatenate(params),
        np.concatenate(labels),
        np.concatenate(radii),
    )


_SEG_ID, _SEG_T, _SEG_LABEL, _SEG_RADIUS = _sample_plan()
_CUBE_POINTS = _cube_surface(CUBE_HALF)
_TARGET_POINTS = _disc_surface(TARGET_RADIUS)
# Everything drawn, in order: arm samples, target marker, cube.
_ALL_LABEL = np.concatenate(
    [
        _SEG_LABEL,
        np.full(len(_TARGET_POINTS), _TARGET, dtype=np.uint8),
        np.full(len(_CUBE_POINTS), _CUBE, dtype=np.uint8),
    ]
)
_ALL_RADIUS = np.concatenate(
    [
        _SEG_RADIUS,
        np.full(len(_TARGET_POINTS) + len(_CUBE_POINTS), SPACING * 0.6),
    ]
)


def _segments(world: SimWorld) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) arrays (14, 3) of every drawn segment, in _ARM_SEGMENTS order."""
    starts, ends = [], []
    for side, pose in enumerate(world.poses()):
        approach, opening = pose.hand[:, 0], pose.hand[:, 1]
        palm = pose.tip - FINGER * approach
        grip = max(float(world.q[side, -1]), 0.0)
        if world.holder == side:
            grip = max(grip, GRIPPER_ON_CUBE)
        off = (0.006 + 0.03 * grip) * opening
        starts += [
            pose.base,
            pose.shoulder,
            pose.elbow,
            pose.wrist,
            palm + off,
            palm - off,
            palm - off,
        ]
        ends += [
            pose.shoulder,
            pose.elbow,
            pose.wrist,
            palm,
            pose.tip + off,
            pose.tip - off,
            palm + off,
        ]
    return np.stack(starts), np.stack(ends)


def scene_points(world: SimWorld) -> np.ndarray:
    """World points (N, 3) of everything that moves; colours and radii are _ALL_*."""
    a, b = _segments(world)
    arms = a[_SEG_ID] + (b - a)[_SEG_ID] * _SEG_T[:, None]
    return np.concatenate([arms, world.target + _TARGET_POINTS, world.cube + _CUBE_POINTS])


class Renderer:
    """Renders one named camera of a SimWorld at a fixed resolution."""

    def __init__(self, name: str, height: int, width: int) -> None:
        if name not in _RIGS:
            raise ValueError(
                f"unknown sim camera {name!r}; known cameras: {', '.join(CAMERA_NAMES)}"
            )
        if height < 1 or width < 1:
            raise ValueError("height and width must be >= 1")
        self.name, self.height, self.width = name, int(height), int(width)
        self.rig = _RIGS[name]
        self.focal = (width / 2.0) / math.tan(math.radians(self.rig.hfov_deg) / 2.0)
        u = (np.arange(width) + 0.5 - width / 2.0) / self.focal
        v = (np.arange(height) + 0.5 - height / 2.0) / self.focal
        vv, uu = np.meshgrid(v, u, indexing="ij")
        # Per-pixel ray directions in the camera frame, optical-axis component 1.
        self._rays = np.stack([uu, vv, np.ones_like(uu)], axis=-1).reshape(-1, 3)
        self._static: tuple[np.ndarray, np.ndarray] | None = None
        if self.rig.wrist_of is None:
            eye = np.array(self.rig.eye)
            rot = _look_at(eye, np.array(self.rig.at), np.array(self.rig.up))
            self._fixed_pose = (eye, rot)
            self._static = self._background(eye, rot)

    # --- pose -----------------------------------------------------------------------------
    def pose(self, world: SimWorld) -> tuple[np.ndarray, np.ndarray]:
        """(eye (3,), camera-to-world rotation (3, 3)) at the world's present state."""
        if self.rig.wrist_of is None:
            return self._fixed_pose
        hand = world.poses()[self.rig.wrist_of]
        approach, normal = hand.hand[:, 0], hand.hand[:, 2]
        eye = hand.wrist + 0.02 * approach - 0.06 * normal
        at = hand.tip + 0.08 * approach
        return eye, _look_at(eye, at, -normal)

    # --- static scene -----------------------------------------------------------------------
    def _background(self, eye: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Palette labels (HW,) uint8 and z-depth (HW,) float metres (inf = nothing)."""
        d = self._rays @ rot.T  # world directions, scaled so depth = ray parameter
        down = d[:, 2] < -1e-9
        dz = np.where(down, d[:, 2], -1.0)
        t_table = -eye[2] / dz
        hx = np.abs(eye[0] + d[:, 0] * t_table)
        hy = np.abs(eye[1] + d[:, 1] * t_table)
        on_table = down & (t_table > NEAR) & (hx <= TABLE_HALF_X) & (hy <= TABLE_HALF_Y)
        edge = (hx > TABLE_HALF_X - 0.015) | (hy > TABLE_HALF_Y - 0.015)
        t_floor = (FLOOR_Z - eye[2]) / dz
        on_floor = down & ~on_table & (t_floor > NEAR) & (t_floor < FAR)
        label = np.where(
            on_table, np.where(edge, _EDGE, _TABLE), np.where(on_floor, _FLOOR, _BACKDROP)
        ).astype(np.uint8)
        depth = np.where(on_table, t_table, np.where(on_floor, t_floor, np.inf))
        return label, depth

    def render(self, world: SimWorld) -> tuple[np.ndarray, np.ndarray]:
        """(color (H, W, 3) uint8 RGB, depth (H, W) uint16 mm) of the world now."""
        h, w = self.height, self.width
        eye, rot = self.pose(world)
        if self._static is not None:
            label, zbuf = (a.copy() for a in self._static)
        else:
            label, zbuf = self._background(eye, rot)

        cam = (scene_points(world) - eye) @ rot  # camera frame: x right, y down, z forward
        z = cam[:, 2]
        front = z > NEAR
        cam, lab, rads, z = cam[front], _ALL_LABEL[front], _ALL_RADIUS[front], z[front]
        u = np.rint(self.focal * cam[:, 0] / z + (w / 2.0 - 0.5)).astype(np.int64)
        v = np.rint(self.focal * cam[:, 1] / z + (h / 2.0 - 0.5)).astype(np.int64)
        r_px = np.clip(np.rint(rads * self.focal / z), 0, MAX_SPLAT).astype(np.int64)

        idx_parts, z_parts, l_parts = [], [], []
        for r in np.flatnonzero(np.bincount(r_px, minlength=MAX_SPLAT + 1)):
            sel = r_px == r
            off = _OFFSETS[r]
            vv = (v[sel][:, None] + off[None, :, 0]).ravel()
            uu = (u[sel][:, None] + off[None, :, 1]).ravel()
            inside = (vv >= 0) & (vv < h) & (uu >= 0) & (uu < w)
            idx_parts.append((vv * w + uu)[inside])
            z_parts.append(np.repeat(z[sel], len(off))[inside])
            l_parts.append(np.repeat(lab[sel], len(off))[inside])
        if idx_parts:
            idx = np.concatenate(idx_parts)
            zz = np.concatenate(z_parts)
            ll = np.concatenate(l_parts)
            np.minimum.at(zbuf, idx, zz)  # z-buffer: the nearest sample of each pixel wins
            win = zz <= zbuf[idx]
            label[idx[win]] = ll[win]

        color = _PALETTE[label].reshape(h, w, 3)
        depth_mm = np.where(np.isfinite(zbuf), np.rint(zbuf * 1000.0), 0.0)
        depth = np.clip(depth_mm, 0, 65535).astype(np.uint16).reshape(h, w)
        return color, depth

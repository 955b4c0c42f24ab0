"""Offscreen colour + depth frames of the MuJoCo cell, one GL pass per frame.

`mujoco.Renderer` draws the scene twice to get colour and depth (once per mode); a
RealSense frame needs both, so this renderer keeps the same pieces (a GL context, an
MjrContext, an MjvScene) and reads both buffers after one `mjr_render`, halving the cost.
Shadows, reflections, skybox and multisampling are off: on a CPU GL they cost ~20x the
rest of the frame and a policy at 96x128 does not need them.

Depth is z-depth along the optical axis in millimetres (uint16), 0 where nothing is in
range, as a RealSense reports it.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np

from drivers.sim.mujoco.scene import CAMERA_NAMES, MAX_RENDER

_OFF_FLAGS = (
    mujoco.mjtRndFlag.mjRND_SHADOW,
    mujoco.mjtRndFlag.mjRND_REFLECTION,
    mujoco.mjtRndFlag.mjRND_SKYBOX,
)
MAX_DEPTH_MM = 65535


class CellRenderer:
    """Renders any of the model's cameras at one image size (make one per size, reuse it).

    Not thread-safe: its GL context is made current on the calling thread per render.
    """

    def __init__(self, model: mujoco.MjModel, height: int, width: int) -> None:
        h, w = int(height), int(width)
        if not (0 < h <= MAX_RENDER[0] and 0 < w <= MAX_RENDER[1]):
            raise ValueError(f"image size {h}x{w} outside 1..{MAX_RENDER[0]}x{MAX_RENDER[1]}")
        self.model = model
        self.height, self.width = h, w
        self._cam_ids = {
            name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            for name in CAMERA_NAMES
        }
        self._gl: mujoco.GLContext | None = mujoco.GLContext(w, h)
        self._gl.make_current()
        self._ctx: mujoco.MjrContext | None = mujoco.MjrContext(
            model, mujoco.mjtFontScale.mjFONTSCALE_100.value
        )
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN.value, self._ctx)
        self._ctx.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=1000)
        for flag in _OFF_FLAGS:
            self._scene.flags[flag] = False
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._rect = mujoco.MjrRect(0, 0, w, h)
        self._rgb = np.empty((h, w, 3), dtype=np.uint8)
        self._depth = np.empty((h, w), dtype=np.float32)
        # Reversed-z depth buffer -> metres (the mapping mujoco.Renderer uses).
        extent = model.stat.extent
        near = np.float32(model.vis.map.znear * extent)
        far = np.float32(model.vis.map.zfar * extent)
        c = -(far + near) / (far - near)
        d = -(np.float32(2) * far * near) / (far - near)
        self._c = float(np.float32(-0.5) * c - np.float32(0.5))
        self._d = float(np.float32(-0.5) * d)
        self._far_mm = float(far) * 1000.0

    def render(self, data: mujoco.MjData, camera: str) -> tuple[np.ndarray, np.ndarray]:
        """(color (H, W, 3) uint8, depth (H, W) uint16 mm) from camera `camera`."""
        cam_id = self._cam_ids.get(camera, -1)
        if cam_id < 0:
            raise ValueError(f"unknown camera {camera!r}; known: {', '.join(CAMERA_NAMES)}")
        if self._gl is None or self._ctx is None:
            raise RuntimeError("renderer is closed")
        self._gl.make_current()
        self._camera.fixedcamid = cam_id
        mujoco.mjv_updateScene(
            self.model,
            data,
            self._option,
            None,
            self._camera,
            mujoco.mjtCatBit.mjCAT_ALL.value,
            self._scene,
        )
        mujoco.mjr_render(self._rect, self._scene, self._ctx)
        mujoco.mjr_readPixels(self._rgb, self._depth, self._rect, self._ctx)
        color = np.ascontiguousarray(self._rgb[::-1])
        metres = self._d / (self._depth[::-1].astype(np.float64) + self._c)
        mm = metres * 1000.0
        mm[~(mm < self._far_mm * 0.999)] = 0.0  # background (and NaN): nothing in range
        depth = np.clip(np.rint(mm), 0, MAX_DEPTH_MM).astype(np.uint16)
        return color, depth

    def close(self) -> None:
        """Free the GL resources (idempotent)."""
        if self._ctx is not None and self._gl is not None:
            self._gl.make_current()
            self._ctx.free()
        self._ctx = None
        if self._gl is not None:
            self._gl.free()
        self._gl = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown: GL may be gone
            self.close()

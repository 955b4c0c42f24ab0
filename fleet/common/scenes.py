"""Episode seeds: which scene a cell trains on, and the held-out scenes `fleet eval` uses.

A scene (object layout, target) is a function of a 32-bit seed alone, on every sim backend.
The seed space is split by its top bit, so the two sets can never meet whatever the cell
seeds or episode counts: a training seed (what cells draw while the fleet learns) always
has bit 31 clear, a held-out seed always has it set. Both sides call these functions; no
other code makes episode seeds.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

#: The simulated cells there are: MuJoCo behind the SDKs, or the light kinematic stand-in.
SimBackend = Literal["mujoco", "kinematic"]
SIM_BACKENDS: tuple[SimBackend, ...] = get_args(SimBackend)

SEED_BITS = 32
HELDOUT_BIT = 1 << (SEED_BITS - 1)
_LOW_MASK = HELDOUT_BIT - 1  # the 31 bits below the held-out bit


def training_seed(cell_seed: int, index: int) -> int:
    """The scene seed of a cell's `index`-th episode: reproducible from the cell's seed and
    the index, spread by a hash, and never a held-out seed (bit 31 clear)."""
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    state = np.random.SeedSequence([cell_seed & 0xFFFFFFFF, index]).generate_state(1)[0]
    return int(state) & _LOW_MASK


def heldout_seed(index: int) -> int:
    """The `index`-th held-out scene seed (bit 31 set); index 0 .. 2**31 - 1."""
    if not 0 <= index <= _LOW_MASK:
        raise ValueError(f"held-out scene index must be in 0..{_LOW_MASK}, got {index}")
    return HELDOUT_BIT | index


def is_heldout(seed: int) -> bool:
    """True for a held-out scene seed, False for a training one."""
    if not 0 <= seed < (1 << SEED_BITS):
        raise ValueError(f"scene seeds are {SEED_BITS}-bit unsigned, got {seed}")
    return bool(seed & HELDOUT_BIT)

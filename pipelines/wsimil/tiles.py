"""Tile conventions shared by training, inference and the benchmark.

The model sees square RGB tiles of :data:`TILE_PX` pixels at
:data:`MODEL_MPP` micrometres per pixel (a 64 um field, about a 5x
objective), which is enough to tell large pleomorphic nuclei from small
stromal and lymphoid ones and keeps a 100,000-pixel-wide 40x slide at some
40,000 tissue tiles. A tile counts as tissue when at least
:data:`MIN_TISSUE_FRACTION` of its pixels are coloured (stained), which is
how glass and tissue differ in brightfield whatever the stain strength.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_TISSUE_FRACTION", "MODEL_MPP", "TILE_PX", "tissue_fraction", "to_model_input"]

MODEL_MPP = 2.0
TILE_PX = 32
MIN_TISSUE_FRACTION = 0.25
# max(R, G, B) - min(R, G, B) above this is stain, below is glass and noise
SATURATION_THRESHOLD = 25


def saturation(rgb: np.ndarray) -> np.ndarray:
    """Colourfulness of RGB uint8 pixels, ``[..., 3]`` -> ``[...]`` int16."""
    return rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Fraction of stained pixels per tile, ``[N, H, W, 3]`` uint8 -> ``[N]``."""
    return (saturation(tiles) > SATURATION_THRESHOLD).mean(axis=(1, 2))


def to_model_input(tiles: np.ndarray) -> np.ndarray:
    """RGB uint8 tiles ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in [0, 1], the encoder's input."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)

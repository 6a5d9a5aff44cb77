"""Tiling of synthetic slides and the figures of merit of the tumour model (numpy only).

:func:`slide_tiles` is the one place where a :class:`~pipelines.wsimil.lab.scene.SlideScene`
becomes the model's bag of tiles, with exactly the tiling that inference
applies to a real slide: the slide is rendered at
:data:`~pipelines.wsimil.preprocess.MODEL_MPP`, the tile grid starts at pixel
(0, 0) of that level, tile ``(r, c)`` covers rows ``r*32:(r+1)*32`` and
columns ``c*32:(c+1)*32``, only whole tiles are used (a partial row or
column at the right or bottom edge is dropped) and a tile is kept when its
:func:`~pipelines.wsimil.preprocess.tissue_fraction` is at least
:data:`~pipelines.wsimil.preprocess.MIN_TISSUE_FRACTION`. Training, the held-out
evaluation, the model test and the benchmark all use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipelines.wsimil.preprocess import MIN_TISSUE_FRACTION, MODEL_MPP, TILE_PX, tissue_fraction

if TYPE_CHECKING:
    from pipelines.wsimil.lab.scene import SlideScene

__all__ = ["TRUTH_FRACTION", "dice", "grid_shape", "roc_auc", "slide_tiles"]

# A tile is tumour (ground truth, evaluation only) when at least this
# fraction of its pixels lie in the scene's tumour mask.
TRUTH_FRACTION = 0.5
# Tile rows rendered at once: the renderer pads every request by a margin
# of some 13 pixels for blur and nuclei, so one-tile bands would render
# nearly twice the area; eight rows keep that overhead near 10 % while a
# 3 mm wide band stays a few MB.
_BAND_ROWS = 8


def grid_shape(scene: SlideScene, mpp: float = MODEL_MPP) -> tuple[int, int]:
    """Rows and columns of whole tiles in the slide at ``mpp``."""
    # The small epsilon keeps an exact multiple (3000 um / 2.0) from
    # losing a pixel to floating-point rounding.
    h_px = int(np.floor(scene.height_um / mpp + 1e-6))
    w_px = int(np.floor(scene.width_um / mpp + 1e-6))
    return h_px // TILE_PX, w_px // TILE_PX


def _to_tiles(band: np.ndarray) -> np.ndarray:
    """``[R*T, C*T, ...]`` -> ``[R*C, T, T, ...]`` in row-major tile order."""
    rows, cols = band.shape[0] // TILE_PX, band.shape[1] // TILE_PX
    rest = band.shape[2:]
    t = band.reshape(rows, TILE_PX, cols, TILE_PX, *rest).swapaxes(1, 2)
    return t.reshape(rows * cols, TILE_PX, TILE_PX, *rest)


def slide_tiles(
    scene: SlideScene, mpp: float = MODEL_MPP, with_truth: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Render a slide band by band and return its tissue tiles.

    Parameters
    ----------
    scene : SlideScene
        The synthetic slide.
    mpp : float
        Micrometres per pixel of the level that is tiled (the model's is
        :data:`~pipelines.wsimil.preprocess.MODEL_MPP`).
    with_truth : bool
        Compute the tile truth from the scene's tumour mask. Training passes
        False: it learns from the slide label only, and the mask is not even
        evaluated.

    Returns
    -------
    tiles : numpy.ndarray
        ``[N, 32, 32, 3]`` uint8 RGB tissue tiles, row-major order.
    rc : numpy.ndarray
        ``[N, 2]`` int64 row and column of each tile in the grid.
    truth : numpy.ndarray
        ``[N]`` bool, tumour tile (at least :data:`TRUTH_FRACTION` of its
        pixels in the tumour mask); all False when ``with_truth`` is False.
    grid : tuple of int
        ``(rows, cols)`` of the whole tile grid.
    """
    rows, cols = grid_shape(scene, mpp)
    tiles: list[np.ndarray] = []
    rcs: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    w = cols * TILE_PX
    for r0 in range(0, rows, _BAND_ROWS):
        n_rows = min(_BAND_ROWS, rows - r0)
        h = n_rows * TILE_PX
        y = r0 * TILE_PX
        band = _to_tiles(scene.render(0, y, w, h, mpp))
        keep = np.flatnonzero(tissue_fraction(band) >= MIN_TISSUE_FRACTION)
        if not len(keep):
            continue
        tiles.append(band[keep])
        rcs.append(np.stack([r0 + keep // cols, keep % cols], axis=1))
        if with_truth:
            mask = _to_tiles(scene.tumour_mask(0, y, w, h, mpp))[keep]
            truths.append(mask.mean(axis=(1, 2)) >= TRUTH_FRACTION)
        else:
            truths.append(np.zeros(len(keep), bool))
    if not tiles:
        return (
            np.zeros((0, TILE_PX, TILE_PX, 3), np.uint8),
            np.zeros((0, 2), np.int64),
            np.zeros(0, bool),
            (rows, cols),
        )
    return np.concatenate(tiles), np.concatenate(rcs).astype(np.int64), np.concatenate(truths), (rows, cols)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as one half.

    Parameters
    ----------
    scores : numpy.ndarray
        ``[N]`` scores, higher meaning more likely positive.
    labels : numpy.ndarray
        ``[N]`` bool (or 0/1) truth.

    Returns
    -------
    float
        The AUC, or NaN when one of the two classes is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average ranks (1-based) over runs of equal scores: that is what
    # counts a tied positive-negative pair as one half.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` of two boolean arrays; 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ in shape")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)

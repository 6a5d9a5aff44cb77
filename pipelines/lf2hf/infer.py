"""Run the exported lf2hf network and check its output against the acquisition (numpy + onnxruntime).

:func:`enhance` turns acquired low-field slices into 3 T-like slices at twice
the matrix. :func:`degrade` is the forward model of the consistency check:
it takes the enhanced slices back to the acquired grid and scores, per slice,
how well they explain what was acquired.

Consistency score
-----------------
The enhanced image has 3 T contrast, no bias field and no noise, so it can
never equal the acquired image. The forward model therefore is:

1. central k-space truncation of the output to the acquired matrix
   (:func:`~pipelines.lf2hf.preprocess.kspace_downsample`, exactly as the
   simulator forms its input);
2. a smooth, per-slice intensity mapping fitted by least squares within the
   head: ``acquired ~ sum_ij c_ij * d**i * P_j(x, y)`` with ``d`` the
   degraded output, ``i = 0..3`` and ``P_j`` the 2-D polynomials up to total
   degree 2 (24 coefficients). It absorbs the contrast difference between
   low field and 3 T and the bias field, but it is far too smooth to absorb
   a structure that is in the output and not in the acquisition, or the
   reverse.

With ``r`` the residual divided by the slice's normalisation scale, ``s`` the
noise sigma estimated from the acquired background (same units) and ``e``
the model-error floor :data:`MODEL_ERROR_FLOOR` (what remains for a correct
output: thick-slice partial volume, which a 2-D model cannot undo, and the
mapping's approximation), the per-slice scores are

* ``global_score = rms(r in head) / sqrt(s**2 + e**2)``: normalised RMSE;
* ``local_score = max over 5 x 5 windows inside the head of |mean(r)| /
  sqrt(s**2 / 25 + e**2)``: a coherent local discrepancy such as a
  hallucinated lesion or a removed one.

A slice is flagged when ``global_score > GLOBAL_THRESHOLD`` or
``local_score > LOCAL_THRESHOLD``; :attr:`ConsistencyResult.score` is the
larger of the two ratios to their thresholds, so ``score > 1`` means flagged.
The floor and thresholds were calibrated on simulated slices of the training
slab (never the held-out data), see the model card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.lf2hf.preprocess import (
    Contrast,
    box_mean,
    estimate_noise_sigma,
    head_mask,
    kspace_downsample,
    normalisation_scale,
    prepare_slice,
)

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "GLOBAL_THRESHOLD",
    "LOCAL_THRESHOLD",
    "MODEL_ERROR_FLOOR",
    "ConsistencyResult",
    "degrade",
    "enhance",
    "make_session",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Input sides are padded to a multiple of this (the network's stride).
PAD_MULTIPLE: int = 4
#: Upsampling factor of the network.
SCALE: int = 2
#: Slices per onnxruntime call.
BATCH: int = 8
#: Relative model-error floor of the consistency scores.
MODEL_ERROR_FLOOR: float = 0.02
#: Flag thresholds of the consistency scores.
GLOBAL_THRESHOLD: float = 2.0
LOCAL_THRESHOLD: float = 4.0
#: Side of the local window (acquired pixels).
LOCAL_WINDOW: int = 5
#: Degrees of the intensity mapping (in the output intensity) and of its
#: smooth spatial variation.
MAP_INTENSITY_DEGREE: int = 3
MAP_SPATIAL_DEGREE: int = 2


def make_session(path: str | Path, threads: int = 1) -> "onnxruntime.InferenceSession":
    """Open the exported model on the CPU with a fixed number of threads.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.onnx`` file.
    threads : int
        Intra-op threads (0: onnxruntime's default, all cores).

    Returns
    -------
    onnxruntime.InferenceSession
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``[N, H, W]`` at the bottom and right to multiples of ``multiple`` by reflection."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if (ph < h and pw < w) else "edge"
    return np.pad(x, [(0, 0), (0, ph), (0, pw)], mode=mode)


def enhance(session: "onnxruntime.InferenceSession", slices: np.ndarray, field_strength_t: float,
            contrast: Contrast | str, batch: int = BATCH) -> np.ndarray:
    """Translate low-field slices into 3 T-like slices at twice the matrix.

    Each slice is normalised by its own robust scale
    (:func:`~pipelines.lf2hf.preprocess.prepare_slice`), padded to a
    multiple of :data:`PAD_MULTIPLE`, run through the network in batches,
    cropped and multiplied back by its scale, so the output is on the
    input's intensity scale (the median of its head close to the input's).
    Negative values are clipped to zero, as for any magnitude image.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        From :func:`make_session`.
    slices : numpy.ndarray
        float32 ``[N, H, W]`` (or one ``[H, W]`` slice) raw magnitude.
    field_strength_t : float
        B0 of the acquisition (T), nominally in [0.05, 0.55].
    contrast : Contrast or str
        ``"T1w"`` or ``"T2w"``.
    batch : int
        Slices per onnxruntime call.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, 2H, 2W]`` (``[2H, 2W]`` for one slice).
    """
    x = np.asarray(slices, dtype=np.float32)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected slices [N, H, W], got shape {x.shape}")
    if not 0.02 <= field_strength_t <= 1.0:
        logger.warning("field strength %.3f T is outside the trained range 0.05-0.55 T", field_strength_t)
    n, h, w = x.shape
    prepared = [prepare_slice(s, field_strength_t, contrast) for s in x]
    images = _pad(np.stack([p.image for p in prepared]), PAD_MULTIPLE)[:, None]
    conds = np.stack([p.cond for p in prepared])
    out = np.empty((n, SCALE * h, SCALE * w), dtype=np.float32)
    for i in range(0, n, batch):
        y = session.run(None, {"image": images[i : i + batch], "cond": conds[i : i + batch]})[0]
        out[i : i + batch] = y[:, 0, : SCALE * h, : SCALE * w]
    scales = np.array([p.scale for p in prepared], dtype=np.float32)[:, None, None]
    out = np.clip(out * scales, 0.0, None)
    return out[0] if single else out


@dataclass
class ConsistencyResult:
    """Per-slice agreement of enhanced slices with the acquired ones.

    Attributes
    ----------
    degraded : numpy.ndarray
        float32 ``[N, H, W]``: the output taken to the acquired grid and
        intensity-mapped onto the acquired slice.
    residual_rms, local_residual_max, noise_rel : numpy.ndarray
        float ``[N]``: RMS of the relative residual in the head, largest
        absolute 5 x 5 window mean of it, and the relative noise sigma
        (the ingredients of the scores, kept for calibration).
    global_score, local_score : numpy.ndarray
        float ``[N]``, see the module docstring.
    score : numpy.ndarray
        float ``[N]``: ``max(global_score / GLOBAL_THRESHOLD, local_score /
        LOCAL_THRESHOLD)``.
    flagged : numpy.ndarray
        bool ``[N]``: ``score > 1``.
    noise_sigma : numpy.ndarray
        float ``[N]``: noise sigma estimated from each acquired slice.
    field_strength_t : float
        B0 of the acquisition (T).
    """

    degraded: np.ndarray
    residual_rms: np.ndarray
    local_residual_max: np.ndarray
    noise_rel: np.ndarray
    global_score: np.ndarray
    local_score: np.ndarray
    score: np.ndarray
    flagged: np.ndarray
    noise_sigma: np.ndarray
    field_strength_t: float


def _design(d: np.ndarray) -> np.ndarray:
    """Columns ``d**i * P_j(u, v)`` of the intensity mapping for a slice ``[H, W]``."""
    h, w = d.shape
    u, v = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    spatial = [u**a * v**b for a in range(MAP_SPATIAL_DEGREE + 1) for b in range(MAP_SPATIAL_DEGREE + 1 - a)]
    return np.stack([d**i * p for i in range(MAP_INTENSITY_DEGREE + 1) for p in spatial], axis=-1)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a ``(2r+1)``-square (pixels outside the image count as outside)."""
    return box_mean(mask.astype(np.float32), 2 * r + 1) > 1.0 - 1e-6 if r > 0 else mask


def degrade(output: np.ndarray, field_strength_t: float, acquired: np.ndarray,
            floor: float = MODEL_ERROR_FLOOR) -> ConsistencyResult:
    """Take enhanced slices back to the acquired grid and score their consistency.

    Parameters
    ----------
    output : numpy.ndarray
        ``[N, 2H, 2W]`` enhanced slices (from :func:`enhance`), or ``[2H, 2W]``.
    field_strength_t : float
        B0 of the acquisition (T), recorded with the result.
    acquired : numpy.ndarray
        ``[N, H, W]`` acquired low-field slices the output was made from.
    floor : float
        Relative model-error floor, see the module docstring.

    Returns
    -------
    ConsistencyResult
    """
    out = np.asarray(output, dtype=np.float32)
    acq = np.asarray(acquired, dtype=np.float32)
    if out.ndim == 2:
        out, acq = out[None], acq[None]
    if out.ndim != 3 or acq.ndim != 3 or out.shape[0] != acq.shape[0]:
        raise ValueError(f"expected [N, 2H, 2W] output and [N, H, W] acquired slices, got {out.shape}, {acq.shape}")
    if out.shape[1] < acq.shape[1] or out.shape[2] < acq.shape[2]:
        raise ValueError(f"output {out.shape[1:]} is smaller than the acquired matrix {acq.shape[1:]}")
    n = acq.shape[0]
    degraded = kspace_downsample(out, acq.shape[1:])
    mapped = np.zeros_like(acq)
    rms = np.zeros(n)
    loc = np.zeros(n)
    rel = np.zeros(n)
    sigmas = np.zeros(n)
    for k in range(n):
        a = acq[k]
        sigma = estimate_noise_sigma(a)
        scale = normalisation_scale(a, sigma)
        mask = head_mask(a, sigma)
        d = degraded[k] / max(float(np.percentile(degraded[k][mask], 99)), 1e-12)
        design = _design(d)
        coef, *_ = np.linalg.lstsq(design[mask].astype(np.float64), (a[mask] / scale).astype(np.float64), rcond=None)
        fit = (design @ coef).astype(np.float32)
        mapped[k] = fit * scale
        r = np.where(mask, a / scale - fit, 0.0).astype(np.float32)
        rms[k] = float(np.sqrt(np.mean(r[mask] ** 2)))
        inner = _erode(mask, LOCAL_WINDOW // 2)
        loc[k] = float(np.abs(box_mean(r, LOCAL_WINDOW))[inner].max()) if inner.any() else 0.0
        rel[k] = sigma / scale
        sigmas[k] = sigma
    g = rms / np.sqrt(rel**2 + floor**2)
    lo = loc / np.sqrt(rel**2 / LOCAL_WINDOW**2 + floor**2)
    score = np.maximum(g / GLOBAL_THRESHOLD, lo / LOCAL_THRESHOLD)
    return ConsistencyResult(mapped, rms, loc, rel, g, lo, score, score > 1.0, sigmas, float(field_strength_t))

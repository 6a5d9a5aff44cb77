"""Run the exported lf2hf network and check its output against the acquisition (numpy + onnxruntime).

:func:`enhance` turns acquired low-field slices into 3 T-like slices at twice
the matrix. :func:`degrade` is the forward model of the consistency check:
it takes the enhanced slices back to the acquired grid and scores, per slice,
how well they explain what was acquired.

Consistency score
-----------------
The enhanced image has 3 T contrast, no bias field and no noise, so it can
never equal the acquired image. The check therefore compares them through
a forward model, in both directions:

1. central k-space truncation of the output ``y`` to the acquired matrix,
   ``d`` (:func:`~pipelines.lf2hf.preprocess.kspace_downsample`, exactly as
   the simulator forms its input);
2. *forward*: a smooth per-slice intensity mapping fitted by least squares,
   ``a ~ f(d, x, y) = sum_ij c_ij * d**i * P_j(x, y)`` (``i = 0..3``,
   ``P_j`` the 2-D polynomials up to total degree 2: 24 coefficients),
   where ``a`` is the acquired slice. It absorbs the low-field versus 3 T
   contrast and the bias field, but no local structure;
3. *reverse*: the same mapping the other way, ``d ~ g(a, x, y)``. A
   structure the output adds (a hallucinated lesion) can hide from the
   forward fit where the low-field contrast is flat (T1w at very low
   field), but the acquired image cannot predict it in the reverse one.

Both are fitted and evaluated inside the head mask eroded by
:data:`INTERIOR_EROSION` of its radius (roughly the brain), in units of each
image's normalisation scale (brain tissue = 1). With ``r_f = a - f``,
``r_r = d - g``, ``s`` the noise sigma estimated from the acquired
background (relative) and ``G`` a Gaussian of :data:`LOCAL_SIGMA_PX`
acquired pixels:

* ``global_score = rms(r_f) / sqrt(s**2 + e**2)``, ``e`` =
  :data:`MODEL_ERROR_FLOOR` (what a correct output leaves: thick-slice
  partial volume, which a 2-D model cannot undo, and the mapping's
  approximation), flagged above :data:`GLOBAL_THRESHOLD`;
* ``local_score = max(|G * r_f|, |G * r_r|) / sqrt(t**2 + (0.85 s)**2)``
  (the maximum over the region), ``t`` = :data:`LOCAL_TOLERANCE`: a local
  discrepancy larger than ``t`` of the tissue level over a ~3 mm Gaussian
  window, with ``0.85 s`` the expected maximum of smoothed noise; flagged
  above 1.

:attr:`ConsistencyResult.score` is ``max(global_score / GLOBAL_THRESHOLD,
local_score)``, so ``score > 1`` means flagged. The constants were
calibrated on simulated slices of the training slab, never the held-out
data (``python -m pipelines.lf2hf.lab.bench --calibrate``): there, none of the
network's outputs is flagged (largest score 0.76), 4 % of the 3 T truths
themselves are (thin-slice detail that the thick low-field slice cannot
show), a bright blob added to the outputs (peak twice the tissue level,
sigma 3 output pixels) is flagged in 97 % of slices, and a faint one (peak
at the tissue level) in only 15 %. The check finds gross and conspicuous
local inconsistencies; it cannot prove an output right, and subtle
hallucinations pass it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    "LOCAL_TOLERANCE",
    "MODEL",
    "MODEL_ERROR_FLOOR",
    "ConsistencyResult",
    "degrade",
    "enhance",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Manifest name of the network (``exported_models/lf2hf-net.json``).
MODEL: str = "lf2hf-net"
#: Input sides are padded to a multiple of this (the network's stride).
PAD_MULTIPLE: int = 4
#: Upsampling factor of the network.
SCALE: int = 2
#: Slices per onnxruntime call.
BATCH: int = 8
#: Relative model-error floor of the global consistency score.
MODEL_ERROR_FLOOR: float = 0.04
#: Flag threshold of the global consistency score.
GLOBAL_THRESHOLD: float = 3.0
#: Local discrepancy (relative to the tissue level) tolerated before a slice
#: is flagged.
LOCAL_TOLERANCE: float = 0.55
#: Expected maximum over a slice of Gaussian-smoothed white noise, in units
#: of the noise sigma: about 4.5 standard deviations of the smoothed noise,
#: whose standard deviation is ``1 / (2 sqrt(pi) LOCAL_SIGMA_PX)``.
NOISE_MAX_GAIN: float = 0.85
#: Width of the local window (acquired pixels).
LOCAL_SIGMA_PX: float = 1.5
#: The scores look at the head mask eroded by this fraction of its
#: equivalent radius (about the skull and scalp), i.e. at the brain: scalp
#: fat and the truncation ringing around it are not what the check is for,
#: and a per-slice intensity mapping cannot serve fat and brain at once.
INTERIOR_EROSION: float = 0.15
#: Degrees of the intensity mapping (in the output intensity) and of its
#: smooth spatial variation.
MAP_INTENSITY_DEGREE: int = 3
MAP_SPATIAL_DEGREE: int = 2


def _pad(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``[N, H, W]`` at the bottom and right to multiples of ``multiple`` by reflection."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    width = [(0, 0), (0, ph), (0, pw)]
    # Reflection needs the image to be larger than the pad.
    return np.pad(x, width, mode="reflect") if (ph < h and pw < w) else np.pad(x, width, mode="edge")


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
        Of the exported model: ``ctx.sessions[MODEL]`` in the service,
        :func:`pipelines._lab.cpu_session` in the lab and the tests.
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
        mapped onto the acquired slice's contrast (``f`` of the module
        docstring, in acquired units).
    residual_rms, local_residual_max, noise_rel : numpy.ndarray
        float ``[N]``: ``rms(r_f)``, ``max(|G * r_f|, |G * r_r|)`` and ``s``
        (the ingredients of the scores, kept for calibration).
    global_score, local_score : numpy.ndarray
        float ``[N]``, see the module docstring.
    score : numpy.ndarray
        float ``[N]``: ``max(global_score / GLOBAL_THRESHOLD, local_score)``.
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


def _fit_residual(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares mapping ``y ~ f(x, position)`` within ``mask``: the fit and the residual (0 outside)."""
    design = _design(x)
    coef, *_ = np.linalg.lstsq(design[mask].astype(np.float64), y[mask].astype(np.float64), rcond=None)
    fit = (design @ coef).astype(np.float32)
    return fit, np.where(mask, y - fit, 0.0).astype(np.float32)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a ``(2r+1)``-square (pixels outside the image count as outside)."""
    return box_mean(mask.astype(np.float32), 2 * r + 1) > 1.0 - 1e-6 if r > 0 else mask


def _interior(head: np.ndarray) -> np.ndarray:
    """The head mask eroded by :data:`INTERIOR_EROSION` of its equivalent radius: roughly the brain."""
    radius = float(np.sqrt(head.sum() / np.pi))
    inner = _erode(head, int(round(INTERIOR_EROSION * radius)))
    return inner if inner.sum() >= 50 else head


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing of ``[H, W]`` (zero beyond the edges)."""
    r = max(1, int(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    y = np.apply_along_axis(np.convolve, 0, x, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, y, k, mode="same")


def degrade(output: np.ndarray, field_strength_t: float, acquired: np.ndarray) -> ConsistencyResult:
    """Take enhanced slices back to the acquired grid and score their consistency with it.

    Parameters
    ----------
    output : numpy.ndarray
        ``[N, 2H, 2W]`` enhanced slices (from :func:`enhance`), or ``[2H, 2W]``.
    field_strength_t : float
        B0 of the acquisition (T), recorded with the result.
    acquired : numpy.ndarray
        ``[N, H, W]`` acquired low-field slices the output was made from.

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
    rms, loc, rel, sigmas = (np.zeros(n) for _ in range(4))
    for k in range(n):
        a = acq[k]
        sigma = estimate_noise_sigma(a)
        scale = normalisation_scale(a, sigma)
        mask = _interior(head_mask(a, sigma))
        a_n = a / scale
        d_n = degraded[k] / max(float(np.median(degraded[k][mask])), 1e-12)
        fit, r_f = _fit_residual(d_n, a_n, mask)
        _, r_r = _fit_residual(a_n, d_n, mask)
        mapped[k] = fit * scale
        rms[k] = float(np.sqrt(np.mean(r_f[mask] ** 2)))
        inner = _erode(mask, int(np.ceil(2 * LOCAL_SIGMA_PX)))
        local = np.maximum(np.abs(_gaussian(r_f, LOCAL_SIGMA_PX)), np.abs(_gaussian(r_r, LOCAL_SIGMA_PX)))
        loc[k] = float(local[inner].max()) if inner.any() else 0.0
        rel[k] = sigma / scale
        sigmas[k] = sigma
    g = rms / np.sqrt(rel**2 + MODEL_ERROR_FLOOR**2)
    lo = loc / np.sqrt(LOCAL_TOLERANCE**2 + (NOISE_MAX_GAIN * rel) ** 2)
    score = np.maximum(g / GLOBAL_THRESHOLD, lo)
    return ConsistencyResult(mapped, rms, loc, rel, g, lo, score, score > 1.0, sigmas, float(field_strength_t))

"""Run the exported lf2hf network, check it, and the contrast-preserving reconstruction (numpy + onnxruntime).

:func:`enhance` turns acquired low-field slices into 3 T-like slices at twice
the matrix. :func:`degrade` is the forward model of the consistency check:
it takes the enhanced slices back to the acquired grid and scores, per slice,
how well they explain what was acquired. :func:`domain_reasons` is the
domain gate's image test. The gate falls back to a contrast-preserving
result: :func:`restore`, the learned one (an unrolled proximal-gradient
network: gradient steps through the acquisition operator, a small learned
prior, and a final projection onto the data within the noise level), or
:func:`reconstruct_tv`, the classical one (total variation with the same
operator). The :func:`residual_to_noise` of both is at or below the noise
level by construction.

Contrast-preserving reconstruction
----------------------------------
The acquisition is ``y = A x + n``: ``A`` keeps the central half of k-space
(:func:`~pipelines.lf2hf.preprocess.kspace_downsample`, the simulator's own
operator), ``n`` is the noise of sigma estimated from the image
(:func:`~pipelines.lf2hf.preprocess.robust_noise_sigma`). The result solves

    min_x  1/2 ||A x - y||^2  +  lambda * TV(x),   lambda = TV_LAMBDA_OVER_SIGMA * sigma

(isotropic TV on the 2x grid) by :data:`TV_ITERATIONS` Chambolle-Pock
(primal-dual) iterations started from the zero-filled ``A+ y``; the data
term's proximal step is exact because ``A A+ = I``. It only removes what
the data do not support (noise, truncation ringing): it cannot change
contrast and cannot add a structure that ``A`` would not see.

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
    kspace_upsample,
    normalisation_scale,
    prepare_slice,
    robust_noise_sigma,
)

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "GLOBAL_THRESHOLD",
    "LOCAL_TOLERANCE",
    "MODEL",
    "MODEL_ERROR_FLOOR",
    "RESTORE_ITERATIONS",
    "RESTORE_MODEL",
    "TRAINED_FIELD_RANGE_T",
    "TV_ITERATIONS",
    "TV_LAMBDA_OVER_SIGMA",
    "ConsistencyResult",
    "degrade",
    "domain_reasons",
    "enhance",
    "reconstruct_tv",
    "residual_to_noise",
    "restore",
    "restore_conditioning",
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
#: TV weight over the noise sigma (normalised units) of the contrast-preserving
#: reconstruction. Chosen on simulated training-slab 3 T slices degraded by
#: ``A`` plus noise at the benchmark's three field strengths, as the best
#: worst-case gain over bicubic of 0.1, 0.25, 0.5, 0.75 and 1 (never on the
#: real images of the out-of-domain benchmark; worst-case gains 0.94 to
#: 1.14 dB at 0.25, 0.07 dB at 0.5 and -1.24 dB at 0.75 at 0.064 T).
TV_LAMBDA_OVER_SIGMA: float = 0.25
#: Primal-dual iterations of :func:`reconstruct_tv` (the PSNR changes by
#: less than 0.05 dB beyond this on the calibration slices).
TV_ITERATIONS: int = 150
#: Manifest name of the learned contrast-preserving restoration's prior (``exported_models/lf2hf-dc.json``).
RESTORE_MODEL: str = "lf2hf-dc"
#: Unrolled proximal-gradient iterations of :func:`restore` (one prior call each).
RESTORE_ITERATIONS: int = 3
#: Step of the gradient step on ``1/2 ||A x - y||^2`` (in units of ``1 / ||A||^2``).
RESTORE_STEP: float = 0.5
#: Radius of the final data-consistency projection, in noise sigmas: the
#: output's residual ``rms(A x - y)`` is at most this (the discrepancy
#: principle: a denoised image explains the data to the noise level).
RESTORE_TAU: float = 1.0
#: Rounds of alternating projections onto non-negative images and onto the data ball after the loop
#: (not part of training). A magnitude image is non-negative, and clipping the projected output at zero
#: in the air would push its residual above ``RESTORE_TAU`` (to 1.17 sigma on a 256 x 256 phantom with
#: 12 % air at SNR 155); after these rounds the final clip moves it by little.
RESTORE_NONNEG_ROUNDS: int = 3
#: Fine-grid sides the prior takes must be multiples of this (the caller pads).
PRIOR_STRIDE: int = 4
#: Conditioning of the prior: ``log10(max(sigma_rel, PRIOR_SIGMA_FLOOR) / PRIOR_SIGMA_REF)`` and
#: the iteration ``k / (RESTORE_ITERATIONS - 1)``.
PRIOR_COND_DIM: int = 2
PRIOR_SIGMA_FLOOR: float = 1e-3
PRIOR_SIGMA_REF: float = 0.05
#: Field strengths (T) the network was trained on (the simulator's
#: ``FIELD_RANGE_T``); outside them the contrast translation is not trusted.
TRAINED_FIELD_RANGE_T: tuple[float, float] = (0.05, 0.55)
#: Per weighting, the lowest and highest 10th, 25th, 75th and 90th percentiles
#: of the normalised head intensities (the conditioning's
#: :data:`~pipelines.lf2hf.preprocess.COND_QUANTILES`) over simulated
#: training slices, all fields, 213 per weighting, rounded outwards
#: (``python -m pipelines.lf2hf.lab.bench --calibrate-gate``). A slice outside
#: this envelope does not look like anything the network learnt: bright
#: fat or marrow filling the field (shoulder, abdomen), or no air around it.
DOMAIN_QUANTILES: dict[Contrast, tuple[tuple[float, ...], tuple[float, ...]]] = {
    Contrast.T1W: ((0.06, 0.30, 1.03, 1.07), (0.46, 0.70, 1.39, 1.88)),
    Contrast.T2W: ((0.06, 0.31, 1.10, 1.17), (0.49, 0.86, 1.48, 2.02)),
}


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


def domain_reasons(slices: np.ndarray, field_strength_t: float, contrast: Contrast | str) -> list[str]:
    """Why the network's contrast translation cannot be trusted on these slices (empty: in its domain).

    Cheap image statistics, before the network runs: the field strength
    against :data:`TRAINED_FIELD_RANGE_T`, and each slice's intensity
    percentiles within its foreground against :data:`DOMAIN_QUANTILES`.
    The test is one-sided on purpose: a brain slice the envelope turns
    away only loses the contrast translation, while a foreign image let
    through would be painted with brain contrast.

    Parameters
    ----------
    slices : numpy.ndarray
        ``[N, H, W]`` acquired slices.
    field_strength_t : float
        B0 (T).
    contrast : Contrast or str
        The weighting the network would be told.

    Returns
    -------
    list of str
        Short reasons, without patient data.
    """
    reasons = []
    lo_t, hi_t = TRAINED_FIELD_RANGE_T
    if not lo_t <= field_strength_t <= hi_t:
        reasons.append(f"{field_strength_t:g} T is outside the trained {lo_t:g}-{hi_t:g} T")
    lo, hi = (np.asarray(v) for v in DOMAIN_QUANTILES[Contrast.of(contrast)])
    outside = 0
    for s in np.asarray(slices, dtype=np.float32).reshape(-1, *slices.shape[-2:]):
        q = prepare_slice(s, max(field_strength_t, 1e-3), contrast).cond[-len(lo):]
        outside += int(np.any(q < lo) or np.any(q > hi))
    if outside:
        reasons.append(f"{outside} of {len(slices)} slices have an intensity distribution unlike the training data")
    return reasons


def _grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences along the last two axes (zero at the far edge)."""
    gr = np.zeros_like(x)
    gc = np.zeros_like(x)
    gr[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    gc[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return gr, gc


def _div(pr: np.ndarray, pc: np.ndarray) -> np.ndarray:
    """Divergence, the negative adjoint of :func:`_grad`."""
    d = np.zeros_like(pr)
    d[..., 0, :] += pr[..., 0, :]
    d[..., 1:-1, :] += pr[..., 1:-1, :] - pr[..., :-2, :]
    d[..., -1, :] -= pr[..., -2, :]
    d[..., :, 0] += pc[..., :, 0]
    d[..., :, 1:-1] += pc[..., :, 1:-1] - pc[..., :, :-2]
    d[..., :, -1] -= pc[..., :, -2]
    return d


def _band(shape: tuple[int, int], acquired: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the acquired band in unshifted FFT order of the fine grid."""
    h2, w2 = shape
    h, w = acquired
    m = np.zeros(shape, dtype=bool)
    m[h2 // 2 - h // 2 : h2 // 2 - h // 2 + h, w2 // 2 - w // 2 : w2 // 2 - w // 2 + w] = True
    return np.fft.ifftshift(m)


def reconstruct_tv(slices: np.ndarray, lam_over_sigma: float = TV_LAMBDA_OVER_SIGMA,
                   iterations: int = TV_ITERATIONS) -> np.ndarray:
    """Contrast-preserving denoising and 2x: TV-regularised reconstruction through ``A`` (module docstring).

    Parameters
    ----------
    slices : numpy.ndarray
        float ``[N, H, W]`` (or ``[H, W]``) acquired magnitude slices.
    lam_over_sigma : float
        TV weight in units of each slice's noise sigma.
    iterations : int
        Primal-dual iterations.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, 2H, 2W]`` (``[2H, 2W]`` for one slice) on the input's
        intensity scale, clipped below at 0.
    """
    x_in = np.asarray(slices, dtype=np.float64)
    single = x_in.ndim == 2
    if single:
        x_in = x_in[None]
    n, h, w = x_in.shape
    scales = np.array([normalisation_scale(s) for s in x_in])[:, None, None]
    y = x_in / scales
    lam = np.array([lam_over_sigma * robust_noise_sigma(s) for s in y])[:, None, None]
    lam = np.maximum(lam, 1e-9)  # a noiseless slice: TV weight ~0, the zero-filled result
    x0 = kspace_upsample(y, (SCALE * h, SCALE * w)).real
    band = _band((SCALE * h, SCALE * w), (h, w))
    # 1/2 ||A x - y||^2 summed over acquired pixels = 1/(2 SCALE^2) ||P x - x0||^2 on the fine grid
    # (A A+ = I), so the proximal step solves (I + a P) x = v + a x0 with a = tau / SCALE^2.
    tau = sig = 1.0 / np.sqrt(8.0)  # tau * sigma * ||grad||^2 <= 1
    a = tau / SCALE**2
    shrink = 1.0 - a / (1.0 + a)
    x = x0.copy()
    xb = x0.copy()
    pr = np.zeros_like(x)
    pc = np.zeros_like(x)
    for _ in range(iterations):
        gr, gc = _grad(xb)
        pr += sig * gr
        pc += sig * gc
        norm = np.maximum(1.0, np.sqrt(pr**2 + pc**2) / lam)
        pr /= norm
        pc /= norm
        k = np.fft.fft2(x + tau * _div(pr, pc) + a * x0)
        k[..., band] *= shrink
        x_new = np.fft.ifft2(k).real
        xb = 2.0 * x_new - x
        x = x_new
    out = np.clip(x * scales, 0.0, None).astype(np.float32)
    return out[0] if single else out


def residual_to_noise(output: np.ndarray, acquired: np.ndarray) -> np.ndarray:
    """Per slice, ``rms(|A x| - y) / sigma``: how well an output explains the acquisition, in noise units.

    ``sigma`` is :func:`~pipelines.lf2hf.preprocess.robust_noise_sigma` of
    the acquired slice. An output that fits the data to the noise level
    scores about 1 or less (a denoised one less, as it leaves the noise in
    the residual); one with foreign contrast or invented structure scores
    far more.

    Parameters
    ----------
    output : numpy.ndarray
        ``[N, 2H, 2W]`` or ``[2H, 2W]``.
    acquired : numpy.ndarray
        ``[N, H, W]`` or ``[H, W]``.

    Returns
    -------
    numpy.ndarray
        float ``[N]``.
    """
    out = np.asarray(output, dtype=np.float32).reshape(-1, *np.shape(output)[-2:])
    acq = np.asarray(acquired, dtype=np.float32).reshape(-1, *np.shape(acquired)[-2:])
    back = kspace_downsample(out, acq.shape[-2:])
    ratios = []
    for b, a in zip(back, acq):
        sigma = max(robust_noise_sigma(a), 1e-6 * max(float(np.abs(a).max()), 1e-12))
        ratios.append(float(np.sqrt(np.mean((b.astype(np.float64) - a) ** 2))) / sigma)
    return np.array(ratios)


def _half_band(band: np.ndarray) -> np.ndarray:
    """The weights that make ``irfft2(rfft2(x) * w)`` equal ``Re(ifft2(fft2(x) * band))`` for real ``x``.

    ``Re`` of a masked spectrum is the mask averaged with its mirror
    ``band(-k)`` (the acquired band is not symmetric at Nyquist for even
    sides), so the real-input transforms, about twice as fast, give the same
    projection.
    """
    mirror = np.roll(band[::-1, ::-1], 1, axis=(0, 1))
    return ((band.astype(np.float64) + mirror) / 2.0)[:, : band.shape[1] // 2 + 1]


def _band_project(x: np.ndarray, half_band: np.ndarray) -> np.ndarray:
    """``Re(A+ A x)``: the part of ``x`` ``[..., H2, W2]`` in the acquired band (weights of :func:`_half_band`)."""
    return np.fft.irfft2(np.fft.rfft2(x) * half_band, s=x.shape[-2:])


def restore_conditioning(sigma_rel: float, k: int, iterations: int = RESTORE_ITERATIONS) -> np.ndarray:
    """The prior's conditioning for one slice at iteration ``k``: log noise level and ``k / (K - 1)``."""
    return np.array([np.log10(max(sigma_rel, PRIOR_SIGMA_FLOOR) / PRIOR_SIGMA_REF), k / max(iterations - 1, 1)],
                    dtype=np.float32)


def restore(session: "onnxruntime.InferenceSession", slices: np.ndarray, batch: int = BATCH,
            iterations: int = RESTORE_ITERATIONS, nonneg_rounds: int = RESTORE_NONNEG_ROUNDS) -> np.ndarray:
    """Contrast-preserving denoising and 2x by an unrolled proximal-gradient network with data consistency.

    With ``A`` the acquisition (central half of k-space), ``y`` the
    normalised slice, ``x0 = Re(A+ y)`` (zero filling), ``P = Re(A+ A)`` and
    ``D`` the learned prior (``exported_models/lf2hf-dc.onnx``, one call per
    iteration, all slices batched), the loop is::

        x = D(x0, c_0)
        for k in 1 .. K-1:
            x = D(x - RESTORE_STEP * (P x - x0), c_k)   # gradient step on 1/2 ||A x - y||^2, then the prior
        r = P x - x0                                    # = A+ (A x - y)
        x = x - max(0, 1 - tau sigma / rms(r)) * r      # projection onto ||A x - y|| <= tau sigma
        repeat RESTORE_NONNEG_ROUNDS times: x = max(x, 0), then the same projection

    ``c_k`` is :func:`restore_conditioning` of the noise sigma estimated from
    the slice itself (:func:`~pipelines.lf2hf.preprocess.robust_noise_sigma`:
    background or high-pass, no label). The last line makes the output
    explain the acquired data to ``RESTORE_TAU`` noise sigmas by
    construction, whatever the prior did: :func:`residual_to_noise` of the
    result is at most about ``RESTORE_TAU`` (slightly more, as it measures
    the magnitude). The prior saw no contrast, field or anatomy label, so it
    changes no contrast. The same loop in torch
    (:func:`pipelines.lf2hf.lab.net.unrolled_restore`) is what was trained.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Of ``lf2hf-dc`` (``ctx.sessions[RESTORE_MODEL]``).
    slices : numpy.ndarray
        float ``[N, H, W]`` (or ``[H, W]``) acquired magnitude slices.
    batch : int
        Slices per prior call.
    iterations : int
        ``K``, as trained (:data:`RESTORE_ITERATIONS`).
    nonneg_rounds : int
        Alternating projections onto ``x >= 0`` and the data ball after the
        loop (:data:`RESTORE_NONNEG_ROUNDS`).

    Returns
    -------
    numpy.ndarray
        float32 ``[N, 2H, 2W]`` (``[2H, 2W]`` for one slice) on the input's
        intensity scale, clipped below at 0.
    """
    x_in = np.asarray(slices, dtype=np.float64)
    single = x_in.ndim == 2
    if single:
        x_in = x_in[None]
    if x_in.ndim != 3:
        raise ValueError(f"expected slices [N, H, W], got shape {x_in.shape}")
    n, h, w = x_in.shape
    if n > batch:  # one batch of slices at a time: memory bounded by the batch, not the series
        out = np.concatenate([restore(session, x_in[i : i + batch], batch, iterations, nonneg_rounds)
                              for i in range(0, n, batch)])
        return out[0] if single else out
    scales = np.array([normalisation_scale(s) for s in x_in])[:, None, None]
    y = x_in / scales
    sig = np.array([robust_noise_sigma(s) for s in y])
    x0 = kspace_upsample(y, (SCALE * h, SCALE * w)).real
    band = _half_band(_band((SCALE * h, SCALE * w), (h, w)))
    x = x0.copy()
    for k in range(iterations):
        if k:
            x = x - RESTORE_STEP * (_band_project(x, band) - x0)
        cond = np.stack([restore_conditioning(float(s), k, iterations) for s in sig])
        padded = _pad(x.astype(np.float32), PRIOR_STRIDE)[:, None]
        x = session.run(None, {"image": padded, "cond": cond})[0][:, 0, : SCALE * h, : SCALE * w].astype(np.float64)
    radius = RESTORE_TAU * sig[:, None, None]
    for j in range(1 + nonneg_rounds):
        if j:
            x = np.clip(x, 0.0, None)
        r = _band_project(x, band) - x0
        rms = np.sqrt(np.mean(r**2, axis=(-2, -1), keepdims=True))
        x = x - np.clip(1.0 - radius / np.maximum(rms, 1e-12), 0.0, None) * r
    out = np.clip(x * scales, 0.0, None).astype(np.float32)
    return out[0] if single else out

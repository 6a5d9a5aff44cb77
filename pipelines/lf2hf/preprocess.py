"""Series in, arrays out: reading the slices, and the pre-processing shared with the lab.

:func:`read_slices` turns a routed series into sorted frames, their source
headers and geometry; :func:`field_strength` and :func:`guess_contrast`
read what the network is told about the acquisition.

Everything that must be computed *identically* on simulated training data
(:mod:`pipelines.lf2hf.lab.simulator`) and on acquired images lives here
too, so the two can never drift apart (numpy only):

* :func:`estimate_noise_sigma`: the Rician noise level from the background;
* :func:`head_mask`: a rough head mask from the image alone;
* :func:`normalisation_scale`: the robust intensity scale (the median
  within the head) that the network's inputs are divided by;
* :func:`kspace_downsample`: the acquisition's resolution loss, central
  k-space truncation to half the matrix, used by the simulator to make the
  low-field input and by the consistency check to degrade the output;
* :func:`kspace_upsample`: its pseudo-inverse (zero filling), the start
  and the data-consistency projection of the contrast-preserving
  reconstruction;
* :func:`robust_noise_sigma`: the noise level the reconstruction and the
  domain gate use, safe for images without background;
* :func:`encode_conditioning`: the conditioning vector of the network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.contract import Geometry, InputError, Series
from pipelines.lf2hf.options import ACCEPTED_FIELD_RANGE_T

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "COND_DIM",
    "NORM_PERCENTILE",
    "Contrast",
    "box_mean",
    "encode_conditioning",
    "estimate_noise_sigma",
    "field_strength",
    "guess_contrast",
    "head_mask",
    "kspace_downsample",
    "kspace_upsample",
    "normalisation_scale",
    "prepare_slice",
    "read_slices",
    "robust_noise_sigma",
    "sequence_reasons",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Percentile of the head's intensities that maps to 1 after normalisation.
#: The median lies in brain tissue (the brain is most of an axial head
#: section), so a normalised patch of brain has the same meaning whatever
#: the slice. A high percentile (99th) lands in scalp fat or CSF, whose
#: brightness relative to the brain varies with parameters a patch cannot
#: see; with it the network could not learn the target's scale (tried:
#: validation error stayed at that of an affine intensity fit).
NORM_PERCENTILE: float = 50.0
#: Side of the box filter (pixels) used for the head mask and noise estimate.
BOX: int = 5
#: Fraction of the field of view assumed to be background at least, for the
#: first noise estimate (the lowest box means). Brain MRI is usually planned
#: with air around the head; the refinement below does not depend on it.
BG_FRACTION: float = 0.15
#: Head-mask threshold as a fraction of the 99.5th percentile of box means.
HEAD_REL_THRESHOLD: float = 0.08
#: Percentiles of the normalised head intensities in the conditioning: a
#: summary of the whole slice's contrast, which a patch does not show.
COND_QUANTILES: tuple[float, ...] = (10.0, 25.0, 75.0, 90.0)
#: Number of conditioning inputs, see :func:`encode_conditioning`.
COND_DIM: int = 4 + len(COND_QUANTILES)
#: Reference field and noise level of the conditioning encoding.
COND_FIELD_REF_T: float = 0.2
COND_SIGMA_REF: float = 0.05
#: Smallest relative noise level the encoding distinguishes (zero-filled
#: backgrounds give an estimate of zero).
COND_SIGMA_FLOOR: float = 1e-3
#: Rayleigh mean over sigma, sqrt(pi / 2).
_RAYLEIGH_MEAN = math.sqrt(math.pi / 2.0)
#: Relative standard deviation of a Rayleigh variable, sqrt(4 / pi - 1).
_RAYLEIGH_RSTD = math.sqrt(4.0 / math.pi - 1.0)


class Contrast(str, Enum):
    """Image weighting of a spin-echo / fast-spin-echo slice."""

    T1W = "T1w"
    T2W = "T2w"

    @classmethod
    def of(cls, value: "Contrast | str") -> "Contrast":
        """Normalise an enum member or its (case-insensitive) string value."""
        if isinstance(value, Contrast):
            return value
        for member in cls:
            if member.value.lower() == str(value).lower():
                return member
        raise ValueError(f"unknown contrast {value!r}; expected one of {[m.value for m in cls]}")


def box_mean(img: np.ndarray, size: int = BOX, dtype: type = np.float32) -> np.ndarray:
    """Mean over a ``size x size`` box around each pixel of the last two axes.

    Edges are handled by replicating the border, via summed-area tables, so
    the cost does not depend on ``size``. ``size`` must be odd.
    """
    r = size // 2
    x = np.pad(np.asarray(img, dtype=np.float64), [(0, 0)] * (img.ndim - 2) + [(r + 1, r), (r + 1, r)], mode="edge")
    x[..., 0, :] = 0.0
    x[..., :, 0] = 0.0
    c = x.cumsum(-1).cumsum(-2)
    s = c[..., size:, size:] - c[..., :-size, size:] - c[..., size:, :-size] + c[..., :-size, :-size]
    return (s / (size * size)).astype(dtype)


def _highpass_sigma(img: np.ndarray) -> float:
    """Noise level from a Laplacian-like high-pass (Immerkaer 1996).

    The fall-back when an image has no background, for example when it
    was cropped tight around the head.
    """
    x = np.asarray(img, dtype=np.float64)
    lap = (
        x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:]
        - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1] - 2 * x[1:-1, 2:]
        + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:]
    )
    # The mask operator has a gain of 6 on white noise (sqrt(36)); the median
    # absolute value keeps edges from dominating.
    return float(np.median(np.abs(lap)) / 0.6745 / 6.0)


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Estimate the noise standard deviation of one magnitude slice from its background.

    Background pixels of a magnitude image are Rayleigh distributed with
    ``E[m**2] = 2 sigma**2``. A first estimate uses the darkest
    :data:`BG_FRACTION` of box means; the background is then every pixel
    whose box mean is within four standard deviations (of a mean of
    ``BOX**2`` Rayleigh values) of the Rayleigh mean, so that air, bone and
    other signal-free pixels count and the estimate is not biased low by the
    first selection.

    Parameters
    ----------
    img : numpy.ndarray
        Magnitude slice ``[H, W]``.

    Returns
    -------
    float
        ``sigma`` in the image's units; 0 for a zero-filled background.
    """
    x = np.asarray(img, dtype=np.float32)
    sm = box_mean(x)
    low = sm <= np.quantile(sm, BG_FRACTION)
    sigma0 = math.sqrt(float(np.mean(x[low].astype(np.float64) ** 2)) / 2.0)
    if sigma0 <= 0.0:
        return 0.0
    upper = _RAYLEIGH_MEAN * sigma0 * (1.0 + 4.0 * _RAYLEIGH_RSTD / BOX)
    bg = sm <= upper
    if bg.mean() < 0.02:
        return _highpass_sigma(x)
    return math.sqrt(float(np.mean(x[bg].astype(np.float64) ** 2)) / 2.0)


def robust_noise_sigma(img: np.ndarray) -> float:
    """Noise sigma for regularisation and the domain gate: the smaller of the background and high-pass estimates.

    :func:`estimate_noise_sigma` trusts the darkest pixels to be air; in an
    image cropped to the anatomy (no background) they are dark tissue, and
    it overestimates sigma several-fold (a 64 x 64 crop of a real MR image:
    25 times). The high-pass estimate (Immerkaer) overestimates only where
    edges are dense. Taking the smaller one errs towards less smoothing,
    the safe side for a reconstruction that must never lose detail. The
    network's conditioning keeps :func:`estimate_noise_sigma`, with which
    it was trained.

    Parameters
    ----------
    img : numpy.ndarray
        Magnitude slice ``[H, W]``.

    Returns
    -------
    float
        ``sigma`` in the image's units (0 only for a constant image).
    """
    x = np.asarray(img, dtype=np.float32)
    bg = estimate_noise_sigma(x)
    hp = _highpass_sigma(x)
    return min(bg, hp) if bg > 0.0 else hp


def head_mask(img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Rough head mask of one magnitude slice, from the image alone.

    A pixel is head when its box mean exceeds both
    :data:`HEAD_REL_THRESHOLD` times the 99.5th percentile of box means and
    the level that background noise reaches (Rayleigh mean plus four
    standard deviations of a box mean).

    Parameters
    ----------
    img : numpy.ndarray
        Magnitude slice ``[H, W]``.
    sigma : float, optional
        Noise level; estimated with :func:`estimate_noise_sigma` if omitted.

    Returns
    -------
    numpy.ndarray
        Boolean mask ``[H, W]``.
    """
    x = np.asarray(img, dtype=np.float32)
    if sigma is None:
        sigma = estimate_noise_sigma(x)
    sm = box_mean(x)
    noise_level = _RAYLEIGH_MEAN * sigma * (1.0 + 4.0 * _RAYLEIGH_RSTD / BOX)
    thr = max(HEAD_REL_THRESHOLD * float(np.percentile(sm, 99.5)), noise_level)
    mask = sm > thr
    if not mask.any():  # a blank slice: fall back to the whole field of view
        mask = np.ones_like(mask)
    return mask


def normalisation_scale(img: np.ndarray, sigma: float | None = None) -> float:
    """Robust intensity scale of one slice: the median within the head.

    Network inputs are divided by it (and targets by their own); outputs
    are multiplied back by the input's scale, so the enhanced slice comes
    back on the acquired slice's intensity scale. See
    :data:`NORM_PERCENTILE` for why the median.

    Parameters
    ----------
    img : numpy.ndarray
        Magnitude slice ``[H, W]``.
    sigma : float, optional
        Noise level, see :func:`head_mask`.

    Returns
    -------
    float
        Positive scale (1 for a blank slice).
    """
    x = np.asarray(img, dtype=np.float32)
    s = float(np.percentile(x[head_mask(x, sigma)], NORM_PERCENTILE))
    return s if s > 0.0 else 1.0


def kspace_downsample(img: np.ndarray, shape: tuple[int, int], magnitude: bool = True) -> np.ndarray:
    """Keep the central ``shape`` of k-space: the acquisition's resolution loss.

    The simulator forms the low-field input this way (before adding noise)
    and the consistency check degrades the enhanced output the same way.
    Intensities are preserved: a constant image stays the same constant.

    Parameters
    ----------
    img : numpy.ndarray
        Real or complex images ``[..., H2, W2]`` on the fine grid.
    shape : tuple of int
        Coarse matrix ``(H, W)``, at most ``(H2, W2)``.
    magnitude : bool
        Return the magnitude (as an MR image is reconstructed); otherwise
        the complex image.

    Returns
    -------
    numpy.ndarray
        ``[..., H, W]``, float32 magnitude or complex64.
    """
    h2, w2 = img.shape[-2:]
    h, w = shape
    if h > h2 or w > w2:
        raise ValueError(f"cannot truncate k-space of {h2}x{w2} to a larger {h}x{w}")
    k = np.fft.fftshift(np.fft.fft2(img, axes=(-2, -1)), axes=(-2, -1))
    # The DC sample sits at index n // 2 after fftshift, for odd and even n.
    r0 = h2 // 2 - h // 2
    c0 = w2 // 2 - w // 2
    k = k[..., r0 : r0 + h, c0 : c0 + w]
    out = np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), axes=(-2, -1)) * (h * w / (h2 * w2))
    return np.abs(out).astype(np.float32) if magnitude else out.astype(np.complex64)


def kspace_upsample(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-fill k-space to ``shape``: the pseudo-inverse of :func:`kspace_downsample` (complex mode).

    With ``A`` the truncation of :func:`kspace_downsample` (``magnitude=False``)
    and ``A+`` this function, ``A(A+(y)) = y`` exactly, and ``A+(A(x))`` is
    the orthogonal projection of ``x`` onto the acquired band. It is the
    sinc (zero-filling) interpolation a scanner applies, so pixel ``j`` of the
    coarse grid lands on pixel ``2j`` of the fine one (the FFT's sample
    positions), intensities preserved.

    Parameters
    ----------
    img : numpy.ndarray
        Real or complex ``[..., H, W]`` on the coarse grid.
    shape : tuple of int
        Fine matrix ``(H2, W2)``, at least ``(H, W)``.

    Returns
    -------
    numpy.ndarray
        complex128 ``[..., H2, W2]``.
    """
    h, w = img.shape[-2:]
    h2, w2 = shape
    if h > h2 or w > w2:
        raise ValueError(f"cannot zero-fill k-space of {h}x{w} to a smaller {h2}x{w2}")
    k = np.fft.fftshift(np.fft.fft2(img, axes=(-2, -1)), axes=(-2, -1))
    r0 = h2 // 2 - h // 2
    c0 = w2 // 2 - w // 2
    big = np.zeros(img.shape[:-2] + (h2, w2), dtype=np.complex128)
    big[..., r0 : r0 + h, c0 : c0 + w] = k
    return np.fft.ifft2(np.fft.ifftshift(big, axes=(-2, -1)), axes=(-2, -1)) * (h2 * w2 / (h * w))


def encode_conditioning(field_strength_t: float, contrast: Contrast | str, sigma_rel: float,
                        quantiles: np.ndarray) -> np.ndarray:
    """Conditioning vector of the network for one slice.

    Components (all of order 1):

    0. ``log10(B0 / 0.2 T)``: field strength;
    1. 1 for T1-weighted, else 0;
    2. 1 for T2-weighted, else 0;
    3. ``log10(max(sigma_rel, 1e-3) / 0.05)``: noise level relative to the
       normalisation scale, from :func:`estimate_noise_sigma`;
    4. to 7. the :data:`COND_QUANTILES` percentiles of the normalised
       intensities within the head mask.

    Parameters
    ----------
    field_strength_t : float
        Main field B0 of the acquisition (T).
    contrast : Contrast or str
        Image weighting.
    sigma_rel : float
        Noise sigma divided by :func:`normalisation_scale`.
    quantiles : numpy.ndarray
        The :data:`COND_QUANTILES` percentiles of the normalised slice
        within its head mask.

    Returns
    -------
    numpy.ndarray
        float32 ``[COND_DIM]``.
    """
    if not field_strength_t > 0:
        raise ValueError(f"field strength must be positive, got {field_strength_t} T")
    c = Contrast.of(contrast)
    return np.array(
        [
            math.log10(field_strength_t / COND_FIELD_REF_T),
            1.0 if c is Contrast.T1W else 0.0,
            1.0 if c is Contrast.T2W else 0.0,
            math.log10(max(sigma_rel, COND_SIGMA_FLOOR) / COND_SIGMA_REF),
            *[float(q) for q in quantiles],
        ],
        dtype=np.float32,
    )


@dataclass(frozen=True)
class PreparedSlice:
    """A slice made ready for the network.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``[H, W]``, the slice divided by ``scale``.
    cond : numpy.ndarray
        float32 ``[COND_DIM]``, see :func:`encode_conditioning`.
    scale : float
        :func:`normalisation_scale` of the slice.
    sigma : float
        :func:`estimate_noise_sigma` of the slice (image units).
    """

    image: np.ndarray
    cond: np.ndarray
    scale: float
    sigma: float


def prepare_slice(img: np.ndarray, field_strength_t: float, contrast: Contrast | str) -> PreparedSlice:
    """Normalise one acquired (or simulated) slice and encode its conditioning.

    Training and inference both go through this function.

    Parameters
    ----------
    img : numpy.ndarray
        Magnitude slice ``[H, W]`` in any units.
    field_strength_t : float
        B0 (T) to tell the network (training jitters it).
    contrast : Contrast or str
        Weighting.

    Returns
    -------
    PreparedSlice
    """
    x = np.asarray(img, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected one 2-D slice, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("slice contains NaN or infinite values")
    sigma = estimate_noise_sigma(x)
    mask = head_mask(x, sigma)
    scale = float(np.percentile(x[mask], NORM_PERCENTILE))
    scale = scale if scale > 0.0 else 1.0
    quantiles = np.percentile(x[mask], COND_QUANTILES) / scale
    cond = encode_conditioning(field_strength_t, contrast, sigma / scale, quantiles)
    return PreparedSlice((x / scale).astype(np.float32), cond, scale, sigma)


def read_slices(series: Series) -> tuple[np.ndarray, list[Dataset], list[Geometry]]:
    """Frames ``[N, H, W]`` of classic or enhanced images, sorted along the slice normal.

    The modality LUT is applied (:meth:`gateway.contract.Instance.frames`).
    Each frame comes with the header of its instance (the source of the
    derived image) and its plane geometry, in the same order, so the writer
    can copy identity and place each enhanced slice where its source lies.

    Raises
    ------
    gateway.contract.InputError
        For colour images, images without position, orientation or pixel
        spacing, frames of different sizes, or a series without images: the
        network translates one grey-level matrix size per series.
    """
    frames: list[np.ndarray] = []
    sources: list[Dataset] = []
    geoms: list[Geometry] = []
    for inst in series.instances:
        header = inst.dataset(pixels=False)
        for frame in inst.frames():
            if frame.pixels.ndim != 2:
                raise InputError("colour images cannot be translated (SamplesPerPixel != 1)")
            if frame.geometry is None:
                raise InputError("an image lacks position, orientation or pixel spacing")
            if frames and frame.pixels.shape != frames[0].shape:
                raise InputError(f"images differ in size ({frame.pixels.shape} and {frames[0].shape})")
            frames.append(frame.pixels)
            sources.append(header)
            geoms.append(frame.geometry)
    if not frames:
        raise InputError("series has no images")
    order = sorted(range(len(frames)), key=lambda i: geoms[i].slice_location)
    return (
        np.stack([frames[i] for i in order]).astype(np.float32),
        [sources[i] for i in order],
        [geoms[i] for i in order],
    )


def field_strength(series: Series, assume_field_t: float | None) -> float:
    """B0 (T) of the acquisition: MagneticFieldStrength (0018,0087), else what the site assumes.

    Raises
    ------
    gateway.contract.InputError
        When the series lacks the attribute and no ``assume_field_t`` is
        configured, or when B0 lies outside :data:`~pipelines.lf2hf.options.ACCEPTED_FIELD_RANGE_T`:
        the network is conditioned on B0, and a guess would silently change its output.
    """
    value = series.first("MagneticFieldStrength")
    raw: Any = value if value not in (None, "") else assume_field_t
    try:
        b0 = float(raw)
    except (TypeError, ValueError):
        raise InputError(
            "MagneticFieldStrength (0018,0087) is missing; set [pipelines.lf2hf] assume_field_t to process anyway"
        ) from None
    if not ACCEPTED_FIELD_RANGE_T[0] <= b0 <= ACCEPTED_FIELD_RANGE_T[1]:
        raise InputError(f"MagneticFieldStrength {b0:g} T is outside what the model can translate (0.05-0.55 T)")
    return b0


def guess_contrast(headers: Mapping[str, Any] | Dataset) -> str:
    """T2w for long echo times (or a description saying so), else T1w.

    The series description wins because sites name their protocols; the
    echo time (60 ms and more for T2 weighting in spin echo) is the fallback
    when the description says neither.
    """
    desc = str(headers.get("SeriesDescription", "")).upper()
    if "T2" in desc or "FLAIR" in desc:
        return "T2w"
    if "T1" in desc:
        return "T1w"
    try:
        te = float(headers.get("EchoTime") or 0)
    except (TypeError, ValueError):
        te = 0.0
    return "T2w" if te >= 60 else "T1w"


#: ScanningSequence (0018,0020) defined terms the network never saw (PS3.3 C.8.3.1): inversion recovery,
#: gradient echo and echo planar images have other contrasts than the spin echo it was trained on.
FOREIGN_SEQUENCES: frozenset[str] = frozenset({"IR", "GR", "EP"})


def sequence_reasons(headers: Mapping[str, Any] | Dataset, contrast_option: str,
                     body_parts: tuple[str, ...]) -> list[str]:
    """Why the headers put a series outside the contrast translation's domain (empty: they do not).

    Parameters
    ----------
    headers : mapping or pydicom.Dataset
        Of the first slice.
    contrast_option : str
        ``[pipelines.lf2hf] contrast``; anything but ``"auto"`` makes the
        weighting known.
    body_parts : tuple of str
        BodyPartExamined values of the domain.

    Returns
    -------
    list of str
        Short reasons, without patient data.
    """
    reasons = []
    part = str(headers.get("BodyPartExamined", "") or "").strip().upper()
    if part and part not in {b.upper() for b in body_parts}:
        reasons.append(f"body part {part} is not {'/'.join(body_parts)}")
    raw = headers.get("ScanningSequence", "") or ""
    values = str(raw).split("\\") if isinstance(raw, str) else [str(v) for v in raw]
    seq = {v.strip().upper() for v in values}
    seq.discard("")
    if seq & FOREIGN_SEQUENCES and "SE" not in seq:
        reasons.append(f"sequence {'/'.join(sorted(seq))} is not spin echo")
    if contrast_option == "auto":
        desc = str(headers.get("SeriesDescription", "")).upper()
        if "FLAIR" in desc or "STIR" in desc:
            reasons.append("inversion recovery (FLAIR/STIR) weighting")
        elif "T1" not in desc and "T2" not in desc and not (headers.get("EchoTime") and headers.get("RepetitionTime")):
            reasons.append("weighting unknown (no T1/T2 in the description, no echo and repetition times)")
    return reasons

"""Physics-based simulator of low-field and 3 T spin-echo slices on real anatomy.

Anatomy
-------
The MNI152 2009 (ICBM 2009a nonlinear symmetric) T1 template and its grey
and white matter probability maps at 1 mm, as shipped inside the nilearn
wheel (loaded offline with :func:`nilearn.datasets.load_mni152_gm_template`
and friends). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging
Centre, Montreal Neurological Institute, McGill University; the licence
allows use, copying and distribution with the copyright notice kept (see the
model card). Tissue fractions per voxel:

* ``gm``, ``wm``: the probability maps;
* ``csf``: the (slightly smoothed) brain mask minus GM and WM;
* ``bone``, ``fat``, ``muscle``: the template is skull-stripped, so a rough
  synthetic head is grown around the brain from the 3-D distance to the
  brain mask: 2 mm of extra-cerebral CSF, 6 mm of skull with a fatty
  diploe (marrow) in its middle, then 2 mm of muscle (galea, temporalis),
  4 mm of subcutaneous fat and 1.5 mm of skin (muscle-like). Layer edges
  are 1 mm linear ramps, so the shells have partial volume too.

Slices are stored in display orientation: rows run anterior to posterior,
columns run from the patient's right to left (radiological convention, the
DICOM LPS in-plane axes), on a 1 mm grid padded to
:data:`GRID_SHAPE` = 240 x 224.

Relaxation versus field
-----------------------
Signal of a spin echo: ``S = PD * (1 - exp(-TR / T1)) * exp(-TE / T2)``,
summed over the tissue fractions of a voxel (partial volume).
``T1(B0) = a * B0**b`` (ms, B0 in T) per tissue, the power law of Bottomley
et al., Med Phys 11:425 (1984) and Rooney et al., MRM 57:308 (2007),
anchored (these anchors are approximate literature-like values, not a fit
to one study) at:

=======  ============  ===========  ================================
tissue   T1 at 3 T     T1 ~50 mT    sources
=======  ============  ===========  ================================
GM       1330 ms       ~330 ms      Wansapura et al. JMRI 1999 (3 T);
WM        830 ms       ~275 ms      O'Reilly & Webb MRM 2022 (50 mT)
CSF      4200 ms       ~3700 ms     CSF is nearly field independent
fat       380 ms       ~215 ms      de Bazelaire et al. Radiology 2004
muscle   1420 ms       ~370 ms      Gold et al. AJR 2004 (1.5/3 T)
bone      250 ms       (dark: PD 0.05, T2 5 ms)
=======  ============  ===========  ================================

``T2(B0) = T2(3 T) * (B0 / 3 T)**c`` with ``c = -0.05`` (T2 is nearly field
independent, slightly longer at low field). Proton densities relative to
CSF: GM 0.80, WM 0.70, CSF 1.0, fat 0.90, muscle 0.75, bone 0.05.
Every PD, T1 and T2 is multiplied per acquisition by a factor drawn in
``[0.9, 1.1]`` (one subject, so the same factors apply to the low-field
input and the 3 T target).

Target and input
----------------
*Target*: 3 T, the fixed reference protocol :data:`REFERENCE_3T` (T1w spin
echo TR 500 / TE 10 ms; T2w fast spin echo TR 4000 / TE_eff 90 ms), one
1 mm slice, full resolution, no noise, no bias field. The protocol is fixed
so that "3 T-like" is one well-defined contrast.

*Input*: ``B0`` in :data:`FIELD_RANGE_T` (log-uniform when drawn) with
field-dependent T1, and what the low-field protocol and hardware add, drawn
from a seed:

* sequence: T1w spin echo with ``TR = r * T1_WM(B0)``, ``r`` in [0.5, 1.2]
  (low-field protocols shorten TR with T1), TE in [8, 20] ms; T2w fast spin
  echo with TR in [2000, 4500] ms, TE in [80, 130] ms;
* slice thickness ``t`` in [2, 3] mm: a box profile over neighbouring 1 mm
  slices (weights ``(t - 1) / 2, 1, (t - 1) / 2`` over ``t``);
* a smooth multiplicative bias field (receive/transmit inhomogeneity):
  ``exp`` of Legendre polynomials up to total degree 3 across the field of
  view, coefficients ``N(0, s**2)`` with ``s`` in [0, 0.08];
* half the in-plane matrix by central k-space truncation
  (:func:`~pipelines.lf2hf.preprocess.kspace_downsample`);
* Rician noise: complex Gaussian noise on the truncated image, then the
  magnitude, with ``sigma = S_brain / SNR``, ``S_brain`` the mean noiseless
  input signal in the brain and ``SNR = SNR_3T * (B0 / 3 T)**p``: ``p`` in
  [1, 1.75] (SNR ~ B0**(7/4) when coil noise dominates, ~B0 when the body
  does) and ``SNR_3T`` log-uniform in [800, 3200], the brain SNR the same
  low-field protocol (larger voxels, more averages) would reach at 3 T.

Data splits
-----------
Training uses axial template slices :data:`TRAIN_SLICES` and seeds outside
:data:`RESERVED_SEEDS`; held-out evaluation uses the slab
:data:`HELDOUT_SLICES` (never touched by training, with guard bands so that
no thick training slice overlaps it) and the seeds
:data:`BENCH_SEEDS` and :data:`TEST_SEED`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.lf2hf.preprocess import Contrast, kspace_downsample

__all__ = [
    "BENCH_SEEDS",
    "FIELD_RANGE_T",
    "GRID_SHAPE",
    "HELDOUT_SLICES",
    "REFERENCE_3T",
    "RESERVED_SEEDS",
    "TEST_SEED",
    "TISSUES",
    "TRAIN_SLICES",
    "Acquisition",
    "Anatomy",
    "LowFieldSeries",
    "PairSampler",
    "SequenceParams",
    "SlicePair",
    "draw_acquisition",
    "generate_pairs",
    "load_anatomy",
    "simulate_pair",
    "simulate_series",
    "t1_ms",
    "t2_ms",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Tissue classes, in the order of :attr:`Anatomy.fractions`.
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "fat", "muscle", "bone")
#: Target field strength (T).
TARGET_FIELD_T: float = 3.0
#: Range of low-field B0 (T).
FIELD_RANGE_T: tuple[float, float] = (0.05, 0.55)
#: 1 mm target grid (rows, cols) of the default (training) geometry; the
#: low-field input is half of it.
GRID_SHAPE: tuple[int, int] = (240, 224)
#: Axial template slice indices (MNI z = index - 72 mm) used for training.
TRAIN_SLICES: tuple[int, ...] = tuple(range(30, 90)) + tuple(range(110, 121))
#: Held-out slab (MNI z = +23 to +32 mm: ventricles' bodies, centrum
#: semiovale). The guard bands 90-94 and 105-109 keep every thick training
#: slice (which reaches one slice either side) off it.
HELDOUT_SLICES: tuple[int, ...] = tuple(range(95, 105))
#: Seeds of the held-out benchmark and of the model test.
BENCH_SEEDS: tuple[int, ...] = (9001, 9002, 9003)
TEST_SEED: int = 9100
#: Seeds no training run may use.
RESERVED_SEEDS: frozenset[int] = frozenset(BENCH_SEEDS + (TEST_SEED,))
#: Probability above which a pixel counts as GM or WM for the contrast metric.
HIGH_PROB: float = 0.8

# Tissue constants: PD (relative to CSF), T1 at 3 T (ms), T1 power-law
# exponent b, T2 at 3 T (ms). See the module docstring for the sources.
_PD = np.array([0.80, 0.70, 1.00, 0.90, 0.75, 0.05])
_T1_3T = np.array([1330.0, 830.0, 4200.0, 380.0, 1420.0, 250.0])
_T1_EXP = np.array([0.340, 0.270, 0.031, 0.140, 0.330, 0.300])
_T2_3T = np.array([100.0, 75.0, 2000.0, 130.0, 35.0, 5.0])
_T2_EXP: float = -0.05
#: Relative uncertainty of every PD, T1 and T2 (uniform, per acquisition).
TISSUE_JITTER: float = 0.10

#: Ranges of the drawn acquisition parameters (see the module docstring).
T1W_TR_OVER_T1WM: tuple[float, float] = (0.5, 1.2)
T1W_TE_MS: tuple[float, float] = (8.0, 20.0)
T2W_TR_MS: tuple[float, float] = (2000.0, 4500.0)
T2W_TE_MS: tuple[float, float] = (80.0, 130.0)
SLICE_THICKNESS_MM: tuple[float, float] = (2.0, 3.0)
SNR_EXPONENT: tuple[float, float] = (1.0, 1.75)
SNR_3T_REF: tuple[float, float] = (800.0, 3200.0)
BIAS_DEGREE: int = 3
BIAS_STD: tuple[float, float] = (0.0, 0.08)
#: Training augmentation: in-plane rotation (degrees), zoom, shift (mm).
AUG_ROTATION_DEG: float = 12.0
AUG_ZOOM: tuple[float, float] = (0.9, 1.1)
AUG_SHIFT_MM: float = 8.0


def t1_ms(b0_t: float, scale: np.ndarray | None = None) -> np.ndarray:
    """T1 (ms) of every tissue at field ``b0_t`` (T): ``a * B0**b``.

    Parameters
    ----------
    b0_t : float
        Field strength (T).
    scale : numpy.ndarray, optional
        Per-tissue multiplicative factors (the subject's deviation).

    Returns
    -------
    numpy.ndarray
        ``[len(TISSUES)]`` T1 in ms.
    """
    t1 = _T1_3T * (b0_t / TARGET_FIELD_T) ** _T1_EXP
    return t1 if scale is None else t1 * scale


def t2_ms(b0_t: float, scale: np.ndarray | None = None) -> np.ndarray:
    """T2 (ms) of every tissue at field ``b0_t`` (T): nearly field independent."""
    t2 = _T2_3T * (b0_t / TARGET_FIELD_T) ** _T2_EXP
    return t2 if scale is None else t2 * scale


@dataclass(frozen=True)
class SequenceParams:
    """Spin-echo timing of one protocol.

    Attributes
    ----------
    contrast : Contrast
        Weighting.
    tr_ms, te_ms : float
        Repetition and (effective) echo time.
    """

    contrast: Contrast
    tr_ms: float
    te_ms: float


#: The 3 T reference protocols that define the target contrast.
REFERENCE_3T: dict[Contrast, SequenceParams] = {
    Contrast.T1W: SequenceParams(Contrast.T1W, 500.0, 10.0),
    Contrast.T2W: SequenceParams(Contrast.T2W, 4000.0, 90.0),
}


def tissue_signals(b0_t: float, seq: SequenceParams, pd_scale: np.ndarray, t1_scale: np.ndarray,
                   t2_scale: np.ndarray) -> np.ndarray:
    """Noiseless spin-echo signal of every pure tissue, ``[len(TISSUES)]``."""
    t1 = t1_ms(b0_t, t1_scale)
    t2 = t2_ms(b0_t, t2_scale)
    return _PD * pd_scale * (1.0 - np.exp(-seq.tr_ms / t1)) * np.exp(-seq.te_ms / t2)


@dataclass(frozen=True)
class Acquisition:
    """Everything drawn for one low-field acquisition and its 3 T counterpart.

    Attributes
    ----------
    field_t : float
        Low-field B0 (T).
    sequence : SequenceParams
        Low-field protocol.
    pd_scale, t1_scale, t2_scale : numpy.ndarray
        Per-tissue factors of the subject's PD, T1, T2.
    snr_exponent : float
        ``p`` of ``SNR ~ B0**p``.
    snr_3t : float
        Brain SNR of the same protocol at 3 T.
    slice_thickness_mm : float
        Input slice thickness.
    bias_coeffs : numpy.ndarray
        Legendre coefficients of the log bias field, ``[(BIAS_DEGREE+1)**2]``
        (row-major over degrees ``(i, j)``; only ``0 < i + j <= BIAS_DEGREE``
        are non-zero).
    """

    field_t: float
    sequence: SequenceParams
    pd_scale: np.ndarray
    t1_scale: np.ndarray
    t2_scale: np.ndarray
    snr_exponent: float
    snr_3t: float
    slice_thickness_mm: float
    bias_coeffs: np.ndarray

    @property
    def contrast(self) -> Contrast:
        """Weighting of input and target."""
        return self.sequence.contrast

    @property
    def snr(self) -> float:
        """Brain SNR of the low-field input."""
        return self.snr_3t * (self.field_t / TARGET_FIELD_T) ** self.snr_exponent


def draw_acquisition(rng: np.random.Generator, field_t: float | None = None,
                     contrast: Contrast | str | None = None) -> Acquisition:
    """Draw the uncertain parameters of one acquisition.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    field_t : float, optional
        Low-field B0 (T); log-uniform over :data:`FIELD_RANGE_T` if omitted.
    contrast : Contrast or str, optional
        Weighting; T1w or T2w with equal probability if omitted.

    Returns
    -------
    Acquisition
    """
    n = len(TISSUES)
    # Always draw every variable, so the stream does not depend on which
    # ones the caller fixed.
    u_field = rng.uniform(math.log(FIELD_RANGE_T[0]), math.log(FIELD_RANGE_T[1]))
    u_contrast = rng.random()
    b0 = float(math.exp(u_field)) if field_t is None else float(field_t)
    if not b0 > 0:
        raise ValueError(f"field strength must be positive, got {b0} T")
    c = (Contrast.T1W if u_contrast < 0.5 else Contrast.T2W) if contrast is None else Contrast.of(contrast)
    pd_scale = rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER, n)
    t1_scale = rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER, n)
    t2_scale = rng.uniform(1 - TISSUE_JITTER, 1 + TISSUE_JITTER, n)
    r_tr = rng.uniform(*T1W_TR_OVER_T1WM)
    te1 = rng.uniform(*T1W_TE_MS)
    tr2 = rng.uniform(*T2W_TR_MS)
    te2 = rng.uniform(*T2W_TE_MS)
    if c is Contrast.T1W:
        # The protocol is tuned to the nominal T1 of white matter at this
        # field, not to the subject's.
        seq = SequenceParams(c, float(r_tr * t1_ms(b0)[TISSUES.index("wm")]), float(te1))
    else:
        seq = SequenceParams(c, float(tr2), float(te2))
    p = float(rng.uniform(*SNR_EXPONENT))
    snr_3t = float(math.exp(rng.uniform(math.log(SNR_3T_REF[0]), math.log(SNR_3T_REF[1]))))
    thickness = float(rng.uniform(*SLICE_THICKNESS_MM))
    s = rng.uniform(*BIAS_STD)
    d = BIAS_DEGREE + 1
    coeffs = rng.normal(0.0, 1.0, (d, d)) * s
    i, j = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    coeffs[(i + j == 0) | (i + j > BIAS_DEGREE)] = 0.0
    return Acquisition(b0, seq, pd_scale, t1_scale, t2_scale, p, snr_3t, thickness, coeffs.ravel())


def bias_field(coeffs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative bias field over a field of view, mean log 0 at the centre."""
    d = int(round(math.sqrt(coeffs.size)))
    u = np.linspace(-1.0, 1.0, shape[0])
    v = np.linspace(-1.0, 1.0, shape[1])
    pu = np.polynomial.legendre.legvander(u, d - 1)  # [rows, d]
    pv = np.polynomial.legendre.legvander(v, d - 1)  # [cols, d]
    log_b = pu @ coeffs.reshape(d, d) @ pv.T
    return np.exp(log_b).astype(np.float32)


def thickness_weights(thickness_mm: float) -> np.ndarray:
    """Weights of the slices ``z-1, z, z+1`` for a box slice profile ``thickness_mm`` wide."""
    if not 1.0 <= thickness_mm <= 3.0:
        raise ValueError(f"slice thickness must be within [1, 3] mm, got {thickness_mm}")
    side = (thickness_mm - 1.0) / 2.0
    return np.array([side, 1.0, side]) / thickness_mm


@dataclass(frozen=True)
class Anatomy:
    """Tissue fractions on the 1 mm display grid.

    Attributes
    ----------
    fractions : numpy.ndarray
        float32 ``[len(TISSUES), Z, rows, cols]``; axial slice ``k`` of the
        template is index ``k - z_offset``.
    brain : numpy.ndarray
        bool ``[Z, rows, cols]``, the template's brain mask.
    z_offset : int
        Template slice index of the first stored slice.
    """

    fractions: np.ndarray
    brain: np.ndarray
    z_offset: int

    def slab(self, z: int) -> np.ndarray:
        """Fractions of slices ``z-1, z, z+1``: ``[3, len(TISSUES), rows, cols]``."""
        i = z - self.z_offset
        if i - 1 < 0 or i + 2 > self.fractions.shape[1]:
            raise ValueError(f"slice {z} is outside the stored range")
        return np.ascontiguousarray(self.fractions[:, i - 1 : i + 2].transpose(1, 0, 2, 3))

    def brain_slice(self, z: int) -> np.ndarray:
        """Brain mask of slice ``z``, ``[rows, cols]``."""
        return self.brain[z - self.z_offset]


def _ramp_band(d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fraction of a shell between distances ``lo`` and ``hi`` (mm), with 1 mm ramps."""
    return np.clip(d - lo + 0.5, 0.0, 1.0) - np.clip(d - hi + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def load_anatomy(z_range: tuple[int, int] = (25, 130)) -> Anatomy:
    """Build the tissue fractions from the MNI152 2009 templates shipped with nilearn.

    Parameters
    ----------
    z_range : tuple of int
        Template axial slices to keep, ``[start, stop)``.

    Returns
    -------
    Anatomy
        Cached: the first call takes a few seconds.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template
    from scipy import ndimage

    def vol(img: object) -> np.ndarray:
        return np.asarray(img.get_fdata(), dtype=np.float32)  # type: ignore[attr-defined]

    gm = np.clip(vol(load_mni152_gm_template(resolution=1)), 0, 1)
    wm = np.clip(vol(load_mni152_wm_template(resolution=1)), 0, 1)
    mask = vol(load_mni152_brain_mask(resolution=1)) > 0.5
    # A slightly soft brain edge, so that the CSF fraction has partial volume
    # like the GM and WM maps rather than a staircase.
    brain_soft = np.maximum(ndimage.gaussian_filter(mask.astype(np.float32), 0.6), gm + wm)
    parenchyma = np.minimum(gm + wm, 1.0)
    csf = np.clip(brain_soft - parenchyma, 0.0, None)
    inside = np.minimum(parenchyma + csf, 1.0)
    d = ndimage.distance_transform_edt(~mask).astype(np.float32)  # mm outside the brain
    outside = 1.0 - inside
    csf = csf + _ramp_band(d, 0.5, 2.5) * outside
    bone = _ramp_band(d, 2.5, 8.5) * outside
    marrow = _ramp_band(d, 4.5, 6.5) * outside
    bone = bone - 0.6 * marrow  # diploe: 60 % fat, 40 % bone
    fat = 0.6 * marrow + _ramp_band(d, 10.5, 14.5) * outside
    muscle = (_ramp_band(d, 8.5, 10.5) + _ramp_band(d, 14.5, 16.0)) * outside
    frac = np.stack([gm, wm, csf, fat, muscle, bone])
    total = frac.sum(0)
    frac /= np.maximum(total, 1.0)  # partial volumes never exceed one voxel
    z0, z1 = z_range
    frac = frac[..., z0:z1]
    mask = mask[..., z0:z1]

    def to_display(a: np.ndarray) -> np.ndarray:
        # RAS [x, y, z] -> [z, rows (A->P), cols (R->L)]
        a = np.flip(a, axis=(-3, -2))
        return np.moveaxis(a, (-3, -2, -1), (-1, -2, -3))

    frac = to_display(frac)
    mask = to_display(mask)
    rows, cols = frac.shape[-2:]
    pr, pc = GRID_SHAPE[0] - rows, GRID_SHAPE[1] - cols
    pad = [(pr // 2, pr - pr // 2), (pc // 2, pc - pc // 2)]
    frac = np.pad(frac, [(0, 0), (0, 0)] + pad)
    mask = np.pad(mask, [(0, 0)] + pad)
    logger.info("anatomy: %d slices of %dx%d", frac.shape[1], *frac.shape[-2:])
    return Anatomy(np.ascontiguousarray(frac, dtype=np.float32), np.ascontiguousarray(mask), z0)


@dataclass
class SlicePair:
    """One simulated low-field input and its 3 T target.

    Attributes
    ----------
    input : numpy.ndarray
        float32 ``[H, W]`` low-field magnitude slice (arbitrary units).
    target : numpy.ndarray
        float32 ``[2H, 2W]`` noiseless 3 T slice (same units).
    brain_mask : numpy.ndarray
        bool ``[2H, 2W]`` brain mask of the target slice.
    gm_mask, wm_mask : numpy.ndarray
        bool ``[2H, 2W]``: GM (WM) fraction at least :data:`HIGH_PROB`.
    field_strength_t : float
        Low-field B0 (T).
    contrast : Contrast
        Weighting.
    acquisition : Acquisition
        Everything drawn for this pair.
    noise_sigma : float
        True noise sigma of the input.
    z : int
        Template slice index.
    """

    input: np.ndarray
    target: np.ndarray
    brain_mask: np.ndarray
    gm_mask: np.ndarray
    wm_mask: np.ndarray
    field_strength_t: float
    contrast: Contrast
    acquisition: Acquisition
    noise_sigma: float
    z: int = -1
    extra: dict[str, float] = field(default_factory=dict)


def _simulate(frac3: np.ndarray, acq: Acquisition, rng: np.random.Generator,
              in_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Input and target from the fractions of three neighbouring slices on the target grid.

    ``frac3`` is ``[3, T, 2H, 2W]``; the target grid is twice ``in_shape``.
    Returns the input ``[H, W]``, the target ``[2H, 2W]`` and the noise sigma.
    """
    lf = tissue_signals(acq.field_t, acq.sequence, acq.pd_scale, acq.t1_scale, acq.t2_scale)
    hf = tissue_signals(TARGET_FIELD_T, REFERENCE_3T[acq.contrast], acq.pd_scale, acq.t1_scale, acq.t2_scale)
    w = thickness_weights(acq.slice_thickness_mm)
    lf_thick = np.einsum("k,ktyx,t->yx", w, frac3, lf)
    target = np.einsum("tyx,t->yx", frac3[1], hf).astype(np.float32)
    biased = lf_thick * bias_field(acq.bias_coeffs, lf_thick.shape)
    low = kspace_downsample(biased, in_shape, magnitude=False)
    brain = kspace_downsample(frac3[1, :2].sum(0), in_shape) > 0.5
    s_brain = float(np.mean(np.abs(low)[brain])) if brain.any() else float(np.mean(np.abs(low)))
    sigma = s_brain / acq.snr
    noise = rng.normal(0.0, sigma, (2,) + in_shape)
    noisy = np.abs(low + noise[0] + 1j * noise[1]).astype(np.float32)
    return noisy, target, sigma


def _pair(frac3: np.ndarray, brain: np.ndarray, acq: Acquisition, rng: np.random.Generator, z: int) -> SlicePair:
    rows, cols = frac3.shape[-2:]
    if rows % 2 or cols % 2:
        raise ValueError(f"target grid must have even sides, got {rows}x{cols}")
    inp, target, sigma = _simulate(frac3, acq, rng, (rows // 2, cols // 2))
    return SlicePair(
        input=inp,
        target=target,
        brain_mask=brain,
        gm_mask=frac3[1, 0] >= HIGH_PROB,
        wm_mask=frac3[1, 1] >= HIGH_PROB,
        field_strength_t=acq.field_t,
        contrast=acq.contrast,
        acquisition=acq,
        noise_sigma=sigma,
        z=z,
    )


def _augment(frac3: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random in-plane rotation, zoom, shift and left-right flip of the anatomy."""
    from scipy import ndimage

    theta = math.radians(rng.uniform(-AUG_ROTATION_DEG, AUG_ROTATION_DEG))
    zoom = rng.uniform(*AUG_ZOOM)
    shift = rng.uniform(-AUG_SHIFT_MM, AUG_SHIFT_MM, 2)
    flip = rng.random() < 0.5
    c, s = math.cos(theta), math.sin(theta)
    m = np.array([[c, -s], [s, c]]) / zoom  # output -> input coordinates
    centre = (np.array(frac3.shape[-2:]) - 1) / 2.0
    offset = centre - m @ centre + shift
    flat = frac3.reshape(-1, *frac3.shape[-2:])
    out = np.stack([ndimage.affine_transform(a, m, offset, order=1, mode="constant") for a in flat])
    mask = ndimage.affine_transform(brain.astype(np.float32), m, offset, order=1) > 0.5
    out = out.reshape(frac3.shape)
    if flip:
        out = out[..., ::-1]
        mask = mask[..., ::-1]
    return np.ascontiguousarray(out, dtype=np.float32), np.ascontiguousarray(mask)


def simulate_pair(anatomy: Anatomy, z: int, acq: Acquisition, rng: np.random.Generator,
                  augment: bool = False) -> SlicePair:
    """Simulate one input/target pair of template slice ``z`` on the default grid.

    Parameters
    ----------
    anatomy : Anatomy
        From :func:`load_anatomy`.
    z : int
        Template axial slice index.
    acq : Acquisition
        Drawn with :func:`draw_acquisition`.
    rng : numpy.random.Generator
        Source of the noise (and of the augmentation).
    augment : bool
        Randomly rotate, zoom, shift and flip the anatomy (training only).

    Returns
    -------
    SlicePair
        Input ``120 x 112`` at 2 mm, target ``240 x 224`` at 1 mm.
    """
    frac3 = anatomy.slab(z)
    brain = anatomy.brain_slice(z)
    if augment:
        frac3, brain = _augment(frac3, brain, rng)
    return _pair(frac3, brain, acq, rng, z)


def generate_pairs(slab: Sequence[int], seed: int | Sequence[int], field_strength_t: float | None = None,
                   contrast: Contrast | str | None = None, per_slice: int = 1,
                   anatomy: Anatomy | None = None) -> list[SlicePair]:
    """Simulate input/target pairs for every slice of an axial slab.

    Parameters
    ----------
    slab : sequence of int
        Template slice indices, e.g. :data:`HELDOUT_SLICES`.
    seed : int or sequence of int
        Seed of everything drawn (acquisitions and noise).
    field_strength_t : float, optional
        Low-field B0 (T); drawn per pair if omitted.
    contrast : Contrast or str, optional
        Weighting; drawn per pair if omitted.
    per_slice : int
        Independent acquisitions per slice.
    anatomy : Anatomy, optional
        Defaults to :func:`load_anatomy`.

    Returns
    -------
    list of SlicePair
        ``len(slab) * per_slice`` pairs, slice-major.
    """
    anatomy = anatomy or load_anatomy()
    rng = np.random.default_rng(seed)
    pairs = []
    for z in slab:
        for _ in range(per_slice):
            acq = draw_acquisition(rng, field_strength_t, contrast)
            pairs.append(simulate_pair(anatomy, z, acq, rng))
    return pairs


class PairSampler:
    """Endless stream of augmented training pairs from the training slab.

    Parameters
    ----------
    seed : int
        Training seed; must not be in :data:`RESERVED_SEEDS`.
    slab : sequence of int
        Slices to draw from (default :data:`TRAIN_SLICES`).
    stream : int
        Sub-stream index, so that training and validation streams of the
        same seed differ.
    anatomy : Anatomy, optional
        Defaults to :func:`load_anatomy`.
    """

    def __init__(self, seed: int, slab: Sequence[int] = TRAIN_SLICES, stream: int = 0,
                 anatomy: Anatomy | None = None) -> None:
        if seed in RESERVED_SEEDS:
            raise ValueError(f"seed {seed} is reserved for held-out data")
        overlap = set(slab) & set(range(min(HELDOUT_SLICES) - 5, max(HELDOUT_SLICES) + 6))
        if overlap:
            raise ValueError(f"training slab touches the held-out slab and its guard bands: {sorted(overlap)}")
        self.anatomy = anatomy or load_anatomy()
        self.slab = tuple(slab)
        self.rng = np.random.default_rng([seed, stream, 0x1F2A])

    def __iter__(self) -> Iterator[SlicePair]:
        return self

    def __next__(self) -> SlicePair:
        z = int(self.slab[self.rng.integers(len(self.slab))])
        acq = draw_acquisition(self.rng)
        return simulate_pair(self.anatomy, z, acq, self.rng, augment=True)


@dataclass
class LowFieldSeries:
    """A simulated low-field series at an arbitrary matrix, for demos.

    Attributes
    ----------
    input : numpy.ndarray
        float32 ``[N, H, W]`` low-field magnitude slices.
    target : numpy.ndarray
        float32 ``[N, 2H, 2W]`` the 3 T reference slices (same geometry).
    brain_mask : numpy.ndarray
        bool ``[N, 2H, 2W]``.
    pixel_spacing_mm : tuple of float
        Input (row, column) spacing; the target's is half.
    slice_thickness_mm : float
        Input slice thickness.
    slice_positions_mm : numpy.ndarray
        Superior coordinate (MNI z, mm) of each slice centre.
    acquisition : Acquisition
        Parameters drawn for the series (TR, TE, field in ``sequence``).
    """

    input: np.ndarray
    target: np.ndarray
    brain_mask: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    slice_positions_mm: np.ndarray
    acquisition: Acquisition


def simulate_series(slices: Sequence[int], matrix: tuple[int, int], field_strength_t: float,
                    contrast: Contrast | str, seed: int, fov_mm: tuple[float, float] = (240.0, 224.0),
                    anatomy: Anatomy | None = None) -> LowFieldSeries:
    """Simulate a low-field series at any input matrix, one acquisition for all slices.

    The 1 mm fractions are resampled (linearly) onto a ``2H x 2W`` grid
    covering ``fov_mm`` around the centre of the default grid, then
    simulated as in training (so the input's pixel is ``fov / matrix``).

    Parameters
    ----------
    slices : sequence of int
        Template axial slice indices (1 mm apart), e.g. ``range(40, 120, 5)``.
    matrix : tuple of int
        Input matrix ``(H, W)``.
    field_strength_t : float
        Low-field B0 (T).
    contrast : Contrast or str
        Weighting.
    seed : int
        Seed of the acquisition draw and the noise.
    fov_mm : tuple of float
        Field of view (rows, cols) in mm.
    anatomy : Anatomy, optional
        Defaults to :func:`load_anatomy`.

    Returns
    -------
    LowFieldSeries
    """
    from scipy import ndimage

    anatomy = anatomy or load_anatomy()
    rng = np.random.default_rng(seed)
    acq = draw_acquisition(rng, field_strength_t, contrast)
    h, w = matrix
    out_shape = (2 * h, 2 * w)
    step = np.array([fov_mm[0] / out_shape[0], fov_mm[1] / out_shape[1]])
    centre_in = (np.array(GRID_SHAPE) - 1) / 2.0
    centre_out = (np.array(out_shape) - 1) / 2.0
    offset = centre_in - step * centre_out
    inputs, targets, masks = [], [], []
    for z in slices:
        frac3 = anatomy.slab(z)
        flat = frac3.reshape(-1, *GRID_SHAPE)
        res = np.stack([ndimage.affine_transform(a, step, offset, output_shape=out_shape, order=1) for a in flat])
        res = np.clip(res, 0.0, 1.0).reshape(3, len(TISSUES), *out_shape)
        brain = ndimage.affine_transform(anatomy.brain_slice(z).astype(np.float32), step, offset,
                                         output_shape=out_shape, order=1) > 0.5
        inp, tgt, _ = _simulate(res, acq, rng, (h, w))
        inputs.append(inp)
        targets.append(tgt)
        masks.append(brain)
    return LowFieldSeries(
        input=np.stack(inputs),
        target=np.stack(targets),
        brain_mask=np.stack(masks),
        pixel_spacing_mm=(float(fov_mm[0] / h), float(fov_mm[1] / w)),
        slice_thickness_mm=acq.slice_thickness_mm,
        slice_positions_mm=np.array([z - 72.0 for z in slices]),
        acquisition=acq,
    )

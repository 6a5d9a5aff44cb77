"""Domain-randomised anatomy for the contrast-preserving restoration: scenes no scanner ever saw, seeded.

The learned restoration (:mod:`pipelines.lf2hf.lab.train_restore`) must
learn to *restore*, not to recognise an organ, so most of its training
scenes are random (the approach behind SynthSR, Iglesias et al., Sci Adv
2023): every scene is drawn from the seed, with

* a foreground of random smooth shape in air, or tissue filling the whole
  field of view (a tight crop);
* a smooth random label map (argmax of smoothed Gaussian fields, random
  length scale), layered shells along the edge (skin, fat, muscle-like
  layers of random thickness), and thin bright or dark curvilinear
  structures (vessels, tendons, cortex, septa: a narrow level set of a
  smooth field);
* per label a random PD, T1 and T2 and per scene random spin-echo TR and TE,
  so tissue intensities and their order are random (some labels nearly
  signal-free, like bone or air);
* a multiplicative fine texture per label, partial volume (rendered at
  twice the resolution and averaged), a smooth bias field;
* a **field-map perturbation** (:func:`field_map_warp`): a smooth
  displacement along the read-out axis (B0 off-resonance) and a radial
  scaling (gradient non-linearity), with the Jacobian's intensity pile-up.

:func:`brain_truth` adds the MNI152 brain of the simulator, imaged at low
field with its own contrast (no 3 T mapping: the restoration preserves
contrast). :func:`degrade` is the acquisition: the operator ``A`` (central
half of k-space, :func:`~pipelines.lf2hf.preprocess.kspace_downsample`),
complex Gaussian noise, magnitude.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.lf2hf.lab.simulator import (
    Acquisition,
    Anatomy,
    bias_field,
    thickness_weights,
    tissue_signals,
)
from pipelines.lf2hf.preprocess import kspace_downsample, normalisation_scale

__all__ = [
    "B0_SHIFT_MAX_PX",
    "GRADIENT_NONLINEARITY_MAX",
    "PHANTOM_SEED",
    "TEST_PHANTOM_SEED",
    "SNR_RANGE",
    "brain_crop",
    "brain_truth",
    "degrade",
    "field_map_warp",
    "random_scene",
]

#: Largest displacement (fine pixels) of the B0 field-map perturbation along
#: read-out: off-resonance / read-out bandwidth per pixel, a few ppm of a
#: low-field magnet over a 100-200 Hz/pixel read-out.
B0_SHIFT_MAX_PX: float = 1.5
#: Largest relative radial scaling at the edge of the field of view from
#: gradient non-linearity.
GRADIENT_NONLINEARITY_MAX: float = 0.03
#: Tissue SNR (tissue level / noise sigma) of the training inputs, log-uniform:
#: from worse than the benchmark's 0.064 T (8) to better than its 0.55 T (155).
SNR_RANGE: tuple[float, float] = (3.0, 300.0)
#: Seeds of the held-out phantoms: the restoration benchmark's and the model test's. The trainer refuses them.
PHANTOM_SEED: int = 9201
TEST_PHANTOM_SEED: int = 9202
#: Soft ceiling of a scene's intensities, in units of its normalisation scale (typical tissue).
SCENE_MAX_REL: float = 4.0


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """A smoothed Gaussian field of unit standard deviation."""
    from scipy import ndimage

    n = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_px, 0.3), mode="wrap")
    return n / (n.std() + 1e-12)


def _loguniform(rng: np.random.Generator, lo: float, hi: float, size: int | None = None) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def field_map_warp(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0, order: int = 3,
                   pixels_per_fine_pixel: float = 1.0) -> np.ndarray:
    """Distort an image as a B0 field map and gradient non-linearity would.

    Read-out axis (rows or columns, drawn): displacement ``d(u, v)``, a
    smooth field (Legendre polynomials to degree 3) scaled to at most
    ``strength * B0_SHIFT_MAX_PX`` pixels; both axes: a radial scaling
    ``r (1 + c r**2)``, ``|c| <= strength * GRADIENT_NONLINEARITY_MAX``.
    Intensities are multiplied by the Jacobian of the read-out displacement
    (signal piles up where the field compresses the image).

    Parameters
    ----------
    img : numpy.ndarray
        ``[H, W]``.
    rng : numpy.random.Generator
        Source of the field.
    strength : float
        Fraction of the largest perturbation (1 in training and in the
        benchmark's robustness figure).
    order : int
        Spline order of the resampling. Training augments with linear
        interpolation (cheap; its slight blur is part of the augmentation);
        the benchmark uses cubic splines, because a blurred truth is easier
        to restore and would make the perturbation look like a gain.
    pixels_per_fine_pixel : float
        Pixels of ``img`` per fine-grid pixel (2 for a twice-resolution
        rendering), so the displacement stays the same in millimetres.

    Returns
    -------
    numpy.ndarray
        float32 ``[H, W]``.
    """
    from scipy import ndimage

    h, w = img.shape
    u, v = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    coeffs = rng.normal(0.0, 1.0, (4, 4))
    coeffs[0, 0] = 0.0
    d = np.polynomial.legendre.legval2d(u, v, coeffs)
    d *= strength * B0_SHIFT_MAX_PX * pixels_per_fine_pixel * rng.uniform(0.3, 1.0) / max(float(np.abs(d).max()), 1e-9)
    c = strength * GRADIENT_NONLINEARITY_MAX * rng.uniform(-1.0, 1.0)
    r2 = (u**2 + v**2) / 2.0
    rows = (u * (1 + c * r2) + 1) * (h - 1) / 2
    cols = (v * (1 + c * r2) + 1) * (w - 1) / 2
    if rng.random() < 0.5:
        cols = cols + d
        jac = 1.0 + np.gradient(d, axis=1)
    else:
        rows = rows + d
        jac = 1.0 + np.gradient(d, axis=0)
    out = np.clip(ndimage.map_coordinates(img.astype(np.float64), [rows, cols], order=order, mode="nearest"), 0, None)
    return (out * np.clip(jac, 0.5, 1.5)).astype(np.float32)


def random_scene(rng: np.random.Generator, shape: tuple[int, int] = (80, 80), warp: bool = True,
                 warp_rng: np.random.Generator | None = None) -> np.ndarray:
    """One domain-randomised scene on the fine (high-resolution) grid, see the module docstring.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of everything drawn.
    shape : tuple of int
        Fine matrix ``(H2, W2)``, even sides.
    warp : bool
        Apply a random field-map perturbation (:func:`field_map_warp`,
        linear, after the partial-volume averaging: the training
        augmentation).
    warp_rng : numpy.random.Generator, optional
        Instead, perturb with a field drawn from this generator, on the
        twice-resolution rendering before the averaging (cubic, at twice
        the displacement in those pixels): the scene drawn from ``rng`` is
        the same as without it, and the perturbed truth keeps the same
        partial-volume sharpness (the benchmark's robustness figure).

    Returns
    -------
    numpy.ndarray
        float32 ``[H2, W2]``, non-negative, tissue of order 1.
    """
    from scipy import ndimage

    h, w = shape
    big = (2 * h, 2 * w)  # rendered at twice the resolution, then averaged: partial volume
    side = float(min(big))
    u, v = np.meshgrid(np.linspace(-1, 1, big[0]), np.linspace(-1, 1, big[1]), indexing="ij")
    if rng.random() < 0.25:
        fg = np.ones(big, dtype=bool)
    else:
        a, b = rng.uniform(0.45, 0.95, 2)
        cu, cv = rng.uniform(-0.15, 0.15, 2)
        th = rng.uniform(0, math.pi)
        ru = (u - cu) * math.cos(th) + (v - cv) * math.sin(th)
        rv = -(u - cu) * math.sin(th) + (v - cv) * math.cos(th)
        fg = 1.0 - (ru / a) ** 2 - (rv / b) ** 2 + rng.uniform(0.1, 0.4) * _smooth(rng, big, side / 8) > 0
    n_labels = int(rng.integers(3, 8))
    scale = side * rng.uniform(0.03, 0.15)
    fields = np.stack([_smooth(rng, big, scale) for _ in range(n_labels)])
    labels = np.argmax(fields, axis=0) + 1  # 0 is air
    n_total = n_labels + 1
    if not fg.all() and rng.random() < 0.6:
        depth = ndimage.distance_transform_edt(fg)
        edge = 0.0
        for _ in range(int(rng.integers(1, 4))):
            thick = rng.uniform(1.5, 7.0) * 2  # fine pixels at twice the resolution
            labels[(depth > edge) & (depth <= edge + thick)] = n_total
            n_total += 1
            edge += thick
    for _ in range(int(rng.integers(0, 6))):
        f = _smooth(rng, big, side * rng.uniform(0.05, 0.2))
        labels[np.abs(f) < rng.uniform(0.02, 0.08)] = n_total
        n_total += 1
    labels[~fg] = 0
    # Random relaxation per label, one random spin-echo protocol per scene.
    pd = rng.uniform(0.2, 1.0, n_total)
    pd[rng.random(n_total) < 0.15] = 0.03  # bone-like, nearly no signal
    t1 = _loguniform(rng, 100.0, 4000.0, n_total)
    t2 = _loguniform(rng, 10.0, 2000.0, n_total)
    tr = float(_loguniform(rng, 300.0, 5000.0))
    te = float(rng.uniform(5.0, 120.0))
    signal = pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)
    signal[0] = 0.0
    img = signal[labels]
    for k in range(1, n_total):
        amp = rng.uniform(0.0, 0.12)
        if amp > 0.01:
            m = labels == k
            if m.any():
                tex = _smooth(rng, big, rng.uniform(0.7, 3.0))
                img[m] *= np.clip(1.0 + amp * tex[m], 0.2, None)
    if warp_rng is not None:
        img = field_map_warp(img, warp_rng, pixels_per_fine_pixel=2.0)
    img = img.reshape(h, 2, w, 2).mean(axis=(1, 3))
    coeffs = np.zeros((4, 4))
    coeffs[1:, :] = rng.normal(0.0, rng.uniform(0.0, 0.15), (3, 4))
    coeffs[0, 1:] = rng.normal(0.0, 0.1, 3)
    img = img * bias_field(coeffs.ravel() * (np.add.outer(np.arange(4), np.arange(4)).ravel() <= 3), (h, w))
    if warp and warp_rng is None:
        img = field_map_warp(img, rng, order=1)
    s = normalisation_scale(img) if img.max() > 0 else 1.0
    # Soft ceiling at SCENE_MAX_REL x the typical tissue: random relaxation can make a thin label tens of
    # times brighter than the rest, which no MR image shows and which would dominate the loss.
    return (SCENE_MAX_REL * np.tanh(np.clip(img / s, 0.0, None) / SCENE_MAX_REL)).astype(np.float32)


def brain_truth(frac3: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Noiseless low-field image of the simulator's brain on the fine grid, with its own contrast.

    Thick slice (the simulator's box profile) and bias field as in
    :mod:`pipelines.lf2hf.lab.simulator`, but no resolution loss and no
    noise: what a contrast-preserving restoration should recover.

    Parameters
    ----------
    frac3 : numpy.ndarray
        ``[3, T, H2, W2]`` fractions of three neighbouring slices
        (:meth:`~pipelines.lf2hf.lab.simulator.Anatomy.slab`).
    acq : Acquisition
        The low-field acquisition.

    Returns
    -------
    numpy.ndarray
        float32 ``[H2, W2]``.
    """
    lf = tissue_signals(acq.field_t, acq.sequence, acq.pd_scale, acq.t1_scale, acq.t2_scale)
    thick = np.einsum("k,ktyx,t->yx", thickness_weights(acq.slice_thickness_mm), frac3, lf)
    return (thick * bias_field(acq.bias_coeffs, thick.shape)).astype(np.float32)


def brain_crop(anatomy: Anatomy, z: int, acq: Acquisition, rng: np.random.Generator,
               shape: tuple[int, int]) -> np.ndarray:
    """A random ``shape`` crop of :func:`brain_truth` of slice ``z``, centred on the head, normalised."""
    img = brain_truth(anatomy.slab(z), acq)
    head = np.argwhere(img > 0.05 * img.max())
    cy, cx = head[int(rng.integers(len(head)))]
    h, w = shape
    r0 = int(np.clip(cy - h // 2, 0, img.shape[0] - h))
    c0 = int(np.clip(cx - w // 2, 0, img.shape[1] - w))
    crop = img[r0 : r0 + h, c0 : c0 + w]
    if rng.random() < 0.5:
        crop = field_map_warp(crop, rng, order=1)
    return (crop / normalisation_scale(crop)).astype(np.float32)


def degrade(truth: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    """The acquisition of a fine-grid image: central half of k-space, complex Gaussian noise, magnitude.

    ``sigma = normalisation_scale(truth) / snr`` (tissue SNR), so the SNR is
    that of the image's typical tissue.

    Returns
    -------
    numpy.ndarray
        float32 ``[H2 / 2, W2 / 2]``.
    """
    h2, w2 = truth.shape
    c = kspace_downsample(truth, (h2 // 2, w2 // 2), magnitude=False)
    sigma = normalisation_scale(truth) / snr
    noise = rng.standard_normal((2, *c.shape))
    return np.abs(c + sigma * (noise[0] + 1j * noise[1])).astype(np.float32)

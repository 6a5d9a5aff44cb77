"""IVIM signal model and seeded synthetic data generator.

The bi-exponential intravoxel incoherent motion (IVIM) model is

.. math::

    S(b) = S_0 \\left( f e^{-b D^*} + (1 - f) e^{-b D} \\right)

with ``b`` in s/mm² and ``D``, ``D*`` in mm²/s. Everything here is numpy only
and vectorised, so that training, tests and the benchmark share one
simulator and only training needs torch. The service never simulates: the
protocol limits the network was trained for (``K_MIN``, ``K_MAX``,
``B_MAX``) are defined by :mod:`pipelines.ivim.infer`, which checks every
series against them, and imported here.

Conventions shared by the generator, the network and the estimators:

* Protocols are padded to :data:`K_MAX` entries. Padded entries carry
  ``b = 0``, ``signal = 0`` and ``mask = 0``; valid entries have ``mask = 1``.
* Noise is defined relative to S0: ``sigma = S0 / SNR``. Rician noise is the
  magnitude of the signal plus complex Gaussian noise of that sigma.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from pipelines.ivim.infer import B_MAX, K_MAX, K_MIN

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Seed of the benchmark's held-out test voxels (:mod:`pipelines.ivim.lab.bench`).
BENCH_TEST_SEED: int = 20240917
#: Seed of the held-out voxels of the model's unit tests.
MODEL_TEST_SEED: int = 424242

#: Largest b-value (s/mm²) of the benchmark's reference setting B protocols.
SETTING_B_B_MAX: float = 1000.0

#: The "setting A" protocol (s/mm²), as in the IVIM-NET simulation studies.
SETTING_A_BVALUES: np.ndarray = np.array([0, 5, 10, 20, 30, 40, 60, 150, 300, 500, 700], dtype=np.float64)


class NoiseType(str, Enum):
    """Noise model of the simulated magnitude images."""

    GAUSSIAN = "gaussian"
    RICIAN = "rician"


@dataclass(frozen=True)
class ParamRanges:
    """Uniform sampling ranges of the IVIM parameters.

    Attributes
    ----------
    d, f, dstar, s0 : tuple of float
        ``(low, high)`` of the diffusion coefficient (mm²/s), the perfusion
        fraction, the pseudo-diffusion coefficient (mm²/s) and S0
        (arbitrary units).
    """

    d: tuple[float, float]
    f: tuple[float, float]
    dstar: tuple[float, float]
    s0: tuple[float, float] = (1.0, 1.0)

    def as_dict(self) -> dict[str, list[float]]:
        """Return the ranges as a JSON-friendly dict."""
        return {
            "d": list(self.d),
            "f": list(self.f),
            "dstar": list(self.dstar),
            "s0": list(self.s0),
        }


#: Held-out test ranges (the benchmark's settings A and B).
TEST_RANGES = ParamRanges(d=(0.5e-3, 3.0e-3), f=(0.05, 0.55), dstar=(0.01, 0.1))

#: Training ranges: the test ranges widened by 5 % of their width on each
#: side, so that test values near the edges are not at the edge of the prior,
#: where a posterior-mean estimator is biased inward. (Widening by 10 % a side
#: cost about 0.005 in validation NRMSE of f and 0.01 of D* at SNR 20.)
TRAIN_RANGES = ParamRanges(d=(0.375e-3, 3.125e-3), f=(0.025, 0.575), dstar=(0.0055, 0.1045), s0=(0.5, 2.0))
#: The wide box of the training voxels that teach the uncertainty branch what
#: lies outside TRAIN_RANGES (TrainingDistribution.outside_ranges): D up to
#: beyond free water, f up to 1, D* up to fast flow.
OUTSIDE_TRAIN_RANGES = ParamRanges(d=(0.05e-3, 5e-3), f=(0.0, 1.0), dstar=(0.004, 0.4), s0=(0.5, 2.0))


@dataclass(frozen=True)
class ProtocolSampling:
    """How random b-value protocols are drawn.

    Attributes
    ----------
    p_setting_a : float
        Probability of the fixed setting A protocol.
    k_min, k_max : int
        Number of distinct b-values of a random protocol, uniform in
        ``[k_min, k_max]``.
    p_b0 : float
        Probability that a random protocol contains ``b = 0``.
    low_b_min, low_b_max : float
        Edges (s/mm²) of the "low" b-value region, where perfusion is
        visible; ``b = 0`` counts as low too. Values below ``low_b_min`` are
        not drawn: they are replicates of ``b = 0`` in all but name and
        clinical protocols do not use them.
    high_b_min : float
        Lower edge (s/mm²) of the "high" region used to estimate D.
    b_max : float
        Largest b-value (s/mm²) drawn. The default, 1000, is the reference
        setting B of the benchmark (the model card's figures since 1.0.0);
        training draws up to :data:`~pipelines.ivim.infer.B_MAX`.
    min_low, min_high : int
        At least this many b-values (``b = 0`` included) in the low and high
        regions: a clinical IVIM protocol samples both the perfusion and the
        diffusion regime, and the segmented fit needs two high b-values.
    low_fraction : tuple of float
        Fraction of the b-values placed in the low region, uniform in this
        range; clinical IVIM protocols put about half or more of their
        b-values at or below 100 s/mm².
    """

    p_setting_a: float = 0.25
    k_min: int = K_MIN
    k_max: int = K_MAX
    p_b0: float = 0.5
    low_b_min: float = 5.0
    low_b_max: float = 100.0
    high_b_min: float = 200.0
    b_max: float = SETTING_B_B_MAX
    min_low: int = 2
    min_high: int = 2
    low_fraction: tuple[float, float] = (0.4, 0.7)

    def as_dict(self) -> dict[str, object]:
        """Return the sampling settings as a JSON-friendly dict."""
        return {
            "p_setting_a": self.p_setting_a,
            "setting_a_bvalues": SETTING_A_BVALUES.tolist(),
            "k_min": self.k_min,
            "k_max": self.k_max,
            "p_b0": self.p_b0,
            "low_b_min": self.low_b_min,
            "low_b_max": self.low_b_max,
            "high_b_min": self.high_b_min,
            "min_low": self.min_low,
            "min_high": self.min_high,
            "low_fraction": list(self.low_fraction),
            "b_max": self.b_max,
            "rounding": "integer s/mm2, distinct",
        }


@dataclass(frozen=True)
class TrainingDistribution:
    """Everything that defines the synthetic training distribution.

    Attributes
    ----------
    ranges : ParamRanges
        Parameter sampling ranges (uniform).
    snr : tuple of float
        SNR is log-uniform in this range (``sigma = S0 / SNR``).
    p_rician : float
        Probability that a voxel gets Rician rather than Gaussian noise.
    protocols : ProtocolSampling
        Protocol sampler.
    p_perturb : float
        Probability that a voxel's told b-values are perturbed.
    perturb_rel : float
        Maximum relative perturbation of the told b-values (uniform,
        multiplicative, independent per b-value).
    outside_fraction : float
        Fraction of voxels whose D, f and D* are drawn from ``outside_ranges``
        instead (outlier exposure): they train only the uncertainty branch,
        which so learns that signals the estimate cannot represent have
        large errors; the estimate is trained on the voxels inside ``ranges``.
    outside_ranges : ParamRanges
        The wide box of those voxels (S0 is still drawn from ``ranges``).
    """

    ranges: ParamRanges = TRAIN_RANGES
    snr: tuple[float, float] = (8.0, 120.0)
    p_rician: float = 0.5
    # Training protocols reach the largest b-value the service accepts.
    protocols: ProtocolSampling = field(default_factory=lambda: ProtocolSampling(b_max=B_MAX))
    p_perturb: float = 0.5
    perturb_rel: float = 0.05
    outside_fraction: float = 0.1
    outside_ranges: ParamRanges = OUTSIDE_TRAIN_RANGES

    def as_dict(self) -> dict[str, object]:
        """Return the distribution as a JSON-friendly dict."""
        return {
            "ranges": self.ranges.as_dict(),
            "range_distribution": "uniform",
            "snr": list(self.snr),
            "snr_distribution": "log-uniform, sigma = S0 / SNR",
            "p_rician": self.p_rician,
            "noise": "gaussian or rician (magnitude of complex gaussian)",
            "protocols": self.protocols.as_dict(),
            "bvalue_perturbation": {
                "p": self.p_perturb,
                "relative": self.perturb_rel,
                "kind": "told b = true b * (1 + U[-rel, rel]), per b-value; signal simulated with the true b",
            },
            "outside": {
                "fraction": self.outside_fraction,
                "ranges": self.outside_ranges.as_dict(),
                "use": "uncertainty branch only (NLL); voxels with any of D, f, D* outside ranges get no MSE",
            },
        }


@dataclass
class SimulatedBatch:
    """A batch of simulated voxels on padded protocols.

    Attributes
    ----------
    d, f, dstar, s0 : numpy.ndarray
        True parameters, shape ``[N]``.
    bvalues : numpy.ndarray
        True b-values, shape ``[N, K_MAX]``, padded with 0.
    bvalues_told : numpy.ndarray
        The b-values given to the estimator (possibly perturbed), same shape.
    mask : numpy.ndarray
        1 for valid entries, 0 for padding, same shape.
    signal : numpy.ndarray
        Noisy signals, same shape, 0 in padded entries.
    inside : numpy.ndarray
        Boolean ``[N]``: D, f and D* all inside the distribution's ``ranges``.
    """

    d: np.ndarray
    f: np.ndarray
    dstar: np.ndarray
    s0: np.ndarray
    bvalues: np.ndarray
    bvalues_told: np.ndarray
    mask: np.ndarray
    signal: np.ndarray
    inside: np.ndarray


def ivim_signal(
    bvalues: np.ndarray,
    d: np.ndarray | float,
    f: np.ndarray | float,
    dstar: np.ndarray | float,
    s0: np.ndarray | float = 1.0,
) -> np.ndarray:
    """Evaluate the bi-exponential IVIM model.

    Parameters
    ----------
    bvalues : numpy.ndarray
        b-values in s/mm², shape ``[K]`` (shared protocol) or ``[N, K]``.
    d, f, dstar, s0 : numpy.ndarray or float
        Parameters, scalars or shape ``[N]``; D and D* in mm²/s.

    Returns
    -------
    numpy.ndarray
        Signals of shape ``[N, K]`` (or ``[K]`` when every input is scalar
        and ``bvalues`` is 1-D).
    """
    b = np.asarray(bvalues, dtype=np.float64)
    d_ = np.asarray(d, dtype=np.float64)[..., None]
    f_ = np.asarray(f, dtype=np.float64)[..., None]
    ds_ = np.asarray(dstar, dtype=np.float64)[..., None]
    s0_ = np.asarray(s0, dtype=np.float64)[..., None]
    return s0_ * (f_ * np.exp(-b * ds_) + (1.0 - f_) * np.exp(-b * d_))


def add_noise(
    rng: np.random.Generator,
    signal: np.ndarray,
    sigma: np.ndarray | float,
    noise: NoiseType | str | np.ndarray,
) -> np.ndarray:
    """Add Gaussian or Rician noise of standard deviation ``sigma``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    signal : numpy.ndarray
        Noise-free signals ``[N, K]``.
    sigma : numpy.ndarray or float
        Noise standard deviation, scalar or ``[N]``.
    noise : NoiseType or str or numpy.ndarray
        One noise type for all voxels, or a boolean ``[N]`` array that is
        True where the voxel is Rician.

    Returns
    -------
    numpy.ndarray
        Noisy signals, same shape as ``signal``.
    """
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.ndim == 1:
        sig = sig[:, None]
    # Both quadrature channels are always drawn so that the Gaussian and the
    # Rician voxels consume the random stream identically.
    n_re = rng.standard_normal(signal.shape) * sig
    n_im = rng.standard_normal(signal.shape) * sig
    gaussian = signal + n_re
    rician = np.sqrt((signal + n_re) ** 2 + n_im**2)
    if isinstance(noise, np.ndarray):
        return np.where(noise[:, None], rician, gaussian)
    if NoiseType(noise) is NoiseType.RICIAN:
        return rician
    return gaussian


def sample_parameters(
    rng: np.random.Generator, n: int, ranges: ParamRanges
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` parameter sets uniformly from ``ranges``.

    Returns
    -------
    tuple of numpy.ndarray
        ``(d, f, dstar, s0)``, each of shape ``[n]``.
    """
    d = rng.uniform(*ranges.d, size=n)
    f = rng.uniform(*ranges.f, size=n)
    dstar = rng.uniform(*ranges.dstar, size=n)
    s0 = rng.uniform(*ranges.s0, size=n)
    return d, f, dstar, s0


def sample_random_protocol(rng: np.random.Generator, sampling: ProtocolSampling | None = None) -> np.ndarray:
    """Draw one random, clinically plausible b-value protocol.

    The number of b-values is uniform in ``[k_min, k_max]``. ``b = 0`` is
    included with probability ``p_b0``. A fraction ``low_fraction`` of the
    b-values (at least ``min_low``, ``b = 0`` included) lie in the low region,
    log-uniform in ``[low_b_min, low_b_max]``; at least ``min_high`` lie in
    ``[high_b_min, b_max]``; the rest are uniform in ``(low_b_max, b_max]``.
    Values are distinct integers.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    sampling : ProtocolSampling, optional
        Sampler settings; the defaults if omitted.

    Returns
    -------
    numpy.ndarray
        Sorted b-values (s/mm²), float64, ``k_min`` to ``k_max`` of them.
    """
    s = sampling or ProtocolSampling()
    k = int(rng.integers(s.k_min, s.k_max + 1))
    n_low = int(round(k * rng.uniform(*s.low_fraction)))
    n_low = min(max(n_low, s.min_low), k - s.min_high)
    n_high = s.min_high
    n_mid = k - n_low - n_high
    values: set[int] = set()
    if rng.random() < s.p_b0:
        values.add(0)
    # Low b-values are log-uniform because clinical protocols sample the
    # fast perfusion decay more densely near b = 0.
    log_lo, log_hi = np.log(s.low_b_min), np.log(s.low_b_max)
    while len(values) < n_low:
        values.add(int(round(np.exp(rng.uniform(log_lo, log_hi)))))
    while len(values) < n_low + n_high:
        values.add(int(round(rng.uniform(s.high_b_min, s.b_max))))
    while len(values) < n_low + n_high + n_mid:
        values.add(int(round(rng.uniform(s.low_b_max, s.b_max))))
    return np.array(sorted(values), dtype=np.float64)


def sample_protocol(rng: np.random.Generator, sampling: ProtocolSampling | None = None) -> np.ndarray:
    """Draw a protocol: setting A with probability ``p_setting_a``, else random.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    sampling : ProtocolSampling, optional
        Sampler settings; the defaults if omitted.

    Returns
    -------
    numpy.ndarray
        Sorted b-values (s/mm²).
    """
    s = sampling or ProtocolSampling()
    if rng.random() < s.p_setting_a:
        return SETTING_A_BVALUES.copy()
    return sample_random_protocol(rng, s)


def perturb_bvalues(rng: np.random.Generator, bvalues: np.ndarray, rel: float = 0.05) -> np.ndarray:
    """Perturb b-values multiplicatively, as the estimator would be *told* them.

    The scanner's nominal b-values differ from the effective ones by a few
    percent (gradient non-linearity, imaging gradients); training on signals
    simulated with the true b-values while telling the network perturbed ones
    makes it robust to that mismatch. ``b = 0`` stays 0.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    bvalues : numpy.ndarray
        True b-values, any shape.
    rel : float
        Maximum relative error; each value is scaled by ``1 + U[-rel, rel]``.

    Returns
    -------
    numpy.ndarray
        Perturbed b-values, same shape.
    """
    b = np.asarray(bvalues, dtype=np.float64)
    return b * (1.0 + rng.uniform(-rel, rel, size=b.shape))


def pad_protocol(bvalues: np.ndarray, k_max: int = K_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Pad a protocol to ``k_max`` entries.

    Returns
    -------
    tuple of numpy.ndarray
        ``(bvalues_padded, mask)`` of shape ``[k_max]``.
    """
    k = len(bvalues)
    if k > k_max:
        raise ValueError(f"protocol has {k} b-values, at most {k_max} are supported")
    b = np.zeros(k_max, dtype=np.float64)
    m = np.zeros(k_max, dtype=np.float64)
    b[:k] = bvalues
    m[:k] = 1.0
    return b, m


def simulate_training_batch(
    rng: np.random.Generator,
    n: int,
    dist: TrainingDistribution | None = None,
    voxels_per_protocol: int = 8,
) -> SimulatedBatch:
    """Simulate a batch of noisy voxels on random, padded protocols.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source (the only one used, so a seed fixes the batch).
    n : int
        Number of voxels.
    dist : TrainingDistribution, optional
        The training distribution; the defaults if omitted.
    voxels_per_protocol : int
        Consecutive voxels share a protocol (and its told b-values); a fresh
        protocol is drawn for every group, so a batch mixes many protocols.

    Returns
    -------
    SimulatedBatch
        The simulated voxels.
    """
    dist = dist or TrainingDistribution()
    b_true = np.zeros((n, K_MAX))
    b_told = np.zeros((n, K_MAX))
    mask = np.zeros((n, K_MAX))
    for start in range(0, n, voxels_per_protocol):
        stop = min(start + voxels_per_protocol, n)
        prot = sample_protocol(rng, dist.protocols)
        bt, m = pad_protocol(prot)
        b_true[start:stop] = bt
        mask[start:stop] = m
        if rng.random() < dist.p_perturb:
            b_told[start:stop] = perturb_bvalues(rng, bt, dist.perturb_rel)
        else:
            b_told[start:stop] = bt
    d, f, dstar, s0 = sample_parameters(rng, n, dist.ranges)
    if dist.outside_fraction > 0:
        wide = rng.random(n) < dist.outside_fraction
        dw, fw, dsw, _ = sample_parameters(rng, n, dist.outside_ranges)
        d, f, dstar = np.where(wide, dw, d), np.where(wide, fw, f), np.where(wide, dsw, dstar)
    r = dist.ranges
    inside = (
        (d >= r.d[0]) & (d <= r.d[1]) & (f >= r.f[0]) & (f <= r.f[1]) & (dstar >= r.dstar[0]) & (dstar <= r.dstar[1])
    )
    snr = np.exp(rng.uniform(np.log(dist.snr[0]), np.log(dist.snr[1]), size=n))
    rician = rng.random(n) < dist.p_rician
    clean = ivim_signal(b_true, d, f, dstar, s0)
    noisy = add_noise(rng, clean, s0 / snr, rician) * mask
    return SimulatedBatch(
        d=d,
        f=f,
        dstar=dstar,
        s0=s0,
        bvalues=b_true,
        bvalues_told=b_told,
        mask=mask,
        signal=noisy,
        inside=inside,
    )


def simulate_protocol(
    rng: np.random.Generator,
    bvalues: np.ndarray,
    n: int,
    snr: float,
    noise: NoiseType | str,
    ranges: ParamRanges = TEST_RANGES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Simulate ``n`` noisy voxels on one fixed protocol.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    bvalues : numpy.ndarray
        The protocol (s/mm²), shape ``[K]``.
    n : int
        Number of voxels.
    snr : float
        Signal-to-noise ratio, ``sigma = S0 / snr``.
    noise : NoiseType or str
        Gaussian or Rician.
    ranges : ParamRanges
        Uniform parameter ranges (default: the test ranges, S0 = 1).

    Returns
    -------
    tuple of numpy.ndarray
        ``(signals [n, K], d, f, dstar, s0)``.
    """
    d, f, dstar, s0 = sample_parameters(rng, n, ranges)
    clean = ivim_signal(np.asarray(bvalues, dtype=np.float64)[None, :], d, f, dstar, s0)
    noisy = add_noise(rng, clean, s0 / snr, noise)
    return noisy, d, f, dstar, s0

"""Body tissues with literature-like IVIM parameter ranges, each on a clinical b-value protocol of its own.

The benchmark's settings A and B draw D, f and D* from one wide box. Real
organs occupy small, different corners of it (bone marrow diffuses slowly,
kidney fast; muscle is barely perfused, liver strongly) and each organ is
scanned with its own protocol. :data:`BODY_TISSUES` describes such tissues:
uniform ranges of D, f and D* and a typical clinical protocol, and
:func:`simulate_tissue` draws voxels from one of them with the shared
simulator (:func:`~pipelines.ivim.lab.signal.simulate_protocol`).

The ranges are written here, rounded, as the span of the mean values that
IVIM studies of healthy volunteers and patients at 1.5 and 3 T report for
each tissue: the kind of literature the OSIPI IVIM task force (ISMRM Open
Science Initiative for Perfusion Imaging, task force 2.4) collects for its
digital phantoms, together with reviews and meta-analyses per organ. They are
not the spread of single voxels, and D* in particular varies between studies
by more than a factor of two. The protocols are typical of published
clinical IVIM work per organ, not copies of one vendor's or one paper's.

Used by :func:`pipelines.ivim.lab.bench.tissue_report`; numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipelines.ivim.infer import B_MAX, K_MAX, K_MIN
from pipelines.ivim.lab.signal import NoiseType, ParamRanges, simulate_protocol

__all__ = ["BODY_TISSUES", "TISSUE_NOISE", "TISSUE_SNR", "BodyTissue", "simulate_tissue"]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: SNR of the tissue benchmark, relative to S0 (``sigma = S0 / SNR``).
TISSUE_SNR: float = 20.0
#: Magnitude images: Rician noise.
TISSUE_NOISE: NoiseType = NoiseType.RICIAN


@dataclass(frozen=True)
class BodyTissue:
    """One tissue: its parameter ranges and the protocol it is scanned with.

    Attributes
    ----------
    name : str
        Short identifier (``snake_case``), used as a table row and JSON key.
    ranges : ParamRanges
        Uniform ranges of D (mm²/s), f and D* (mm²/s); S0 is 1.
    bvalues : tuple of float
        The clinical protocol (s/mm²): 4 to 20 distinct values in
        ``[0, B_MAX]``, the network's limits.
    """

    name: str
    ranges: ParamRanges
    bvalues: tuple[float, ...]

    def __post_init__(self) -> None:
        b = np.asarray(self.bvalues, dtype=np.float64)
        if np.unique(b).size != b.size or not K_MIN <= b.size <= K_MAX:
            raise ValueError(f"{self.name}: need {K_MIN} to {K_MAX} distinct b-values, got {self.bvalues}")
        if b.min() < 0 or b.max() > B_MAX:
            raise ValueError(f"{self.name}: b-values must lie in [0, {B_MAX:g}] s/mm2, got {self.bvalues}")

    @property
    def protocol(self) -> np.ndarray:
        """The b-values as a float64 array."""
        return np.asarray(self.bvalues, dtype=np.float64)


def _mm2(lo: float, hi: float) -> tuple[float, float]:
    """A diffusivity range given in 1e-3 mm²/s, in mm²/s."""
    return (lo * 1e-3, hi * 1e-3)


# Protocols shared by tissues that are scanned in the same examination.
# Liver: the dense low-b sampling of abdominal IVIM studies, up to b = 800.
_LIVER_B = (0, 10, 20, 30, 50, 75, 100, 150, 200, 400, 600, 800)
# Renal IVIM: many low b-values (renal perfusion is fast and large), as in
# the consensus recommendations for renal DWI, to b = 800.
_KIDNEY_B = (0, 10, 20, 30, 40, 50, 70, 100, 150, 200, 300, 400, 500, 800)
# Prostate: few low b-values and high b up to 1200, where the cancer contrast is.
_PROSTATE_B = (0, 10, 25, 50, 100, 150, 200, 400, 600, 800, 1000, 1200)
# Breast: evenly spaced low b-values up to 200, then three high ones to 800.
_BREAST_B = (0, 15, 30, 45, 60, 75, 90, 120, 150, 200, 400, 600, 800)

#: The body tissues of the benchmark. Ranges (D and D* in 1e-3 mm²/s in the
#: comments) are the span of study means per tissue, see the module docstring.
BODY_TISSUES: tuple[BodyTissue, ...] = (
    # Healthy liver: D 0.8-1.3, f 0.12-0.32 (one of the most perfused organs),
    # D* 30-100 (liver D* is the least reproducible figure of all).
    BodyTissue("liver", ParamRanges(d=_mm2(0.8, 1.3), f=(0.12, 0.32), dstar=_mm2(30, 100)), _LIVER_B),
    # Spleen: slow diffusion, moderate perfusion; abdominal protocol with fewer b-values.
    BodyTissue(
        "spleen",
        ParamRanges(d=_mm2(0.7, 1.1), f=(0.04, 0.18), dstar=_mm2(20, 80)),
        (0, 10, 20, 40, 60, 100, 150, 200, 400, 800),
    ),
    # Pancreas: D 1.0-1.5, f 0.10-0.30, D* 10-60; pancreatic protocols stop near b = 600.
    BodyTissue(
        "pancreas",
        ParamRanges(d=_mm2(1.0, 1.5), f=(0.10, 0.30), dstar=_mm2(10, 60)),
        (0, 10, 20, 30, 40, 50, 100, 200, 400, 600),
    ),
    # Kidney cortex: fast diffusion and large perfusion fraction.
    BodyTissue("kidney_cortex", ParamRanges(d=_mm2(1.8, 2.4), f=(0.12, 0.30), dstar=_mm2(15, 60)), _KIDNEY_B),
    # Kidney medulla: slightly slower diffusion, somewhat lower f than cortex.
    BodyTissue("kidney_medulla", ParamRanges(d=_mm2(1.6, 2.2), f=(0.08, 0.25), dstar=_mm2(15, 50)), _KIDNEY_B),
    # Prostate peripheral zone: high D, low f, slow D*.
    BodyTissue("prostate_pz", ParamRanges(d=_mm2(1.4, 2.0), f=(0.05, 0.20), dstar=_mm2(10, 50)), _PROSTATE_B),
    # Prostate transition zone: lower D than the peripheral zone (stromal hyperplasia).
    BodyTissue("prostate_tz", ParamRanges(d=_mm2(1.0, 1.6), f=(0.05, 0.20), dstar=_mm2(10, 50)), _PROSTATE_B),
    # Normal fibroglandular breast tissue: high D, little perfusion.
    BodyTissue("breast_fibroglandular", ParamRanges(d=_mm2(1.6, 2.3), f=(0.03, 0.12), dstar=_mm2(10, 50)), _BREAST_B),
    # Invasive breast carcinoma: restricted diffusion, higher f than normal tissue.
    BodyTissue("breast_tumour", ParamRanges(d=_mm2(0.7, 1.2), f=(0.06, 0.18), dstar=_mm2(10, 70)), _BREAST_B),
    # Head-and-neck squamous cell carcinoma; H&N protocols often start the low b at 20.
    BodyTissue(
        "head_neck_tumour",
        ParamRanges(d=_mm2(0.7, 1.2), f=(0.08, 0.22), dstar=_mm2(15, 60)),
        (0, 20, 40, 60, 80, 100, 200, 300, 500, 800, 1000),
    ),
    # Resting skeletal muscle (thigh, calf): low f, slow D*; a short musculoskeletal protocol.
    BodyTissue(
        "skeletal_muscle",
        ParamRanges(d=_mm2(1.3, 1.7), f=(0.03, 0.12), dstar=_mm2(10, 40)),
        (0, 10, 25, 50, 100, 200, 400, 600),
    ),
    # Fat-suppressed adult vertebral bone marrow: the slowest diffusion in
    # the body (partly below the network's training range, 0.375e-3).
    BodyTissue(
        "vertebral_marrow",
        ParamRanges(d=_mm2(0.35, 0.65), f=(0.05, 0.20), dstar=_mm2(20, 80)),
        (0, 10, 20, 40, 80, 150, 300, 500, 800),
    ),
)


def simulate_tissue(
    rng: np.random.Generator,
    tissue: BodyTissue,
    n: int,
    snr: float = TISSUE_SNR,
    noise: NoiseType = TISSUE_NOISE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` noisy voxels of ``tissue`` on its protocol, parameters uniform in its ranges.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    tissue : BodyTissue
        The tissue.
    n : int
        Number of voxels.
    snr : float
        ``sigma = S0 / snr`` with S0 = 1.
    noise : NoiseType
        Rician by default (magnitude images).

    Returns
    -------
    tuple of numpy.ndarray
        ``(signals [n, K], d, f, dstar)`` on ``tissue.protocol``.
    """
    sig, d, f, dstar, _ = simulate_protocol(rng, tissue.protocol, n, snr, noise, tissue.ranges)
    return sig, d, f, dstar

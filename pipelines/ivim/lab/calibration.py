"""Held-out voxels and figures for the uncertainty of the IVIM network (numpy only).

The network returns, with every estimate of D, D* and f, a standard deviation
``sd``. It is *calibrated* when the nominal 90 % interval
``estimate ± Z90 · sd`` holds the true value in 90 % of voxels, over the whole
test range and within each quartile of the true value, at every SNR; and it
is *informative* when voxels whose parameters lie outside the training ranges
get larger ``sd`` than voxels inside them (:func:`auroc`).

Training fits one scalar factor per parameter (the graph multiplies ``sd``
by it) on voxels from :func:`calibration_sets` with a calibration seed; the
benchmark and the tests measure coverage on other seeds with the same
function, so the three use the same definition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.ivim.infer import IvimEstimator
from pipelines.ivim.lab.signal import (
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
    ParamRanges,
    ProtocolSampling,
    sample_random_protocol,
    simulate_protocol,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Two-sided 90 % quantile of the standard normal distribution.
Z90: float = 1.6448536269514722
#: Nominal coverage of the interval ``estimate ± Z90 · sd``.
NOMINAL: float = 0.90
#: Coverage must lie in this range, overall and in each quartile of the truth.
COVERAGE_RANGE: tuple[float, float] = (0.85, 0.95)
#: SNRs at which calibration is fitted and checked.
CALIBRATION_SNRS: tuple[int, ...] = (10, 20, 50)
#: Parameters that carry a standard deviation, in the network's output order.
SD_PARAMS: tuple[str, ...] = ("d", "dstar", "f")
#: Voxels per random protocol.
BLOCK: int = 100

#: Out-of-range test values of each parameter (the others stay in
#: :data:`~pipelines.ivim.lab.signal.TEST_RANGES`): beyond the training
#: ranges (D [0.375, 3.125]e-3, f [0.025, 0.575], D* [0.0055, 0.1045]) by a
#: margin, on the side where tissue goes (free water and fast flow above,
#: barely perfused tissue has f near 0, which is inside).
OUTSIDE_RANGES: dict[str, tuple[float, float]] = {
    "d": (3.4e-3, 4.5e-3),
    "f": (0.62, 0.9),
    "dstar": (0.12, 0.3),
}


@dataclass
class VoxelSet:
    """Simulated voxels on one protocol with their true parameters."""

    bvalues: np.ndarray  # [K]
    signals: np.ndarray  # [N, K]
    truth: dict[str, np.ndarray]  # "d", "dstar", "f" -> [N]


def voxel_sets(
    rng: np.random.Generator,
    n: int,
    snr: float,
    noise: NoiseType,
    random_protocols: bool,
    ranges: ParamRanges = TEST_RANGES,
    sampling: ProtocolSampling | None = None,
) -> list[VoxelSet]:
    """``n`` voxels on setting A, or on random protocols of :data:`BLOCK` voxels each."""
    out = []
    for start in range(0, n, BLOCK if random_protocols else n):
        m = min(BLOCK if random_protocols else n, n - start)
        b = sample_random_protocol(rng, sampling) if random_protocols else SETTING_A_BVALUES
        sig, d, f, dstar, _ = simulate_protocol(rng, b, m, snr, noise, ranges)
        out.append(VoxelSet(b, sig, {"d": d, "dstar": dstar, "f": f}))
    return out


def calibration_sets(seed: int, n: int, snrs: tuple[int, ...] = CALIBRATION_SNRS) -> Iterator[tuple[str, VoxelSet]]:
    """Setting A and random-protocol voxels, Gaussian and Rician, at each SNR, labelled ``"A gaussian SNR 10"``.

    ``n`` voxels per setting, noise and SNR, drawn from ``numpy.random.default_rng([seed, 7, ...])``.
    """
    for si, snr in enumerate(snrs):
        for ni, noise in enumerate(NoiseType):
            for setting in ("A", "B"):
                rng = np.random.default_rng([seed, 7, si, ni, setting == "B"])
                for vs in voxel_sets(rng, n, snr, noise, setting == "B"):
                    yield f"{setting} {noise.value} SNR {snr}", vs


def outside_sets(seed: int, n: int, snr: float, param: str) -> tuple[list[VoxelSet], list[VoxelSet]]:
    """``(inside, outside)`` Gaussian voxels on random protocols; ``outside`` has ``param`` out of range."""
    rng = np.random.default_rng([seed, 8, SD_PARAMS.index(param), int(snr)])
    inside = voxel_sets(rng, n, snr, NoiseType.GAUSSIAN, True)
    wide = {"d": TEST_RANGES.d, "f": TEST_RANGES.f, "dstar": TEST_RANGES.dstar}
    wide[param] = OUTSIDE_RANGES[param]
    outside = voxel_sets(rng, n, snr, NoiseType.GAUSSIAN, True, ParamRanges(**wide))
    return inside, outside


#: A network run: ``(signals [N, K], bvalues [K]) -> (estimates, sds)``, dicts of ``[N]`` arrays keyed by parameter.
Predictor = Callable[[np.ndarray, np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


@dataclass
class Errors:
    """Per-voxel errors, standard deviations and truths of many voxel sets, concatenated."""

    err: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]


def errors(predict: Predictor, sets: list[VoxelSet]) -> Errors:
    """Run ``predict`` on every set and gather estimate minus truth, sd and truth per parameter."""
    err: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    sd: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    truth: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    for vs in sets:
        est, s = predict(vs.signals, vs.bvalues)
        for p in SD_PARAMS:
            err[p].append(np.asarray(est[p], np.float64) - vs.truth[p])
            sd[p].append(np.asarray(s[p], np.float64))
            truth[p].append(vs.truth[p])
    cat = np.concatenate
    return Errors(
        {p: cat(v) for p, v in err.items()}, {p: cat(v) for p, v in sd.items()}, {p: cat(v) for p, v in truth.items()}
    )


def calibration_factors(e: Errors) -> dict[str, float]:
    """The factor per parameter that makes the 90 % interval cover exactly 90 % of ``e``."""
    return {p: float(np.quantile(np.abs(e.err[p]) / np.maximum(e.sd[p], 1e-30), NOMINAL) / Z90) for p in SD_PARAMS}


def coverage(e: Errors, param: str) -> dict[str, float]:
    """Coverage of ``estimate ± Z90 · sd``, overall (``"all"``) and per quartile of the truth (``"q1"``..``"q4"``)."""
    return quartile_coverage(np.abs(e.err[param]) <= Z90 * e.sd[param], e.truth[param])


def quartile_coverage(inside: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Share of ``inside`` overall (``"all"``) and per quartile of ``truth`` (``"q1"``..``"q4"``)."""
    edges = np.quantile(truth, [0.25, 0.5, 0.75])
    q = np.searchsorted(edges, truth)
    out = {"all": float(np.mean(inside))}
    for i in range(4):
        out[f"q{i + 1}"] = float(np.mean(inside[q == i]))
    return out


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of telling ``positive`` (larger scores) from ``negative`` (Mann-Whitney U)."""
    neg = np.sort(np.asarray(negative, np.float64))
    pos = np.asarray(positive, np.float64)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (neg.size * pos.size))


def estimator_predictor(estimator: IvimEstimator) -> Predictor:
    """A :data:`Predictor` from an estimator that gives standard deviations (the network's wrapper)."""

    def predict(signals: np.ndarray, bvalues: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        p = estimator.fit(signals, bvalues)
        sds = {name: getattr(p, f"{name}_sd") for name in SD_PARAMS}
        if any(v is None for v in sds.values()):
            raise ValueError("this estimator gives no standard deviations")
        return {name: getattr(p, name) for name in SD_PARAMS}, sds

    return predict

"""Bayes-optimal reference of the IVIM benchmark: the posterior mean on a grid over the prior.

Usage::

    OMP_NUM_THREADS=1 python -m pipelines.ivim.lab.bayes [--voxels 10000]
        [--points 50] [--check-voxels 1000] [--model exported_models/ivim-net.onnx]
        [--json-out FILE]
    OMP_NUM_THREADS=1 python -m pipelines.ivim.lab.bayes --tissues [--bayes-voxels 1000]
        [--tissue-voxels 5000] [--points 50] [--tissue-points 30] [--rician-points 30]

Under squared error the posterior mean ``E[theta | signal]`` is the best
estimator there is for data drawn from the prior, for each parameter at once,
so its NRMSE on the benchmark's voxels is a bound that no estimator (network
or fit) beats on average. Its ratio of setting B to setting A says how much
of the network's gap between the two is the protocols' and how much the
network's.

The model is the benchmark's (:func:`~pipelines.ivim.lab.bench.setting_a`,
:func:`~pipelines.ivim.lab.bench.setting_b`): D, f, D* independent and uniform
in :data:`~pipelines.ivim.lab.signal.TEST_RANGES`, S0 = 1, Gaussian noise of
``sigma = S0 / SNR``. Rician noise is left out: its likelihood has no
closed-form integral over S0, and the setting B target is read on the
Gaussian table.

The grid holds the cell centres of ``points`` equal cells per axis, so under
the uniform prior every grid point weighs the same. S0 is handled three ways:

``known``
    S0 = 1, as the benchmark draws it: the exact minimum-mean-squared-error
    estimator of the benchmark's distribution, a bound for every estimator.
``flat``
    S0 unknown with a flat prior on the real line, integrated out
    analytically (the signal is linear in S0), the noise sigma = 1 / SNR
    known: the simplest treatment of an unknown S0.
``scale``
    S0 unknown with the scale-invariant prior dS0 / S0 and sigma = S0 / SNR,
    integrated out by Laplace's method (error < 5e-4 in the log-weights).
    The posterior mean under this prior is the best estimator among those
    whose D, f, D* do not change when the signal is scaled (the Bayes
    estimator of the invariant problem), so it is the bound at this SNR for
    the network (it divides by the largest signal) and the least-squares
    fits (bounds relative to it), which are such estimators. This is the
    reference of the model card.

``--tissues`` (:func:`tissue_bayes_report`) puts the references on the
body tissues of :func:`~pipelines.ivim.lab.bench.tissue_benchmark` instead:
the same voxels (Rician, SNR 20) and a Gaussian variant of them, NRMSE per
tissue and the median over tissues against the best least-squares fit, the
figure of the tissue target. Beside the references above on the test
ranges (and, for the Rician voxels, ``known`` with the Rician likelihood) it
has two other priors: the equal mixture of the tissues' boxes (the best
estimators that do not know the tissue, for tissues drawn from the twelve)
and each tissue's own box (estimators that know the tissue; with S0 known, a
bound for every estimator). It also lists the tissue ranges that leave the
test ranges, where the prior of the benchmark has no mass.

Runtime of the command with its defaults: about 4.5 minutes on one thread
of a shared 2-core machine (2 minutes for the tables, the rest the grid
check at 100 points per axis). With ``--tissues`` and its defaults about 12
minutes (the mixture priors and the Rician likelihood take most of it).

This is a command-line script, so it prints its tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

# Runtimes are quoted for one thread on a shared machine. Set only when run as
# a script (BLAS reads these when numpy is imported), so that importing this
# module has no side effect.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipelines._lab import cpu_session  # noqa: E402
from pipelines.ivim.infer import (  # noqa: E402
    FullLsqEstimator,
    IvimEstimator,
    IvimNetEstimator,
    IvimParams,
    SegmentedLsqEstimator,
)
from pipelines.ivim.lab.bench import (  # noqa: E402
    DEFAULT_MODEL,
    NRMSE_KEYS,
    SETTING_B_MAX_RATIO,
    TISSUE_RATIO_TARGET,
    TISSUE_VOXELS,
    Truth,
    fit_blocks,
    nrmse,
    setting_a,
    setting_b,
    tissue_benchmark,
)
from pipelines.ivim.lab.signal import (  # noqa: E402
    BENCH_TEST_SEED,
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
    ParamRanges,
    ivim_signal,
)
from pipelines.ivim.lab.tissues import BODY_TISSUES, TISSUE_SNR, BodyTissue, simulate_tissue  # noqa: E402

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Grid points per axis of the reference (the grid check doubles them).
POINTS: int = 50
#: The SNR of the setting B target.
SNR: float = 20.0
#: Voxel-by-grid-point log-weights held at once (float32, 64 MiB).
_BLOCK_ELEMENTS: int = 1 << 24
#: The benchmark's bins of its table "by number of b-values".
K_BINS: tuple[tuple[str, int, int], ...] = (("4-7", 4, 7), ("8-13", 8, 13), ("14-20", 14, 20))
#: Parameter of each NRMSE key, as IvimParams and Truth name them.
_PARAM: dict[str, str] = {"nrmse_d": "d", "nrmse_f": "f", "nrmse_dstar": "dstar"}
#: Bootstrap resamples of the intervals of the ratios.
BOOTSTRAP: int = 1000

Blocks = list[tuple[np.ndarray, np.ndarray, Truth]]


class S0Prior(str, Enum):
    """How the reference treats S0 (see the module docstring)."""

    KNOWN = "known"
    FLAT = "flat"
    SCALE = "scale"


@dataclass(frozen=True)
class PriorGrid:
    """Grid points over the uniform prior of D, f and D*, flattened, all of equal weight.

    Attributes
    ----------
    d, f, dstar : numpy.ndarray
        Parameter values of the ``M`` grid points (D and D* in mm²/s).
    """

    d: np.ndarray
    f: np.ndarray
    dstar: np.ndarray

    @classmethod
    def uniform(cls, ranges: ParamRanges = TEST_RANGES, points: int = POINTS) -> PriorGrid:
        """Cell centres of ``points`` equal cells per axis of ``ranges``."""
        axes = [lo + (np.arange(points) + 0.5) * (hi - lo) / points for lo, hi in (ranges.d, ranges.f, ranges.dstar)]
        d, f, dstar = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
        return cls(d, f, dstar)

    @property
    def size(self) -> int:
        """Number of grid points."""
        return int(self.d.size)


def rician_correction(y: np.ndarray, shapes: np.ndarray, snr: float) -> np.ndarray:
    """What the Rician log-likelihood adds to the Gaussian one, S0 known, sigma = 1 / snr: ``[N, M]``.

    The Rician density of a magnitude ``y`` about ``g`` is, up to terms of
    ``y`` alone, ``exp(-(y^2 + g^2) / (2 sigma^2)) I0(y g / sigma^2)``, and
    ``log I0(x) = x + log i0e(x)``: the ``x`` is the Gaussian log-likelihood's
    cross term, so the rest is ``sum_k log i0e(y_k g_k / sigma^2)``.
    """
    from scipy.special import i0e

    scale = np.float32(snr**2)
    out = np.zeros((y.shape[0], shapes.shape[0]), dtype=np.float32)
    tmp = np.empty_like(out)
    for k in range(y.shape[1]):
        np.multiply((scale * y[:, k])[:, None], shapes[None, :, k], out=tmp)
        out += np.log(i0e(tmp))
    return out


class BayesEstimator:
    """Posterior mean of D, f, D* (and S0) on a prior grid, for Gaussian noise at a known SNR.

    Parameters
    ----------
    snr : float
        The voxels' SNR: ``sigma = 1 / snr`` (the benchmark's S0 is 1) for
        ``known`` and ``flat``, ``sigma = S0 / snr`` for ``scale``.
    s0 : S0Prior
        How S0 is treated.
    grid : PriorGrid, optional
        The prior grid; :meth:`PriorGrid.uniform` over the test ranges if omitted.
    rician : bool
        Use the Rician likelihood of magnitude data instead of the Gaussian
        one (``known`` only): per b-value it multiplies the Gaussian
        likelihood by ``i0e(y g / sigma^2)``, the exponentially scaled
        modified Bessel function of order 0. About ten times slower.
    """

    def __init__(
        self, snr: float, s0: S0Prior = S0Prior.FLAT, grid: PriorGrid | None = None, rician: bool = False
    ) -> None:
        self.snr = float(snr)
        self.s0 = S0Prior(s0)
        self.grid = grid or PriorGrid.uniform()
        if rician and self.s0 is not S0Prior.KNOWN:
            raise ValueError("the Rician likelihood is implemented for a known S0 only")
        self.rician = rician

    def _log_weights(
        self, yg: np.ndarray, yy: np.ndarray, norm2: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-likelihood of every voxel at every grid point, S0 integrated out, up to the voxel's constants.

        ``yg [n, M]`` holds the products y.g of the voxels with the grid's
        noise-free shapes g (S0 = 1), ``yy [n, 1]`` the voxels' |y|^2 and
        ``norm2 [M]`` the shapes' |g|^2. Returns the log-weights and, per
        voxel and grid point, the conditional mean of S0 (None: S0 = 1).
        """
        h = np.float32(0.5 * self.snr**2)
        if self.s0 is S0Prior.KNOWN:
            # -|y - g|^2 / (2 sigma^2), sigma = 1 / snr.
            return yg * (2 * h) - h * norm2, None
        if self.s0 is S0Prior.FLAT:
            # The integral over S0 of exp(-|y - S0 g|^2 / (2 sigma^2)) is
            # |g|^-1 exp((y.g)^2 / (2 sigma^2 |g|^2)); E[S0] = y.g / |g|^2.
            s0 = yg / norm2
            return (yg * s0) * h - 0.5 * np.log(norm2), s0
        # sigma = S0 / snr and the prior dS0 / S0 (scale-invariant): with
        # t = 1 / S0 the likelihood integrates to the integral over t of
        # t^(k-1) exp(-h |t y - g|^2), done by Laplace's method about its
        # peak t* (error in the log-weight < 5e-4 for |y|^2 snr^2 / 2 >= 100,
        # checked against quadrature); E[S0] ~ 1 / t*.
        a = h * yy
        b = yg * (2 * h)
        t = (b + np.sqrt(b * b + 8 * (k - 1) * a)) / (4 * a)
        curvature = (k - 1) / (t * t) + 2 * a
        logw = (k - 1) * np.log(t) + t * (b - a * t) - h * norm2 - 0.5 * np.log(curvature)
        return logw, 1.0 / t

    def fit(self, signals: np.ndarray, bvalues: np.ndarray) -> IvimParams:
        """Posterior means of ``signals [N, K]`` on the protocol ``bvalues [K]``."""
        g = self.grid
        b = np.asarray(bvalues, dtype=np.float64)
        shapes = ivim_signal(b, g.d, g.f, g.dstar)  # [M, K], S0 = 1
        # float32 halves the time of the products and the elementwise work;
        # the log-weights (a few thousand at most) stay within about 1e-3 of
        # float64's, far below the spread that matters.
        norm2 = np.einsum("mk,mk->m", shapes, shapes).astype(np.float32)
        shapes32 = shapes.astype(np.float32)
        values = np.stack([g.d, g.f, g.dstar], axis=1).astype(np.float32)
        y = np.asarray(signals, dtype=np.float32)
        n = y.shape[0]
        means = np.empty((n, 3))
        s0 = np.ones(n)
        chunk = max(1, _BLOCK_ELEMENTS // g.size)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            yy = np.einsum("nk,nk->n", y[rows], y[rows])[:, None]
            logw, s0_at = self._log_weights(y[rows] @ shapes32.T, yy, norm2, b.size)
            if self.rician:
                logw += rician_correction(y[rows], shapes32, self.snr)
            # Log-sum-exp: only differences of the log-weights matter.
            logw -= logw.max(axis=1, keepdims=True)
            np.exp(logw, out=logw)
            total = logw.sum(axis=1, dtype=np.float64)
            means[rows] = (logw @ values) / total[:, None]
            if s0_at is not None:
                s0[rows] = np.einsum("nm,nm->n", logw, s0_at, dtype=np.float64) / total
        return IvimParams.from_arrays(means[:, 0], means[:, 2], means[:, 1], s0)


def bayes_estimators(snr: float = SNR, points: int = POINTS) -> dict[str, BayesEstimator]:
    """The references ``bayes-known``, ``bayes-flat`` and ``bayes-scale``, on one grid."""
    grid = PriorGrid.uniform(TEST_RANGES, points)
    return {f"bayes-{s.value}": BayesEstimator(snr, s, grid) for s in S0Prior}


@dataclass
class Fitted:
    """Estimates of several methods on the same voxels.

    Attributes
    ----------
    params : dict
        ``{method: IvimParams}``, voxels in the order of ``truth``.
    truth : Truth
        True parameters.
    block : numpy.ndarray
        Index of each voxel's protocol (its block), ``[N]``.
    k : numpy.ndarray
        Number of b-values of each voxel's protocol, ``[N]``.
    b0 : numpy.ndarray
        True where the voxel's protocol has ``b = 0``, ``[N]``.
    """

    params: dict[str, IvimParams]
    truth: Truth
    block: np.ndarray
    k: np.ndarray
    b0: np.ndarray

    def nrmse(self, method: str, key: str, select: np.ndarray | None = None) -> float:
        """NRMSE of one parameter (``key`` of :data:`NRMSE_KEYS`) of one method, optionally on a subset."""
        name = _PARAM[key]
        est, true = getattr(self.params[method], name), getattr(self.truth, name)
        if select is None:
            return nrmse(est, true)
        return nrmse(est[select], true[select])


def fit_all(estimators: dict[str, IvimEstimator], blocks: Blocks) -> Fitted:
    """Fit every estimator on every block with its own protocol (:func:`~pipelines.ivim.lab.bench.fit_blocks`)."""
    params: dict[str, IvimParams] = {}
    truth = Truth(np.empty(0), np.empty(0), np.empty(0))
    for name, est in estimators.items():
        params[name], truth = fit_blocks(est, blocks)
    sizes = [sig.shape[0] for _, sig, _ in blocks]
    block = np.repeat(np.arange(len(blocks)), sizes)
    k = np.repeat([b.size for b, _, _ in blocks], sizes)
    b0 = np.repeat([bool(np.any(b == 0)) for b, _, _ in blocks], sizes)
    return Fitted(params, truth, block, k, b0)


def setting_a_blocks(n: int, snr: float = SNR, seed: int = BENCH_TEST_SEED) -> Blocks:
    """The benchmark's setting A voxels (Gaussian noise) as one block."""
    sig, truth = setting_a(n, snr, NoiseType.GAUSSIAN, seed)
    return [(SETTING_A_BVALUES, sig, truth)]


def paired_excess(fitted: Fitted, method: str, reference: str, key: str) -> tuple[float, float]:
    """Mean per-voxel excess squared error of ``method`` over ``reference`` and its standard error.

    Both see the same voxels, so the difference is free of most of the
    sampling noise of either NRMSE; a positive mean means ``method`` is worse.
    """
    name = _PARAM[key]
    true = getattr(fitted.truth, name)
    diff = (getattr(fitted.params[method], name) - true) ** 2 - (getattr(fitted.params[reference], name) - true) ** 2
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def _bootstrap_index(rng: np.random.Generator, fitted: Fitted) -> np.ndarray:
    """Resample protocols (blocks) if there are several, else voxels."""
    blocks = int(fitted.block.max()) + 1
    if blocks == 1:
        return rng.integers(0, fitted.block.size, fitted.block.size)
    members = [np.flatnonzero(fitted.block == i) for i in range(blocks)]
    return np.concatenate([members[i] for i in rng.integers(0, blocks, blocks)])


def ratio_interval(
    num: Fitted, num_method: str, den: Fitted, den_method: str, key: str, seed: int = 0, resamples: int = BOOTSTRAP
) -> tuple[float, float]:
    """95 % bootstrap interval of NRMSE(num) / NRMSE(den): voxels of setting A, protocols of setting B."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        i, j = _bootstrap_index(rng, num), _bootstrap_index(rng, den)
        ratios.append(num.nrmse(num_method, key, i) / den.nrmse(den_method, key, j))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def grid_check(blocks_a: Blocks, blocks_b: Blocks, points: int, snr: float = SNR) -> dict[str, dict[str, float]]:
    """Relative change of the references' NRMSE when the grid spacing is halved (``2 * points`` per axis)."""
    out: dict[str, dict[str, float]] = {}
    coarse, fine = bayes_estimators(snr, points), bayes_estimators(snr, 2 * points)
    for setting, blocks in (("A", blocks_a), ("B", blocks_b)):
        a, b = fit_all(dict(coarse), blocks), fit_all(dict(fine), blocks)
        for name in coarse:
            out[f"{name} {setting}"] = {k: b.nrmse(name, k) / a.nrmse(name, k) - 1.0 for k in NRMSE_KEYS}
    return out


def _cells(values: Sequence[float]) -> str:
    return " | ".join(f"{v:.3f}" for v in values)


def _triple(values: Sequence[float], fmt: str = ".3f") -> str:
    return " / ".join(format(v, fmt) for v in values)


def _nrmse_table(methods: list[str], fa: Fitted, fb: Fitted) -> dict[str, Any]:
    """Print NRMSE in settings A and B and the ratio B/A of every method."""
    print("## NRMSE D / f / D*, setting A, setting B and their ratio B/A\n")
    print("| method | A: D | A: f | A: D* | B: D | B: f | B: D* | B/A: D | B/A: f | B/A: D* |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for m in methods:
        in_a = [fa.nrmse(m, k) for k in NRMSE_KEYS]
        in_b = [fb.nrmse(m, k) for k in NRMSE_KEYS]
        ratio = [y / x for x, y in zip(in_a, in_b)]
        out[m] = {name: dict(zip(NRMSE_KEYS, v)) for name, v in (("A", in_a), ("B", in_b), ("B/A", ratio))}
        print(f"| {m} | {_cells(in_a)} | {_cells(in_b)} | {_cells(ratio)} |")
    return out


def _excess_table(bayes: list[str], fa: Fitted, fb: Fitted) -> dict[str, Any]:
    """Print the network's NRMSE over each reference's, with the paired excess MSE in standard errors."""
    print("\n## Network's excess over the references: NRMSE net / bayes (paired excess MSE in standard errors)\n")
    print("| reference | A: D | A: f | A: D* | B: D | B: f | B: D* |")
    print("|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for ref in bayes:
        cells, row = [], {}
        for setting, fitted in (("A", fa), ("B", fb)):
            for k in NRMSE_KEYS:
                ratio = fitted.nrmse("net", k) / fitted.nrmse(ref, k)
                mean, se = paired_excess(fitted, "net", ref, k)
                row[f"{setting} {k}"] = {"ratio": ratio, "excess_mse_in_se": mean / se}
                cells.append(f"{ratio:.3f} ({mean / se:+.0f})")
        out[ref] = row
        print(f"| {ref} | " + " | ".join(cells) + " |")
    return out


def _reachable_table(bayes: list[str], fa: Fitted, fb: Fitted) -> dict[str, Any]:
    """Print the lowest B/A any estimator can reach: Bayes B over Bayes A, and Bayes B over the network's A."""
    print(
        f"\n## The lowest ratio B/A reachable (95 % bootstrap interval, {BOOTSTRAP} resamples of setting A's "
        "voxels and setting B's protocols)\n"
    )
    print(
        f"The target is B/A <= {SETTING_B_MAX_RATIO:.2f} on every parameter. No estimator's NRMSE in B is below "
        "Bayes B, so with setting A kept as the network's now, B/A is at least Bayes B / net A.\n"
    )
    print("| ratio | D | f | D* |")
    print("|---|---|---|---|")
    out: dict[str, Any] = {}
    for ref in bayes:
        for label, den in ((f"{ref} B / {ref} A", ref), (f"{ref} B / net A", "net")):
            row: dict[str, dict[str, Any]] = {}
            cells = []
            for k in NRMSE_KEYS:
                ratio = fb.nrmse(ref, k) / fa.nrmse(den, k)
                lo, hi = ratio_interval(fb, ref, fa, den, k)
                row[k] = {"ratio": ratio, "ci95": [lo, hi]}
                cells.append(f"{ratio:.3f} ({lo:.3f}-{hi:.3f})")
            out[label] = row
            print(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _subset_table(
    title: str, groups: list[tuple[str, np.ndarray]], methods: list[str], bayes: list[str], fa: Fitted, fb: Fitted
) -> dict[str, Any]:
    """Print setting B on subsets of its protocols: NRMSE, ratio to setting A, and net over each reference."""
    print(f"\n## Setting B by {title}: NRMSE D / f / D* and its ratio to setting A of the same method\n")
    print(f"| {title} (protocols) | method | D | f | D* | subset/A: D | subset/A: f | subset/A: D* |")
    print("|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for label, sel in groups:
        if not sel.any():
            continue
        protocols = int(np.unique(fb.block[sel]).size)
        row: dict[str, Any] = {"protocols": protocols}
        for m in methods:
            in_sub = [fb.nrmse(m, k, sel) for k in NRMSE_KEYS]
            ratio = [x / fa.nrmse(m, k) for x, k in zip(in_sub, NRMSE_KEYS)]
            row[m] = {"nrmse": dict(zip(NRMSE_KEYS, in_sub)), "ratio_to_a": dict(zip(NRMSE_KEYS, ratio))}
            print(f"| {label} ({protocols}) | {m} | {_cells(in_sub)} | {_cells(ratio)} |")
        row["net_over_bayes"] = {
            ref: {k: fb.nrmse("net", k, sel) / fb.nrmse(ref, k, sel) for k in NRMSE_KEYS} for ref in bayes
        }
        out[label] = row
    print(f"\nNRMSE net / bayes by {title} (D / f / D*):\n")
    print(f"| {title} | " + " | ".join(f"net / {ref}" for ref in bayes) + " |")
    print("|---|" + "---|" * len(bayes))
    for label, row in out.items():
        cells = [_triple([row["net_over_bayes"][ref][k] for k in NRMSE_KEYS]) for ref in bayes]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return out


def report(
    model: Path = DEFAULT_MODEL, n: int = 10000, points: int = POINTS, check_voxels: int = 1000, snr: float = SNR
) -> dict[str, Any]:
    """Print the reference's tables for the benchmark's setting A and B voxels (Gaussian, ``snr``) and return them."""
    t0 = time.perf_counter()
    estimators: dict[str, IvimEstimator] = dict(bayes_estimators(snr, points))
    estimators["net"] = IvimNetEstimator(cpu_session(model, threads=1))
    estimators["lsq-full"] = FullLsqEstimator()
    methods = list(estimators)
    bayes = [m for m in methods if m.startswith("bayes")]
    blocks_a = setting_a_blocks(n, snr)
    blocks_b = setting_b(n, snr, NoiseType.GAUSSIAN)
    fa, fb = fit_all(estimators, blocks_a), fit_all(estimators, blocks_b)
    fit_seconds = time.perf_counter() - t0
    print(f"# Bayes-optimal reference, SNR {snr:g}, Gaussian noise\n")
    print(
        f"Benchmark voxels (seed {BENCH_TEST_SEED}): setting A {n}, setting B {n} on {len(blocks_b)} random "
        f"protocols; grid {points}^3 = {points**3:,} points over the test ranges; model {model}.\n"
    )
    res: dict[str, Any] = {
        "snr": snr,
        "voxels": n,
        "grid_points_per_axis": points,
        "test_seed": BENCH_TEST_SEED,
        "nrmse": _nrmse_table(methods, fa, fb),
        "net_over_bayes": _excess_table(bayes, fa, fb),
        "reachable": _reachable_table(bayes, fa, fb),
        "by_k": _subset_table(
            "b-values", [(label, (fb.k >= lo) & (fb.k <= hi)) for label, lo, hi in K_BINS], methods, bayes, fa, fb
        ),
        "by_b0": _subset_table("b = 0", [("with", fb.b0), ("without", ~fb.b0)], methods, bayes, fa, fb),
    }
    if check_voxels > 0:
        t1 = time.perf_counter()
        # The same share of setting B's protocols, spread over all of them.
        every = max(1, n // check_voxels)
        first = check_voxels
        sub_a = [(b, sig[:first], Truth(t.d[:first], t.f[:first], t.dstar[:first])) for b, sig, t in blocks_a]
        check = grid_check(sub_a, blocks_b[::every], points, snr)
        res["grid_check"] = check
        print(
            f"\n## Grid check: relative change of NRMSE D / f / D* with {2 * points}^3 points instead of {points}^3 "
            f"(setting A: first {check_voxels} voxels; setting B: every {every}th protocol)\n"
        )
        print("| reference, setting | D | f | D* |")
        print("|---|---|---|---|")
        for name, change in check.items():
            print(f"| {name} | " + " | ".join(f"{v:+.2%}" for v in change.values()) + " |")
        res["grid_check_seconds"] = time.perf_counter() - t1
    res["fit_seconds"] = fit_seconds
    res["seconds"] = time.perf_counter() - t0
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\nTime: {res['seconds']:.0f} s ({fit_seconds:.0f} s for the tables); OMP_NUM_THREADS={threads}.")
    return res


#: Voxels per tissue the references are evaluated on (the first of the
#: benchmark's :data:`~pipelines.ivim.lab.bench.TISSUE_VOXELS`).
TISSUE_BAYES_VOXELS: int = 1000
#: Grid points per axis of each tissue's box in the mixture prior and the tissue's own prior.
TISSUE_POINTS: int = 30
#: Grid points per axis of the references with the Rician likelihood (ten times slower).
RICIAN_POINTS: int = 30
#: Parameters of the ranges, as ParamRanges names them, and their labels.
_RANGE_NAMES: tuple[tuple[str, str], ...] = (("d", "D"), ("f", "f"), ("dstar", "D*"))


def mixture_grid(tissues: Sequence[BodyTissue] = BODY_TISSUES, points: int = TISSUE_POINTS) -> PriorGrid:
    """The equal mixture of the tissues' uniform priors: each tissue's grid, ``points`` per axis, side by side.

    Every tissue contributes as many points, all of equal weight, so each
    tissue has prior weight ``1 / len(tissues)``, uniform within its box.
    """
    grids = [PriorGrid.uniform(t.ranges, points) for t in tissues]
    return PriorGrid(*(np.concatenate([getattr(g, a) for g in grids]) for a, _ in _RANGE_NAMES))


def outside_share(tissue: BodyTissue, ranges: ParamRanges = TEST_RANGES) -> dict[str, float]:
    """Share of each of the tissue's uniform ranges that lies outside ``ranges`` (and ``all``: of its box)."""
    out: dict[str, float] = {}
    inside = 1.0
    for name, _ in _RANGE_NAMES:
        (lo, hi), (rlo, rhi) = getattr(tissue.ranges, name), getattr(ranges, name)
        share = max(0.0, min(hi, rhi) - max(lo, rlo)) / (hi - lo)
        out[name] = 1.0 - share
        inside *= share
    out["all"] = 1.0 - inside
    return out


def tissue_estimators(
    tissue: BodyTissue, noise: NoiseType, points: int, tissue_points: int, rician_points: int, mixture: PriorGrid
) -> dict[str, BayesEstimator]:
    """The references of the tissue table for one tissue and noise type (see :func:`tissue_bayes_report`)."""
    test = PriorGrid.uniform(TEST_RANGES, points)
    own = PriorGrid.uniform(tissue.ranges, tissue_points)
    rician = noise is NoiseType.RICIAN
    ests = {
        "bayes-scale": BayesEstimator(TISSUE_SNR, S0Prior.SCALE, test),
        "bayes-known": BayesEstimator(TISSUE_SNR, S0Prior.KNOWN, test),
    }
    if rician:
        coarse = PriorGrid.uniform(TEST_RANGES, rician_points)
        ests["bayes-known-rician"] = BayesEstimator(TISSUE_SNR, S0Prior.KNOWN, coarse, rician=True)
    ests["mixture-scale"] = BayesEstimator(TISSUE_SNR, S0Prior.SCALE, mixture)
    ests["mixture-known"] = BayesEstimator(TISSUE_SNR, S0Prior.KNOWN, mixture)
    ests["tissue-known"] = BayesEstimator(TISSUE_SNR, S0Prior.KNOWN, own)
    if rician:
        ests["tissue-known-rician"] = BayesEstimator(TISSUE_SNR, S0Prior.KNOWN, own, rician=True)
    return ests


def _nrmse_of(p: IvimParams, truth: Truth, n: int) -> dict[str, float]:
    """NRMSE of D, f, D* on the first ``n`` voxels."""
    return {k: nrmse(getattr(p, _PARAM[k])[:n], getattr(truth, _PARAM[k])[:n]) for k in NRMSE_KEYS}


def tissue_bayes(
    model: Path = DEFAULT_MODEL,
    n_bench: int = TISSUE_VOXELS,
    n: int = TISSUE_BAYES_VOXELS,
    points: int = POINTS,
    tissue_points: int = TISSUE_POINTS,
    rician_points: int = RICIAN_POINTS,
    seed: int = BENCH_TEST_SEED,
) -> dict[str, Any]:
    """NRMSE per tissue of the network, both fits and the references, on the tissue benchmark's voxels.

    The voxels are :func:`~pipelines.ivim.lab.bench.tissue_benchmark`'s:
    ``n_bench`` per tissue from the stream ``[seed, 10, tissue index]``,
    Rician noise at SNR 20, and a Gaussian variant of the same draws (the
    simulator draws both quadrature channels for either noise, so the
    Gaussian voxels are the Rician ones' real channel). Everything is scored
    on the first ``n`` voxels of each tissue; the network and the fits also
    on all ``n_bench`` of the Rician ones, which must reproduce
    ``tissue_benchmark`` (checked, ``check_max_abs_diff``).

    Returns ``{"nrmse": {noise: {tissue: {method: {key: value}}}},
    "benchmark": {tissue: {method: {key: value}}}, ...}``.
    """
    t0 = time.perf_counter()
    net: IvimEstimator = IvimNetEstimator(cpu_session(model, threads=1))
    seg: IvimEstimator = SegmentedLsqEstimator()
    full: IvimEstimator = FullLsqEstimator()
    mixture = mixture_grid(BODY_TISSUES, tissue_points)
    res: dict[str, Any] = {"nrmse": {}, "benchmark": {}, "seconds": {}}
    for noise in (NoiseType.RICIAN, NoiseType.GAUSSIAN):
        per: dict[str, dict[str, dict[str, float]]] = {}
        for i, tissue in enumerate(BODY_TISSUES):
            rng = np.random.default_rng([seed, 10, i])
            sig, d, f, dstar = simulate_tissue(rng, tissue, n_bench, TISSUE_SNR, noise)
            truth = Truth(d, f, dstar)
            row: dict[str, dict[str, float]] = {}
            for name, est in (("net", net), ("lsq-segmented", seg), ("lsq-full", full)):
                fitted = est.fit(sig, tissue.protocol)
                row[name] = _nrmse_of(fitted, truth, n)
                if noise is NoiseType.RICIAN:
                    res["benchmark"].setdefault(tissue.name, {})[name] = _nrmse_of(fitted, truth, n_bench)
            row["best-lsq"] = {k: min(row["lsq-segmented"][k], row["lsq-full"][k]) for k in NRMSE_KEYS}
            for name, bayes in tissue_estimators(tissue, noise, points, tissue_points, rician_points, mixture).items():
                t0 = time.perf_counter()
                row[name] = _nrmse_of(bayes.fit(sig[:n], tissue.protocol), truth, n)
                key = f"{noise.value} {name}"
                res["seconds"][key] = res["seconds"].get(key, 0.0) + time.perf_counter() - t0
            per[tissue.name] = row
            logger.info("%s %s done", noise.value, tissue.name)
        res["nrmse"][noise.value] = per
    # The same voxels as the tissue benchmark: its own figures, recomputed.
    bench = tissue_benchmark(net, seg, full, n_bench, seed)
    res["check_max_abs_diff"] = max(
        abs(bench.per_tissue[t][m][k] - res["benchmark"][t][m][k])
        for t in bench.per_tissue
        for m in ("net", "lsq-segmented", "lsq-full")
        for k in NRMSE_KEYS
    )
    res["benchmark_ratio_net_over_best_lsq"] = bench.ratio
    res.update(voxels_drawn=n_bench, voxels=n, grid_points_per_axis=points, tissue_points=tissue_points)
    res.update(rician_points=rician_points, test_seed=seed, model=str(model))
    res["total_seconds"] = time.perf_counter() - t0
    return res


def _medians(per: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    methods = next(iter(per.values())).keys()
    return {m: {k: float(np.median([per[t][m][k] for t in per])) for k in NRMSE_KEYS} for m in methods}


def tissue_bayes_report(res: dict[str, Any]) -> dict[str, Any]:
    """Print :func:`tissue_bayes`'s figures against the best least-squares fit; return them with the summary."""
    n_bench, n, points = res["voxels_drawn"], res["voxels"], res["grid_points_per_axis"]
    tissue_points, rician_points, model = res["tissue_points"], res["rician_points"], res["model"]
    print(f"# Bayes-optimal references on the body tissues, SNR {TISSUE_SNR:g}\n")
    print(
        f"Voxels of the tissue benchmark (`bench --tissues`, seed {BENCH_TEST_SEED}, stream [seed, 10, tissue]): "
        f"{n_bench} per tissue drawn, all figures on the first {n} of each tissue. Rician: the benchmark's "
        "voxels; Gaussian: the same draws with Gaussian noise (their real channel). Model "
        f"{model}.\n"
    )
    print("References (posterior means; `known`: S0 = 1 known; `scale`: S0 unknown, prior dS0 / S0):\n")
    print(f"- bayes-scale, bayes-known: uniform prior over the test ranges {TEST_RANGES}, {points}^3 points;")
    print("  Gaussian likelihood, on the Rician voxels as is (a misspecified likelihood there);")
    print(f"- bayes-known-rician: the same prior, Rician likelihood, {rician_points}^3 points (Rician voxels only);")
    print(
        f"- mixture-scale, mixture-known: equal mixture of the {len(BODY_TISSUES)} tissues' uniform boxes, "
        f"{tissue_points}^3 points each: the best estimators (in mean squared error over the tissues) that do not "
        "know the tissue;"
    )
    print(
        f"- tissue-known (-rician): the tissue's own box, {tissue_points}^3 points, S0 known: knows the tissue, "
        "a bound for every estimator with the matching likelihood.\n"
    )
    print("## Tissue ranges outside the test ranges (share of each range; all: share of the tissue's box)\n")
    print("| tissue | D | f | D* | all |")
    print("|---|---|---|---|---|")
    outside = {t.name: outside_share(t) for t in BODY_TISSUES}
    for name, share in outside.items():
        if share["all"] > 0:
            print(f"| {name} | " + " | ".join(f"{share[a]:.0%}" for a, _ in _RANGE_NAMES) + f" | {share['all']:.0%} |")
    res["outside_test_ranges"] = outside
    summary: dict[str, Any] = {}
    for noise, per in res["nrmse"].items():
        methods = [m for m in next(iter(per.values())) if m not in ("lsq-segmented", "lsq-full", "best-lsq")]
        med = _medians(per)
        print(f"\n## {noise.capitalize()} noise: NRMSE D / f / D*, and its ratio to the best LSQ fit\n")
        print("| tissue | best LSQ | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods))
        for name, row in [*per.items(), ("**median**", med)]:
            cells = [_triple([row[m][k] for k in NRMSE_KEYS]) for m in ["best-lsq", *methods]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(
            f"\nRatio to the best LSQ fit per tissue; median row: median over tissues / median best LSQ "
            f"(the target: <= {TISSUE_RATIO_TARGET})\n"
        )
        print("| tissue | " + " | ".join(methods) + " |")
        print("|---|" + "---|" * len(methods))
        ratios = {m: {k: med[m][k] / med["best-lsq"][k] for k in NRMSE_KEYS} for m in methods}
        for name, row in per.items():
            cells = [_triple([row[m][k] / row["best-lsq"][k] for k in NRMSE_KEYS], ".2f") for m in methods]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| **median** | " + " | ".join(_triple([ratios[m][k] for k in NRMSE_KEYS]) for m in methods) + " |")
        summary[noise] = {"median": med, "median_ratio_to_best_lsq": ratios}
    res["summary"] = summary
    bench_ratio = res["benchmark_ratio_net_over_best_lsq"]
    print(
        f"\nThe tissue benchmark itself ({n_bench} voxels per tissue, Rician): net / best LSQ "
        f"{_triple([bench_ratio[k] for k in NRMSE_KEYS])}; network and fits recomputed here on its voxels "
        f"differ from it by at most {res['check_max_abs_diff']:.1e} in NRMSE."
    )
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\nTime: {res['total_seconds']:.0f} s (references: {seconds}); OMP_NUM_THREADS={threads}.")
    return res


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--voxels", type=int, default=10000, help="voxels of each setting (the benchmark's default)")
    p.add_argument("--points", type=int, default=POINTS, help="grid points per axis")
    p.add_argument(
        "--check-voxels", type=int, default=1000, help="voxels of each setting in the grid check; 0 skips it"
    )
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--tissues", action="store_true", help="the body tissues instead of settings A and B")
    p.add_argument(
        "--tissue-voxels", type=int, default=TISSUE_VOXELS, help="voxels per tissue drawn (the tissue benchmark's)"
    )
    p.add_argument(
        "--bayes-voxels", type=int, default=TISSUE_BAYES_VOXELS, help="voxels per tissue scored (the first drawn)"
    )
    p.add_argument("--tissue-points", type=int, default=TISSUE_POINTS, help="points per axis of each tissue's box")
    p.add_argument("--rician-points", type=int, default=RICIAN_POINTS, help="points per axis, Rician likelihood")
    args = p.parse_args(argv)
    if args.tissues:
        if args.bayes_voxels > args.tissue_voxels:
            p.error("--bayes-voxels must not exceed --tissue-voxels")
        res = tissue_bayes_report(
            tissue_bayes(
                args.model, args.tissue_voxels, args.bayes_voxels, args.points, args.tissue_points, args.rician_points
            )
        )
    else:
        res = report(args.model, args.voxels, args.points, args.check_voxels)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())

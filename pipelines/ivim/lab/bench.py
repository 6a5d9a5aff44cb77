"""Held-out benchmark of the IVIM network against least-squares baselines.

Usage::

    python -m pipelines.ivim.lab.bench [--model exported_models/ivim-net.onnx]
        [--retrain-seeds 5] [--retrain-steps N] [--voxels 10000]
        [--json-out FILE] [--manifest exported_models/ivim-net.json
        --train-log DIR/ivim-net.train.json] [--tissue-voxels 5000]
    python -m pipelines.ivim.lab.bench --tissues [--tissue-voxels 5000]

Setting A: the fixed protocol b = {0, 5, 10, 20, 30, 40, 60, 150, 300, 500,
700} s/mm², D ~ U[0.5, 3]e-3 mm²/s, f ~ U[0.05, 0.55], D* ~ U[0.01, 0.1]
mm²/s, S0 = 1, SNR in {15, 20, 30, 50} with sigma = S0 / SNR, Gaussian and
Rician noise, ``--voxels`` voxels per SNR and noise type, all drawn from
:data:`~pipelines.ivim.lab.signal.BENCH_TEST_SEED`, which no training run may
use. The network and both least-squares fits see the same voxels.

Setting B: the same parameter ranges on random protocols of 4 to 20 b-values
in [0, 1000] (the random branch of
:func:`~pipelines.ivim.lab.signal.sample_random_protocol`, the reference of
the model cards since 1.0.0), a fresh protocol for every block of 100 voxels;
the network's NRMSE is compared with setting A's at the same SNR and noise.
The same with b up to 1200 s/mm² is reported at SNR 20.

Uncertainty (:func:`uncertainty_report`): coverage of the network's 90 %
intervals at SNR 10, 20, 50, overall and per quartile of the true value, and
the AUROC of its standard deviations for voxels outside the training ranges.

Body tissues (:func:`tissue_report`, alone with ``--tissues``): twelve body
tissues of :mod:`pipelines.ivim.lab.tissues`, each with literature-like
ranges of D, f, D* and a clinical protocol of its own, Rician noise at SNR 20,
``--tissue-voxels`` voxels each; NRMSE per tissue of the network and both
least-squares fits, and the median over tissues against the best fit.

Throughput (:func:`throughput`): voxels per second of the network and of both
least-squares fits on one thread in the same run, and their ratios.

The spread over retrainings evaluates networks trained with seeds
1..``--retrain-seeds`` on the same voxels (trained into ``--retrain-dir`` if
not already there with the requested step budget).

This is a command-line script, so it prints its tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Throughput is reported for one thread, and the machine is shared. Set
# only when run as a script (BLAS reads these when numpy is imported), so
# that importing this module has no side effect.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipelines._lab import cpu_session, sha256_file  # noqa: E402
from pipelines._lab import write_manifest as write_model_manifest  # noqa: E402
from pipelines.ivim.infer import (  # noqa: E402
    B_MAX,
    K_MAX,
    K_MIN,
    LSQ_BOUNDS,
    MODEL,
    NET_BATCH,
    FullLsqEstimator,
    IvimEstimator,
    IvimNetEstimator,
    IvimParams,
    SegmentedLsqEstimator,
)
from pipelines.ivim.lab.calibration import (  # noqa: E402
    COVERAGE_RANGE,
    OUTSIDE_RANGES,
    SD_PARAMS,
    auroc,
    calibration_sets,
    coverage,
    errors,
    estimator_predictor,
    outside_sets,
)
from pipelines.ivim.lab.signal import (  # noqa: E402
    BENCH_TEST_SEED,
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
    ProtocolSampling,
    sample_random_protocol,
    simulate_protocol,
)
from pipelines.ivim.lab.tissues import BODY_TISSUES, TISSUE_SNR, BodyTissue, simulate_tissue  # noqa: E402

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

SNRS: tuple[int, ...] = (15, 20, 30, 50)
#: Targets of setting A at SNR 20 (same keys as the manifest's thresholds).
THRESHOLDS: dict[str, float] = {
    "nrmse_d": 0.18,
    "nrmse_f": 0.22,
    "nrmse_dstar": 0.39,
    "abs_rho_dstar_f": 0.22,
}
#: Setting B may be at most this factor worse than setting A.
SETTING_B_MAX_RATIO: float = 1.10
#: The network must beat least squares at every SNR up to this.
BEAT_LSQ_MAX_SNR: int = 30
#: Voxels per random protocol in setting B.
SETTING_B_BLOCK: int = 100
#: The network must be at least this many times faster than lsq-full on one
#: thread (measured in the same run; the absolute target is 200,000 voxels/s).
SPEED_RATIO_MIN: float = 20.0
#: Voxels of the throughput measurement and its repetitions (the best counts).
SPEED_VOXELS: int = 200_000
SPEED_REPEATS: int = 3
#: SNR of the out-of-range (AUROC) check, and the AUROC it must reach.
OUTSIDE_SNRS: tuple[int, ...] = (10, 20, 50)
AUROC_MIN: float = 0.7
#: The NRMSE figures of the tissue benchmark.
NRMSE_KEYS: tuple[str, ...] = ("nrmse_d", "nrmse_f", "nrmse_dstar")
#: Issue 15's target on body tissues: the median NRMSE over tissues of each
#: of D, f, D* at most this times that of the best least-squares fit.
TISSUE_RATIO_TARGET: float = 0.5
#: What the model card states and the tests check for the same ratio. The
#: exported model misses the target for D (0.66) and f (0.62) and meets it for
#: D* (0.27); these limits are its figures plus about 0.06, four standard
#: deviations of the ratio over seeds with the tests' 1,000 voxels a tissue
#: (D 0.015, f 0.012, D* 0.008); a model 10 % worse in D or f (20 % in D*) fails.
TISSUE_RATIO_MAX: dict[str, float] = {"nrmse_d": 0.72, "nrmse_f": 0.68, "nrmse_dstar": 0.33}
#: Voxels per tissue: the least-squares fits are vectorised (lsq-full about
#: 9,000 voxels/s on one thread), so the twelve tissues take about 20 s.
TISSUE_VOXELS: int = 5000
DEFAULT_MODEL = Path("exported_models/ivim-net.onnx")
#: Version of the exported model (2: protocol-conditioned network with uncertainty).
MODEL_VERSION = "2.0.0"
DEFAULT_RETRAIN_DIR = Path("/tmp/ivim-retrain")


def nrmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square error divided by the mean true value."""
    e = np.asarray(estimate, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    return float(np.sqrt(np.mean((e - t) ** 2)) / np.mean(t))


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (bounded fits produce ties at the bounds)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def abs_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Absolute Spearman rank correlation (0 if either input is constant)."""
    ra = _rankdata(np.asarray(a, dtype=np.float64).ravel())
    rb = _rankdata(np.asarray(b, dtype=np.float64).ravel())
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
    return float(abs(np.sum(ra * rb) / den)) if den > 0 else 0.0


@dataclass
class Truth:
    """True parameters of a set of test voxels."""

    d: np.ndarray
    f: np.ndarray
    dstar: np.ndarray


def score(p: IvimParams, truth: Truth) -> dict[str, float]:
    """NRMSE of D, f, D* and absolute Spearman correlations of the estimates."""
    return {
        "nrmse_d": nrmse(p.d, truth.d),
        "nrmse_f": nrmse(p.f, truth.f),
        "nrmse_dstar": nrmse(p.dstar, truth.dstar),
        "abs_rho_d_dstar": abs_spearman(p.d, p.dstar),
        "abs_rho_d_f": abs_spearman(p.d, p.f),
        "abs_rho_dstar_f": abs_spearman(p.dstar, p.f),
    }


def setting_a(n: int, snr: float, noise: NoiseType, seed: int = BENCH_TEST_SEED) -> tuple[np.ndarray, Truth]:
    """Held-out setting A voxels for one SNR and noise type."""
    rng = np.random.default_rng([seed, 0, list(NoiseType).index(noise), int(snr)])
    sig, d, f, dstar, _ = simulate_protocol(rng, SETTING_A_BVALUES, n, snr, noise, TEST_RANGES)
    return sig, Truth(d, f, dstar)


def setting_b(
    n: int, snr: float, noise: NoiseType, seed: int = BENCH_TEST_SEED
) -> list[tuple[np.ndarray, np.ndarray, Truth]]:
    """Held-out setting B blocks ``(bvalues, signals, truth)``, random protocols."""
    rng = np.random.default_rng([seed, 1, list(NoiseType).index(noise), int(snr)])
    sampling = ProtocolSampling()
    blocks = []
    for start in range(0, n, SETTING_B_BLOCK):
        m = min(SETTING_B_BLOCK, n - start)
        b = sample_random_protocol(rng, sampling)
        sig, d, f, dstar, _ = simulate_protocol(rng, b, m, snr, noise, TEST_RANGES)
        blocks.append((b, sig, Truth(d, f, dstar)))
    return blocks


def fit_blocks(est: IvimEstimator, blocks: list[tuple[np.ndarray, np.ndarray, Truth]]) -> tuple[IvimParams, Truth]:
    """Fit each block with its own protocol and concatenate results and truths."""
    ps = [est.fit(sig, b) for b, sig, _ in blocks]

    def cat(name: str, xs: list) -> np.ndarray:
        return np.concatenate([getattr(x, name) for x in xs])

    keys = ["d", "dstar", "f", "s0"] + (["d_sd", "dstar_sd", "f_sd"] if ps[0].d_sd is not None else [])
    params = IvimParams(*(cat(k, ps) for k in keys))
    truths = [t for _, _, t in blocks]
    return params, Truth(cat("d", truths), cat("f", truths), cat("dstar", truths))


def uncertainty_report(
    net: IvimNetEstimator, n: int, seed: int = BENCH_TEST_SEED
) -> tuple[dict[str, Any], list[tuple[str, bool]]]:
    """Coverage of the 90 % intervals and the out-of-range AUROC, printed as tables.

    Coverage: :func:`~pipelines.ivim.lab.calibration.calibration_sets` from
    ``seed`` (setting A and random protocols, Gaussian and Rician, SNR 10,
    20, 50; ``n`` voxels each), overall and per quartile of the true value;
    every figure must lie in :data:`~pipelines.ivim.lab.calibration.COVERAGE_RANGE`.
    AUROC: each parameter's standard deviation telling random-protocol
    voxels with that parameter in
    :data:`~pipelines.ivim.lab.calibration.OUTSIDE_RANGES` from voxels in the
    test ranges, at :data:`OUTSIDE_SNRS`.
    """
    predict = estimator_predictor(net)
    groups: dict[str, list[Any]] = {}
    for label, vs in calibration_sets(seed, n):
        groups.setdefault(label, []).append(vs)
    lo, hi = COVERAGE_RANGE
    results: dict[str, Any] = {"coverage": {}, "auroc": {}, "mean_sd_inside": {}, "mean_sd_outside": {}}
    checks: list[tuple[str, bool]] = []
    print("## Uncertainty: coverage of the nominal 90 % interval (estimate ± 1.645 sd)\n")
    print(
        f"Test seed {seed}, {n} voxels per row; each cell: overall coverage "
        "(lowest-highest of the four quartiles of the true value).\n"
    )
    print("| setting, noise, SNR | D | D* | f |")
    print("|---|---|---|---|")
    for label, sets in groups.items():
        e = errors(predict, sets)
        cov = {p: coverage(e, p) for p in SD_PARAMS}
        results["coverage"][label] = cov
        cells = []
        for p in SD_PARAMS:
            qs = [cov[p][f"q{i}"] for i in range(1, 5)]
            cells.append(f"{cov[p]['all']:.3f} ({min(qs):.3f}-{max(qs):.3f})")
            ok = all(lo <= v <= hi for v in cov[p].values())
            checks.append((f"coverage {label} {p}: overall and every quartile in [{lo}, {hi}]", ok))
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n## Uncertainty: out-of-range voxels\n")
    print(
        "AUROC of each parameter's sd telling voxels with that parameter outside the training ranges "
        f"({', '.join(f'{p} {OUTSIDE_RANGES[p]}' for p in SD_PARAMS)}) from voxels in the test ranges; "
        f"random protocols, Gaussian noise, {n} voxels each.\n"
    )
    print("| SNR | D | D* | f |")
    print("|---|---|---|---|")
    for snr in OUTSIDE_SNRS:
        row = {}
        for p in SD_PARAMS:
            inside, outside = outside_sets(seed, n, snr, p)
            e_in, e_out = errors(predict, inside), errors(predict, outside)
            row[p] = auroc(e_in.sd[p], e_out.sd[p])
            results["mean_sd_inside"][f"{p}_snr{snr}"] = float(np.mean(e_in.sd[p]))
            results["mean_sd_outside"][f"{p}_snr{snr}"] = float(np.mean(e_out.sd[p]))
            checks.append((f"out-of-range SNR {snr} {p}: AUROC {row[p]:.3f} >= {AUROC_MIN}", row[p] >= AUROC_MIN))
        results["auroc"][str(snr)] = row
        print(f"| {snr} | " + " | ".join(f"{row[p]:.3f}" for p in SD_PARAMS) + " |")
    print()
    return results, checks


def throughput(
    net: IvimNetEstimator, seg: SegmentedLsqEstimator, full: FullLsqEstimator
) -> dict[str, float]:
    """Voxels per second of the three estimators on one thread, on the same setting A voxels.

    The network runs :data:`SPEED_VOXELS` voxels (where per-call overhead does
    not matter), the best of :data:`SPEED_REPEATS` runs; the least-squares
    fits, being slower, run a tenth of them once each.
    """
    big, _ = setting_a(SPEED_VOXELS, 20, NoiseType.GAUSSIAN, seed=BENCH_TEST_SEED + 1)
    rates = {}
    for name, est, voxels, repeats in (
        ("net", net, big, SPEED_REPEATS),
        ("lsq-segmented", seg, big[: SPEED_VOXELS // 10], 1),
        ("lsq-full", full, big[: SPEED_VOXELS // 10], 1),
    ):
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            est.fit(voxels, SETTING_A_BVALUES)
            best = min(best, time.perf_counter() - t0)
        rates[name] = voxels.shape[0] / best
    return rates


def speed_report(
    net: IvimNetEstimator, seg: SegmentedLsqEstimator, full: FullLsqEstimator
) -> tuple[dict[str, Any], list[tuple[str, bool]]]:
    """Print the throughput section; return its results and its checks (speed ratio, 200,000 voxels/s)."""
    rates = throughput(net, seg, full)
    ratio_full = rates["net"] / rates["lsq-full"]
    ratio_seg = rates["net"] / rates["lsq-segmented"]
    print("## Throughput (CPU, 1 thread, setting A)\n")
    for k, v in rates.items():
        print(f"- {k}: {v:,.0f} voxels/s")
    print(f"- net / lsq-full: {ratio_full:.1f}x; net / lsq-segmented: {ratio_seg:.1f}x")
    results = {
        "voxels_per_second_1_thread": rates,
        "speed_ratio": {"net_over_lsq_full": ratio_full, "net_over_lsq_segmented": ratio_seg},
    }
    checks = [
        (f"throughput: net {ratio_full:.1f}x lsq-full >= {SPEED_RATIO_MIN:g}x", ratio_full >= SPEED_RATIO_MIN),
        (f"throughput: net {rates['net']:,.0f} voxels/s >= 200,000 on one thread", rates["net"] >= 2e5),
    ]
    return results, checks


@dataclass
class TissueResult:
    """NRMSE of each estimator on each body tissue, and the summary the target is judged on.

    Attributes
    ----------
    per_tissue : dict
        ``{tissue: {method: {nrmse key: value}}}`` for the methods ``net``,
        ``lsq-segmented``, ``lsq-full`` and ``best-lsq`` (per parameter the
        lower of the two fits on that tissue).
    best_method : dict
        ``{tissue: {nrmse key: "lsq-segmented" or "lsq-full"}}``: which fit
        ``best-lsq`` took.
    median : dict
        ``{method: {nrmse key: median over tissues}}``, same methods.
    ratio : dict
        ``{nrmse key: median net / median best-lsq}``: the figure of the
        target.
    """

    per_tissue: dict[str, dict[str, dict[str, float]]]
    best_method: dict[str, dict[str, str]]
    median: dict[str, dict[str, float]]
    ratio: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """Return the figures as a JSON-friendly dict."""
        return {
            "per_tissue": self.per_tissue,
            "best_lsq_method": self.best_method,
            "median": self.median,
            "median_ratio_net_over_best_lsq": self.ratio,
        }


def tissue_benchmark(
    net: IvimEstimator,
    seg: IvimEstimator,
    full: IvimEstimator,
    n: int = TISSUE_VOXELS,
    seed: int = BENCH_TEST_SEED,
    tissues: tuple[BodyTissue, ...] = BODY_TISSUES,
) -> TissueResult:
    """Score the network and both least-squares fits on body tissues, each on its own protocol.

    ``n`` voxels per tissue from ``numpy.random.default_rng([seed, 10, i])``
    (``i`` the tissue's index in ``tissues``), uniform in the tissue's ranges,
    Rician noise at SNR 20 (:func:`~pipelines.ivim.lab.tissues.simulate_tissue`).
    The three estimators see the same voxels. The best least-squares fit is
    taken per tissue and parameter, so its median over tissues is no higher
    than either fit's: the strictest reading of the target.
    """
    per: dict[str, dict[str, dict[str, float]]] = {}
    best_method: dict[str, dict[str, str]] = {}
    lsq = ("lsq-segmented", "lsq-full")
    for i, tissue in enumerate(tissues):
        sig, d, f, dstar = simulate_tissue(np.random.default_rng([seed, 10, i]), tissue, n)
        truth = Truth(d, f, dstar)
        row = {}
        for name, est in (("net", net), (lsq[0], seg), (lsq[1], full)):
            m = score(est.fit(sig, tissue.protocol), truth)
            row[name] = {k: m[k] for k in NRMSE_KEYS}
        best_method[tissue.name] = {k: min(lsq, key=lambda name: row[name][k]) for k in NRMSE_KEYS}
        row["best-lsq"] = {k: row[best_method[tissue.name][k]][k] for k in NRMSE_KEYS}
        per[tissue.name] = row
    median = {
        name: {k: float(np.median([per[t][name][k] for t in per])) for k in NRMSE_KEYS}
        for name in ("net", *lsq, "best-lsq")
    }
    ratio = {k: median["net"][k] / median["best-lsq"][k] for k in NRMSE_KEYS}
    return TissueResult(per, best_method, median, ratio)


def tissue_checks(result: TissueResult) -> list[tuple[str, bool]]:
    """The issue's target and the tested threshold of the model card, one check per parameter."""
    checks = []
    for k in NRMSE_KEYS:
        r = result.ratio[k]
        for limit, what in ((TISSUE_RATIO_TARGET, "issue target"), (TISSUE_RATIO_MAX[k], "tested threshold")):
            checks.append((f"tissues: median {k} net / best LSQ = {r:.3f} <= {limit} ({what})", r <= limit))
    return checks


def tissue_report(
    net: IvimEstimator, seg: IvimEstimator, full: IvimEstimator, n: int, seed: int = BENCH_TEST_SEED
) -> tuple[TissueResult, list[tuple[str, bool]]]:
    """Run :func:`tissue_benchmark` and print the tissues, the per-tissue table and the medians."""
    result = tissue_benchmark(net, seg, full, n, seed)
    short = {"lsq-segmented": "seg", "lsq-full": "full"}
    print(f"## Body tissues, each on its own protocol (Rician noise, SNR {TISSUE_SNR:g})\n")
    print(f"Test seed {seed}, {n} voxels per tissue, parameters uniform in the ranges; D, D* in 1e-3 mm2/s.\n")
    print("| tissue | D | f | D* | b-values (s/mm2) |")
    print("|---|---|---|---|---|")
    for t in BODY_TISSUES:
        r = t.ranges
        print(
            f"| {t.name} | {r.d[0] * 1e3:g}-{r.d[1] * 1e3:g} | {r.f[0]:g}-{r.f[1]:g} "
            f"| {r.dstar[0] * 1e3:g}-{r.dstar[1] * 1e3:g} | {', '.join(f'{b:g}' for b in t.bvalues)} |"
        )
    print("\nNRMSE of D / f / D*; best LSQ is the lower of the two fits per tissue and parameter.\n")
    print("| tissue | net | lsq-segmented | lsq-full | best LSQ | net / best LSQ |")
    print("|---|---|---|---|---|---|")

    def cells(m: dict[str, float]) -> str:
        return " / ".join(f"{m[k]:.3f}" for k in NRMSE_KEYS)

    for name, row in result.per_tissue.items():
        best = " / ".join(f"{row['best-lsq'][k]:.3f} {short[result.best_method[name][k]]}" for k in NRMSE_KEYS)
        ratio = " / ".join(f"{row['net'][k] / row['best-lsq'][k]:.2f}" for k in NRMSE_KEYS)
        lsq = f"{cells(row['lsq-segmented'])} | {cells(row['lsq-full'])}"
        print(f"| {name} | {cells(row['net'])} | {lsq} | {best} | {ratio} |")
    med = result.median
    ratio = " / ".join(f"{result.ratio[k]:.3f}" for k in NRMSE_KEYS)
    print(
        f"| **median** | {cells(med['net'])} | {cells(med['lsq-segmented'])} | {cells(med['lsq-full'])} "
        f"| {cells(med['best-lsq'])} | {ratio} |\n"
    )
    return result, tissue_checks(result)


def _retrain(seeds: list[int], steps: int | None, out_dir: Path) -> list[Path]:
    """Return model paths for ``seeds``, training (sequentially) those missing."""
    from pipelines.ivim.lab.train import TrainConfig  # torch only when training

    want = steps or TrainConfig.steps
    paths = []
    for seed in seeds:
        d = out_dir / f"seed_{seed}"
        onnx_path = d / "ivim-net.onnx"
        log_path = d / "ivim-net.train.json"
        have = None
        if onnx_path.exists() and log_path.exists():
            have = json.loads(log_path.read_text())["config"]["steps"]
        if have != want:
            print(f"training seed {seed} ({want} steps) into {d} ...", flush=True)
            cmd = [
                sys.executable,
                "-m",
                "pipelines.ivim.lab.train",
                "--seed",
                str(seed),
                "--out",
                str(d),
                "--steps",
                str(want),
            ]
            subprocess.run(cmd, check=True)
        paths.append(onnx_path)
    return paths


def _fmt_row(name: str, m: dict[str, float]) -> str:
    keys = ["nrmse_d", "nrmse_f", "nrmse_dstar", "abs_rho_d_dstar", "abs_rho_d_f", "abs_rho_dstar_f"]
    return f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |"


_HEADER = (
    "| method | NRMSE D | NRMSE f | NRMSE D* | abs rho(D,D*) | abs rho(D,f) | abs rho(f,D*) |\n"
    "|---|---|---|---|---|---|---|"
)


def write_manifest(model: Path, manifest: Path, metrics: dict[str, Any], train_log: dict[str, Any]) -> None:
    """Write the machine-readable manifest of the exported model (:func:`pipelines._lab.write_manifest`).

    The keys follow the order of the committed ``exported_models/ivim-net.json``.

    Parameters
    ----------
    model : pathlib.Path
        The ``.onnx`` file (the manifest names it relative to its folder).
    manifest : pathlib.Path
        Destination JSON.
    metrics : dict
        Held-out figures from this benchmark.
    train_log : dict
        The ``ivim-net.train.json`` written by the training run of ``model``.
    """
    from pipelines.ivim.lab.net import (
        B_LOG_MAX,
        B_LOG_SCALE,
        B_SCALE,
        CHANNELS,
        DEPTH,
        MAX_POOL_FILL,
        OUTPUT_BOUNDS,
        OUTPUT_NAMES,
        REF_EPS,
        SD_NAMES,
        SD_WIDTH,
        WIDTH,
    )

    cfg = train_log["config"]
    write_model_manifest(
        model,
        manifest,
        MODEL,
        MODEL_VERSION,
        architecture={
            "kind": "protocol encoder (masked set network over the b-values) generating a per-voxel MLP",
            "per_voxel_mlp": f"[x, log x, sqrt x, x^2] of {K_MAX} entries = {CHANNELS * K_MAX} -> {WIDTH} "
            f"(generated weights), {DEPTH} residual {WIDTH} -> {WIDTH} layers (FiLM folded into the weights), "
            f"-> 4 sigmoids; SiLU",
            "sd_branch": f"{CHANNELS * K_MAX} -> {SD_WIDTH} (generated), [that, detached trunk features, misfit] "
            f"{WIDTH + SD_WIDTH + 1} -> {SD_WIDTH} -> 3 log-variances; NLL on detached inputs",
            "width": WIDTH,
            "depth": DEPTH,
            "parameters": train_log.get("parameters"),
        },
        preprocessing={
            "k_max": K_MAX,
            "k_min": K_MIN,
            "b_range_s_per_mm2": [0.0, B_MAX],
            "padding": "entries beyond the protocol: signal 0, bvalues 0, mask 0",
            "protocol_inputs": "bvalues and mask are [1, k_max]: one protocol per call, shared by all N voxels",
            "mask": "1 = valid entry, 0 = padding",
            "repeated_bvalues": "averaged before padding (pipelines.ivim.infer.merge_repeated_bvalues)",
            "order": "any (the network is permutation invariant)",
            "bvalues_unit": "s/mm2, raw (the graph divides by b_scale)",
            "b_scale": B_SCALE,
            "b_log_features": f"log1p(b / {B_LOG_SCALE}) / log1p({B_LOG_MAX} / {B_LOG_SCALE}), inside the graph",
            "signal_reference": "max of the valid signals, inside the graph",
            "signal_reference_min": REF_EPS,
            "signal_normalisation": "signal / reference, inside the graph",
            "max_pool_fill": MAX_POOL_FILL,
            "output_columns": list(OUTPUT_NAMES),
            "output_units": {"d": "mm2/s", "dstar": "mm2/s", "f": "1", "s0": "signal units"},
            "sd_columns": list(SD_NAMES),
            "sd_units": {"d": "mm2/s", "dstar": "mm2/s", "f": "1"},
            "sd_meaning": "calibrated standard deviation of the estimate's error; nominal 90 % interval = "
            "estimate +/- 1.645 sd",
            "sd_calibration_factors": train_log["sd_calibration"],
            "sd_calibration_data": train_log["calibration"],
            "output_bounds": {
                "d": [round(v, 10) for v in OUTPUT_BOUNDS[0]],
                "dstar": [round(v, 10) for v in OUTPUT_BOUNDS[1]],
                "f": [round(v, 10) for v in OUTPUT_BOUNDS[2]],
                "s0_over_reference": [round(v, 10) for v in OUTPUT_BOUNDS[3]],
            },
        },
        training={
            "command": train_log["command"],
            "seed": cfg["seed"],
            "steps": cfg["steps"],
            "batch": cfg["batch"],
            "train_seconds_single_thread": train_log["train_seconds"],
            "torch": train_log["torch_version"],
            "data_generator": "pipelines.ivim.lab.signal",
            "parameters": train_log["distribution"],
            "loss": "MSE of parameters normalised to the output bounds, weights D, D*, f, S0 = "
            + ", ".join(str(w) for w in cfg["loss_weights"])
            + "; plus Gaussian NLL of that error (D, D*, f) for the sd branch, on detached features",
            "onnx_max_abs_diff_vs_torch": train_log["onnx_max_abs_diff"],
        },
        metrics=metrics,
        thresholds={
            "setting_a_snr20": dict(THRESHOLDS),
            "speed_ratio_min_vs_lsq_full": SPEED_RATIO_MIN,
            "coverage_90_range": list(COVERAGE_RANGE),
            "outside_auroc_min": AUROC_MIN,
            "tissues_median_ratio_target": TISSUE_RATIO_TARGET,
            "tissues_median_ratio_max": dict(TISSUE_RATIO_MAX),
        },
    )


def _print_checks(checks: list[tuple[str, bool]]) -> bool:
    """Print one PASS/FAIL line per check and the overall verdict; True if all pass."""
    print("\n## Checks\n")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    all_ok = all(ok for _, ok in checks)
    print(f"\nOVERALL: {'PASS' if all_ok else 'FAIL'}")
    return all_ok


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--retrain-seeds", type=int, default=5, help="0 to skip the spread over seeds")
    p.add_argument("--retrain-steps", type=int, default=None, help="default: the training default")
    p.add_argument("--retrain-dir", type=Path, default=DEFAULT_RETRAIN_DIR)
    p.add_argument("--voxels", type=int, default=10000)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--manifest", type=Path, default=None)
    p.add_argument("--train-log", type=Path, default=None)
    p.add_argument("--tissues", action="store_true", help="run only the body-tissue benchmark")
    p.add_argument("--speed", action="store_true", help="run only the throughput measurement")
    p.add_argument("--tissue-voxels", type=int, default=TISSUE_VOXELS, help="voxels per body tissue")
    args = p.parse_args(argv)
    if args.manifest is not None and args.train_log is None:
        p.error("--manifest needs --train-log")
    for only in ("tissues", "speed"):
        if getattr(args, only) and (
            args.manifest is not None or args.retrain_seeds != p.get_default("retrain_seeds")
        ):
            p.error(f"--{only} runs one part of the benchmark only: no --manifest or --retrain-seeds")
    if args.tissues and args.speed:
        p.error("--tissues and --speed each run one part: choose one")
    n = args.voxels
    net = IvimNetEstimator(cpu_session(args.model, threads=1))
    seg, full = SegmentedLsqEstimator(), FullLsqEstimator()
    print(f"model {args.model} sha256 {sha256_file(args.model)}")
    if args.tissues:
        print(f"onnxruntime CPU, 1 thread; LSQ bounds: {LSQ_BOUNDS}\n")
        tissue_result, tissue_only = tissue_report(net, seg, full, args.tissue_voxels)
        all_ok = _print_checks(tissue_only)
        if args.json_out is not None:
            out = tissue_result.as_dict() | {"test_seed": BENCH_TEST_SEED, "voxels_per_tissue": args.tissue_voxels}
            args.json_out.write_text(json.dumps(out, indent=2) + "\n")
        return 0 if all_ok else 1
    if args.speed:
        print(f"onnxruntime CPU, 1 thread; {NET_BATCH} voxels per call\n")
        speed, speed_checks = speed_report(net, seg, full)
        all_ok = _print_checks(speed_checks)
        if args.json_out is not None:
            args.json_out.write_text(json.dumps(speed, indent=2) + "\n")
        return 0 if all_ok else 1
    print(f"test seed {BENCH_TEST_SEED}; {n} voxels per SNR and noise type; onnxruntime CPU, 1 thread")
    print(f"LSQ bounds: {LSQ_BOUNDS}\n")

    others: list[IvimNetEstimator] = []
    steps_note = ""
    if args.retrain_seeds > 0:
        from pipelines.ivim.lab.train import TrainConfig

        steps = args.retrain_steps or TrainConfig.steps
        steps_note = f"{args.retrain_seeds} retrainings, seeds 1..{args.retrain_seeds}, {steps} steps each" + (
            "" if steps == TrainConfig.steps else f" (REDUCED from the default {TrainConfig.steps})"
        )
        paths = _retrain(list(range(1, args.retrain_seeds + 1)), steps, args.retrain_dir)
        others = [IvimNetEstimator(cpu_session(pth, threads=1)) for pth in paths]

    results: dict[str, Any] = {"setting_a": {}, "setting_b": {}, "seeds": {}}
    checks: list[tuple[str, bool]] = []
    for noise in NoiseType:
        print(f"## Setting A, {noise.value} noise\n")
        res_a: dict[str, dict[str, dict[str, float]]] = {}
        for snr in SNRS:
            sig, truth = setting_a(n, snr, noise)
            row = {}
            for name, est in (("net", net), ("lsq-segmented", seg), ("lsq-full", full)):
                prm = est.fit(sig, SETTING_A_BVALUES)
                row[name] = score(prm, truth)
            if others:
                seed_scores = [score(o.fit(sig, SETTING_A_BVALUES), truth) for o in others]
                row["seeds_mean"] = {k: float(np.mean([s[k] for s in seed_scores])) for k in seed_scores[0]}
                row["seeds_std"] = {k: float(np.std([s[k] for s in seed_scores], ddof=1)) for k in seed_scores[0]}
                results["seeds"][f"{noise.value}_snr{snr}"] = seed_scores
            res_a[str(snr)] = row
            print(f"### SNR {snr}\n")
            print(_HEADER)
            for name in ("net", "lsq-segmented", "lsq-full"):
                print(_fmt_row(name, row[name]))
            if others:
                keys = ["nrmse_d", "nrmse_f", "nrmse_dstar", "abs_rho_d_dstar", "abs_rho_d_f", "abs_rho_dstar_f"]
                cells = " | ".join(f"{row['seeds_mean'][k]:.3f} ± {row['seeds_std'][k]:.3f}" for k in keys)
                print(f"| net, {len(others)} seeds (mean ± std) | {cells} |")
            print()
        results["setting_a"][noise.value] = res_a
        m20 = res_a["20"]["net"]
        for key, thr in THRESHOLDS.items():
            checks.append((f"setting A {noise.value} SNR 20 {key} = {m20[key]:.3f} <= {thr}", m20[key] <= thr))
        for snr in SNRS:
            if snr > BEAT_LSQ_MAX_SNR:
                continue
            r = res_a[str(snr)]
            ok = all(
                r["net"][k] < min(r["lsq-segmented"][k], r["lsq-full"][k])
                for k in ("nrmse_d", "nrmse_f", "nrmse_dstar")
            )
            checks.append((f"setting A {noise.value} SNR {snr}: net NRMSE below both LSQ fits (D, f, D*)", ok))

        print(f"## Setting B (random protocols, 4-20 b-values), {noise.value} noise\n")
        print("Network NRMSE, its ratio to setting A at the same SNR, and for context the same ratio of lsq-full.\n")
        print(
            "| SNR | NRMSE D | NRMSE f | NRMSE D* | ratio B/A D | ratio B/A f | ratio B/A D* "
            "| lsq-full ratio B/A D, f, D* |"
        )
        print("|---|---|---|---|---|---|---|---|")
        res_b: dict[str, dict[str, Any]] = {}
        nr_keys = ("nrmse_d", "nrmse_f", "nrmse_dstar")
        for snr in SNRS:
            blocks = setting_b(n, snr, noise)
            prm, truth = fit_blocks(net, blocks)
            mb = score(prm, truth)
            ma = res_a[str(snr)]["net"]
            ratio = {k: mb[k] / ma[k] for k in nr_keys}
            lsq_b = score(*fit_blocks(full, blocks))
            lsq_ratio = {k: lsq_b[k] / res_a[str(snr)]["lsq-full"][k] for k in nr_keys}
            by_k: dict[str, dict[str, float]] = {}
            for label, lo, hi in (("k4-7", 4, 7), ("k8-13", 8, 13), ("k14-20", 14, 20)):
                sel = [blk for blk in blocks if lo <= blk[0].size <= hi]
                if sel:
                    mk = score(*fit_blocks(net, sel))
                    by_k[label] = {k: mk[k] for k in nr_keys} | {"protocols": len(sel)}
            res_b[str(snr)] = {"net": mb, "ratio_to_a": ratio, "lsq_full_ratio_to_a": lsq_ratio, "net_by_k": by_k}
            print(
                f"| {snr} | {mb['nrmse_d']:.3f} | {mb['nrmse_f']:.3f} | {mb['nrmse_dstar']:.3f} | "
                f"{ratio['nrmse_d']:.3f} | {ratio['nrmse_f']:.3f} | {ratio['nrmse_dstar']:.3f} | "
                + ", ".join(f"{lsq_ratio[k]:.2f}" for k in nr_keys)
                + " |"
            )
            ok = all(v <= SETTING_B_MAX_RATIO for v in ratio.values())
            text = f"setting B {noise.value} SNR {snr}: NRMSE within {SETTING_B_MAX_RATIO:.2f}x of setting A"
            checks.append((text, ok))
        print("\nNetwork NRMSE in setting B by number of b-values (SNR 20):\n")
        print("| b-values | protocols | NRMSE D | NRMSE f | NRMSE D* |")
        print("|---|---|---|---|---|")
        for label, mk in res_b["20"]["net_by_k"].items():
            print(
                f"| {label[1:]} | {mk['protocols']} | {mk['nrmse_d']:.3f} | {mk['nrmse_f']:.3f} "
                f"| {mk['nrmse_dstar']:.3f} |"
            )
        results["setting_b"][noise.value] = res_b
        print()

    # Protocols reaching b = 1200 s/mm2, which the network accepts since 2.0.0.
    print("## Setting B with b up to 1200 s/mm2, SNR 20\n")
    print("| noise | NRMSE D | NRMSE f | NRMSE D* | ratio to setting B (b <= 1000) D, f, D* |")
    print("|---|---|---|---|---|")
    results["setting_b1200"] = {}
    for noise in NoiseType:
        rng = np.random.default_rng([BENCH_TEST_SEED, 2, list(NoiseType).index(noise), 20])
        blocks = []
        for _ in range(0, n, SETTING_B_BLOCK):
            b = sample_random_protocol(rng, ProtocolSampling(b_max=B_MAX))
            sig, d, f, dstar, _ = simulate_protocol(rng, b, SETTING_B_BLOCK, 20.0, noise, TEST_RANGES)
            blocks.append((b, sig, Truth(d, f, dstar)))
        m12 = score(*fit_blocks(net, blocks))
        ref = results["setting_b"][noise.value]["20"]["net"]
        results["setting_b1200"][noise.value] = m12
        print(
            f"| {noise.value} | {m12['nrmse_d']:.3f} | {m12['nrmse_f']:.3f} | {m12['nrmse_dstar']:.3f} | "
            + ", ".join(f"{m12[k] / ref[k]:.2f}" for k in ("nrmse_d", "nrmse_f", "nrmse_dstar"))
            + " |"
        )
    print()

    unc, unc_checks = uncertainty_report(net, n)
    results["uncertainty"] = unc
    checks += unc_checks

    tissue_result, tissue_only = tissue_report(net, seg, full, args.tissue_voxels)
    results["tissues"] = tissue_result.as_dict() | {"voxels_per_tissue": args.tissue_voxels}
    checks += tissue_only

    speed, speed_checks = speed_report(net, seg, full)
    results |= speed
    checks += speed_checks
    if steps_note:
        print(f"\nSpread over seeds: {steps_note}.")
        results["seeds_note"] = steps_note

    all_ok = _print_checks(checks)
    results["checks"] = [{"check": t, "pass": ok} for t, ok in checks]
    results["test_seed"] = BENCH_TEST_SEED
    results["voxels_per_snr"] = n

    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    if args.manifest is not None:
        train_log = json.loads(args.train_log.read_text())
        keep = ("net", "lsq-segmented", "lsq-full", "seeds_mean", "seeds_std")
        compact = {
            "test_seed": BENCH_TEST_SEED,
            "voxels_per_snr": n,
            "setting_a": {
                nz: {snr: {m: v for m, v in row.items() if m in keep} for snr, row in res.items()}
                for nz, res in results["setting_a"].items()
            },
            "setting_b": results["setting_b"],
            "setting_b1200": results["setting_b1200"],
            "uncertainty": results["uncertainty"],
            "tissues": results["tissues"],
            "voxels_per_second_1_thread": results["voxels_per_second_1_thread"],
            "speed_ratio": results["speed_ratio"],
            "seeds_note": steps_note,
            "checks": results["checks"],
            "all_checks_pass": all_ok,
        }
        write_manifest(args.model, args.manifest, compact, train_log)
        print(f"wrote {args.manifest}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())

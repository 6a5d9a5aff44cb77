"""Held-out checks of the exported IVIM network and the least-squares baselines.

The voxels are simulated afresh from a seed that no training run used
(:data:`pipelines.ivim.lab.signal.MODEL_TEST_SEED`), with numpy and onnxruntime
only: no torch. The thresholds are the manifest's (the model card's): accuracy
in setting A, the speed ratio to the least-squares fit in the same run, the
coverage of the 90 % intervals and the out-of-range AUROC.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines._lab import cpu_session, sha256_file
from pipelines.ivim.infer import (
    LSQ_BOUNDS,
    FullLsqEstimator,
    IvimNetEstimator,
    SegmentedLsqEstimator,
    select_method,
)
from pipelines.ivim.lab.bayes import bayes_estimators, fit_all, paired_excess, setting_a_blocks
from pipelines.ivim.lab.bench import (
    NRMSE_KEYS,
    TISSUE_RATIO_MAX,
    TISSUE_RATIO_TARGET,
    TissueResult,
    abs_spearman,
    nrmse,
    setting_b,
    tissue_benchmark,
)
from pipelines.ivim.lab.calibration import (
    SD_PARAMS,
    auroc,
    calibration_sets,
    coverage,
    errors,
    estimator_predictor,
    outside_sets,
)
from pipelines.ivim.lab.signal import (
    MODEL_TEST_SEED,
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
    ParamRanges,
    ivim_signal,
    sample_parameters,
    simulate_protocol,
)
from pipelines.ivim.options import IvimMethod

MODELS = Path(__file__).resolve().parents[1] / "exported_models"
ONNX_PATH = MODELS / "ivim-net.onnx"
MANIFEST_PATH = MODELS / "ivim-net.json"

#: An unseen 5-b-value protocol without b = 0 and its NRMSE bounds at SNR 20.
#: They are looser than setting A's because five b-values, the lowest at
#: 10 s/mm², carry much less perfusion information than setting A's eleven;
#: the exported model gives D 0.18, f 0.31, D* 0.44 here (1.0.0: 0.19, 0.32,
#: 0.46; lsq-full: 0.43, 0.88, 1.70); the bounds are 1.0.0's, so 2.0.0 must
#: be no worse than it was by more than about 15 %.
UNSEEN_BVALUES = np.array([10.0, 40.0, 120.0, 400.0, 800.0])
UNSEEN_BOUNDS = {"d": 0.22, "f": 0.36, "dstar": 0.54}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text())


@pytest.fixture(scope="module")
def net() -> IvimNetEstimator:
    return IvimNetEstimator(cpu_session(ONNX_PATH, threads=1))


def test_manifest_sha256_matches_model(manifest: dict) -> None:
    assert manifest["file"] == ONNX_PATH.name
    assert manifest["sha256"] == sha256_file(ONNX_PATH)
    assert ONNX_PATH.stat().st_size < 5 * 1024 * 1024
    assert [i["name"] for i in manifest["inputs"]] == ["signal", "bvalues", "mask"]
    # The protocol is given once per call, not per voxel.
    assert [i["shape"] for i in manifest["inputs"]] == [["N", 20], [1, 20], [1, 20]]
    assert [o["name"] for o in manifest["outputs"]] == ["params", "params_sd"]
    assert [o["shape"] for o in manifest["outputs"]] == [["N", 4], ["N", 3]]
    assert set(manifest["preprocessing"]["sd_calibration_factors"]) == set(SD_PARAMS)


def test_setting_a_snr20_meets_manifest_thresholds(manifest: dict, net: IvimNetEstimator) -> None:
    rng = np.random.default_rng(MODEL_TEST_SEED)
    sig, d, f, dstar, _ = simulate_protocol(rng, SETTING_A_BVALUES, 4000, 20.0, NoiseType.GAUSSIAN, TEST_RANGES)
    p = net.fit(sig, SETTING_A_BVALUES)
    thr = manifest["thresholds"]["setting_a_snr20"]
    got = {
        "nrmse_d": nrmse(p.d, d),
        "nrmse_f": nrmse(p.f, f),
        "nrmse_dstar": nrmse(p.dstar, dstar),
        "abs_rho_dstar_f": abs_spearman(p.dstar, p.f),
    }
    for key, limit in thr.items():
        assert got[key] <= limit, f"{key} = {got[key]:.3f} > {limit} ({got})"


def test_unseen_protocol_without_b0(net: IvimNetEstimator) -> None:
    rng = np.random.default_rng([MODEL_TEST_SEED, 1])
    sig, d, f, dstar, s0 = simulate_protocol(rng, UNSEEN_BVALUES, 4000, 20.0, NoiseType.GAUSSIAN, TEST_RANGES)
    # Arbitrary signal scale and b-value order must not matter.
    order = np.array([3, 0, 4, 2, 1])
    p = net.fit(sig[:, order] * 750.0, UNSEEN_BVALUES[order])
    got = {"d": nrmse(p.d, d), "f": nrmse(p.f, f), "dstar": nrmse(p.dstar, dstar)}
    for key, limit in UNSEEN_BOUNDS.items():
        assert got[key] <= limit, f"NRMSE {key} = {got[key]:.3f} > {limit} ({got})"
    assert nrmse(p.s0 / 750.0, s0) < 0.15
    lsq = FullLsqEstimator().fit(sig, UNSEEN_BVALUES)
    assert got["d"] < nrmse(lsq.d, d) and got["f"] < nrmse(lsq.f, f) and got["dstar"] < nrmse(lsq.dstar, dstar)


def test_net_input_handling(net: IvimNetEstimator) -> None:
    b = np.array([0.0, 0.0, 10.0, 50.0, 200.0, 600.0])
    sig = ivim_signal(b[None, :], np.array([1e-3, 2e-3]), np.array([0.2, 0.3]), np.array([0.05, 0.02]))
    sig[1, 3] = np.nan
    p = net.fit(sig, b)
    assert np.isfinite(p.d[0]) and np.isnan(p.d[1])
    assert p.d.dtype == np.float32
    for name in SD_PARAMS:
        sd = getattr(p, f"{name}_sd")
        assert sd is not None and sd.dtype == np.float32
        assert sd[0] > 0 and np.isnan(sd[1]), name
    # b up to 1200 s/mm2 is accepted (body protocols), above is refused.
    assert np.isfinite(net.fit(sig[:1, 1:], np.array([0.0, 10.0, 50.0, 200.0, 1200.0])).d).all()
    with pytest.raises(ValueError, match="4 to 20"):
        net.fit(sig[:, :3], b[:3])
    with pytest.raises(ValueError, match="b-values must lie"):
        net.fit(sig[:, 1:], np.array([0.0, 10.0, 50.0, 200.0, 1500.0]))


@pytest.fixture(scope="module")
def coverages(net: IvimNetEstimator) -> dict[str, dict[str, dict[str, float]]]:
    """Coverage per "setting noise SNR" row and parameter on a fresh seed (2,000 voxels a row)."""
    groups: dict[str, list] = {}
    for label, vs in calibration_sets(MODEL_TEST_SEED, 2000):
        groups.setdefault(label, []).append(vs)
    assert len(groups) == 12  # settings A and B, Gaussian and Rician, SNR 10, 20, 50
    out = {}
    for label, sets in groups.items():
        e = errors(estimator_predictor(net), sets)
        out[label] = {p: coverage(e, p) for p in SD_PARAMS}
    return out


@pytest.mark.parametrize("param", SD_PARAMS)
def test_90_percent_intervals_cover_90_percent_at_every_snr(manifest: dict, coverages: dict, param: str) -> None:
    lo, hi = manifest["thresholds"]["coverage_90_range"]
    got = {label: cov[param]["all"] for label, cov in coverages.items()}
    assert all(lo <= v <= hi for v in got.values()), f"{param} coverage outside [{lo}, {hi}]: {got}"


# The card's target asks the same in each quartile of the true value. The
# network's estimate is a posterior mean, which shrinks toward the middle of
# the training range where the data say little, so voxels at the edges of a
# range have biased errors that no symmetric interval around that estimate
# covers as often as the middle ones (see the model card, "Uncertainty").
QUARTILES_NOT_MET = {
    "d": "D: quartiles 0.82-0.95 in the card (top quartile low at SNR 10 Rician, high at SNR 50)",
    "dstar": "D*: top quartile 0.80-0.88 in the card, middle quartiles up to 0.98",
    "f": "f: quartiles 0.85-0.96 in the card (lowest quartile high at SNR 50, random protocols)",
}


@pytest.mark.parametrize(
    "param",
    [
        pytest.param(
            p, marks=pytest.mark.xfail(p in QUARTILES_NOT_MET, reason=QUARTILES_NOT_MET.get(p, ""), strict=True)
        )
        for p in SD_PARAMS
    ],
)
def test_90_percent_intervals_cover_90_percent_in_each_quartile(manifest: dict, coverages: dict, param: str) -> None:
    lo, hi = manifest["thresholds"]["coverage_90_range"]
    bad = {
        f"{label} {q}": round(v, 3)
        for label, cov in coverages.items()
        for q, v in cov[param].items()
        if q != "all" and not lo <= v <= hi
    }
    assert not bad, f"{param} quartile coverage outside [{lo}, {hi}]: {bad}"


@pytest.mark.parametrize("param", SD_PARAMS)
def test_standard_deviation_is_higher_outside_the_training_ranges(
    manifest: dict, net: IvimNetEstimator, param: str
) -> None:
    inside, outside = outside_sets(MODEL_TEST_SEED, 2000, 20.0, param)
    predict = estimator_predictor(net)
    got = auroc(errors(predict, inside).sd[param], errors(predict, outside).sd[param])
    assert got >= manifest["thresholds"]["outside_auroc_min"], f"AUROC {param} = {got:.3f}"


def test_net_is_much_faster_than_the_full_least_squares_fit(manifest: dict, net: IvimNetEstimator) -> None:
    # A ratio measured in the same run, so the test does not depend on the machine.
    rng = np.random.default_rng([MODEL_TEST_SEED, 4])
    sig, *_ = simulate_protocol(rng, SETTING_A_BVALUES, 50_000, 20.0, NoiseType.GAUSSIAN, TEST_RANGES)

    def best_rate(est: IvimNetEstimator | FullLsqEstimator, voxels: np.ndarray, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            est.fit(voxels, SETTING_A_BVALUES)
            times.append(time.perf_counter() - t0)
        return voxels.shape[0] / min(times)

    ratio = best_rate(net, sig, 3) / best_rate(FullLsqEstimator(), sig[:5000], 1)
    assert ratio >= manifest["thresholds"]["speed_ratio_min_vs_lsq_full"], f"net only {ratio:.1f}x lsq-full"


def test_lsq_recovers_noiseless_parameters() -> None:
    rng = np.random.default_rng([MODEL_TEST_SEED, 2])
    d, f, dstar, s0 = sample_parameters(rng, 500, TEST_RANGES)
    s0 = s0 * 300.0
    sig = ivim_signal(SETTING_A_BVALUES[None, :], d, f, dstar, s0)
    full = FullLsqEstimator().fit(sig, SETTING_A_BVALUES)
    np.testing.assert_allclose(full.d, d, rtol=1e-4)
    np.testing.assert_allclose(full.f, f, rtol=1e-4)
    np.testing.assert_allclose(full.dstar, dstar, rtol=1e-4)
    np.testing.assert_allclose(full.s0, s0, rtol=1e-4)
    # The segmented fit is exact only where the perfusion signal has died
    # out by b = 200 s/mm², i.e. for fast D*.
    fast = ParamRanges(d=TEST_RANGES.d, f=TEST_RANGES.f, dstar=(0.04, 0.1))
    d, f, dstar, s0 = sample_parameters(rng, 500, fast)
    sig = ivim_signal(SETTING_A_BVALUES[None, :], d, f, dstar, s0)
    seg = SegmentedLsqEstimator().fit(sig, SETTING_A_BVALUES)
    np.testing.assert_allclose(seg.d, d, rtol=1e-3)
    np.testing.assert_allclose(seg.f, f, rtol=1e-3)
    np.testing.assert_allclose(seg.dstar, dstar, rtol=1e-2)
    np.testing.assert_allclose(seg.s0, s0, rtol=1e-6)


@pytest.mark.parametrize("method", ["lsq-segmented", "lsq-full"])
def test_lsq_respects_bounds(method: IvimMethod) -> None:
    rng = np.random.default_rng([MODEL_TEST_SEED, 3])
    wide = ParamRanges(d=(0.0, 4e-3), f=(0.0, 1.0), dstar=(0.0, 0.5))
    sig, *_ = simulate_protocol(rng, SETTING_A_BVALUES, 2000, 5.0, NoiseType.GAUSSIAN, wide)
    p = select_method(method).fit(sig, SETTING_A_BVALUES)
    for name in ("d", "f", "dstar"):
        lo, hi = LSQ_BOUNDS[name]
        values = getattr(p, name)
        assert np.all(np.isfinite(values))
        assert values.min() >= np.float32(lo) and values.max() <= np.float32(hi), name
    assert np.all(p.s0 >= 0)


def test_select_method() -> None:
    assert isinstance(select_method("lsq-segmented"), SegmentedLsqEstimator)
    assert isinstance(select_method("lsq-full"), FullLsqEstimator)
    assert isinstance(select_method("net", cpu_session(ONNX_PATH)), IvimNetEstimator)
    with pytest.raises(ValueError, match="needs an onnxruntime session"):
        select_method("net")
    with pytest.raises(ValueError, match="unknown IVIM method"):
        select_method("bayes")


#: Voxels per body tissue in the tests (12 tissues, about 3 s with the fits).
TISSUE_TEST_VOXELS = 1000


@pytest.fixture(scope="module")
def tissues(net: IvimNetEstimator) -> TissueResult:
    """The body-tissue benchmark on the unit-test seed (the card's figures use the benchmark seed)."""
    return tissue_benchmark(net, SegmentedLsqEstimator(), FullLsqEstimator(), TISSUE_TEST_VOXELS, MODEL_TEST_SEED)


@pytest.mark.parametrize("key", NRMSE_KEYS)
def test_body_tissues_median_nrmse_against_best_lsq_meets_the_card(tissues: TissueResult, key: str) -> None:
    got = tissues.ratio[key]
    assert got <= TISSUE_RATIO_MAX[key], f"median {key} net / best LSQ = {got:.3f} > {TISSUE_RATIO_MAX[key]}"


def test_net_beats_the_best_lsq_fit_on_every_body_tissue(tissues: TissueResult) -> None:
    worse = {
        f"{name} {k}": round(row["net"][k] / row["best-lsq"][k], 3)
        for name, row in tissues.per_tissue.items()
        for k in NRMSE_KEYS
        if row["net"][k] >= row["best-lsq"][k]
    }
    assert len(tissues.per_tissue) == 12
    assert not worse, f"net / best LSQ >= 1: {worse}"


# Issue 15 asks for half the best least-squares NRMSE on each parameter. The
# exported model reaches it for D* only (model card, "Body tissues"); the
# strict expected failures flag a model that meets it for D or f.
TISSUE_TARGET_NOT_MET = {
    "nrmse_d": "D: median net / best LSQ 0.66 in the card; the Bayes posterior on the same prior gets 0.58",
    "nrmse_f": "f: median net / best LSQ 0.62 in the card; the Bayes posterior on the same prior gets 0.49",
}


@pytest.mark.parametrize("key", NRMSE_KEYS)
def test_body_tissues_median_nrmse_is_half_the_best_lsq(
    request: pytest.FixtureRequest, tissues: TissueResult, key: str
) -> None:
    if key in TISSUE_TARGET_NOT_MET:
        request.applymarker(pytest.mark.xfail(reason=TISSUE_TARGET_NOT_MET[key], strict=True))
    got = tissues.ratio[key]
    assert got <= TISSUE_RATIO_TARGET, f"median {key} net / best LSQ = {got:.3f} > {TISSUE_RATIO_TARGET}"


#: Grid points per axis of the Bayes reference in its test: on these voxels
#: 20 gives the NRMSE of 50 (the command's grid) to within 0.1 %.
BAYES_TEST_POINTS = 20


def test_bayes_reference_is_not_beaten_by_the_net_and_beats_lsq_full(net: IvimNetEstimator) -> None:
    # The posterior mean is the least-squares-optimal estimator, so a
    # reference that the network beats by more than sampling noise, or that
    # does not beat the least-squares fit, is a broken reference.
    refs = bayes_estimators(20.0, BAYES_TEST_POINTS)
    blocks = setting_a_blocks(400, seed=MODEL_TEST_SEED) + setting_b(
        400, 20.0, NoiseType.GAUSSIAN, seed=MODEL_TEST_SEED
    )
    fitted = fit_all({**refs, "net": net, "lsq-full": FullLsqEstimator()}, blocks)
    for key in NRMSE_KEYS:
        for ref in refs:
            # Same voxels, so the paired difference's standard error is the
            # sampling noise; the bound holds per protocol, in expectation.
            mean, se = paired_excess(fitted, "net", ref, key)
            assert mean > -3 * se, f"net beats {ref} on {key}: excess MSE {mean:.3g} ({mean / se:+.1f} se)"
            assert fitted.nrmse(ref, key) < fitted.nrmse("lsq-full", key), f"{ref} not below lsq-full on {key}"
        # Knowing S0 is more information than integrating it out.
        mean, se = paired_excess(fitted, "bayes-scale", "bayes-known", key)
        assert mean > -3 * se, f"bayes-known worse than bayes-scale on {key} ({mean / se:+.1f} se)"

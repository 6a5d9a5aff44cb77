"""Held-out checks of the exported lf2hf network (onnxruntime on the CPU, no torch).

The slices are simulated afresh from the held-out slab with a seed that no
training run and no benchmark used
(:data:`pipelines.lf2hf.lab.simulator.TEST_SEED`): per field strength, three
T1-weighted and three T2-weighted slices.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("nilearn")  # the MNI152 templates ship inside its wheel
pytest.importorskip("scipy")

from pipelines._lab import cpu_session, sha256_file  # noqa: E402
from pipelines.lf2hf.infer import degrade, enhance  # noqa: E402
from pipelines.lf2hf.lab.bench import (  # noqa: E402
    BENCH_FIELDS,
    BLOB_AMPLITUDE,
    TEST_SLICES_T1W,
    TEST_SLICES_T2W,
    add_blob,
    bicubic,
    blob_centre,
    heldout_pairs,
)
from pipelines.lf2hf.lab.metrics import psnr_masked, ssim_masked  # noqa: E402
from pipelines.lf2hf.lab.simulator import HELDOUT_SLICES, TEST_SEED, SlicePair  # noqa: E402
from pipelines.lf2hf.preprocess import normalisation_scale  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "exported_models"
ONNX_PATH = MODELS / "lf2hf-net.onnx"
MANIFEST_PATH = MODELS / "lf2hf-net.json"
MANIFEST_KEYS = {
    "name", "version", "file", "sha256", "inputs", "outputs", "preprocessing", "training", "metrics", "thresholds",
}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST_PATH.read_text())


@pytest.fixture(scope="module")
def session() -> Any:
    return cpu_session(ONNX_PATH, threads=1)


@pytest.fixture(scope="module")
def heldout(session: Any) -> dict[float, tuple[list[SlicePair], np.ndarray]]:
    """Per field: the six held-out pairs and the network's raw outputs ``[6, 2H, 2W]``."""
    out = {}
    for f in BENCH_FIELDS:
        pairs, outputs = [], []
        for contrast, slices in (("T1w", TEST_SLICES_T1W), ("T2w", TEST_SLICES_T2W)):
            p = heldout_pairs(TEST_SEED, f, contrast, slices)
            pairs += p
            outputs.append(enhance(session, np.stack([q.input for q in p]), f, contrast))
        out[f] = (pairs, np.concatenate(outputs))
    return out


def test_test_slices_are_held_out() -> None:
    assert set(TEST_SLICES_T1W) | set(TEST_SLICES_T2W) <= set(HELDOUT_SLICES)


def test_manifest_matches_model(manifest: dict[str, Any]) -> None:
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["name"] == "lf2hf-net"
    assert manifest["file"] == ONNX_PATH.name
    assert manifest["sha256"] == sha256_file(ONNX_PATH)
    assert ONNX_PATH.stat().st_size < 3 * 1024 * 1024
    assert [i["name"] for i in manifest["inputs"]] == ["image", "cond"]
    assert [o["name"] for o in manifest["outputs"]] == ["image_2x"]
    assert manifest["training"]["data_generator"] == "pipelines.lf2hf.lab.simulator"
    assert manifest["training"]["seed"] not in (TEST_SEED,)
    assert set(manifest["thresholds"]) == {f"{f:g}T" for f in BENCH_FIELDS}


@pytest.mark.parametrize("field_t", BENCH_FIELDS)
def test_meets_manifest_thresholds_and_beats_bicubic(
    field_t: float, manifest: dict[str, Any], heldout: dict[float, tuple[list[SlicePair], np.ndarray]]
) -> None:
    pairs, outputs = heldout[field_t]
    net_psnr, net_ssim, bic_psnr, bic_ssim = [], [], [], []
    for p, o in zip(pairs, outputs):
        truth = p.target / normalisation_scale(p.target)
        s_in = normalisation_scale(p.input)
        net = o / s_in
        bic = bicubic(p.input / s_in)
        net_psnr.append(psnr_masked(net, truth, p.brain_mask))
        net_ssim.append(ssim_masked(net, truth, p.brain_mask))
        bic_psnr.append(psnr_masked(bic, truth, p.brain_mask))
        bic_ssim.append(ssim_masked(bic, truth, p.brain_mask))
    thr = manifest["thresholds"][f"{field_t:g}T"]
    got = f"PSNR {np.mean(net_psnr):.2f} dB, SSIM {np.mean(net_ssim):.3f} (bicubic {np.mean(bic_psnr):.2f}, " \
          f"{np.mean(bic_ssim):.3f}); thresholds {thr}"
    assert np.mean(net_psnr) >= thr["min_psnr_db"], got
    assert np.mean(net_ssim) >= thr["min_ssim"], got
    assert np.mean(net_psnr) > np.mean(bic_psnr), got
    assert np.mean(net_ssim) > np.mean(bic_ssim), got


def test_consistency_passes_own_output_and_flags_hallucination(
    heldout: dict[float, tuple[list[SlicePair], np.ndarray]]
) -> None:
    rng = np.random.default_rng(TEST_SEED)
    for f, (pairs, outputs) in heldout.items():
        inputs = np.stack([p.input for p in pairs])
        own = degrade(outputs, f, inputs)
        assert own.score.shape == (len(pairs),)
        assert not own.flagged.any(), f"{f} T: own outputs flagged, scores {np.round(own.score, 2)}"
        blobbed = np.stack([
            add_blob(o, blob_centre(p, rng), BLOB_AMPLITUDE * normalisation_scale(o)) for o, p in zip(outputs, pairs)
        ])
        fake = degrade(blobbed, f, inputs)
        assert fake.flagged.all(), f"{f} T: blob not flagged, scores {np.round(fake.score, 2)}"
        assert np.all(fake.score > own.score)


def test_enhance_any_matrix_size(session: Any, heldout: dict[float, tuple[list[SlicePair], np.ndarray]]) -> None:
    pairs, _ = heldout[BENCH_FIELDS[0]]
    odd = pairs[0].input[3:100, 5:106]  # 97 x 101: not a multiple of the network's stride
    out = enhance(session, odd, BENCH_FIELDS[0], "T1w")
    assert out.shape == (194, 202)
    assert out.dtype == np.float32 and np.all(np.isfinite(out)) and out.min() >= 0.0
    # Back on the input's intensity scale.
    assert 0.7 < normalisation_scale(out) / normalisation_scale(odd) < 1.3


def test_inference_needs_no_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from pipelines._lab import cpu_session\n"
        "from pipelines.lf2hf.infer import enhance, degrade\n"
        f"s = cpu_session({str(ONNX_PATH)!r})\n"
        "x = np.random.default_rng(0).rayleigh(1.0, (2, 40, 44)).astype(np.float32)\n"
        "x[:, 10:30, 10:34] += 20\n"
        "y = enhance(s, x, 0.1, 'T2w')\n"
        "degrade(y, 0.1, x)\n"
        "assert y.shape == (2, 80, 88)\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'inference imported torch or scipy'\n"
        "import pipelines.lf2hf.pipeline\n"
        "assert not [m for m in sys.modules if m.startswith('pipelines.lf2hf.lab')], 'the runtime imported the lab'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# The learned contrast-preserving restoration (lf2hf-dc): an unrolled proximal-gradient loop in
# pipelines.lf2hf.infer.restore around an exported prior. Fresh data only: phantoms of a seed that
# training refuses (TEST_PHANTOM_SEED) and held-out brain slices of TEST_SEED.
RESTORE_PATH = MODELS / "lf2hf-dc.onnx"
RESTORE_MANIFEST = MODELS / "lf2hf-dc.json"
#: The out-of-domain benchmark's fields (tissue SNR 8, 67, 155).
PHANTOM_FIELDS = (0.064, 0.3, 0.55)
PHANTOMS_PER_FIELD = 3


@pytest.fixture(scope="module")
def restore_session() -> Any:
    return cpu_session(RESTORE_PATH, threads=1)


@pytest.fixture(scope="module")
def phantom_scores(restore_session: Any) -> list[dict[str, Any]]:
    """Per test phantom (clean and B0-perturbed): bicubic, TV and learned PSNR, residual-to-noise."""
    from pipelines.lf2hf.lab.anatomy import TEST_PHANTOM_SEED
    from pipelines.lf2hf.lab.bench_restore import ood_snr, phantom_case, score

    rows = []
    for f in PHANTOM_FIELDS:
        for i in range(PHANTOMS_PER_FIELD):
            clean = score(*phantom_case(TEST_PHANTOM_SEED, i, ood_snr(f), warp=False), restore_session)
            b0 = score(*phantom_case(TEST_PHANTOM_SEED, i, ood_snr(f), warp=True), restore_session)
            rows.append({"field_t": f, "index": i, "clean": clean, "b0": b0})
    return rows


def test_restore_manifest_matches_model() -> None:
    from pipelines.lf2hf.infer import RESTORE_ITERATIONS, RESTORE_STEP, RESTORE_TAU
    from pipelines.lf2hf.lab.anatomy import PHANTOM_SEED, TEST_PHANTOM_SEED

    m = json.loads(RESTORE_MANIFEST.read_text())
    assert m["name"] == "lf2hf-dc" and m["file"] == RESTORE_PATH.name
    assert m["sha256"] == sha256_file(RESTORE_PATH)
    assert RESTORE_PATH.stat().st_size < 1024 * 1024  # a small prior: the physics is in the loop
    pre = m["preprocessing"]
    assert (pre["iterations"], pre["step"], pre["tau"]) == (RESTORE_ITERATIONS, RESTORE_STEP, RESTORE_TAU)
    assert m["training"]["data_generator"] == "pipelines.lf2hf.lab.anatomy"
    assert m["training"]["seed"] not in (TEST_SEED, PHANTOM_SEED, TEST_PHANTOM_SEED)


def test_restore_is_no_worse_than_bicubic_on_unseen_phantoms(phantom_scores: list[dict[str, Any]]) -> None:
    gains = [r["clean"]["learned"]["psnr"] - r["clean"]["bicubic"]["psnr"] for r in phantom_scores]
    assert min(gains) >= 0.0, np.round(gains, 2)
    # And it is why the pipeline uses it instead of TV: better on average at every field.
    for f in PHANTOM_FIELDS:
        rows = [r for r in phantom_scores if r["field_t"] == f]
        learned = np.mean([r["clean"]["learned"]["psnr"] for r in rows])
        tv = np.mean([r["clean"]["tv"]["psnr"] for r in rows])
        assert learned > tv, f"{f} T: learned {learned:.2f} dB, TV {tv:.2f} dB"


def test_restore_output_explains_the_data_to_the_noise_level(phantom_scores: list[dict[str, Any]]) -> None:
    from pipelines.lf2hf.infer import RESTORE_TAU

    ratios = np.array([r[k]["learned"]["residual_to_noise"] for r in phantom_scores for k in ("clean", "b0")])
    # By construction (the loop ends on the projection onto ||A x - y|| <= tau sigma); the margin is
    # the difference between the projection's real-part residual and the magnitude residual measured here.
    assert ratios.max() <= 1.1 * RESTORE_TAU, np.round(ratios, 2)
    assert ratios.min() > 0.3, np.round(ratios, 2)  # it denoised: the noise stays in the residual


def test_restore_is_robust_to_a_b0_field_map(phantom_scores: list[dict[str, Any]]) -> None:
    loss = np.mean([r["clean"]["learned"]["psnr"] - r["b0"]["learned"]["psnr"] for r in phantom_scores])
    assert loss <= 1.0, f"PSNR loss under the field-map perturbation {loss:+.2f} dB"


@pytest.fixture(scope="module")
def brain_restore_scores(restore_session: Any) -> dict[float, list[dict[str, dict[str, float]]]]:
    """Per field: scores of three T1w and three T2w held-out brain slices (own low-field contrast), TEST_SEED."""
    from pipelines.lf2hf.lab.anatomy import brain_truth, degrade
    from pipelines.lf2hf.lab.bench_restore import score
    from pipelines.lf2hf.lab.simulator import draw_acquisition, load_anatomy
    from pipelines.lf2hf.preprocess import Contrast

    anatomy = load_anatomy()
    out: dict[float, list[dict[str, dict[str, float]]]] = {}
    for f in BENCH_FIELDS:
        out[f] = []
        for contrast, slices in ((Contrast.T1W, TEST_SLICES_T1W), (Contrast.T2W, TEST_SLICES_T2W)):
            for z in slices:
                rng = np.random.default_rng([TEST_SEED, int(f * 1000), z])
                acq = draw_acquisition(rng, f, contrast)
                truth = brain_truth(anatomy.slab(z), acq)
                out[f].append(score(degrade(truth, acq.snr, rng), truth, anatomy.brain_slice(z), restore_session))
    return out


@pytest.mark.parametrize("field_t", BENCH_FIELDS)
def test_restore_in_domain_beats_bicubic_on_every_slice(
    field_t: float, brain_restore_scores: dict[float, list[dict[str, dict[str, float]]]]
) -> None:
    gains = [s["learned"]["psnr"] - s["bicubic"]["psnr"] for s in brain_restore_scores[field_t]]
    assert min(gains) >= 0.0, np.round(gains, 2)


@pytest.mark.parametrize("field_t", BENCH_FIELDS)
def test_restore_in_domain_no_worse_than_tv(
    field_t: float, brain_restore_scores: dict[float, list[dict[str, dict[str, float]]]]
) -> None:
    rows = brain_restore_scores[field_t]
    learned = np.mean([s["learned"]["psnr"] for s in rows])
    tv = np.mean([s["tv"]["psnr"] for s in rows])
    assert learned >= tv, f"learned {learned:.2f} dB, TV {tv:.2f} dB"


def test_restore_speed_against_the_translation_network_in_the_same_run(session: Any, restore_session: Any) -> None:
    import time

    from pipelines.lf2hf.infer import restore

    x = np.random.default_rng(0).rayleigh(1.0, (1, 128, 128)).astype(np.float32)
    x[:, 24:104, 24:104] += 20.0

    def rate(fn: Any) -> float:
        fn()
        best = 0.0
        for _ in range(3):  # the best of three: the machine is shared
            t0 = time.perf_counter()
            for _ in range(4):
                fn()
            best = max(best, 4 / (time.perf_counter() - t0))
        return best

    learned = rate(lambda: restore(restore_session, x))
    net = rate(lambda: enhance(session, x, 0.064, "T1w"))
    # The translation network ran 16.5 slices/s on one thread on the reference machine (model card);
    # 10 slices/s, the target, is 0.6 of it.
    assert learned >= 0.6 * net, f"restore {learned:.1f} slices/s, translation network {net:.1f} slices/s"


def test_restore_is_deterministic_and_needs_no_torch(restore_session: Any) -> None:
    code = (
        "import sys, numpy as np\n"
        "from pipelines._lab import cpu_session\n"
        "from pipelines.lf2hf.infer import restore\n"
        f"s = cpu_session({str(RESTORE_PATH)!r})\n"
        "x = np.random.default_rng(0).rayleigh(1.0, (2, 40, 44)).astype(np.float32)\n"
        "x[:, 10:30, 10:34] += 20\n"
        "a, b = restore(s, x), restore(s, x)\n"
        "assert a.shape == (2, 80, 88) and np.array_equal(a, b) and a.min() >= 0\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'restore imported torch or scipy'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)

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

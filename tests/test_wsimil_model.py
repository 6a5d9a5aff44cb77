"""Held-out checks of the exported tumour MIL models (onnxruntime on the CPU, no torch).

Forty slides are generated afresh from the model-test seed range
(:data:`pipelines.wsimil.lab.evaluate.TEST_BASE`), which no training run, the
manifest's held-out evaluation and the benchmark do not use, and must meet
the thresholds written in the head's manifest and the model card.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("scipy")  # the slide generator

from gateway.models import ModelManifest  # noqa: E402
from pipelines._lab import cpu_session  # noqa: E402
from pipelines.wsimil.infer import ENCODER, HEAD, embed, mil_head  # noqa: E402
from pipelines.wsimil.lab.evaluate import (  # noqa: E402
    BENCH_BASE,
    HELDOUT_BASE,
    TEST_BASE,
    THRESHOLDS,
    TRAIN_SEEDS,
    SlideOutcome,
    check_thresholds,
    make_scene,
    score_slides,
    summarise,
)
from pipelines.wsimil.lab.metrics import slide_tiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "exported_models"
ENCODER_PATH = MODELS / f"{ENCODER}.onnx"
HEAD_PATH = MODELS / f"{HEAD}.onnx"
CARD_PATH = MODELS / "wsi-mil.md"
TEST_SLIDES = 40


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {name: json.loads((MODELS / f"{name}.json").read_text()) for name in (ENCODER, HEAD)}


@pytest.fixture(scope="module")
def encoder() -> Any:
    return cpu_session(ENCODER_PATH, threads=1)


@pytest.fixture(scope="module")
def head() -> Any:
    return cpu_session(HEAD_PATH, threads=1)


@pytest.fixture(scope="module")
def outcomes(encoder: Any, head: Any) -> list[SlideOutcome]:
    return list(score_slides(encoder, head, (make_scene(i, TEST_BASE) for i in range(TEST_SLIDES))))


def test_seed_ranges_are_disjoint() -> None:
    bases = [HELDOUT_BASE, BENCH_BASE, TEST_BASE]
    assert TRAIN_SEEDS.stop <= min(bases)
    assert all(b2 - b1 >= 1_000_000 for b1, b2 in zip(bases, bases[1:]))


@pytest.mark.parametrize("name", [ENCODER, HEAD])
def test_manifest_matches_model(name: str, manifests: dict[str, dict[str, Any]]) -> None:
    m = manifests[name]
    ModelManifest.model_validate(m)  # what the gateway's registry accepts
    path = MODELS / m["file"]
    assert m["name"] == name and m["file"] == f"{name}.onnx"
    assert m["sha256"] == _sha256(path)
    assert path.stat().st_size < 1024 * 1024
    assert m["training"]["data_generator"] == "pipelines.wsimil.lab.scene"
    assert m["training"]["seed"] in TRAIN_SEEDS
    assert m["preprocessing"]["mpp"] == 2.0 and m["preprocessing"]["tile_px"] == 32


def test_manifests_describe_the_graphs(manifests: dict[str, dict[str, Any]], encoder: Any, head: Any) -> None:
    for m, sess in ((manifests[ENCODER], encoder), (manifests[HEAD], head)):
        assert [i["name"] for i in m["inputs"]] == [i.name for i in sess.get_inputs()]
        assert [o["name"] for o in m["outputs"]] == [o.name for o in sess.get_outputs()]
    dim = manifests[ENCODER]["outputs"][0]["shape"][1]
    assert manifests[HEAD]["inputs"][0]["shape"] == ["N", dim]


def test_card_states_the_thresholds_and_hashes(manifests: dict[str, dict[str, Any]]) -> None:
    card = CARD_PATH.read_text()
    assert manifests[HEAD]["thresholds"] == THRESHOLDS
    for key, bound in THRESHOLDS.items():
        assert f"| `{key}` | {bound} |" in card
    for m in manifests.values():
        assert m["sha256"] in card
    assert "not a medical device" in card and "synthetic" in card


def test_meets_manifest_thresholds(manifests: dict[str, dict[str, Any]], outcomes: list[SlideOutcome]) -> None:
    summary = summarise(outcomes)
    assert summary["slides"] == TEST_SLIDES
    assert summary["positive_slides"] >= TEST_SLIDES // 3 and summary["negative_slides"] >= TEST_SLIDES // 3
    failed = check_thresholds(summary, manifests[HEAD]["thresholds"])
    assert not failed, f"{failed}; all figures: {summary}"


def test_head_outputs_are_consistent(outcomes: list[SlideOutcome]) -> None:
    for o in outcomes:
        assert o.attention.dtype == np.float32 and o.tile_probability.dtype == np.float32
        assert abs(float(o.attention.sum()) - 1.0) < 1e-4
        assert np.all(o.attention >= 0)
        assert np.all((o.tile_probability >= 0) & (o.tile_probability <= 1))
        assert 0.0 <= o.probability <= 1.0


def test_head_works_for_one_tile_and_refuses_none(encoder: Any, head: Any) -> None:
    tiles, _, _, _ = slide_tiles(make_scene(0, TEST_BASE), with_truth=False)
    emb = embed(encoder, tiles[:1])
    res = mil_head(head, emb)
    assert res.attention.shape == (1,) and res.tile_probability.shape == (1,)
    assert res.attention[0] == pytest.approx(1.0)
    # One tile: the slide logit is that tile's logit.
    assert res.slide_probability == pytest.approx(float(res.tile_probability[0]), abs=1e-5)
    with pytest.raises(ValueError):
        mil_head(head, emb[:0])
    assert embed(encoder, tiles[:0]).shape == (0, emb.shape[1])


def test_embedding_does_not_depend_on_batching(encoder: Any) -> None:
    tiles, _, _, _ = slide_tiles(make_scene(1, TEST_BASE), with_truth=False)
    a = embed(encoder, tiles[:300], batch=256)
    b = embed(encoder, tiles[:300], batch=7)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_inference_needs_no_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from gateway.models import open_session\n"  # how the service makes its sessions
        "from pipelines.wsimil.infer import embed, mil_head\n"
        f"e = open_session({str(ENCODER_PATH)!r}, threads=1)\n"
        f"h = open_session({str(HEAD_PATH)!r}, threads=1)\n"
        "t = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)\n"
        "r = mil_head(h, embed(e, t))\n"
        "assert r.attention.shape == (3,)\n"
        "assert 'torch' not in sys.modules, 'inference imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)

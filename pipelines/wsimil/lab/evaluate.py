"""Held-out evaluation of the exported tumour MIL models (numpy + onnxruntime, no torch).

Usage::

    python -m pipelines.wsimil.lab.evaluate --models DIR [--n 200] [--base 10000000]

Slides are synthetic (:class:`~pipelines.wsimil.lab.scene.SlideScene`) with seeds
``base + i``; the seed ranges are split so that no two uses share a slide:

* training: :data:`TRAIN_SEEDS` (0 to 99,999);
* held-out evaluation written into the manifest: :data:`HELDOUT_BASE` + i;
* benchmark: :data:`BENCH_BASE` + i;
* model test: :data:`TEST_BASE` + i.

Slide sizes and labels follow the training distribution: each side uniform in
:data:`SIDE_UM_RANGE`, tumour requested on every other slide (the label is
``scene.has_tumour``, which the generator may turn off when a drawn tumour
is too small to appear). Tiles come from
:func:`~pipelines.wsimil.lab.metrics.slide_tiles`, the inference tiling. The
thresholds are the pipeline's defaults (:class:`~pipelines.wsimil.options.WsiMilOptions`),
so the figures describe the service as it is configured out of the box.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines._lab import cpu_session
from pipelines.wsimil.infer import ENCODER, HEAD, embed, mil_head
from pipelines.wsimil.lab.metrics import dice, roc_auc, slide_tiles
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.options import WsiMilOptions

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "BENCH_BASE",
    "HELDOUT_BASE",
    "SIDE_UM_RANGE",
    "TEST_BASE",
    "THRESHOLDS",
    "SLIDE_THRESHOLD",
    "TILE_THRESHOLD",
    "TRAIN_SEEDS",
    "SlideOutcome",
    "evaluate",
    "make_scene",
    "score_slides",
    "summarise",
    "throughput",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

TRAIN_SEEDS = range(0, 100_000)
HELDOUT_BASE = 10_000_000
BENCH_BASE = 20_000_000
TEST_BASE = 30_000_000
SIDE_UM_RANGE = (1200.0, 3000.0)
# A tile is called tumour when its probability reaches this (the segmentation),
# and a slide when its slide probability does: the service's defaults.
TILE_THRESHOLD = WsiMilOptions().tile_threshold
SLIDE_THRESHOLD = WsiMilOptions().slide_threshold
# Pass criteria of the model test (40 fresh slides, TEST_BASE): the project's
# targets for slide AUC and Dice, and bounds on the other figures set with
# room for the sampling spread of 40 slides (20 negative slides carry
# some 9,000 tiles, 20 positive slides a few hundred to a few thousand
# tumour tiles). Held-out figures on 200 slides are in the manifest.
THRESHOLDS: dict[str, float] = {
    "min_slide_auc": 0.95,
    "min_dice_pooled": 0.70,
    "min_dice_mean": 0.70,
    "min_tile_auc_pooled": 0.95,
    "min_attention_auc_mean": 0.90,
    "max_fp_tile_fraction": 0.01,
}


def make_scene(index: int, base: int) -> SlideScene:
    """The ``index``-th slide of a seed range (size and requested label from the seed)."""
    seed = base + index
    rng = np.random.default_rng([seed, 7])
    w, h = rng.uniform(*SIDE_UM_RANGE, size=2)
    return SlideScene(seed, float(w), float(h), tumour=index % 2 == 0)


@dataclass(frozen=True)
class SlideOutcome:
    """Model output and truth of one slide.

    Attributes
    ----------
    seed : int
        Scene seed.
    label : bool
        Slide truth (``scene.has_tumour``).
    probability : float
        Slide probability.
    attention, tile_probability : numpy.ndarray
        ``[N]`` per tissue tile.
    truth : numpy.ndarray
        ``[N]`` bool tile truth.
    """

    seed: int
    label: bool
    probability: float
    attention: np.ndarray
    tile_probability: np.ndarray
    truth: np.ndarray


def score_slides(
    encoder: onnxruntime.InferenceSession, head: onnxruntime.InferenceSession, scenes: Iterable[SlideScene]
) -> Iterator[SlideOutcome]:
    """Tile, embed and pool each slide; slides without tissue tiles are skipped (logged)."""
    for scene in scenes:
        tiles, _, truth, _ = slide_tiles(scene)
        if not len(tiles):
            logger.warning("slide %d has no tissue tiles; skipped", scene.seed)
            continue
        res = mil_head(head, embed(encoder, tiles))
        yield SlideOutcome(
            scene.seed, scene.has_tumour, res.slide_probability, res.attention, res.tile_probability, truth
        )


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def summarise(outcomes: list[SlideOutcome]) -> dict[str, Any]:
    """Slide- and tile-level figures of a list of scored slides.

    Parameters
    ----------
    outcomes : list of SlideOutcome

    Returns
    -------
    dict
        ``slide_auc``; ``dice_pooled`` (all tiles of all positive slides
        together) and ``dice_mean`` (mean over positive slides) of
        ``tile_probability >= TILE_THRESHOLD`` against the tile truth;
        ``attention_auc_pooled`` (attention times the slide's tile count,
        i.e. relative to uniform, so that bags of different sizes compare)
        and ``attention_auc_mean`` (per slide, over positive slides with
        both tumour and non-tumour tiles); ``tile_auc_pooled`` (tile
        probability, all tiles of all slides), ``tile_auc_positive_pooled``
        and ``tile_auc_positive_mean`` (within positive slides);
        ``fp_tile_fraction`` (negative slides' tiles called tumour, pooled)
        and ``fp_tile_fraction_mean`` (per negative slide);
        ``slide_sensitivity`` and ``slide_specificity`` at
        :data:`SLIDE_THRESHOLD`; extreme slide probabilities; counts.
    """
    pos = [o for o in outcomes if o.label]
    neg = [o for o in outcomes if not o.label]
    out: dict[str, Any] = {
        "slides": len(outcomes),
        "positive_slides": len(pos),
        "negative_slides": len(neg),
        "tiles": int(sum(len(o.truth) for o in outcomes)),
        "tumour_tiles": int(sum(int(o.truth.sum()) for o in outcomes)),
        "slide_auc": roc_auc(np.array([o.probability for o in outcomes]), np.array([o.label for o in outcomes])),
    }
    if pos:
        pred = np.concatenate([o.tile_probability >= TILE_THRESHOLD for o in pos])
        truth = np.concatenate([o.truth for o in pos])
        out["dice_pooled"] = dice(pred, truth)
        out["dice_mean"] = float(np.mean([dice(o.tile_probability >= TILE_THRESHOLD, o.truth) for o in pos]))
        rel_att = np.concatenate([o.attention * len(o.attention) for o in pos])
        out["attention_auc_pooled"] = roc_auc(rel_att, truth)
        out["attention_auc_mean"] = _nanmean([roc_auc(o.attention, o.truth) for o in pos])
        out["tile_auc_positive_pooled"] = roc_auc(np.concatenate([o.tile_probability for o in pos]), truth)
        out["tile_auc_positive_mean"] = _nanmean([roc_auc(o.tile_probability, o.truth) for o in pos])
        out["positive_slides_without_tumour_tiles"] = int(sum(not o.truth.any() for o in pos))
    out["tile_auc_pooled"] = roc_auc(
        np.concatenate([o.tile_probability for o in outcomes]), np.concatenate([o.truth for o in outcomes])
    )
    if neg:
        called = [o.tile_probability >= TILE_THRESHOLD for o in neg]
        out["fp_tile_fraction"] = float(np.concatenate(called).mean())
        out["fp_tile_fraction_mean"] = float(np.mean([c.mean() for c in called]))
        out["max_negative_slide_probability"] = float(max(o.probability for o in neg))
    if pos:
        out["min_positive_slide_probability"] = float(min(o.probability for o in pos))
        out["slide_sensitivity"] = float(np.mean([o.probability >= SLIDE_THRESHOLD for o in pos]))
    if neg:
        out["slide_specificity"] = float(np.mean([o.probability < SLIDE_THRESHOLD for o in neg]))
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = round(value, 4)
    return out


def check_thresholds(summary: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """The criteria of ``thresholds`` that ``summary`` fails, as readable lines (empty: all met)."""
    failed = []
    for key, bound in thresholds.items():
        kind, metric = key.split("_", 1)
        value = summary.get(metric, float("nan"))
        ok = value >= bound if kind == "min" else value <= bound
        if not ok:
            failed.append(f"{metric} = {value} ({kind} {bound})")
    return failed


def throughput(encoder_path: Path, head_path: Path, tiles: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Single-thread onnxruntime speed of the encoder (batch 256) and of the head (bag of 1,000 tiles).

    Parameters
    ----------
    encoder_path, head_path : pathlib.Path
        The two ``.onnx`` files.
    tiles : numpy.ndarray
        At least 256 real uint8 tiles to time on.
    repeats : int
        Timed runs after one warm-up run; the median is reported.

    Returns
    -------
    dict
        ``encoder_tiles_per_s`` (including :func:`~pipelines.wsimil.preprocess.to_model_input`),
        ``head_ms_per_1000_tiles`` and ``head_tiles_per_s``.
    """
    enc = cpu_session(encoder_path, threads=1)
    head = cpu_session(head_path, threads=1)
    batch = np.resize(tiles, (256, *tiles.shape[1:]))
    embed(enc, batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        embed(enc, batch)
        times.append(time.perf_counter() - t0)
    enc_rate = 256 / float(np.median(times))
    emb = np.resize(embed(enc, batch), (1000, embed(enc, batch[:1]).shape[1]))
    mil_head(head, emb)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mil_head(head, emb)
        times.append(time.perf_counter() - t0)
    head_s = float(np.median(times))
    return {
        "encoder_tiles_per_s": round(enc_rate),
        "head_ms_per_1000_tiles": round(1000 * head_s, 3),
        "head_tiles_per_s": round(1000 / head_s),
    }


def evaluate(models: Path, n: int = 200, base: int = HELDOUT_BASE) -> dict[str, Any]:
    """Score ``n`` fresh slides of a seed range and time the models.

    Parameters
    ----------
    models : pathlib.Path
        Folder holding ``wsi-mil-encoder.onnx`` and ``wsi-mil-head.onnx``.
    n : int
        Slides.
    base : int
        First seed of the range.

    Returns
    -------
    dict
        :func:`summarise` of the slides, the seed range, the wall time and
        :func:`throughput`.
    """
    enc_path, head_path = models / f"{ENCODER}.onnx", models / f"{HEAD}.onnx"
    enc = cpu_session(enc_path, threads=1)
    head = cpu_session(head_path, threads=1)
    t0 = time.perf_counter()
    outcomes = []
    for i, o in enumerate(score_slides(enc, head, (make_scene(i, base) for i in range(n)))):
        outcomes.append(o)
        if (i + 1) % 50 == 0:
            logger.info("evaluated %d / %d slides (%.0f s)", i + 1, n, time.perf_counter() - t0)
    summary = summarise(outcomes)
    summary["seeds"] = [base, base + n - 1]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    sample, _, _, _ = slide_tiles(make_scene(0, base))
    summary["throughput_single_thread"] = throughput(enc_path, head_path, sample)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with the two .onnx files")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base", type=int, default=HELDOUT_BASE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    summary = evaluate(args.models, args.n, args.base)
    print(json.dumps(summary, indent=2))
    failed = check_thresholds(summary, THRESHOLDS)
    print("thresholds: " + ("all met" if not failed else "FAILED " + "; ".join(failed)))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())

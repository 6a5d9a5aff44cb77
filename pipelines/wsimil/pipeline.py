"""The wsi-mil pipeline plugin: a whole-slide image in, tumour probability SEG and slide report SR out.

A VL Whole Slide Microscopy series (pyramid, thumbnail, label, overview) is
read through wsidicom as a stream of 32-pixel tiles at 2 um/pixel, tissue
only (:mod:`pipelines.wsimil.preprocess`). The tile encoder embeds the
tiles in batches; the gated-attention MIL head turns the embeddings into a
slide-level tumour probability, attention weights and per-tile
probabilities (:mod:`pipelines.wsimil.infer`). The results go back as a
FRACTIONAL Segmentation aligned with the slide and a TID 1500 report
(:mod:`pipelines.wsimil.dicom`). The options (``[pipelines.wsi-mil]``) are
:class:`~pipelines.wsimil.options.WsiMilOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset

from gateway.contract import ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.wsimil.infer import ENCODER, ENCODER_BATCH, HEAD, score_slide, slide_result
from pipelines.wsimil.options import WsiMilOptions
from pipelines.wsimil.preprocess import (
    WSI_STORAGE,
    check_readable,
    open_slide,
    slide_paths,
    source_level,
    volume_instances,
)

__all__ = ["WsiMilPipeline"]


class WsiMilPipeline:
    """Attention-MIL tumour detection and localisation on H&E whole-slide images."""

    name = "wsi-mil"
    options_model = WsiMilOptions

    def __init__(self, options: WsiMilOptions | None = None) -> None:
        self.options = options or WsiMilOptions()

    def selects(self, series: SeriesInfo) -> Selection:
        """A whole-slide series with at least one pyramid level; none of the options bear on it."""
        if WSI_STORAGE not in series.sop_class_uids:
            return Selection(False, "no VL Whole Slide Microscopy images")
        volumes = volume_instances(series)
        if not volumes:
            return Selection(False, "whole-slide series without a pyramid level (VOLUME image)")
        return Selection(True, f"whole-slide image, {len(volumes)} pyramid level instance(s)")

    def models(self) -> Sequence[ModelSpec]:
        """The tile encoder, run in batches, and the head, run once on the whole slide."""
        return [ModelSpec(ENCODER, batch_size=ENCODER_BATCH), ModelSpec(HEAD, batch_size=1)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        """Score the slide and return its tumour-probability Segmentation and its report."""
        # highdicom is imported on the first job, not when the gateway loads its plugins
        from pipelines.wsimil.dicom import slide_report, tumour_segmentation

        opts = self.options
        reader = open_slide(slide_paths(series))
        try:
            encoder_batch = ctx.batch_size(ENCODER, ENCODER_BATCH)  # [models] batch_sizes may override it per node
            score = score_slide(reader, ctx.sessions[ENCODER], ctx.sessions[HEAD], ctx.progress, batch=encoder_batch)
            check_readable(score.stats, opts.max_unreadable_fraction, ctx)
            result = slide_result(score, opts.slide_threshold, opts.tile_threshold)
            source = source_level(series, reader.source_level_size).dataset(pixels=False)
        finally:
            reader.close()
        ctx.log.info(
            "slide scored: %d tissue tiles at %.2f um/px in %.1f s (%.0f tiles/s), %d glass regions skipped, "
            "tumour probability %.3f",
            result.tissue_tiles,
            score.grid.level_mpp,
            score.seconds,
            result.tissue_tiles / max(score.seconds, 1e-9),
            score.stats.chunks_skipped_glass,
            result.probability,
        )
        ctx.progress(0.9, "writing segmentation and report")
        version = ctx.model_versions.get(HEAD, "?")
        seg = tumour_segmentation(source, score.grid, result, ctx, version)
        sr = slide_report(source, seg, score.grid, result, ctx, version)
        return [seg, sr]

    # ------------------------------------------------------------------ demo
    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        """A synthetic tumour-positive slide (:func:`pipelines.wsimil.lab.synthetic.write_demo_slide`)."""
        from pipelines.wsimil.lab.synthetic import write_demo_slide

        return write_demo_slide(folder, seed)

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        """The slide with the probability map and the true outline (:func:`pipelines.wsimil.lab.synthetic.preview`)."""
        from pipelines.wsimil.lab.synthetic import preview

        return preview(inputs, outputs)

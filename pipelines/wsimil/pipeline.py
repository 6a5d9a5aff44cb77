"""The wsi-mil pipeline plugin: a whole-slide image in, tumour probability SEG and slide report SR out.

A VL Whole Slide Microscopy series (pyramid, thumbnail, label, overview) is
read through wsidicom as a stream of 32-pixel tiles at 2 um/pixel, tissue
only (:mod:`pipelines.wsimil.preprocess`). The tile encoder embeds the
tiles in batches; the gated-attention MIL head turns the embeddings into a
slide-level tumour probability, attention weights and per-tile
probabilities (:mod:`pipelines.wsimil.infer`). The results go back as a
FRACTIONAL Segmentation aligned with the slide and a TID 1500 report
(:mod:`pipelines.wsimil.dicom`).

Options (``[pipelines.wsi-mil]``):

``slide_threshold``
    Slide called tumour-positive at or above this probability (0.5).
``tile_threshold``
    Tiles counted in the tumour area at or above this probability (0.5).
``max_unreadable_fraction``
    The job fails when more than this fraction of the examined tissue
    regions cannot be decoded (0.05); below it, the unreadable tiles are
    left out, logged and counted in
    ``aigw_pipeline_flags_total{pipeline="wsi-mil",kind="unreadable_tile"}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import Dataset

from gateway.contract import InputError, Instance, ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.wsimil.infer import MilResult
from pipelines.wsimil.preprocess import Chunk, ReadStats, SlideReader, TileGrid

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["ENCODER", "HEAD", "WSI_STORAGE", "SlideScore", "WsiMilPipeline", "score_slide"]

ENCODER = "wsi-mil-encoder"
HEAD = "wsi-mil-head"
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
_BATCH = 256


def _image_type(inst: Instance) -> list[str]:
    v = inst.headers.get("ImageType") or []
    return [str(x).upper() for x in (v if isinstance(v, list) else [v])]


def _source_level(series: Series, size: tuple[int, int]) -> Instance:
    """The stored pyramid level instance of the given total pixel matrix size (columns, rows)."""
    for inst in series.instances:
        if inst.sop_class_uid != WSI_STORAGE or "VOLUME" not in _image_type(inst):
            continue
        try:
            cols = int(inst.headers.get("TotalPixelMatrixColumns") or 0)
            rows = int(inst.headers.get("TotalPixelMatrixRows") or 0)
        except (TypeError, ValueError):
            continue
        if (cols, rows) == size:
            return inst
    raise InputError("the pyramid level that was read is not among the series' instances")


@dataclass
class SlideScore:
    """The model's view of one slide: MIL outputs for its tissue tiles and where they lie."""

    grid: TileGrid
    stats: ReadStats
    rc: np.ndarray  # int [n, 2] grid row and column of each tissue tile
    mil: MilResult | None  # None when the slide has no tissue
    seconds: float

    def probability_map(self) -> np.ndarray:
        """Tile probabilities on the grid, float32 [rows, columns], 0 off tissue."""
        prob = np.zeros((self.grid.rows, self.grid.columns), np.float32)
        if self.mil is not None:
            prob[self.rc[:, 0], self.rc[:, 1]] = self.mil.tile_probability
        return prob


def score_slide(
    reader: SlideReader,
    encoder: onnxruntime.InferenceSession,
    head: onnxruntime.InferenceSession,
    progress: Callable[[float, str], None] = lambda f, m: None,
    batch: int = _BATCH,
) -> SlideScore:
    """Stream the slide's tissue tiles through the encoder in batches, then the MIL head once."""
    from pipelines.wsimil.infer import embed, mil_head

    t0 = time.perf_counter()
    candidates = reader.candidate_chunks()
    todo = max(1, int(np.count_nonzero(candidates)))
    parts: list[np.ndarray] = []
    where: list[np.ndarray] = []
    pending: list[Chunk] = []
    n_pending = 0
    for i, chunk in enumerate(reader.chunks(candidates)):
        pending.append(chunk)
        n_pending += len(chunk.tiles)
        if n_pending >= batch:
            parts.append(embed(encoder, np.concatenate([c.tiles for c in pending]), batch=batch))
            where.extend(c.rc for c in pending)
            pending, n_pending = [], 0
        if i % 16 == 0:
            progress(0.05 + 0.8 * min(1.0, reader.stats.chunks_read / todo), "tiles embedded")
    if pending:
        parts.append(embed(encoder, np.concatenate([c.tiles for c in pending]), batch=batch))
        where.extend(c.rc for c in pending)
    if not parts:
        return SlideScore(reader.grid, reader.stats, np.zeros((0, 2), int), None, time.perf_counter() - t0)
    mil = mil_head(head, np.concatenate(parts))
    return SlideScore(reader.grid, reader.stats, np.concatenate(where), mil, time.perf_counter() - t0)


class WsiMilPipeline:
    """Attention-MIL tumour detection and localisation on H&E whole-slide images."""

    name = "wsi-mil"

    def selects(self, series: SeriesInfo) -> Selection:
        if WSI_STORAGE not in series.sop_class_uids:
            return Selection(False, "no VL Whole Slide Microscopy images")
        volumes = [i for i in series.instances if i.sop_class_uid == WSI_STORAGE and "VOLUME" in _image_type(i)]
        if not volumes:
            return Selection(False, "whole-slide series without a pyramid level (VOLUME image)")
        return Selection(True, f"whole-slide image, {len(volumes)} pyramid level instance(s)")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(ENCODER, batch_size=_BATCH), ModelSpec(HEAD, batch_size=1)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        from pipelines.wsimil.dicom import SlideResult, slide_report, tumour_segmentation
        from pipelines.wsimil.preprocess import open_slide

        opts = ctx.options
        slide_threshold = float(opts.get("slide_threshold", 0.5))
        tile_threshold = float(opts.get("tile_threshold", 0.5))
        max_unreadable = float(opts.get("max_unreadable_fraction", 0.05))
        paths = [i.path for i in series.instances if i.sop_class_uid == WSI_STORAGE]
        reader = open_slide(paths)
        try:
            encoder_batch = ctx.batch_size(ENCODER, _BATCH)  # [models] batch_sizes may override it per node
            score = score_slide(reader, ctx.sessions[ENCODER], ctx.sessions[HEAD], ctx.progress, batch=encoder_batch)
            stats, grid = score.stats, score.grid
            if stats.tiles_unreadable:
                ctx.flag("unreadable_tile", stats.tiles_unreadable)
                ctx.log.warning(
                    "%d of %d tiles could not be decoded (%s)",
                    stats.tiles_unreadable,
                    stats.tiles_examined + stats.tiles_unreadable,
                    ", ".join(sorted(set(stats.errors))),
                )
                examined = stats.tiles_examined + stats.tiles_unreadable
                if stats.tiles_unreadable > max_unreadable * max(examined, 1):
                    raise InputError(
                        f"{stats.tiles_unreadable} of {examined} tiles of the slide could not be decoded "
                        f"(more than {max_unreadable:.0%}); the slide image is damaged"
                    )
            if score.mil is None:
                raise InputError(
                    f"no tissue found on the slide ({stats.chunks_read} regions read, "
                    f"{stats.chunks_skipped_glass} glass-only regions skipped)"
                )
            result = SlideResult(
                probability=float(score.mil.slide_probability),
                threshold=slide_threshold,
                tile_probability=score.probability_map(),
                tissue_tiles=len(score.rc),
                tile_threshold=tile_threshold,
            )
            source = _source_level(series, reader.source_level_size).dataset(pixels=False)
        finally:
            reader.close()
        ctx.log.info(
            "slide scored: %d tissue tiles at %.2f um/px in %.1f s (%.0f tiles/s), %d glass regions skipped, "
            "tumour probability %.3f",
            result.tissue_tiles,
            grid.level_mpp,
            score.seconds,
            result.tissue_tiles / max(score.seconds, 1e-9),
            stats.chunks_skipped_glass,
            result.probability,
        )
        ctx.progress(0.9, "writing segmentation and report")
        version = ctx.model_versions.get(HEAD, "?")
        seg = tumour_segmentation(source, grid, result, ctx, version)
        sr = slide_report(source, seg, grid, result, ctx, version)
        return [seg, sr]

    # ------------------------------------------------------------------ demo
    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pipelines.wsimil.synthetic import write_demo_slide

        return write_demo_slide(folder, seed)

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        from pipelines.wsimil.synthetic import preview

        return preview(inputs, outputs)

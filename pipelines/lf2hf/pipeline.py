"""The lf2hf pipeline plugin: a low-field MR series in, an AI-enhanced derived series out.

The derived series has twice the in-plane matrix (half the pixel spacing),
the source Frame of Reference, positions and orientation, a Source Image
Sequence per image and a Derivation Code Sequence (:mod:`.dicom`). Every
output slice is pushed back through the degradation model and compared with
the acquired slice (:func:`pipelines.lf2hf.infer.degrade`); slices that the
acquisition does not support are flagged in the image (ImageComments), in
the log and in
``aigw_pipeline_flags_total{pipeline="lf2hf",kind="inconsistent_slice"}``.
The enhanced series is a reading aid next to the acquired one, never a
replacement. Options: :class:`pipelines.lf2hf.options.Lf2hfOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from gateway.contract import ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.lf2hf.dicom import enhanced_series
from pipelines.lf2hf.infer import BATCH, MODEL, degrade, enhance
from pipelines.lf2hf.options import Lf2hfOptions
from pipelines.lf2hf.preprocess import field_strength, guess_contrast, read_slices

__all__ = ["Lf2hfPipeline"]


class Lf2hfPipeline:
    """Low-field to high-field translation of MR series (contrast, noise, 2x resolution)."""

    name = "lf2hf"
    options_model = Lf2hfOptions

    def __init__(self, options: Lf2hfOptions | None = None) -> None:
        self.options = options or Lf2hfOptions()

    def selects(self, series: SeriesInfo) -> Selection:
        """Original grey-level MR below ``max_field_t``: what the network was trained to translate."""
        if series.modality != "MR":
            return Selection(False, f"modality {series.modality!r} is not MR")
        image_type = series.first("ImageType") or []
        if "DERIVED" in [str(v).upper() for v in (image_type if isinstance(image_type, list) else [image_type])]:
            return Selection(False, "series is derived (never enhance an enhanced or computed series)")
        if int(series.first("SamplesPerPixel", 1) or 1) != 1:
            return Selection(False, "colour images")
        try:
            b0 = float(series.first("MagneticFieldStrength"))
        except (TypeError, ValueError):
            return Selection(False, "MagneticFieldStrength missing")
        limit = self.options.max_field_t
        if not 0 < b0 < limit:
            return Selection(False, f"MagneticFieldStrength {b0:g} T is not below {limit:g} T")
        return Selection(True, f"low-field MR at {b0:g} T")

    def models(self) -> Sequence[ModelSpec]:
        """The one network, eight slices per call (a 256 x 256 output slice is large)."""
        return [ModelSpec(MODEL, batch_size=BATCH)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        """Read and sort the slices, enhance and check them, and write the derived series."""
        slices, sources, geometry = read_slices(series)
        b0 = field_strength(series, self.options.assume_field_t)
        contrast = guess_contrast(sources[0]) if self.options.contrast == "auto" else self.options.contrast
        ctx.progress(0.2, "slices read")
        out = enhance(ctx.sessions[MODEL], slices, b0, contrast, batch=ctx.batch_size(MODEL, BATCH))
        cons = degrade(out, b0, slices)
        flagged = int(np.count_nonzero(cons.flagged))
        if flagged:
            ctx.flag("inconsistent_slice", flagged)
            ctx.log.warning("%d of %d slices failed the consistency check", flagged, len(slices))
        ctx.progress(0.8, "enhanced")
        return enhanced_series(sources, geometry, out, cons, b0, contrast, ctx)

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        """A synthetic low-field brain series for ``aigw demo`` (needs the lab's simulator)."""
        from pipelines.lf2hf.lab.synthetic import write_lowfield_series

        return write_lowfield_series(folder, seed=seed)

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        """Input, output and the simulated 3 T truth side by side for the demo report."""
        from pipelines.lf2hf.lab.synthetic import preview

        return preview(inputs, outputs)

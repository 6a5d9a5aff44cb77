"""The lf2hf pipeline plugin: a low-field MR series in, a denoised 2x derived series out.

The derived series has twice the in-plane matrix (half the pixel spacing),
the source Frame of Reference, positions and orientation, a Source Image
Sequence per image and a Derivation Code Sequence (:mod:`.dicom`).

Domain gate
-----------
The network translates contrast as it learnt it on one brain template, so
it runs only on a series that passes, in order:

1. the headers (:func:`pipelines.lf2hf.preprocess.sequence_reasons`): body
   part, spin-echo sequence, known weighting;
2. the images (:func:`pipelines.lf2hf.infer.domain_reasons`): trained field
   range, intensity distribution within the training envelope;
3. its own output: every slice consistent with the acquired one
   (:func:`pipelines.lf2hf.infer.degrade`, score at most 1).

A series that fails any of them gets the contrast-preserving result: the
learned data-consistent restoration (:func:`pipelines.lf2hf.infer.restore`,
an unrolled proximal-gradient network trained on domain-randomised anatomy)
or, with ``contrast_preserving = "tv"``, the classical TV reconstruction
(:func:`pipelines.lf2hf.infer.reconstruct_tv`); both are consistent with the
acquired k-space to the noise level, checked per slice with
:func:`pipelines.lf2hf.infer.residual_to_noise`. Or, with ``out_of_domain =
"no_result"`` or when even that check fails, no result: the job fails with
the reason. The reason goes to the job log, to
``aigw_pipeline_flags_total{pipeline="lf2hf",kind}`` (kinds
``out_of_domain`` and ``inconsistent_slice``: slices turned away;
``no_result``: series without a result) and into the Series and Derivation
Descriptions. A flagged slice is therefore never sent. The result is a
reading aid next to the acquired series, never a replacement. Options:
:class:`pipelines.lf2hf.options.Lf2hfOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from gateway.contract import InputError, ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.lf2hf.dicom import Outcome, enhanced_series
from pipelines.lf2hf.infer import (
    BATCH,
    MODEL,
    RESTORE_MODEL,
    degrade,
    domain_reasons,
    enhance,
    reconstruct_tv,
    residual_to_noise,
    restore,
)
from pipelines.lf2hf.options import Lf2hfOptions
from pipelines.lf2hf.preprocess import field_strength, guess_contrast, read_slices, sequence_reasons

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
        """The contrast-translation network and the restoration's prior, eight slices per call."""
        return [ModelSpec(MODEL, batch_size=BATCH), ModelSpec(RESTORE_MODEL, batch_size=BATCH)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        """Read and sort the slices, gate, enhance and check them, and write the derived series."""
        opts = self.options
        slices, sources, geometry = read_slices(series)
        b0 = field_strength(series, opts.assume_field_t)
        contrast = guess_contrast(sources[0]) if opts.contrast == "auto" else opts.contrast
        ctx.progress(0.2, "slices read")
        kind, short = "out_of_domain", "out of domain"
        reasons = ["contrast translation off"] if opts.translate_contrast == "never" else []
        reasons = reasons or sequence_reasons(sources[0], opts.contrast, opts.domain_body_parts)
        reasons = reasons or domain_reasons(slices, b0, contrast)
        if not reasons:
            out = enhance(ctx.sessions[MODEL], slices, b0, contrast, batch=ctx.batch_size(MODEL, BATCH))
            cons = degrade(out, b0, slices)
            flagged = int(np.count_nonzero(cons.flagged))
            if not flagged:
                ctx.progress(0.8, "enhanced")
                return enhanced_series(sources, geometry, out, Outcome(True, cons.score), b0, contrast, ctx)
            kind, short = "inconsistent_slice", "AI output inconsistent"
            reasons = [f"{flagged} of {len(slices)} AI slices failed the consistency check "
                       f"(largest score {float(cons.score.max()):.2f})"]
        elif reasons[0] == "contrast translation off":
            kind, short = "", "translation off"
        reason = "; ".join(reasons)
        if kind:
            ctx.flag(kind, len(slices))
        ctx.log.warning("lf2hf: no AI contrast translation: %s", reason)
        if opts.out_of_domain == "no_result":
            ctx.flag("no_result", 1)
            raise InputError(f"no result: {reason} (out_of_domain = no_result)")
        learned = opts.contrast_preserving == "learned"
        if learned:
            out = restore(ctx.sessions[RESTORE_MODEL], slices, batch=ctx.batch_size(RESTORE_MODEL, BATCH))
        else:
            out = reconstruct_tv(slices)
        ratio = residual_to_noise(out, slices)
        worst = float(ratio.max())
        if worst > opts.max_residual_to_noise:
            ctx.flag("no_result", 1)
            raise InputError(f"no result: the contrast-preserving reconstruction does not explain the acquired "
                             f"images (residual {worst:.2f} x the noise level, above {opts.max_residual_to_noise:g})")
        ctx.progress(0.8, "contrast-preserving reconstruction")
        return enhanced_series(sources, geometry, out, Outcome(False, ratio, reason, short, learned), b0, contrast,
                               ctx)

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        """A synthetic low-field brain series for ``aigw demo`` (needs the lab's simulator)."""
        from pipelines.lf2hf.lab.synthetic import write_lowfield_series

        return write_lowfield_series(folder, seed=seed)

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        """Input, output and the simulated 3 T truth side by side for the demo report."""
        from pipelines.lf2hf.lab.synthetic import preview

        return preview(inputs, outputs)

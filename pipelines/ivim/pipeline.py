"""The IVIM pipeline plugin: DWI series in, IVIM Parametric Maps (and derived MR series) out.

Its options are :class:`~pipelines.ivim.options.IvimOptions` (``[pipelines.ivim]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset

from gateway.contract import ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.ivim.dicom import derived_mr_series, parametric_maps, preload_standard_tables
from pipelines.ivim.infer import MODEL, NET_BATCH, fit_maps, method_description
from pipelines.ivim.options import IvimOptions
from pipelines.ivim.preprocess import background_mask, bvalues_from_headers, load_dwi

__all__ = ["IvimPipeline"]


class IvimPipeline:
    """IVIM maps (D, D*, f, S0, and the network's standard deviations of D, D*, f) from multi-b-value DWI."""

    name = "ivim"
    options_model = IvimOptions

    def __init__(self, options: IvimOptions | None = None) -> None:
        self.options = options or IvimOptions()

    def selects(self, series: SeriesInfo) -> Selection:
        if series.modality != "MR":
            return Selection(False, f"modality {series.modality!r} is not MR")
        bvals: set[float] = set()
        for inst in series.instances:
            bvals.update(bvalues_from_headers(inst.headers))
        need = self.options.min_bvalues
        if len(bvals) < need:
            return Selection(False, f"{len(bvals)} distinct b-value(s) found; IVIM needs at least {need}")
        return Selection(True, f"MR diffusion with {len(bvals)} distinct b-values")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(MODEL, batch_size=NET_BATCH)]

    def warm_up(self) -> None:
        """Load highdicom's standard tables at start (:class:`gateway.contract.WarmUpCapable`)."""
        preload_standard_tables()

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        method = self.options.method
        volume = load_dwi(series)
        ctx.progress(0.3, "series read")
        mask = background_mask(volume, self.options.mask_fraction)
        maps = fit_maps(volume, mask, method, ctx, uncertainty=self.options.uncertainty)
        ctx.progress(0.8, "maps fitted")
        description = method_description(method, ctx.model_versions)
        out: list[Dataset] = parametric_maps(volume, maps, ctx, description)
        if self.options.derived_series:
            out.extend(derived_mr_series(volume, maps, ctx, description))
        return out

    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pipelines.ivim.lab.synthetic import make_dwi_study

        return make_dwi_study(folder, seed=seed).paths

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        from pipelines.ivim.lab.preview import preview

        return preview(inputs, outputs)

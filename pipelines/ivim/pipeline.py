"""The IVIM pipeline plugin: DWI series in, IVIM Parametric Map (and derived MR series) out.

Options (``[pipelines.ivim]`` in the configuration):

``method``
    ``"net"`` (default, the exported network), ``"lsq-segmented"`` or
    ``"lsq-full"`` (bounded least squares).
``derived_series``
    Also send one MR series per parameter for viewers without Parametric
    Map support (default true).
``mask_fraction``
    Voxels whose lowest-b signal is under this fraction of its 99th
    percentile are background, not fitted (default 0.08).
``min_bvalues``
    Distinct b-values the default selector requires (default 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from gateway.contract import InputError, ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines.ivim.dicom import PARAMETERS, derived_mr_series, parametric_maps
from pipelines.ivim.fit import NET_BATCH, IvimMethod, select_method
from pipelines.ivim.preprocess import background_mask, bvalues_from_headers, load_dwi

__all__ = ["IvimPipeline", "MODEL"]

MODEL = "ivim-net"


class IvimPipeline:
    """IVIM maps (D, D*, f, S0) from multi-b-value diffusion-weighted MR."""

    name = "ivim"

    def __init__(self, min_bvalues: int = 4) -> None:
        self.min_bvalues = min_bvalues

    def selects(self, series: SeriesInfo) -> Selection:
        if series.modality != "MR":
            return Selection(False, f"modality {series.modality!r} is not MR")
        bvals: set[float] = set()
        for inst in series.instances:
            bvals.update(bvalues_from_headers(inst.headers))
        if len(bvals) < self.min_bvalues:
            return Selection(False, f"{len(bvals)} distinct b-value(s) found; IVIM needs at least {self.min_bvalues}")
        return Selection(True, f"MR diffusion with {len(bvals)} distinct b-values")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(MODEL, batch_size=NET_BATCH)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        opts = ctx.options
        try:
            method = IvimMethod(str(opts.get("method", IvimMethod.NET.value)))
        except ValueError:
            raise InputError(f"unknown IVIM method {opts.get('method')!r} in [pipelines.ivim]") from None
        volume = load_dwi(series)
        ctx.progress(0.3, "series read")
        mask = background_mask(volume, float(opts.get("mask_fraction", 0.08)))
        z, k, rows, cols = volume.signals.shape
        voxels = volume.signals.transpose(0, 2, 3, 1)[mask]  # [N, K]
        ctx.log.info("fitting %d voxels on %d b-values with %s", voxels.shape[0], k, method.value)
        maps = {p.key: np.zeros((z, rows, cols), np.float32) for p in PARAMETERS}
        if voxels.shape[0]:
            try:
                estimator = select_method(method, ctx.sessions.get(MODEL), batch=ctx.batch_size(MODEL, NET_BATCH))
                params = estimator.fit(voxels.astype(np.float32), volume.bvalues)
            except ValueError as exc:  # protocol outside what the method supports
                raise InputError(str(exc)) from None
            for p in PARAMETERS:
                values = np.nan_to_num(getattr(params, p.key), nan=0.0, posinf=0.0, neginf=0.0)
                maps[p.key][mask] = np.maximum(values, 0.0)
        ctx.progress(0.8, "maps fitted")
        version = ctx.model_versions.get(MODEL, "?")
        description = f"{method.value}" + (f" {MODEL} {version}" if method == IvimMethod.NET else "")
        out: list[Dataset] = parametric_maps(volume, maps, ctx, description)
        if bool(opts.get("derived_series", True)):
            out.extend(derived_mr_series(volume, maps, ctx, description))
        return out

    # ------------------------------------------------------------------ demo
    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pipelines.ivim.synthetic import make_dwi_study

        return make_dwi_study(folder, seed=seed).paths

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        from pipelines.ivim.preview import preview

        return preview(inputs, outputs)

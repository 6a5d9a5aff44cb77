"""The lf2hf pipeline plugin: a low-field MR series in, an AI-enhanced derived series out.

The derived series has twice the in-plane matrix (half the pixel spacing),
the source Frame of Reference, positions and orientation, a Source Image
Sequence per image and a Derivation Code Sequence. Every output slice is
pushed back through the degradation model and compared with the acquired
slice (:func:`pipelines.lf2hf.infer.degrade`); slices that the acquisition
does not support are flagged in the image (ImageComments), in the log and in
``aigw_pipeline_flags_total{pipeline="lf2hf",kind="inconsistent_slice"}``.
The enhanced series is a reading aid next to the acquired one, never a
replacement.

Options (``[pipelines.lf2hf]``):

``max_field_t``
    The default selector takes MR series below this MagneticFieldStrength (1.0).
``assume_field_t``
    Field strength to use when a routed series lacks MagneticFieldStrength
    (default: none, the job fails with that reason).
``contrast``
    ``"auto"`` (from echo and repetition times), ``"T1w"`` or ``"T2w"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset

from gateway.contract import Geometry, InputError, ModelSpec, RunContext, Selection, Series, SeriesInfo
from pipelines._derived import DerivedImage, derived_mr_image

__all__ = ["Lf2hfPipeline", "MODEL"]

MODEL = "lf2hf-net"
# PS3.16 CID 7203: the closest standard description of a 2x resampling; the
# derivation description says what the network does.
DERIVATION = hd.sr.CodedConcept("113085", "DCM", "Spatial resampling")


def _image_type(info: SeriesInfo) -> list[str]:
    v = info.first("ImageType") or []
    return [str(x).upper() for x in (v if isinstance(v, list) else [v])]


def guess_contrast(headers: Any) -> str:
    """T2w for long echo times (or a description saying so), else T1w."""
    desc = str(headers.get("SeriesDescription", "")).upper()
    if "T2" in desc or "FLAIR" in desc:
        return "T2w"
    if "T1" in desc:
        return "T1w"
    try:
        te = float(headers.get("EchoTime") or 0)
    except (TypeError, ValueError):
        te = 0.0
    return "T2w" if te >= 60 else "T1w"


class Lf2hfPipeline:
    """Low-field to high-field translation of MR series (contrast, noise, 2x resolution)."""

    name = "lf2hf"

    def __init__(self, max_field_t: float = 1.0) -> None:
        self.max_field_t = max_field_t

    def selects(self, series: SeriesInfo) -> Selection:
        if series.modality != "MR":
            return Selection(False, f"modality {series.modality!r} is not MR")
        if "DERIVED" in _image_type(series):
            return Selection(False, "series is derived (never enhance an enhanced or computed series)")
        if int(series.first("SamplesPerPixel", 1) or 1) != 1:
            return Selection(False, "colour images")
        field = series.first("MagneticFieldStrength")
        try:
            b0 = float(field)
        except (TypeError, ValueError):
            return Selection(False, "MagneticFieldStrength missing")
        if not 0 < b0 < self.max_field_t:
            return Selection(False, f"MagneticFieldStrength {b0:g} T is not below {self.max_field_t:g} T")
        return Selection(True, f"low-field MR at {b0:g} T")

    def models(self) -> Sequence[ModelSpec]:
        return [ModelSpec(MODEL, batch_size=8)]

    def run(self, series: Series, ctx: RunContext) -> list[Dataset]:
        from pipelines.lf2hf.infer import degrade, enhance

        opts = ctx.options
        slices, sources, geometry = _read_slices(series)
        field = series.first("MagneticFieldStrength")
        try:
            b0 = float(field) if field not in (None, "") else float(opts["assume_field_t"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                "MagneticFieldStrength (0018,0087) is missing; set [pipelines.lf2hf] assume_field_t to process anyway"
            ) from None
        if not 0.01 <= b0 <= 1.5:
            raise InputError(f"MagneticFieldStrength {b0:g} T is outside what the model can translate (0.05-0.55 T)")
        contrast = str(opts.get("contrast", "auto"))
        if contrast == "auto":
            contrast = guess_contrast(sources[0])
        ctx.progress(0.2, "slices read")
        out = enhance(ctx.sessions[MODEL], slices, b0, contrast, batch=ctx.batch_size(MODEL, 8))
        cons = degrade(out, b0, slices)
        flagged = int(np.count_nonzero(cons.flagged))
        if flagged:
            ctx.flag("inconsistent_slice", flagged)
            ctx.log.warning("%d of %d slices failed the consistency check", flagged, len(slices))
        ctx.progress(0.8, "enhanced")
        version = ctx.model_versions.get(MODEL, "?")
        what = f"{MODEL} {version}, {b0:g} T {contrast} input"
        lo, hi = np.percentile(out[out > 0], [1, 99]) if np.any(out > 0) else (0.0, 1.0)
        # Signal in arbitrary units, as the source's: stored as is, or scaled down to fit
        # 16 bits. There is no Modality LUT in the MR Image IOD, so nothing to rescale.
        gain = 60000.0 / float(out.max()) if float(out.max()) > 60000 else 1.0
        src0 = sources[0]
        description = f"AI-enhanced {src0.get('SeriesDescription', '')}".strip()
        datasets = []
        for z, (src, geom) in enumerate(zip(sources, geometry)):
            score = float(cons.score[z])
            verdict = (
                "FLAGGED: the acquired image does not support this slice; read the acquired series"
                if cons.flagged[z]
                else "consistent with the acquired image"
            )
            img = DerivedImage(
                series_uid=ctx.uid("series"),
                sop_uid=ctx.uid(f"instance/{z}"),
                series_number=int(src0.get("SeriesNumber") or 0) % 100_000 * 10 + 9,
                instance_number=z + 1,
                description=description,
                image_type=("OTHER", "AI_ENHANCED"),
                derivation=DERIVATION,
                derivation_description=(
                    f"AI translation to 3 T-like contrast, denoising and 2x in-plane resolution ({what}); "
                    "a reading aid that does not replace the acquired images"
                ),
                pixels=np.clip(np.rint(out[z] * gain), 0, 65535).astype(np.uint16),
                geometry=_half_spacing(geom),
                window=((lo + hi) / 2 * gain, max((hi - lo) * gain, 1.0)),
                comments=f"{verdict} (consistency score {score:.2f}, flagged above 1; {what})",
            )
            datasets.append(derived_mr_image(src, ctx, img))
        return datasets

    # ------------------------------------------------------------------ demo
    def demo_study(self, folder: Path, seed: int) -> list[Path]:
        from pipelines.lf2hf.synthetic import write_lowfield_series

        return write_lowfield_series(folder, seed=seed)

    def demo_preview(self, inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
        from pipelines.lf2hf.synthetic import preview

        return preview(inputs, outputs)


def _half_spacing(g: Geometry) -> Geometry:
    """Geometry of the 2x image: half the spacing, first pixel centre moved a quarter pixel.

    The old first pixel covers [-s/2, s/2] around its centre P; the new first
    pixel is the top-left quarter, centred at P - s_col/4 * row_dir -
    s_row/4 * col_dir (PS3.3 C.7.6.2.1.1: the first orientation triplet is
    the direction of the rows, PixelSpacing is row spacing then column spacing).
    """
    o = np.asarray(g.orientation, dtype=float)
    row_spacing, col_spacing = g.pixel_spacing
    p = np.asarray(g.position, dtype=float) - (col_spacing / 4) * o[:3] - (row_spacing / 4) * o[3:]
    return Geometry(
        (float(p[0]), float(p[1]), float(p[2])),
        g.orientation,
        (row_spacing / 2, col_spacing / 2),
        g.slice_thickness,
    )


def _read_slices(series: Series) -> tuple[np.ndarray, list[Dataset], list[Geometry]]:
    """Frames [N, H, W] (modality LUT applied) of classic or enhanced images, sorted along the normal."""
    frames: list[np.ndarray] = []
    sources: list[Dataset] = []
    geoms: list[Geometry] = []
    for inst in series.instances:
        header = inst.dataset(pixels=False)
        for frame in inst.frames():
            if frame.pixels.ndim != 2:
                raise InputError("colour images cannot be translated (SamplesPerPixel != 1)")
            if frame.geometry is None:
                raise InputError("an image lacks position, orientation or pixel spacing")
            if frames and frame.pixels.shape != frames[0].shape:
                raise InputError(f"images differ in size ({frame.pixels.shape} and {frames[0].shape})")
            frames.append(frame.pixels)
            sources.append(header)
            geoms.append(frame.geometry)
    if not frames:
        raise InputError("series has no images")
    order = sorted(range(len(frames)), key=lambda i: geoms[i].slice_location)
    return (
        np.stack([frames[i] for i in order]).astype(np.float32),
        [sources[i] for i in order],
        [geoms[i] for i in order],
    )

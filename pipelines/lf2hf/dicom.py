"""Enhanced slices out, DICOM out: the derived MR series of lf2hf (PS3.3 A.4, MR Image IOD).

Each enhanced slice becomes one MR Image instance derived from its source
slice (:func:`pipelines._derived.derived_mr_image`): same Frame of
Reference and orientation, half the pixel spacing, a Source Image Sequence
and a Derivation Code Sequence. The verdict of the consistency check goes
into Image Comments, which most viewers show in the image overlay, so a
reader sees a flagged slice as flagged without opening the log.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from gateway.contract import Geometry, RunContext, derived_series_number
from pipelines._derived import DerivedImage, derived_mr_image
from pipelines.lf2hf.infer import MODEL, ConsistencyResult

__all__ = ["DERIVATION", "SERIES_OFFSET", "enhanced_series", "half_spacing"]

# PS3.16 CID 7203: the closest standard description of a 2x resampling; the
# derivation description says what the network does.
DERIVATION = hd.sr.CodedConcept("113085", "DCM", "Spatial resampling")
#: Digit of the enhanced series' number after the source's (source 3 gives 39).
SERIES_OFFSET: int = 9
#: Largest stored value the enhanced signal is scaled into when it exceeds it,
#: leaving headroom below the 16-bit maximum.
_MAX_STORED: float = 60000.0


def half_spacing(g: Geometry) -> Geometry:
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


def enhanced_series(
    sources: Sequence[Dataset],
    geometry: Sequence[Geometry],
    enhanced: np.ndarray,
    consistency: ConsistencyResult,
    field_strength_t: float,
    contrast: str,
    ctx: RunContext,
) -> list[Dataset]:
    """One derived MR image per enhanced slice, in slice order.

    Parameters
    ----------
    sources, geometry : sequence
        Header and plane geometry of each acquired slice, as
        :func:`pipelines.lf2hf.preprocess.read_slices` returns them.
    enhanced : numpy.ndarray
        float32 ``[N, 2H, 2W]`` from :func:`pipelines.lf2hf.infer.enhance`.
    consistency : ConsistencyResult
        :func:`pipelines.lf2hf.infer.degrade` of ``enhanced``; its verdict
        and score are written into each image.
    field_strength_t, contrast : float, str
        What the network was told, named in the derivation description.
    ctx : RunContext
        Deterministic UIDs, equipment identity and model version.

    Returns
    -------
    list of pydicom.Dataset
    """
    out = enhanced
    version = ctx.model_versions.get(MODEL, "?")
    what = f"{MODEL} {version}, {field_strength_t:g} T {contrast} input"
    lo, hi = np.percentile(out[out > 0], [1, 99]) if np.any(out > 0) else (0.0, 1.0)
    # Signal in arbitrary units, as the source's: stored as is, or scaled down to fit
    # 16 bits. There is no Modality LUT in the MR Image IOD, so nothing to rescale.
    gain = _MAX_STORED / float(out.max()) if float(out.max()) > _MAX_STORED else 1.0
    src0 = sources[0]
    description = f"AI-enhanced {src0.get('SeriesDescription', '')}".strip()
    datasets = []
    for z, (src, geom) in enumerate(zip(sources, geometry)):
        score = float(consistency.score[z])
        verdict = (
            "FLAGGED: the acquired image does not support this slice; read the acquired series"
            if consistency.flagged[z]
            else "consistent with the acquired image"
        )
        img = DerivedImage(
            series_uid=ctx.uid("series"),
            sop_uid=ctx.uid(f"instance/{z}"),
            series_number=derived_series_number(src0.get("SeriesNumber"), SERIES_OFFSET),
            instance_number=z + 1,
            description=description,
            image_type=("OTHER", "AI_ENHANCED"),
            derivation=DERIVATION,
            derivation_description=(
                f"AI translation to 3 T-like contrast, denoising and 2x in-plane resolution ({what}); "
                "a reading aid that does not replace the acquired images"
            ),
            pixels=np.clip(np.rint(out[z] * gain), 0, 65535).astype(np.uint16),
            geometry=half_spacing(geom),
            window=((lo + hi) / 2 * gain, max((hi - lo) * gain, 1.0)),
            comments=f"{verdict} (consistency score {score:.2f}, flagged above 1; {what})",
        )
        datasets.append(derived_mr_image(src, ctx, img))
    return datasets

"""Enhanced slices out, DICOM out: the derived MR series of lf2hf (PS3.3 A.4, MR Image IOD).

Each enhanced slice becomes one MR Image instance derived from its source
slice (:func:`pipelines._derived.derived_mr_image`): same Frame of
Reference and orientation, half the pixel spacing, a Source Image Sequence
and a Derivation Code Sequence. The Series Description and Derivation
Description say which blocks ran (:class:`Outcome`): "AI 3T-like contrast,
denoised 2x" when the domain gate let the network translate the contrast,
"AI denoised 2x, contrast preserved (reason)" when the learned
data-consistent restoration ran instead, "TV denoised 2x, contrast
preserved (reason)" when the classical one did. The verdict of the
consistency check goes into Image Comments, which most viewers show in the
image overlay. A flagged slice never gets here: the pipeline sends its
series down the contrast-preserving path instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from gateway.contract import Geometry, RunContext, derived_series_number
from pipelines._derived import DerivedImage, derived_mr_image
from pipelines.lf2hf.infer import (
    MODEL,
    RESTORE_ITERATIONS,
    RESTORE_MODEL,
    RESTORE_TAU,
    TV_ITERATIONS,
    TV_LAMBDA_OVER_SIGMA,
)

__all__ = ["DERIVATION", "LEARNED_PRESERVED_LABEL", "SERIES_OFFSET", "Outcome", "enhanced_series", "half_spacing"]

# PS3.16 CID 7203: the closest standard description of a 2x resampling; the
# derivation description says what the network does.
DERIVATION = hd.sr.CodedConcept("113085", "DCM", "Spatial resampling")
#: Digit of the enhanced series' number after the source's (source 3 gives 39).
SERIES_OFFSET: int = 9
#: Largest stored value the enhanced signal is scaled into when it exceeds it,
#: leaving headroom below the 16-bit maximum.
_MAX_STORED: float = 60000.0
#: Series Description (LO, 64 characters, PS3.5 6.2) of each path.
AI_LABEL: str = "AI 3T-like contrast, denoised 2x"
PRESERVED_LABEL: str = "TV denoised 2x, contrast preserved"
LEARNED_PRESERVED_LABEL: str = "AI denoised 2x, contrast preserved"


@dataclass(frozen=True)
class Outcome:
    """Which blocks ran on a series, and the per-slice evidence written into each image.

    Attributes
    ----------
    translated : bool
        True: the network's 3 T-like contrast translation (domain gate
        passed); False: the contrast-preserving TV reconstruction.
    score : numpy.ndarray
        float ``[N]``: the consistency score of :func:`pipelines.lf2hf.infer.degrade`
        (translated) or :func:`pipelines.lf2hf.infer.residual_to_noise`
        (contrast preserved).
    reason : str
        Why the gate turned the series away (empty when translated).
    short_reason : str
        The same in a few words, for the Series Description.
    learned : bool
        Contrast preserved by the learned data-consistent restoration
        (:func:`pipelines.lf2hf.infer.restore`) rather than TV.
    """

    translated: bool
    score: np.ndarray
    reason: str = ""
    short_reason: str = ""
    learned: bool = False


def half_spacing(g: Geometry) -> Geometry:
    """Geometry of the 2x image: half the spacing, the first pixel centre where it was.

    Both results are on the grid of zero-filled k-space (the acquisition
    operator keeps the central half of k-space, and the network was trained
    on pairs made that way), whose sample ``2j`` is the acquired sample
    ``j``: the scanner's own zero-fill interpolation keeps Image Position
    (Patient) the same way. PixelSpacing is row spacing then column spacing
    (PS3.3 C.7.6.2.1.1).
    """
    row_spacing, col_spacing = g.pixel_spacing
    return Geometry(g.position, g.orientation, (row_spacing / 2, col_spacing / 2), g.slice_thickness)


def enhanced_series(
    sources: Sequence[Dataset],
    geometry: Sequence[Geometry],
    enhanced: np.ndarray,
    outcome: Outcome,
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
        float32 ``[N, 2H, 2W]`` from :func:`pipelines.lf2hf.infer.enhance`
        or :func:`pipelines.lf2hf.infer.reconstruct_tv`.
    outcome : Outcome
        Which blocks ran and each slice's score, written into each image.
    field_strength_t, contrast : float, str
        What the acquisition was, named in the derivation description.
    ctx : RunContext
        Deterministic UIDs, equipment identity and model version.

    Returns
    -------
    list of pydicom.Dataset
    """
    out = enhanced
    version = ctx.model_versions.get(MODEL, "?")
    src0 = sources[0]
    source_desc = str(src0.get("SeriesDescription", ""))
    if outcome.translated:
        what = f"{MODEL} {version}, {field_strength_t:g} T {contrast} input"
        description = f"{AI_LABEL} {source_desc}".strip()
        derivation = (
            f"AI translation to 3 T-like contrast, denoising and 2x in-plane resolution ({what}); domain gate "
            "passed; a reading aid that does not replace the acquired images"
        )
        image_type = ("OTHER", "AI_ENHANCED")
    elif outcome.learned:
        version = ctx.model_versions.get(RESTORE_MODEL, "?")
        what = f"{RESTORE_MODEL} {version}, {field_strength_t:g} T {contrast} input"
        description = f"{LEARNED_PRESERVED_LABEL} ({outcome.short_reason})"
        derivation = (
            f"AI denoising and 2x in-plane resolution by an unrolled proximal-gradient network ({what}; "
            f"{RESTORE_ITERATIONS} gradient steps through the acquisition operator and a learned prior, then "
            f"projection onto the data within {RESTORE_TAU:g} x the noise level); contrast preserved, no AI "
            f"contrast translation: {outcome.reason}; a reading aid that does not replace the acquired images"
        )
        image_type = ("OTHER", "DENOISED")
    else:
        what = f"{field_strength_t:g} T {contrast} input"
        description = f"{PRESERVED_LABEL} ({outcome.short_reason})"
        derivation = (
            "Denoising and 2x in-plane resolution by total-variation reconstruction consistent with the acquired "
            f"k-space (lambda {TV_LAMBDA_OVER_SIGMA:g} x noise sigma, {TV_ITERATIONS} iterations; {what}); "
            f"contrast preserved, no AI contrast translation: {outcome.reason}; a reading aid that does not "
            "replace the acquired images"
        )
        image_type = ("OTHER", "DENOISED")
    lo, hi = np.percentile(out[out > 0], [1, 99]) if np.any(out > 0) else (0.0, 1.0)
    # Signal in arbitrary units, as the source's: stored as is, or scaled down to fit
    # 16 bits. There is no Modality LUT in the MR Image IOD, so nothing to rescale.
    gain = _MAX_STORED / float(out.max()) if float(out.max()) > _MAX_STORED else 1.0
    # The two paths give different images of the same source: they must never share UIDs (PS3.3 C.7.3.1).
    key = "" if outcome.translated else ("restored/" if outcome.learned else "preserved/")
    datasets = []
    for z, (src, geom) in enumerate(zip(sources, geometry)):
        score = float(outcome.score[z])
        if outcome.translated:
            comments = f"consistent with the acquired image (consistency score {score:.2f}, flagged above 1; {what})"
        else:
            comments = (f"contrast preserved; re-degraded output matches the acquired image to {score:.2f} x the "
                        f"noise level; AI contrast translation skipped: {outcome.short_reason}")
        img = DerivedImage(
            series_uid=ctx.uid(f"{key}series"),
            sop_uid=ctx.uid(f"{key}instance/{z}"),
            series_number=derived_series_number(src0.get("SeriesNumber"), SERIES_OFFSET),
            instance_number=z + 1,
            description=description[:64],
            image_type=image_type,
            derivation=DERIVATION,
            derivation_description=derivation[:1024],
            pixels=np.clip(np.rint(out[z] * gain), 0, 65535).astype(np.uint16),
            geometry=half_spacing(geom),
            window=((lo + hi) / 2 * gain, max((hi - lo) * gain, 1.0)),
            comments=comments[:10240],
        )
        datasets.append(derived_mr_image(src, ctx, img))
    return datasets

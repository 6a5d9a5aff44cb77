"""IVIM outputs as DICOM: one Parametric Map and, for any viewer, derived MR series.

The Parametric Map (PS3.3 A.75) holds D, D*, f and S0 as four float32
channels, each with a Real World Value Mapping whose Quantity Definition
names the quantity (DCM 113291 slow diffusion coefficient, 113292 fast
diffusion coefficient, 113293 fast diffusion coefficient fraction) and the
measurement method, the bi-exponential IVIM model (DCM 113251), in UCUM
units. It keeps the source Frame of Reference and plane geometry and
references its source images.

Many viewers do not display Parametric Maps yet, so each parameter can also
go out as a classic MR image series with integer pixels and a rescale slope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodeContentItem, TextContentItem
from pydicom import Dataset

from gateway.contract import RunContext
from pipelines._derived import DerivedImage, derived_mr_image
from pipelines.ivim.preprocess import DwiVolume

__all__ = ["PARAMETERS", "Parameter", "derived_mr_series", "parametric_map"]

_UCUM = "UCUM"
# Diffusion image analysis (CID 7203 Image Derivation).
DERIVATION = hd.sr.CodedConcept("129105", "DCM", "Diffusion image analysis")
MODEL = hd.sr.CodedConcept("113251", "DCM", "Bi-exponential (IVIM) diffusion model")


@dataclass(frozen=True)
class Parameter:
    """One IVIM parameter: map key, labels, quantity code, unit and display scaling."""

    key: str
    label: str  # LUT label (16 characters at most)
    explanation: str
    quantity: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept
    slope: float  # real value per stored integer in the derived MR images
    window: tuple[float, float]  # centre, width in real units


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "d",
        "D",
        "IVIM slow diffusion coefficient D",
        hd.sr.CodedConcept("113291", "DCM", "Slow Diffusion Coefficient"),
        hd.sr.CodedConcept("mm2/s", _UCUM, "mm2/s"),
        1e-7,
        (1.5e-3, 3e-3),
    ),
    Parameter(
        "dstar",
        "DSTAR",
        "IVIM fast (pseudo-) diffusion coefficient D*",
        hd.sr.CodedConcept("113292", "DCM", "Fast Diffusion Coefficient"),
        hd.sr.CodedConcept("mm2/s", _UCUM, "mm2/s"),
        1e-5,
        (0.05, 0.1),
    ),
    Parameter(
        "f",
        "F",
        "IVIM perfusion fraction f (fast diffusion coefficient fraction)",
        hd.sr.CodedConcept("113293", "DCM", "Fast Diffusion Coefficient Fraction"),
        hd.sr.CodedConcept("1", _UCUM, "no units"),
        1e-4,
        (0.3, 0.6),
    ),
    Parameter(
        "s0",
        "S0",
        "IVIM signal at b = 0 (arbitrary units of the source)",
        hd.sr.CodedConcept("110805", "DCM", "T2 Weighted MR Signal Intensity"),
        hd.sr.CodedConcept("1", _UCUM, "no units"),
        0.0,
        (0.0, 0.0),
    ),
)


def _rwvm(p: Parameter, values: np.ndarray, bvalues: np.ndarray) -> hd.pm.RealWorldValueMapping:
    lo, hi = (float(np.min(values)), float(np.max(values))) if values.size else (0.0, 1.0)
    m = hd.pm.RealWorldValueMapping(
        lut_label=p.label,
        lut_explanation=p.explanation,
        unit=p.unit,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1,
        intercept=0,
        quantity_definition=p.quantity,
    )
    # PS3.3 C.7.6.16.2.11.1.2: the quantity and how it was measured (the
    # model). The items may only be CODE or TEXT, so the b-values go in as text.
    m.QuantityDefinitionSequence.append(
        CodeContentItem(hd.sr.CodedConcept("370129005", "SCT", "Measurement Method"), MODEL)
    )
    bvalue_text = TextContentItem(
        hd.sr.CodedConcept("113240", "DCM", "Source image diffusion b-value"),
        ", ".join(f"{b:g}" for b in bvalues) + " s/mm2",
    )
    m.QuantityDefinitionSequence.append(bvalue_text)  # type: ignore[arg-type]
    return m


def _unique(datasets: Sequence[Dataset]) -> list[Dataset]:
    seen: set[str] = set()
    out = []
    for ds in datasets:
        if ds.SOPInstanceUID not in seen:
            seen.add(ds.SOPInstanceUID)
            out.append(ds)
    return out


def _series_number(src: Dataset, offset: int) -> int:
    # Derived from the source so re-runs and other nodes agree (never random).
    return int(src.get("SeriesNumber") or 0) % 100_000 * 10 + offset


def parametric_map(volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str) -> Dataset:
    """Build the Parametric Map holding every parameter as a channel."""
    geo = volume.geometry
    pixel = np.stack([maps[p.key] for p in PARAMETERS], axis=-1).astype(np.float32)  # [Z, R, C, 4]
    sources = _unique(volume.sources)
    further = [ds for ds in _unique(volume.all_sources) if ds.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}]
    thickness = geo[0].slice_thickness
    if thickness is None:
        thickness = abs(geo[1].position[2] - geo[0].position[2]) if len(geo) > 1 else 1.0
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=pixel,
        series_instance_uid=ctx.uid("pm/series"),
        series_number=_series_number(volume.sources[0], 1),
        sop_instance_uid=ctx.uid("pm/instance"),
        instance_number=1,
        manufacturer=ctx.identity.manufacturer,
        manufacturer_model_name=ctx.identity.model_name,
        software_versions=ctx.identity.software_version,
        device_serial_number=ctx.identity.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[[_rwvm(p, maps[p.key], volume.bvalues)] for p in PARAMETERS],
        voi_lut_transformations=[
            # Widths under 1 need LINEAR_EXACT (PS3.3 C.11.2.1.3); D is ~1e-3 mm2/s.
            hd.VOILUTTransformation(
                window_center=PARAMETERS[0].window[0],
                window_width=PARAMETERS[0].window[1],
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_label="IVIM",
        content_description=description[:64],
        plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, g.position) for g in geo],
        plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, geo[0].orientation),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=geo[0].pixel_spacing, slice_thickness=thickness),
        further_source_images=further or None,
        derivation=DERIVATION,
    )
    pm.SeriesDescription = f"IVIM maps AI ({description})"[:64]
    if "Laterality" not in pm:
        pm.Laterality = volume.sources[0].get("Laterality", "")  # General Series, type 2C
    if ctx.identity.institution_name:
        pm.InstitutionName = ctx.identity.institution_name
    return pm


def derived_mr_series(
    volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str
) -> list[Dataset]:
    """One classic MR series per parameter with integer pixels and a rescale slope."""
    out: list[Dataset] = []
    for pi, p in enumerate(PARAMETERS):
        values = maps[p.key]
        slope = p.slope
        if slope == 0.0:  # S0: scale to the 16-bit range of this series
            slope = max(float(values.max()) / 60000.0, 1e-6)
        window = p.window if p.window[1] > 0 else (float(values.max()) / 2, float(values.max()) or 1.0)
        for z, (geom, src) in enumerate(zip(volume.geometry, volume.sources)):
            img = DerivedImage(
                series_uid=ctx.uid(f"mr/{p.key}/series"),
                sop_uid=ctx.uid(f"mr/{p.key}/instance/{z}"),
                series_number=_series_number(src, 2 + pi),
                instance_number=z + 1,
                description=f"IVIM {p.label} AI ({description})",
                image_type=("DIFFUSION", p.label),
                derivation=DERIVATION,
                derivation_description=f"{p.explanation}; {description}",
                pixels=np.clip(np.rint(values[z] / slope), 0, 65535).astype(np.uint16),
                geometry=geom,
                window=window,
                rescale_slope=slope,
            )
            out.append(derived_mr_image(src, ctx, img))
    return out

"""IVIM outputs as DICOM: one Parametric Map per parameter and, for any viewer, derived MR series.

Each of D, D*, f and S0 goes out as its own Parametric Map (PS3.3 A.75) in
its own series, as quantitative imaging tools do (one map, one quantity):

* every parameter gets its own Frame VOI LUT window, so no parameter is
  shown through another one's window (a shared window left D*, f and S0
  all white);
* the frames of one map differ only by their plane position, so the
  Dimension Index (Image Position) identifies every frame (PS3.3 C.7.6.17)
  and the map loads as a volume;
* float32 pixels with a Real World Value Mapping whose Quantity Definition
  names the quantity (DCM 113291 slow diffusion coefficient, 113292 fast
  diffusion coefficient, 113293 fast diffusion coefficient fraction) and
  the measurement method, the bi-exponential IVIM model (DCM 113251), in
  UCUM units.

With the network (and the ``uncertainty`` option, on by default) the
per-voxel standard deviations of D, D* and f go out the same way, one
Parametric Map each: the same quantity code and UCUM unit as the parameter,
with a Derivation (DCM 121401) of Standard Deviation (SCT 386136009) added to
the Quantity Definition, as SR measurements qualify a statistic (TID 1419,
CID 7464); each has its own window from its data and its LUT label is the
parameter's with ``_SD`` (``D_SD``, ``DSTAR_SD``, ``F_SD``). Each shares its
parameter's series number, since the gateway gives a pipeline nine result
digits and the parameters' maps and derived series take eight.

Each map keeps the source Frame of Reference and plane geometry and
references its source images.

Many viewers do not display Parametric Maps yet, so each parameter can also
go out as a classic MR series. The MR Image IOD has no Modality LUT, so its
pixels are the quantity as integers in a fixed scale: D and D* in
1e-6 and 1e-5 mm2/s, f in 1e-4 (0.01 %), S0 in the source's units, and
each standard deviation in its parameter's scale. The series description
names the scale and a Real World Value Mapping states it (see
:mod:`pipelines._derived`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodeContentItem, TextContentItem
from pydicom import Dataset

from gateway.contract import RunContext, derived_series_number
from pipelines._derived import DerivedImage, RealWorldScale, derived_mr_image
from pipelines._uids import pin_dimension_organization
from pipelines.ivim.preprocess import DwiVolume

__all__ = ["PARAMETERS", "UNCERTAINTIES", "Parameter", "derived_mr_series", "outputs_of", "parametric_maps"]

_UCUM = "UCUM"
# Diffusion image analysis (CID 7203 Image Derivation).
DERIVATION = hd.sr.CodedConcept("129105", "DCM", "Diffusion image analysis")
MODEL = hd.sr.CodedConcept("113251", "DCM", "Bi-exponential (IVIM) diffusion model")
_MM2_S = hd.sr.CodedConcept("mm2/s", _UCUM, "mm2/s")
_NO_UNITS = hd.sr.CodedConcept("1", _UCUM, "no units")
# The uncertainty maps' quantity is the parameter's, modified by its statistic,
# as measurements are in SR (TID 1419: Derivation, CID 7464 Standard Deviation).
DERIVATION_CONCEPT = hd.sr.CodedConcept("121401", "DCM", "Derivation")
STANDARD_DEVIATION = hd.sr.CodedConcept("386136009", "SCT", "Standard Deviation")


@dataclass(frozen=True)
class Parameter:
    """One output map: key, labels, quantity code, unit, display, stored scale and series digit."""

    key: str
    label: str  # LUT label (16 characters at most)
    explanation: str
    quantity: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept
    window: tuple[float, float] | None  # centre, width in real units; None: from the data
    stored_slope: float | None  # real value per stored integer in derived MR images; None: source units
    stored_unit: str  # that scale in words, for the series description
    offset: int  # series digit of the Parametric Map; the derived MR series has offset + len(PARAMETERS)
    symbol: str  # the parameter's usual symbol, for text
    statistic: hd.sr.CodedConcept | None = None  # None: the quantity itself; else a statistic of it

    def scale(self) -> RealWorldScale | None:
        """The Real World Value Mapping of the derived MR images (None for arbitrary units)."""
        if self.stored_slope is None:
            return None
        return RealWorldScale(self.label, self.explanation[:64], self.quantity, self.unit, self.stored_slope)

    def uncertainty(self) -> "Parameter":
        """The map of this parameter's per-voxel standard deviation, in the same units and stored scale.

        It shares the parameter's series digits: :func:`gateway.contract.derived_series_number`
        allows nine result digits, and the four parameters' maps and derived series take eight,
        so each uncertainty series sorts next to its parameter's series instead.
        """
        return dataclasses.replace(
            self,
            key=f"{self.key}_sd",
            label=f"{self.label}_SD",
            explanation=f"standard deviation of IVIM {self.symbol} (per-voxel uncertainty)",
            window=None,
            statistic=STANDARD_DEVIATION,
        )


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "d",
        "D",
        "IVIM slow diffusion coefficient D",
        hd.sr.CodedConcept("113291", "DCM", "Slow Diffusion Coefficient"),
        _MM2_S,
        (1.5e-3, 3e-3),
        1e-6,
        "1e-6 mm2/s",
        1,
        "D",
    ),
    Parameter(
        "dstar",
        "DSTAR",
        "IVIM fast (pseudo-) diffusion coefficient D*",
        hd.sr.CodedConcept("113292", "DCM", "Fast Diffusion Coefficient"),
        _MM2_S,
        (0.05, 0.1),
        1e-5,
        "1e-5 mm2/s",
        2,
        "D*",
    ),
    Parameter(
        "f",
        "F",
        "IVIM perfusion fraction f (fast diffusion coefficient fraction)",
        hd.sr.CodedConcept("113293", "DCM", "Fast Diffusion Coefficient Fraction"),
        _NO_UNITS,
        (0.3, 0.6),
        1e-4,
        "1e-4",
        3,
        "f",
    ),
    Parameter(
        "s0",
        "S0",
        "IVIM signal at b = 0 (arbitrary units of the source)",
        hd.sr.CodedConcept("110805", "DCM", "T2 Weighted MR Signal Intensity"),
        _NO_UNITS,
        None,
        None,
        "source units",
        4,
        "S0",
    ),
)
#: The standard-deviation maps of D, D* and f (the network's uncertainty).
UNCERTAINTIES: tuple[Parameter, ...] = tuple(p.uncertainty() for p in PARAMETERS if p.key != "s0")


def outputs_of(maps: dict[str, np.ndarray]) -> list[Parameter]:
    """The parameters and uncertainties that ``maps`` holds, parameters first."""
    return [p for p in (*PARAMETERS, *UNCERTAINTIES) if p.key in maps]


def display_window(p: Parameter, values: np.ndarray) -> tuple[float, float]:
    """Centre and width in real units: the parameter's fixed window, or the 1-99th percentile of tissue."""
    if p.window is not None:
        return p.window
    tissue = values[values > 0]
    if not tissue.size:
        return (0.5, 1.0)
    lo, hi = (float(v) for v in np.percentile(tissue, [1, 99]))
    return ((lo + hi) / 2, max(hi - lo, 1e-6))


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
    # PS3.3 C.7.6.16.2.11.1.2: the quantity, which statistic of it, and how it
    # was measured (the model). The items may only be CODE or TEXT, so the
    # b-values go in as text.
    if p.statistic is not None:
        m.QuantityDefinitionSequence.append(CodeContentItem(DERIVATION_CONCEPT, p.statistic))
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


def parametric_maps(volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str) -> list[Dataset]:
    """One Parametric Map per map in ``maps`` (parameters, then uncertainties), each in its own series and window."""
    geo = volume.geometry
    sources = _unique(volume.sources)
    further = [ds for ds in _unique(volume.all_sources) if ds.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}]
    thickness = geo[0].slice_thickness
    if thickness is None:
        thickness = abs(geo[1].position[2] - geo[0].position[2]) if len(geo) > 1 else 1.0
    laterality = volume.sources[0].get("Laterality")
    body_part = volume.sources[0].get("BodyPartExamined")
    out: list[Dataset] = []
    for p in outputs_of(maps):
        centre, width = display_window(p, maps[p.key])
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=maps[p.key].astype(np.float32),  # [Z, R, C]: one frame per plane position
            series_instance_uid=ctx.uid(f"pm/{p.key}/series"),
            series_number=derived_series_number(volume.sources[0].get("SeriesNumber"), p.offset),
            sop_instance_uid=ctx.uid(f"pm/{p.key}/instance"),
            instance_number=1,
            manufacturer=ctx.identity.manufacturer,
            manufacturer_model_name=ctx.identity.model_name,
            software_versions=ctx.identity.software_version,
            device_serial_number=ctx.identity.device_serial_number,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[_rwvm(p, maps[p.key], volume.bvalues)],
            voi_lut_transformations=[
                # Widths under 1 need LINEAR_EXACT (PS3.3 C.11.2.1.3); D is ~1e-3 mm2/s.
                hd.VOILUTTransformation(
                    window_center=centre,
                    window_width=width,
                    voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
                )
            ],
            content_label=f"IVIM{p.label}"[:16],
            content_description=f"{p.explanation} ({description})"[:64],
            plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, g.position) for g in geo],
            plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, geo[0].orientation),
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=geo[0].pixel_spacing, slice_thickness=thickness),
            further_source_images=further or None,
            derivation=DERIVATION,
        )
        pm.SeriesDescription = f"IVIM {p.label} map AI ({description})"[:64]
        pin_dimension_organization(pm, ctx.uid(f"pm/{p.key}/dimension-organization"))
        # General Series (PS3.3 C.7.3.1): Laterality is 2C, for paired body parts only.
        # It is written only when the source says which side, never empty; the body
        # part examined (type 3) tells a reader, and validators, whether it is paired.
        if body_part:
            pm.BodyPartExamined = body_part
        if laterality:
            pm.Laterality = laterality
        elif "Laterality" in pm:
            del pm.Laterality
        if ctx.identity.institution_name:
            pm.InstitutionName = ctx.identity.institution_name
        out.append(pm)
    return out


def derived_mr_series(
    volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str
) -> list[Dataset]:
    """One classic MR series per map in ``maps``: integers in the parameter's fixed scale, no Modality LUT."""
    out: list[Dataset] = []
    for p in outputs_of(maps):
        values = maps[p.key]
        slope = p.stored_slope or 1.0
        centre, width = display_window(p, values)
        for z, (geom, src) in enumerate(zip(volume.geometry, volume.sources)):
            img = DerivedImage(
                series_uid=ctx.uid(f"mr/{p.key}/series"),
                sop_uid=ctx.uid(f"mr/{p.key}/instance/{z}"),
                series_number=derived_series_number(src.get("SeriesNumber"), p.offset + len(PARAMETERS)),
                instance_number=z + 1,
                description=f"IVIM {p.label} AI [{p.stored_unit}] ({description})",
                image_type=("DIFFUSION MAP", p.label),
                derivation=DERIVATION,
                derivation_description=f"{p.explanation}, stored in {p.stored_unit}; {description}",
                pixels=np.clip(np.rint(values[z] / slope), 0, 65535).astype(np.uint16),
                geometry=geom,
                window=(centre / slope, width / slope),
                scale=p.scale(),
            )
            ds = derived_mr_image(src, ctx, img)
            if p.statistic is not None and "RealWorldValueMappingSequence" in ds:
                # The shared writer codes the quantity only; say which statistic of it this is.
                qd = ds.RealWorldValueMappingSequence[0].QuantityDefinitionSequence
                qd.append(CodeContentItem(DERIVATION_CONCEPT, p.statistic))
            out.append(ds)
    return out

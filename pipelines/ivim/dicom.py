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

The maps of one series differ only in their pixels, identity, mapping and
window, so highdicom's constructor (which checks every source image against
the standard's tables and builds the per-frame references) runs once per
series; every map is then decoded from that map's encoding with its own
values (:func:`parametric_maps`). They equal what the constructor builds for
each map, element for element (:func:`parametric_maps_by_highdicom`, tested),
in a fraction of the time: 0.25 s instead of 5.2 s (built and encoded) for the seven maps of a
220-image series.

Many viewers do not display Parametric Maps yet, so each parameter can also
go out as a classic MR series. The MR Image IOD has no Modality LUT, so its
pixels are the quantity as integers in a fixed scale: D and D* in
1e-6 and 1e-5 mm2/s, f in 1e-4 (0.01 %), S0 in the source's units, and
each standard deviation in its parameter's scale. The series description
names the scale and a Real World Value Mapping states it (see
:mod:`pipelines._derived`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom import _standard_utils
from highdicom.sr import CodeContentItem, TextContentItem
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from gateway.contract import RunContext, derived_series_number
from pipelines._derived import DerivedImage, RealWorldScale, decoded_dataset, derived_mr_images, encoded_dataset
from pipelines._uids import pin_dimension_organization
from pipelines.ivim.preprocess import DwiVolume

__all__ = [
    "PARAMETERS",
    "UNCERTAINTIES",
    "Parameter",
    "derived_mr_series",
    "outputs_of",
    "parametric_maps",
    "parametric_maps_by_highdicom",
    "preload_standard_tables",
]

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
_FLOAT_PIXEL_DATA = 0x7FE00008


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


@dataclass(frozen=True)
class _MapGeometry:
    """What every Parametric Map of one series shares: its sources, frames and plane geometry."""

    sources: list[Dataset]  # one per slice, in slice order
    further: list[Dataset]  # the other images of the series
    plane_positions: list[hd.PlanePositionSequence]
    plane_orientation: hd.PlaneOrientationSequence
    pixel_measures: hd.PixelMeasuresSequence


@dataclass(frozen=True)
class _MapIdentity:
    """What differs between the Parametric Maps of one series besides their pixels."""

    key: str
    series_uid: str
    sop_uid: str
    series_number: int
    dimension_organization_uid: str
    content_label: str
    content_description: str
    series_description: str
    real_world_value_mapping: hd.pm.RealWorldValueMapping
    voi_lut: hd.VOILUTTransformation


def _map_geometry(volume: DwiVolume) -> _MapGeometry:
    geo = volume.geometry
    sources = _unique(volume.sources)
    own = {s.SOPInstanceUID for s in sources}
    thickness = geo[0].slice_thickness
    if thickness is None:
        thickness = abs(geo[1].position[2] - geo[0].position[2]) if len(geo) > 1 else 1.0
    return _MapGeometry(
        sources=sources,
        further=[ds for ds in _unique(volume.all_sources) if ds.SOPInstanceUID not in own],
        plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, g.position) for g in geo],
        plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, geo[0].orientation),
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=geo[0].pixel_spacing, slice_thickness=thickness),
    )


def _map_identity(
    p: Parameter, values: np.ndarray, volume: DwiVolume, ctx: RunContext, description: str
) -> _MapIdentity:
    centre, width = display_window(p, values)
    return _MapIdentity(
        key=p.key,
        series_uid=ctx.uid(f"pm/{p.key}/series"),
        sop_uid=ctx.uid(f"pm/{p.key}/instance"),
        series_number=derived_series_number(volume.sources[0].get("SeriesNumber"), p.offset),
        dimension_organization_uid=ctx.uid(f"pm/{p.key}/dimension-organization"),
        content_label=f"IVIM{p.label}"[:16],
        content_description=f"{p.explanation} ({description})"[:64],
        series_description=f"IVIM {p.label} map AI ({description})"[:64],
        real_world_value_mapping=_rwvm(p, values, volume.bvalues),
        # Widths under 1 need LINEAR_EXACT (PS3.3 C.11.2.1.3); D is ~1e-3 mm2/s.
        voi_lut=hd.VOILUTTransformation(
            window_center=centre, window_width=width, voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT
        ),
    )


_IOD_TABLES_LOCK = threading.Lock()


def preload_standard_tables() -> None:
    """Load highdicom's tables of the standard now, not in the first job's Parametric Map constructor.

    highdicom reads them (JSON of the IODs, modules and their attributes,
    about 65 MB resident once parsed) lazily and once per process; in the
    first job that took about 0.3 s of a 3 s latency budget. The memory is
    the same either way, only paid at start. Where a highdicom release
    renames a loader, it is skipped and the first job loads it.
    """
    for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        load = getattr(_standard_utils, loader, None)
        if callable(load):
            load()


@contextmanager
def _cached_iod_lookups() -> Iterator[None]:
    """Memoise highdicom's IOD look-ups (``is_attribute_in_iod``) while a block runs.

    For every source image highdicom asks whether its SOP class's IOD has pixel
    data or per-frame functional groups, and each answer scans every attribute
    of every module of that IOD in the standard's tables: about 850 scans for a
    series of 220 images of one SOP class, 80 % of the constructor's time. The
    answer is a function of the arguments and of the tables highdicom ships, so
    caching it changes no result (``tests/test_ivim_pipeline.py`` compares maps
    built with and without it). The cache lives only for the block; a thread
    that calls highdicom meanwhile gets the same answers. Where a highdicom
    release no longer has the function, nothing is cached and the maps are
    only slower.
    """
    original = getattr(_standard_utils, "is_attribute_in_iod", None)
    if original is None:
        yield
        return

    @functools.cache
    def lookup(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, list(exclude) if exclude is not None else None))

    def cached(attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return lookup(attribute, str(sop_class_uid), exclude)

    with _IOD_TABLES_LOCK:
        # does_iod_have_pixel_data and is_multiframe_image look the name up in this module at call time.
        _standard_utils.is_attribute_in_iod = cached
        try:
            yield
        finally:
            _standard_utils.is_attribute_in_iod = original


def _highdicom_map(
    volume: DwiVolume,
    geometry: _MapGeometry,
    ident: _MapIdentity,
    values: np.ndarray,
    ctx: RunContext,
    *,
    cache_iod_lookups: bool = True,
) -> Dataset:
    """One Parametric Map built by highdicom's constructor (PS3.3 A.75), with all its checks."""
    with _cached_iod_lookups() if cache_iod_lookups else nullcontext():
        pm = hd.pm.ParametricMap(
            source_images=geometry.sources,
            pixel_array=values.astype(np.float32),  # [Z, R, C]: one frame per plane position
            series_instance_uid=ident.series_uid,
            series_number=ident.series_number,
            sop_instance_uid=ident.sop_uid,
            instance_number=1,
            manufacturer=ctx.identity.manufacturer,
            manufacturer_model_name=ctx.identity.model_name,
            software_versions=ctx.identity.software_version,
            device_serial_number=ctx.identity.device_serial_number,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[ident.real_world_value_mapping],
            voi_lut_transformations=[ident.voi_lut],
            content_label=ident.content_label,
            content_description=ident.content_description,
            plane_positions=geometry.plane_positions,
            plane_orientation=geometry.plane_orientation,
            pixel_measures=geometry.pixel_measures,
            further_source_images=geometry.further or None,
            derivation=DERIVATION,
        )
    pm.SeriesDescription = ident.series_description
    pin_dimension_organization(pm, ident.dimension_organization_uid)
    # General Series (PS3.3 C.7.3.1): Laterality is 2C, for paired body parts only.
    # It is written only when the source says which side, never empty; the body
    # part examined (type 3) tells a reader, and validators, whether it is paired.
    laterality = volume.sources[0].get("Laterality")
    body_part = volume.sources[0].get("BodyPartExamined")
    if body_part:
        pm.BodyPartExamined = body_part
    if laterality:
        pm.Laterality = laterality
    elif "Laterality" in pm:
        del pm.Laterality
    if ctx.identity.institution_name:
        pm.InstitutionName = ctx.identity.institution_name
    return pm


def _frame_order(pm: Dataset, geometry: _MapGeometry) -> list[int]:
    """The input plane of each frame of ``pm`` (highdicom stores the frames sorted along the normal)."""
    planes = np.array([[float(v) for v in pp[0].ImagePositionPatient] for pp in geometry.plane_positions])
    order = []
    for item in pm.PerFrameFunctionalGroupsSequence:
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        order.append(int(np.argmin(np.linalg.norm(planes - position, axis=1))))
    if sorted(order) != list(range(len(planes))):
        raise RuntimeError("the Parametric Map's frames do not match its plane positions one to one")
    return order


def _derived_map(
    header: bytes, meta: FileMetaDataset | None, ident: _MapIdentity, values: np.ndarray, order: Sequence[int]
) -> Dataset:
    """One Parametric Map of the series, from the encoded header of a map that highdicom built for it.

    The maps of one series share everything that highdicom's constructor spends
    its time on (the source references, the per-frame functional groups and the
    plane matching, each source image checked against the standard's IOD
    tables), so that part is decoded from the first map's encoding and only
    what highdicom sets from the per-map arguments is replaced. Decoding gives
    every map its own elements (nothing is shared between maps), and is lazy:
    the reference sequences stay encoded until they are written.
    ``tests/test_ivim_pipeline.py`` checks that every map equals the one
    highdicom builds, element for element.
    """
    ds = decoded_dataset(header)
    if meta is not None:
        ds.file_meta = copy.deepcopy(meta)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ident.sop_uid)
    ds.SOPInstanceUID = ident.sop_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.SeriesNumber = ident.series_number
    ds.ContentLabel = ident.content_label
    ds.ContentDescription = ident.content_description
    ds.SeriesDescription = ident.series_description
    pin_dimension_organization(ds, ident.dimension_organization_uid)
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.RealWorldValueMappingSequence = [ident.real_world_value_mapping]
    shared.FrameVOILUTSequence = [ident.voi_lut]
    # Native float32, frame after frame in the first map's frame order, as highdicom encodes them.
    ds.FloatPixelData = np.ascontiguousarray(values[list(order)], dtype=np.float32).tobytes()
    return ds


def parametric_maps(volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str) -> list[Dataset]:
    """One Parametric Map per map in ``maps`` (parameters, then uncertainties), each in its own series and window.

    highdicom builds the first map; every map is then decoded from its encoding
    with its own identity, pixels, mapping and window (:func:`_derived_map`), so
    all of them are written from the same bytes and none pays for the sequences
    twice.
    """
    outputs = outputs_of(maps)
    if not outputs:
        return []
    geometry = _map_geometry(volume)
    idents = [_map_identity(p, maps[p.key], volume, ctx, description) for p in outputs]
    first = _highdicom_map(volume, geometry, idents[0], maps[idents[0].key], ctx)
    order = _frame_order(first, geometry)
    header = encoded_dataset(first, leave_out={_FLOAT_PIXEL_DATA})
    meta = getattr(first, "file_meta", None)
    return [_derived_map(header, meta, ident, maps[ident.key], order) for ident in idents]


def parametric_maps_by_highdicom(
    volume: DwiVolume,
    maps: dict[str, np.ndarray],
    ctx: RunContext,
    description: str,
    *,
    cache_iod_lookups: bool = False,
) -> list[Dataset]:
    """The same maps as :func:`parametric_maps`, each one built by highdicom's constructor (slow).

    The reference that :func:`parametric_maps` must equal, element for element
    but for the creation date and time.
    """
    geometry = _map_geometry(volume)
    return [
        _highdicom_map(
            volume,
            geometry,
            _map_identity(p, maps[p.key], volume, ctx, description),
            maps[p.key],
            ctx,
            cache_iod_lookups=cache_iod_lookups,
        )
        for p in outputs_of(maps)
    ]


def derived_mr_series(
    volume: DwiVolume, maps: dict[str, np.ndarray], ctx: RunContext, description: str
) -> list[Dataset]:
    """One classic MR series per map in ``maps``: integers in the parameter's fixed scale, no Modality LUT."""
    outputs = outputs_of(maps)
    windows = [display_window(p, maps[p.key]) for p in outputs]
    series: list[list[Dataset]] = [[] for _ in outputs]
    for z, (geom, src) in enumerate(zip(volume.geometry, volume.sources)):
        images = []
        for p, (centre, width) in zip(outputs, windows):
            slope = p.stored_slope or 1.0
            images.append(
                DerivedImage(
                    series_uid=ctx.uid(f"mr/{p.key}/series"),
                    sop_uid=ctx.uid(f"mr/{p.key}/instance/{z}"),
                    series_number=derived_series_number(src.get("SeriesNumber"), p.offset + len(PARAMETERS)),
                    instance_number=z + 1,
                    description=f"IVIM {p.label} AI [{p.stored_unit}] ({description})",
                    image_type=("DIFFUSION MAP", p.label),
                    derivation=DERIVATION,
                    derivation_description=f"{p.explanation}, stored in {p.stored_unit}; {description}",
                    pixels=np.clip(np.rint(maps[p.key][z] / slope), 0, 65535).astype(np.uint16),
                    geometry=geom,
                    window=(centre / slope, width / slope),
                    scale=p.scale(),
                )
            )
        # Every map's image of this slice shares the source's attributes: built once for all.
        for k, (p, ds) in enumerate(zip(outputs, derived_mr_images(src, ctx, images))):
            if p.statistic is not None and "RealWorldValueMappingSequence" in ds:
                # The shared writer codes the quantity only; say which statistic of it this is.
                qd = ds.RealWorldValueMappingSequence[0].QuantityDefinitionSequence
                qd.append(CodeContentItem(DERIVATION_CONCEPT, p.statistic))
            series[k].append(ds)
    return [ds for one in series for ds in one]

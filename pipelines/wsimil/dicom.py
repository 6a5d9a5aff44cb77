"""Slide results as DICOM: a tumour-probability Segmentation and a TID 1500 measurement report.

The Segmentation (PS3.3 A.51) is FRACTIONAL / PROBABILITY with one segment
(category "Morphologically abnormal structure", type "Neoplasm", automatic,
with the algorithm's name and version). It is a tiled image in the slide's
Frame of Reference and orientation, one pixel per model tile: its total pixel
matrix covers the same area of the slide as the source level, and its first
pixel is centred on the first model tile (PS3.3 C.8.12.9.1 places the origin
at the centre of the first pixel).

The report (PS3.16 TID 1500) holds the slide-level result: presence of tumour
(DCM 121052 Presence of property = Present / Absent) and its probability
(DCM 111047 Probability of cancer), with the slide level as the source image,
and a volumetric group on segment 1 of the Segmentation with the tumour area
(probability >= threshold) in mm2.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from gateway.contract import RunContext, derived_series_number
from pipelines._uids import pin_dimension_organization
from pipelines.wsimil.infer import SlideResult
from pipelines.wsimil.preprocess import TileGrid

__all__ = ["SEG_SERIES_OFFSET", "SR_SERIES_OFFSET", "slide_report", "tumour_segmentation"]

SEGMENT_LABEL = "Tumour probability"
NEOPLASM = codes.SCT.Neoplasm
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
PRESENCE = hd.sr.CodedConcept("121052", "DCM", "Presence of property")
PRESENT = hd.sr.CodedConcept("121053", "DCM", "Present")
ABSENT = hd.sr.CodedConcept("121054", "DCM", "Absent")
PROBABILITY = hd.sr.CodedConcept("111047", "DCM", "Probability of cancer")
AREA = codes.SCT.Area
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "mm2")
HISTOPATHOLOGY = hd.sr.CodedConcept("252416005", "SCT", "Histopathology")
PROCEDURE_REPORTED = hd.sr.CodedConcept("121058", "DCM", "Procedure reported")
# Histopathology is not in CID 100 (Quantitative Diagnostic Imaging Procedure,
# extensible, version 20230630 of PS3.16), so the code declares the extension
# in the Enhanced Encoding Mode of the Code Sequence Macro (PS3.3 8.6, Table
# 8.8-1). The creator UID is aigw's, fixed: 2.25 + UUID5 of the project name.
_CID100_EXTENSION = {
    "ContextIdentifier": "100",
    "ContextUID": "1.2.840.10008.6.1.998",
    "MappingResource": "DCMR",
    "ContextGroupVersion": "20230630",
    "ContextGroupExtensionFlag": "Y",
    "ContextGroupLocalVersion": "20261201000000",
    "ContextGroupExtensionCreatorUID": "2.25.308235588886006849567498594204057531166",
}
SEG_TILE = 256  # frame size of the Segmentation
# Series Number digits of the two results (gateway.contract.derived_series_number).
SEG_SERIES_OFFSET = 7
SR_SERIES_OFFSET = 8


def _algorithm(ctx: RunContext, version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name="wsi-mil attention MIL",
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        source=ctx.identity.manufacturer,
    )


def _first_tile_centre(source: Dataset, tile_src_px: float) -> tuple[float, float, float]:
    """Slide coordinates (mm) of the centre of the first model tile, from the source level's origin."""
    origin = source.TotalPixelMatrixOriginSequence[0]
    o = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem), 0.0])
    z = origin.get("ZOffsetInSlideCoordinateSystem")
    if z is not None:
        o[2] = float(z)
    ori = np.asarray([float(v) for v in source.ImageOrientationSlide])
    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    # the tile's centre lies (t - 1) / 2 source pixels right of and below the first pixel's centre
    d = (tile_src_px - 1) / 2
    p = o + d * col_spacing * ori[:3] + d * row_spacing * ori[3:]
    return float(p[0]), float(p[1]), float(p[2])


def tumour_segmentation(
    source: Dataset, grid: TileGrid, result: SlideResult, ctx: RunContext, model_version: str
) -> hd.seg.Segmentation:
    """The FRACTIONAL tumour-probability Segmentation aligned with ``source`` (a slide level, headers only).

    ``source`` is the stored level whose pixels were read; its pixel size
    may be finer than the grid level (a missing level read from the next
    finer one).
    """
    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    src_row_mm, src_col_mm = (float(v) for v in spacing.PixelSpacing)
    ratio = (grid.level_mpp / 1000.0) / src_col_mm  # grid-level pixels are this many source pixels
    tile_src_px = grid.tile_level_px * ratio
    tile_mm = grid.tile_mpp / 1000.0
    thickness = float(spacing.get("SliceThickness") or 0.001)
    plane_positions = [
        hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_position=_first_tile_centre(source, tile_src_px),
            pixel_matrix_position=(1, 1),
        )
    ]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=CATEGORY,
        segmented_property_type=NEOPLASM,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(ctx, model_version),
        tracking_uid=ctx.uid("seg/segment-1"),
        tracking_id="tumour",
    )
    prob = np.clip(result.tile_probability, 0.0, 1.0).astype(np.float32)
    rows, cols = prob.shape
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=prob[None, :, :],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        segment_descriptions=[description],
        series_instance_uid=ctx.uid("seg/series"),
        series_number=derived_series_number(source.get("SeriesNumber"), SEG_SERIES_OFFSET),
        sop_instance_uid=ctx.uid("seg/instance"),
        instance_number=1,
        manufacturer=ctx.identity.manufacturer,
        manufacturer_model_name=ctx.identity.model_name,
        software_versions=ctx.identity.software_version,
        device_serial_number=ctx.identity.device_serial_number,
        content_description="Attention-MIL tumour probability per tile"[:64],
        content_label="TUMOUR_PROB",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=(tile_mm, tile_mm), slice_thickness=thickness),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_orientation=[float(v) for v in source.ImageOrientationSlide],
        ),
        plane_positions=plane_positions,
        tile_pixel_array=True,
        tile_size=(min(SEG_TILE, rows), min(SEG_TILE, cols)),
        omit_empty_frames=False,  # a negative slide still gets a complete map a viewer can overlay
        series_description="AI tumour probability (attention MIL)",
    )
    # General Image (PS3.3 C.7.6.1): Patient Orientation is Type 2C, required (empty
    # allowed) when the image has no patient position and orientation, as slides do.
    seg.PatientOrientation = ""
    pin_dimension_organization(seg, ctx.uid("seg/dimension-organization"))
    return seg


def slide_report(
    source: Dataset, seg: hd.seg.Segmentation, grid: TileGrid, result: SlideResult, ctx: RunContext, model_version: str
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report: tumour present/absent and probability, and the tumour area on the Segmentation."""
    algorithm = hd.sr.AlgorithmIdentification(name="wsi-mil attention MIL", version=model_version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("sr/device"),
            name=ctx.identity.model_name,
            manufacturer_name=ctx.identity.manufacturer,
            model_name=ctx.identity.model_name,
            serial_number=ctx.identity.device_serial_number,
        ),
    )
    slide_ref = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID
    )
    # The algorithm identifies each measurement (TID 300 row 13, TID 4019); TID 1411
    # has no group-level algorithm, so the area carries it on the measurement.
    slide_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid("sr/slide-finding"), identifier="slide result"),
        finding_type=NEOPLASM,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=PROBABILITY, value=round(result.probability, 4), unit=NO_UNITS, algorithm_id=algorithm
            )
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRESENCE, PRESENT if result.positive else ABSENT)],
        source_images=[slide_ref],
    )
    area_mm2 = float(np.count_nonzero(result.tile_probability >= result.tile_threshold)) * (grid.tile_mpp / 1000.0) ** 2
    region_group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uid("sr/region"), identifier="tumour region"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_images=[
                hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID
                )
            ],
        ),
        finding_type=NEOPLASM,
        measurements=[hd.sr.Measurement(name=AREA, value=round(area_mm2, 4), unit=MM2, algorithm_id=algorithm)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=HISTOPATHOLOGY,
        imaging_measurements=[slide_group, region_group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg],
        content=report,
        series_instance_uid=ctx.uid("sr/series"),
        series_number=derived_series_number(source.get("SeriesNumber"), SR_SERIES_OFFSET),
        sop_instance_uid=ctx.uid("sr/instance"),
        instance_number=1,
        manufacturer=ctx.identity.manufacturer,
        is_complete=True,
        series_description="AI tumour detection report (attention MIL)",
    )
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == PROCEDURE_REPORTED.value:
            for keyword, value in _CID100_EXTENSION.items():
                setattr(item.ConceptCodeSequence[0], keyword, value)
    return sr

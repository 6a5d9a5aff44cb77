"""Shared writer of derived single-frame MR images (PS3.3 A.4, MR Image IOD).

Every built-in pipeline that sends an ordinary image series back (IVIM maps
for viewers without Parametric Map support, the AI-enhanced low-field series)
builds its instances here, so patient/study identity, frame of reference,
equipment, derivation and source references are copied the same way.

The stored integers are what every viewer displays: the MR Image IOD has no
Modality LUT (PS3.3 A.4 has no Rescale Slope/Intercept), and a viewer that
honours the IOD ignores a rescale, so windows are given in stored units. A
quantity is stored in a fixed, documented scale (for example D in
1e-6 mm2/s) that the series description names and that a Real World Value
Mapping (PS3.3 C.7.6.16.2.11, allowed in the General Image module) states
in machine-readable form.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from gateway.contract import Geometry, RunContext

__all__ = ["DerivedImage", "RealWorldScale", "derived_mr_image"]

# Patient, study, frame of reference and acquisition context the derived
# image shares with its source (PS3.3 C.7.1.1, C.7.2.1, C.7.4.1, C.8.3.1).
_COPIED = (
    # The character set of the copied text (PS3.3 C.12.1.1.2); without it a
    # non-Latin name would be written as undeclared bytes.
    "SpecificCharacterSet",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate",
    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "BodyPartExamined", "Laterality", "MagneticFieldStrength", "PatientPosition",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
    "InversionTime", "EchoTrainLength", "FlipAngle", "ImagedNucleus", "ImagingFrequency", "AcquisitionNumber",
)


@dataclass(frozen=True)
class RealWorldScale:
    """The quantity one stored integer stands for: ``value = stored * slope`` in ``unit``."""

    label: str  # LUT Label (16 characters at most)
    explanation: str  # LUT Explanation (64 characters at most)
    quantity: hd.sr.CodedConcept
    unit: hd.sr.CodedConcept  # UCUM
    slope: float


@dataclass(frozen=True)
class DerivedImage:
    """What differs between derived images: identity within the series, pixels, geometry, display."""

    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int
    description: str  # SeriesDescription (64 characters at most)
    image_type: tuple[str, ...]  # values 3 and 4 of ImageType after DERIVED\SECONDARY
    derivation: hd.sr.CodedConcept
    derivation_description: str
    pixels: np.ndarray  # uint16 (rows, columns)
    geometry: Geometry
    window: tuple[float, float]  # centre, width, in stored units (there is no Modality LUT)
    scale: RealWorldScale | None = None  # None: the pixels are signal intensities in arbitrary units
    comments: str | None = None  # ImageComments, e.g. a quality flag


def derived_mr_image(src: Dataset, ctx: RunContext, img: DerivedImage) -> Dataset:
    """One MR Image Storage instance derived from ``src`` (its source image)."""
    ds = Dataset()
    for kw in _COPIED:
        if kw in src:
            ds[kw] = src[kw]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = img.sop_uid
    ds.SeriesInstanceUID = img.series_uid
    ds.Modality = "MR"
    ds.SeriesNumber = img.series_number
    ds.InstanceNumber = img.instance_number
    ds.SeriesDescription = img.description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY", *img.image_type]
    ds.DerivationDescription = img.derivation_description[:1024]
    ds.DerivationCodeSequence = DicomSequence([img.derivation])
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = DicomSequence(
        [hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")]
    )
    ds.SourceImageSequence = DicomSequence([ref])
    ds.Manufacturer = ctx.identity.manufacturer
    ds.ManufacturerModelName = ctx.identity.model_name
    ds.SoftwareVersions = ctx.identity.software_version
    ds.DeviceSerialNumber = ctx.identity.device_serial_number
    if ctx.identity.institution_name:
        ds.InstitutionName = ctx.identity.institution_name
    ds.SeriesDate = ds.ContentDate = src.get("SeriesDate", src.get("StudyDate", ""))
    ds.SeriesTime = ds.ContentTime = src.get("SeriesTime", src.get("StudyTime", ""))
    g = img.geometry
    ds.ImagePositionPatient = [f"{v:.10g}" for v in g.position]  # DS: at most 16 characters
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in g.orientation]
    ds.PixelSpacing = [f"{v:.10g}" for v in g.pixel_spacing]
    if g.slice_thickness:
        ds.SliceThickness = f"{g.slice_thickness:.6g}"
    # MR Image module type 1/2 attributes, from the source when it has them.
    ds.ScanningSequence = src.get("ScanningSequence", "RM")
    ds.SequenceVariant = src.get("SequenceVariant", "NONE")
    ds.ScanOptions = src.get("ScanOptions", "")
    ds.MRAcquisitionType = src.get("MRAcquisitionType", "2D")
    ds.EchoTrainLength = src.get("EchoTrainLength", 1)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(img.pixels, dtype="<u2").tobytes()
    if img.scale is not None:
        ds.RealWorldValueMappingSequence = DicomSequence([_real_world_value_mapping(img.scale, img.pixels)])
    center, width = img.window
    # Stored integers: a width of at least 1 needs no LINEAR_EXACT (PS3.3 C.11.2.1.2).
    ds.WindowCenter = f"{center:.6g}"
    ds.WindowWidth = f"{max(width, 1.0):.6g}"
    if img.comments:
        ds.ImageComments = img.comments[:10240]
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _real_world_value_mapping(scale: RealWorldScale, pixels: np.ndarray) -> Dataset:
    """One Real World Value Mapping item covering every stored value of the image."""
    lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
    return hd.pm.RealWorldValueMapping(
        lut_label=scale.label,
        lut_explanation=scale.explanation,
        unit=scale.unit,
        value_range=(lo, hi if hi > lo else lo + 1),
        slope=scale.slope,
        intercept=0,
        quantity_definition=scale.quantity,
    )

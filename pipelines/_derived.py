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

import copy
from collections.abc import Container, Sequence
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from gateway.contract import Geometry, RunContext

__all__ = [
    "DerivedImage",
    "RealWorldScale",
    "decoded_dataset",
    "derived_mr_image",
    "derived_mr_images",
    "encoded_dataset",
]

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
    ds = _from_source(src, ctx, img.geometry)
    _set_image(ds, img)
    return ds


def derived_mr_images(src: Dataset, ctx: RunContext, images: Sequence[DerivedImage]) -> list[Dataset]:
    """The instances :func:`derived_mr_image` makes of ``images``, all derived from ``src`` at one geometry.

    What they take from the source, the identity and the geometry is built and
    encoded once, and each instance is decoded from those bytes (its own
    elements, nothing shared) before its own attributes are set: for several
    quantities of one slice this is a fraction of building each alone, and
    the decoded elements are written back as they are.
    """
    if not images:
        return []
    if any(img.geometry != images[0].geometry for img in images):
        raise ValueError("derived_mr_images: every image must have the same geometry")
    base = _from_source(src, ctx, images[0].geometry)
    encoded = encoded_dataset(base)
    out = []
    for img in images:
        ds = decoded_dataset(encoded)
        ds.file_meta = copy.deepcopy(base.file_meta)
        _set_image(ds, img)
        out.append(ds)
    return out


def encoded_dataset(ds: Dataset, leave_out: Container[int] = ()) -> bytes:
    """The elements of ``ds`` (but the tags in ``leave_out``) encoded in Explicit VR Little Endian (PS3.5 A.2)."""
    kept = Dataset()
    for elem in ds:
        if elem.tag not in leave_out:
            kept.add(elem)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, kept)
    return fp.getvalue()


def decoded_dataset(data: bytes) -> Dataset:
    """A dataset from :func:`encoded_dataset`'s bytes; its elements are decoded when first read."""
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def _from_source(src: Dataset, ctx: RunContext, g: Geometry) -> Dataset:
    """What a derived image takes from its source, the gateway's identity and its plane geometry."""
    ds = Dataset()
    for kw in _COPIED:
        if kw in src:
            ds[kw] = src[kw]
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
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
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _set_image(ds: Dataset, img: DerivedImage) -> None:
    """What is the image's own: identity in its series, description, derivation, pixels and display."""
    ds.SOPInstanceUID = img.sop_uid
    ds.SeriesInstanceUID = img.series_uid
    ds.SeriesNumber = img.series_number
    ds.InstanceNumber = img.instance_number
    ds.SeriesDescription = img.description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY", *img.image_type]
    ds.DerivationDescription = img.derivation_description[:1024]
    ds.DerivationCodeSequence = DicomSequence([img.derivation])
    ds.Rows, ds.Columns = img.pixels.shape
    # OW for 16-bit pixels (PS3.5 8.1.2), set here: pydicom resolves "OB or OW" only for
    # datasets it does not write in the encoding they were read in (derived_mr_images).
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(img.pixels, dtype="<u2").tobytes())
    if img.scale is not None:
        ds.RealWorldValueMappingSequence = DicomSequence([_real_world_value_mapping(img.scale, img.pixels)])
    center, width = img.window
    # Stored integers: a width of at least 1 needs no LINEAR_EXACT (PS3.3 C.11.2.1.2).
    ds.WindowCenter = f"{center:.6g}"
    ds.WindowWidth = f"{max(width, 1.0):.6g}"
    if img.comments:
        ds.ImageComments = img.comments[:10240]


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

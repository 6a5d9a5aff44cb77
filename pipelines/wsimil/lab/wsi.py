"""Writing synthetic slides as DICOM VL Whole Slide Microscopy pyramids, in bounded memory.

:func:`write_slide` turns a :class:`~pipelines.wsimil.lab.scene.SlideScene` into
the instances a scanner would send (PS3.3 A.32.8, VL Whole Slide Microscopy
Image IOD): one instance per pyramid level (``VOLUME``), each rendered tile by
tile directly at that level's resolution, plus a ``LABEL``, an ``OVERVIEW``
of the whole glass slide and a ``THUMBNAIL``. All of them share the study,
series, frame of reference and pyramid (PS3.3 C.8.12.4), so a reader such as
wsidicom opens the folder as one slide.

Nothing holds a whole level: the header is written by pydicom without Pixel
Data, then (7FE0,0010) is appended frame by frame (PS3.5 A.4 for encapsulated
frames, PS3.5 7.1.2 for native ones) and the offset table and the compression
ratio, which are only known at the end, are patched in place.

Slide geometry follows PS3.3 C.8.12.2: the glass slide is 76 x 26 mm, the
label sits at one end, and the scanned area lies next to it. Every image uses
Image Orientation (Slide) ``0\\-1\\0\\-1\\0\\0``: along a row (increasing
column) is -Y, the long side; down a column (increasing row) is -X, the short
side. The top-left pixel of a matrix therefore has the largest X and Y, and the
Total Pixel Matrix Origin (PS3.3 C.8.12.15) of the overview is the corner of the
glass at (26, 76) mm, at the label end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pydicom.valuerep import DSfloat
from scipy import ndimage

from gateway.contract import derived_uid
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.preprocess import WSI_STORAGE

__all__ = [
    "VL_WSI_STORAGE",
    "Compression",
    "ImageFlavour",
    "LevelInfo",
    "SlideFiles",
    "SlideIdentity",
    "slide_header",
    "write_slide",
]

logger = logging.getLogger(__name__)

VL_WSI_STORAGE = WSI_STORAGE  # PS3.4 B.5, VL Whole Slide Microscopy Image Storage: what the pipeline selects
#: Glass slide, ISO 8037-1 (mm): long side along slide Y, short side along slide X.
SLIDE_LENGTH_MM = 76.0
SLIDE_WIDTH_MM = 26.0
#: The label occupies this much of the long side, at the Y = SLIDE_LENGTH_MM end.
LABEL_LENGTH_MM = 20.0
#: The scanned area starts this far from that end.
SCAN_START_MM = 25.0
#: Overview and label resolution (mm per pixel), a low-power camera.
MACRO_SPACING_MM = 0.04
THUMBNAIL_MAX_PX = 1024
#: Nominal section thickness (mm); PixelMeasures Slice Thickness, and Imaged Volume Depth in um.
SECTION_THICKNESS_MM = 0.004
#: Image Orientation (Slide): row direction -Y, column direction -X (see the module docstring).
IMAGE_ORIENTATION_SLIDE = (0, -1, 0, -1, 0, 0)

# Tags and VRs for what is appended by hand (PS3.5 7.1.2, 7.5, A.4).
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_EXTENDED_OFFSET_TABLE = b"\xe0\x7f\x01\x00"
_EXTENDED_OFFSET_TABLE_LENGTHS = b"\xe0\x7f\x02\x00"
_PER_FRAME_FUNCTIONAL_GROUPS = b"\x00\x52\x30\x92"
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Largest even length a native Pixel Data element can state (0xFFFFFFFF means undefined).
_MAX_NATIVE_BYTES = 2**32 - 2
#: The Basic Offset Table holds 32-bit offsets; when the worst case could pass this, the
#: Extended Offset Table (64-bit, PS3.3 C.7.6.3.1.8) is written instead.
_BOT_LIMIT_BYTES = 2**32 - 1
# A placeholder for Lossy Image Compression Ratio, patched once the frames are written; 16 bytes,
# the longest DS value (PS3.5 6.2), so that any ratio fits.
_RATIO_PLACEHOLDER = "1.00000000000000"


class Compression(str, Enum):
    """How the frames are encoded, with the transfer syntax each implies (PS3.5 8.2, A.4)."""

    JPEG = "jpeg"  # JPEG Baseline (Process 1), YBR_FULL_422
    JPEG2000 = "jpeg2000"  # JPEG 2000 Image Compression (Lossless Only), reversible colour transform: YBR_RCT
    NONE = "none"  # Explicit VR Little Endian, RGB

    @property
    def transfer_syntax(self) -> UID:
        return {
            Compression.JPEG: JPEGBaseline8Bit,
            Compression.JPEG2000: JPEG2000Lossless,
            Compression.NONE: ExplicitVRLittleEndian,
        }[self]

    @property
    def photometric_interpretation(self) -> str:
        # PS3.5 8.2.1: a subsampled YCbCr baseline JPEG is YBR_FULL_422; PS3.5 8.2.4: a JPEG 2000
        # codestream with the reversible multi-component transform is YBR_RCT. Both are among the
        # values the WSI image module allows (PS3.3 C.8.12.4.1.5).
        return {Compression.JPEG: "YBR_FULL_422", Compression.JPEG2000: "YBR_RCT", Compression.NONE: "RGB"}[self]

    @property
    def lossy(self) -> bool:
        return self is Compression.JPEG


class ImageFlavour(str, Enum):
    """Value 3 of Image Type for the WSI IOD (PS3.3 C.8.12.4.1.1); what readers sort instances by."""

    VOLUME = "VOLUME"
    LABEL = "LABEL"
    OVERVIEW = "OVERVIEW"
    THUMBNAIL = "THUMBNAIL"


class DimensionOrganizationType(str, Enum):
    """Dimension Organization Type (0020,9311) for tiled images (PS3.3 C.7.6.17)."""

    TILED_FULL = "TILED_FULL"
    TILED_SPARSE = "TILED_SPARSE"


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level as written: one instance."""

    path: Path
    mpp: float
    columns: int
    rows: int
    tile: int
    frames: int
    sop_instance_uid: str


@dataclass(frozen=True)
class SlideFiles:
    """Everything :func:`write_slide` wrote."""

    folder: Path
    paths: list[Path]  # every file written: levels, base first, then label / overview / thumbnail
    levels: list[LevelInfo]  # pyramid (VOLUME) levels, base first
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    base_mpp: float
    origin_mm: tuple[float, float]  # TotalPixelMatrixOrigin X / Y offsets in slide coordinates


@dataclass(frozen=True)
class SlideIdentity:
    """What every instance of one slide shares: patient, study, series, specimen, equipment.

    Build it with :meth:`derived` so that the UIDs follow from a namespace
    (PS3.5 B.2) and a slide written twice gets the same identity.
    """

    namespace: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    pyramid_uid: str
    specimen_uid: str
    patient_name: str
    patient_id: str
    container_id: str
    specimen_id: str
    acquired: dt.datetime
    series_description: str = "SYNTHETIC H&E WSI"
    manufacturer: str = "aigw synthetic slide generator"
    model_name: str = "SlideScene"
    device_serial_number: str = "aigw-synthetic"
    software_versions: str = "1"
    label_text: str = ""
    barcode: str = ""
    series_key: str = ""  # names the encoding; part of every instance-level UID

    @classmethod
    def derived(
        cls,
        namespace: str,
        *,
        series_key: str = "",
        patient: tuple[str, str] = ("SYNTHETIC^SLIDE", "SLIDE0001"),
        acquired: dt.datetime | None = None,
        **kw: str,
    ) -> SlideIdentity:
        """An identity whose UIDs are :func:`derived_uid` of the namespace.

        Parameters
        ----------
        namespace : str
            Names the slide: the study, patient-level identifiers and the container follow from it.
        series_key : str
            Names one encoding of the slide: series, frame of reference and pyramid follow from
            ``namespace`` and it, so two encodings never share SOP Instance UIDs.
        patient : tuple of str
            Patient's Name and Patient ID (synthetic only).
        acquired : datetime, optional
            Study, series, content and acquisition date and time; by default a date derived from
            the namespace, so that the same slide is written byte for byte the same.
        **kw : str
            Any other field (manufacturer, series_description, ...).
        """

        def uid(*parts: object) -> str:
            return derived_uid("aigw-wsi", namespace, *parts)

        if acquired is None:
            day = int.from_bytes(hashlib.sha256(namespace.encode()).digest()[:4], "little") % 3650
            acquired = dt.datetime(2015, 1, 1, 9, 0, 0) + dt.timedelta(days=day, seconds=day * 7 % 28800)
        tag = namespace.upper()[:20]
        return cls(
            namespace=namespace,
            study_uid=uid("study"),
            series_uid=uid("series", series_key),
            frame_of_reference_uid=uid("frame-of-reference", series_key),
            pyramid_uid=uid("pyramid", series_key),
            specimen_uid=uid("specimen"),
            patient_name=patient[0],
            patient_id=patient[1],
            container_id=kw.pop("container_id", f"SYNTH-{tag}"),
            specimen_id=kw.pop("specimen_id", f"SYNTH-{tag}-S1"),
            acquired=acquired,
            label_text=kw.pop("label_text", f"SYNTH {namespace}"),
            barcode=kw.pop("barcode", f"SYNTH-{tag}"),
            series_key=series_key,
            **kw,
        )

    def uid(self, *parts: object) -> str:
        """A UID of this slide's encoding (instances, dimension organisations, acquisitions)."""
        return derived_uid("aigw-wsi", self.namespace, self.series_key, *parts)


# --------------------------------------------------------------------------- header


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(**kw: object) -> Dataset:
    item = Dataset()
    for k, v in kw.items():
        setattr(item, k, v)
    return item


def _ds(value: float) -> DSfloat:
    """A DS that fits its 16 characters (PS3.5 6.2) whatever the float."""
    return DSfloat(round(float(value), 8), auto_format=True)


@cache
def _srgb_icc() -> bytes | None:
    """An sRGB ICC profile, required with colour images (PS3.3 C.8.12.5, C.11.15), from Pillow's LittleCMS."""
    try:
        from PIL import ImageCms

        return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    except Exception:  # Pillow built without LittleCMS: the slide stays readable, with a dciodvfy warning
        logger.warning("no sRGB ICC profile (Pillow without LittleCMS); the optical path has none")
        return None


def _staining(specimen_id: str) -> Dataset:
    """One H&E staining step (PS3.3 C.8.12.6.1; TID 8001 "Specimen Preparation" with TID 8004 "Specimen Staining")."""

    def concept(name: Dataset, value: Dataset) -> Dataset:
        return _item(ValueType="CODE", ConceptNameCodeSequence=[name], ConceptCodeSequence=[value])

    substance = _code("424361007", "SCT", "Using substance")
    return _item(
        SpecimenPreparationStepContentItemSequence=[
            _item(
                ValueType="TEXT",
                ConceptNameCodeSequence=[_code("121041", "DCM", "Specimen Identifier")],
                TextValue=specimen_id,
            ),
            concept(_code("111701", "DCM", "Processing type"), _code("127790008", "SCT", "Staining")),
            concept(substance, _code("12710003", "SCT", "hematoxylin stain")),
            concept(substance, _code("36879007", "SCT", "water soluble eosin stain")),
        ]
    )


def slide_header(
    identity: SlideIdentity,
    *,
    sop_instance_uid: str,
    instance_number: int,
    total_columns: int,
    total_rows: int,
    tile_columns: int,
    tile_rows: int,
    frames: int,
    spacing_mm: float,
    origin_mm: tuple[float, float],
    imaged_size_mm: tuple[float, float],
    flavour: ImageFlavour | str = ImageFlavour.VOLUME,
    resampled: bool = False,
    compression: Compression | str = Compression.NONE,
    sparse: bool = False,
    staining: bool = True,
) -> Dataset:
    """The VL Whole Slide Microscopy Image data set without Pixel Data (PS3.3 A.32.8).

    Parameters
    ----------
    identity : SlideIdentity
        Patient, study, series, specimen and equipment shared by the slide's instances.
    sop_instance_uid : str
        This instance.
    instance_number : int
        Instance Number, unique in the series.
    total_columns, total_rows : int
        Total Pixel Matrix Columns / Rows (PS3.3 C.8.12.14).
    tile_columns, tile_rows : int
        Columns / Rows of one frame.
    frames : int
        Number of Frames; every tile for TILED_FULL, the tiles present for TILED_SPARSE.
    spacing_mm : float
        Pixel spacing in mm, square pixels.
    origin_mm : tuple of float
        X and Y of the Total Pixel Matrix Origin in slide coordinates (PS3.3 C.8.12.15).
    imaged_size_mm : tuple of float
        Imaged Volume Width and Height, mm.
    flavour : ImageFlavour or str
        Image Type value 3.
    resampled : bool
        True for a level or thumbnail made at a lower resolution than acquired:
        Image Type ``DERIVED\\PRIMARY\\<flavour>\\RESAMPLED``, else ``ORIGINAL\\PRIMARY\\<flavour>\\NONE``.
    compression : Compression or str
        Sets the transfer syntax, Photometric Interpretation and Lossy Image Compression.
        For lossy compression, Lossy Image Compression Ratio holds a 16-character placeholder
        that the writer patches once the frames are written.
    sparse : bool
        TILED_SPARSE: adds the Dimension Index Sequence; the per-frame functional groups are
        written by the caller after this header.
    staining : bool
        Describe an H&E staining step in the Specimen Preparation Sequence.

    Returns
    -------
    pydicom.dataset.Dataset
        With ``file_meta``; write it with ``dcmwrite(..., enforce_file_format=True)``.
    """
    flavour = ImageFlavour(flavour)
    compression = Compression(compression)
    if frames < 1:
        raise ValueError(f"an instance needs at least one frame, got {frames}")
    image_type = [
        "DERIVED" if resampled else "ORIGINAL",
        "PRIMARY",
        flavour.value,
        "RESAMPLED" if resampled else "NONE",
    ]
    organisation = DimensionOrganizationType.TILED_SPARSE if sparse else DimensionOrganizationType.TILED_FULL
    when = identity.acquired

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(VL_WSI_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = compression.transfer_syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common, General Image, WSI Image
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = image_type
    ds.SOPClassUID = VL_WSI_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = "SM"
    ds.Manufacturer = identity.manufacturer
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = identity.series_description
    ds.ManufacturerModelName = identity.model_name
    ds.VolumetricProperties = "VOLUME"
    # Patient (synthetic: no birth date, sex "O" other, PS3.3 C.7.1.1)
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.DeviceSerialNumber = identity.device_serial_number
    ds.SoftwareVersions = identity.software_versions
    # General Acquisition (PS3.3 C.7.10.1): the pyramid and its thumbnail come from one scan,
    # the label and the overview from the macro camera.
    ds.AcquisitionUID = identity.uid(
        "acquisition", "macro" if flavour in (ImageFlavour.LABEL, ImageFlavour.OVERVIEW) else "scan"
    )
    ds.PyramidUID = identity.pyramid_uid  # PS3.3 C.8.12.4, shared by every resolution of the pyramid
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"  # PS3.3 C.7.4.1.1.2
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=identity.uid("dimension", sop_instance_uid))]
    if sparse:
        # PS3.3 C.7.6.17: TILED_SPARSE frames are indexed by where they sit in the total pixel matrix.
        ds.DimensionIndexSequence = [
            _item(
                DimensionIndexPointer=0x0048021E,  # Column Position In Total Image Pixel Matrix
                FunctionalGroupPointer=0x0048021A,  # Plane Position (Slide) Sequence
                DimensionOrganizationUID=ds.DimensionOrganizationSequence[0].DimensionOrganizationUID,
            ),
            _item(
                DimensionIndexPointer=0x0048021F,  # Row Position In Total Image Pixel Matrix
                FunctionalGroupPointer=0x0048021A,
                DimensionOrganizationUID=ds.DimensionOrganizationSequence[0].DimensionOrganizationUID,
            ),
        ]
    ds.DimensionOrganizationType = organisation.value
    # Specimen (PS3.3 C.7.6.22)
    ds.ContainerIdentifier = identity.container_id
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    ds.AcquisitionContextSequence = []
    ds.SpecimenDescriptionSequence = [
        _item(
            SpecimenIdentifier=identity.specimen_id,
            SpecimenUID=identity.specimen_uid,
            IssuerOfTheSpecimenIdentifierSequence=[],
            SpecimenShortDescription="synthetic H&E section",
            SpecimenPreparationSequence=[_staining(identity.specimen_id)] if staining else [],
        )
    ]
    # Imaged Volume Width / Height in mm, Depth in um (PS3.3 C.8.12.4.1.2)
    ds.ImagedVolumeWidth = round(float(imaged_size_mm[0]), 6)
    ds.ImagedVolumeHeight = round(float(imaged_size_mm[1]), 6)
    ds.ImagedVolumeDepth = SECTION_THICKNESS_MM * 1000
    ds.TotalPixelMatrixColumns = total_columns
    ds.TotalPixelMatrixRows = total_rows
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.TotalPixelMatrixOriginSequence = [
        _item(XOffsetInSlideCoordinateSystem=_ds(origin_mm[0]), YOffsetInSlideCoordinateSystem=_ds(origin_mm[1]))
    ]
    ds.ImageOrientationSlide = list(IMAGE_ORIENTATION_SLIDE)
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = compression.photometric_interpretation
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.Rows = tile_rows
    ds.Columns = tile_columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # The label and the overview show the slide label, whose text identifies the specimen.
    shows_label = flavour in (ImageFlavour.LABEL, ImageFlavour.OVERVIEW)
    ds.BurnedInAnnotation = "YES" if shows_label else "NO"
    if compression.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = _RATIO_PLACEHOLDER
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"
    ds.SpecimenLabelInImage = "YES" if shows_label else "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    # Optical Path (PS3.3 C.8.12.5): one brightfield path
    ds.NumberOfOpticalPaths = 1
    path_item = _item(
        OpticalPathIdentifier="1",
        OpticalPathDescription="brightfield",
        IlluminationTypeCodeSequence=[_code("111744", "DCM", "Brightfield illumination")],
        IlluminationColorCodeSequence=[_code("414298005", "SCT", "Full Spectrum")],
    )
    icc = _srgb_icc()
    if icc is not None:
        path_item.ICCProfile = icc
        path_item.ColorSpace = "SRGB"
    ds.OpticalPathSequence = [path_item]
    if flavour is ImageFlavour.LABEL:
        # Slide Label module (PS3.3 C.8.12.8), required for LABEL images
        ds.LabelText = identity.label_text
        ds.BarcodeValue = identity.barcode
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PixelMeasuresSequence=[
                _item(PixelSpacing=[_ds(spacing_mm), _ds(spacing_mm)], SliceThickness=_ds(SECTION_THICKNESS_MM))
            ],
            WholeSlideMicroscopyImageFrameTypeSequence=[_item(FrameType=image_type)],
            OpticalPathIdentificationSequence=[_item(OpticalPathIdentifier="1")],
        )
    ]
    return ds


def _plane_position(column: int, row: int, origin_mm: tuple[float, float], spacing_mm: float) -> tuple[float, float]:
    """Slide X, Y (mm) of the pixel at zero-based ``column``, ``row`` of a total pixel matrix.

    PS3.3 C.8.12.15 / C.7.6.16.2.15: origin plus column times the row direction cosines plus
    row times the column direction cosines, each scaled by the pixel spacing.
    """
    rx, ry, _, cx, cy, _ = IMAGE_ORIENTATION_SLIDE
    x = origin_mm[0] + column * spacing_mm * rx + row * spacing_mm * cx
    y = origin_mm[1] + column * spacing_mm * ry + row * spacing_mm * cy
    return x, y


def _per_frame_item(column: int, row: int, origin_mm: tuple[float, float], spacing_mm: float) -> Dataset:
    """Per-frame functional group of a TILED_SPARSE frame whose top-left pixel is (column, row), zero-based."""
    x, y = _plane_position(column, row, origin_mm, spacing_mm)
    position = _item(
        XOffsetInSlideCoordinateSystem=_ds(x),
        YOffsetInSlideCoordinateSystem=_ds(y),
        ZOffsetInSlideCoordinateSystem=_ds(0.0),
        ColumnPositionInTotalImagePixelMatrix=column + 1,  # one-based (PS3.3 C.7.6.16.2.15)
        RowPositionInTotalImagePixelMatrix=row + 1,
    )
    return _item(PlanePositionSlideSequence=[position])


# --------------------------------------------------------------------------- streaming


def _encode_item(item: Dataset) -> bytes:
    """A sequence item, explicit VR little endian, with explicit length (PS3.5 7.5)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, item)
    body = fp.getvalue()
    return _ITEM + struct.pack("<I", len(body)) + body


def _long_header(tag: bytes, vr: bytes, length: int) -> bytes:
    """Element header of an OB / OV / SQ element, explicit VR little endian (PS3.5 7.1.2)."""
    return tag + vr + b"\x00\x00" + struct.pack("<I", length)


def _write_instance(
    path: Path,
    header: Dataset,
    frames: Iterable[bytes],
    *,
    count: int,
    encapsulated: bool,
    frame_bytes: int,
    per_frame: Iterable[Dataset] | None = None,
) -> int:
    """Write one instance: pydicom header, per-frame groups and Pixel Data streamed; returns the pixel bytes.

    ``frame_bytes`` is the size of one decoded frame (Rows x Columns x 3), for the native length
    and the compression ratio. At most one frame is held at a time.
    """
    buf = io.BytesIO()
    dcmwrite(buf, header, enforce_file_format=True)
    head = buf.getvalue()
    ratio_at = -1
    if "LossyImageCompressionRatio" in header and str(header.LossyImageCompressionRatio) == _RATIO_PLACEHOLDER:
        marker = b"\x28\x00\x12\x21DS\x10\x00" + _RATIO_PLACEHOLDER.encode()
        ratio_at = head.find(marker)
        if ratio_at < 0 or head.find(marker, ratio_at + 1) >= 0:
            raise RuntimeError("could not locate the Lossy Image Compression Ratio placeholder in the header")
        ratio_at += 8

    length = count * frame_bytes
    if not encapsulated and length + length % 2 > _MAX_NATIVE_BYTES:
        raise ValueError(
            f"{length} bytes of native pixel data do not fit the 32-bit length of (7FE0,0010) "
            f"(at most {_MAX_NATIVE_BYTES}); use compression='jpeg' or 'jpeg2000', or a larger base_mpp"
        )
    try:
        with open(path, "wb") as fh:
            fh.write(head)
            if per_frame is not None:
                # (5200,9230) sorts after every other attribute of the header but the pixel data group
                fh.write(_long_header(_PER_FRAME_FUNCTIONAL_GROUPS, b"SQ", _UNDEFINED_LENGTH))
                for item in per_frame:
                    fh.write(_encode_item(item))
                fh.write(_SEQUENCE_DELIMITER + b"\x00\x00\x00\x00")
            if encapsulated:
                written = _write_encapsulated(fh, frames, count, frame_bytes)
            else:
                written = _write_native(fh, frames, count, frame_bytes)
            if ratio_at >= 0:
                fh.seek(ratio_at)
                fh.write(f"{length / max(written, 1):.2f}".ljust(16).encode())
    except BaseException:
        path.unlink(missing_ok=True)  # never leave half an instance behind
        raise
    return written


def _write_native(fh: BinaryIO, frames: Iterable[bytes], count: int, frame_bytes: int) -> int:
    """Native Pixel Data: OB with its length stated up front (PS3.5 7.1.2), frames one after another."""
    length = count * frame_bytes
    pad = length % 2  # PS3.5 7.1.1: values have even length
    fh.write(_long_header(_PIXEL_DATA, b"OB", length + pad))
    written = 0
    for n, frame in enumerate(frames):
        if len(frame) != frame_bytes:
            raise ValueError(f"frame {n} has {len(frame)} bytes, expected {frame_bytes}")
        fh.write(frame)
        written += len(frame)
    if written != length:
        raise ValueError(f"{written // frame_bytes} frames written, the header says {count}")
    fh.write(b"\x00" * pad)
    return written


def _write_encapsulated(fh: BinaryIO, frames: Iterable[bytes], count: int, frame_bytes: int) -> int:
    """Encapsulated Pixel Data, one fragment per frame, with an offset table patched at the end (PS3.5 A.4)."""
    # Worst case a little over the raw size per frame (JPEG of noise at high quality), so that
    # the 32-bit Basic Offset Table is only chosen where it cannot overflow.
    use_bot = count * (2 * frame_bytes + 1024) <= _BOT_LIMIT_BYTES
    table_at = fh.tell()
    if not use_bot:
        # Extended Offset Table (7FE0,0001) and its lengths (7FE0,0002), OV, 64-bit; the Basic
        # Offset Table is then empty (PS3.5 A.4, PS3.3 C.7.6.3.1.8).
        fh.write(_long_header(_EXTENDED_OFFSET_TABLE, b"OV", 8 * count) + bytes(8 * count))
        fh.write(_long_header(_EXTENDED_OFFSET_TABLE_LENGTHS, b"OV", 8 * count) + bytes(8 * count))
    fh.write(_long_header(_PIXEL_DATA, b"OB", _UNDEFINED_LENGTH))
    bot_at = fh.tell()
    fh.write(_ITEM + struct.pack("<I", 4 * count if use_bot else 0) + (bytes(4 * count) if use_bot else b""))
    first = fh.tell()
    offsets: list[int] = []
    lengths: list[int] = []
    for frame in frames:
        # Offsets count from the first byte of the first fragment's item tag (PS3.5 A.4)
        offsets.append(fh.tell() - first)
        pad = len(frame) % 2  # even fragments; a trailing 0x00 after EOI / EOC is allowed (PS3.5 A.4)
        lengths.append(len(frame) + pad)
        fh.write(_ITEM + struct.pack("<I", len(frame) + pad))
        fh.write(frame)
        if pad:
            fh.write(b"\x00")
    if len(offsets) != count:
        raise ValueError(f"{len(offsets)} frames written, the header says {count}")
    fh.write(_SEQUENCE_DELIMITER + b"\x00\x00\x00\x00")
    end = fh.tell()
    if use_bot:
        fh.seek(bot_at + 8)
        fh.write(struct.pack(f"<{count}I", *offsets))
    else:
        fh.seek(table_at + 12)
        fh.write(struct.pack(f"<{count}Q", *offsets))
        fh.seek(table_at + 12 + 8 * count + 12)
        # PS3.3 C.7.6.3.1.8: a frame's length is its fragment's Item length (padded), without the item header
        fh.write(struct.pack(f"<{count}Q", *lengths))
    fh.seek(end)
    return sum(lengths)


def _encode(tile: np.ndarray, compression: Compression, quality: int) -> bytes:
    """One frame's bytes: a JPEG or JPEG 2000 codestream, or the native RGB samples."""
    if compression is Compression.NONE:
        return np.ascontiguousarray(tile, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8))  # (h, w, 3) uint8: RGB
    if compression is Compression.JPEG:
        # subsampling=1 is 4:2:2 (chroma halved horizontally), what YBR_FULL_422 states (PS3.3 C.7.6.3.1.2)
        image.save(buf, "JPEG", quality=quality, subsampling=1, optimize=False)
    else:
        # A bare codestream (no JP2 box, PS3.5 A.4.4), reversible wavelet and colour transform: lossless YBR_RCT
        image.save(buf, "JPEG2000", no_jp2=True, irreversible=False, mct=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- images


def _level_sizes(scene: SlideScene, base_mpp: float, min_size: int) -> list[tuple[float, int, int]]:
    """(mpp, columns, rows) of every pyramid level, halving until both sides are <= ``min_size``."""
    out = []
    k = 0
    while True:
        mpp = base_mpp * 2**k
        cols, rows = math.ceil(scene.width_um / mpp), math.ceil(scene.height_um / mpp)
        out.append((mpp, cols, rows))
        if max(cols, rows) <= min_size:
            return out
        k += 1


def _tissue_tiles(scene: SlideScene, mpp: float, tile: int, across: int, down: int) -> np.ndarray:
    """Tiles (down, across) that hold or border tissue, from a cheap look at the scene's tissue field."""
    k = 8  # samples per tile side
    tiles = np.zeros((down, across), bool)
    for r in range(down):  # a row of tiles at a time, so a huge level's mask is never whole
        mask = scene.tissue_mask(0, r * k, across * k, k, mpp * tile / k)
        tiles[r] = mask.reshape(k, across, k).any(axis=(0, 2))
    # One tile more on every side: the rendered tissue edge is softer than the mask's
    return np.asarray(ndimage.binary_dilation(tiles, structure=np.ones((3, 3), bool)), dtype=bool)


def _render_region(scene: SlideScene, width: int, height: int, mpp: float, chunk: int = 256) -> np.ndarray:
    """The whole ``width`` x ``height`` region at ``mpp`` rendered in chunks, so render's temporaries stay small."""
    out = np.empty((height, width, 3), np.uint8)
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            h, w = min(chunk, height - y), min(chunk, width - x)
            out[y : y + h, x : x + w] = scene.render(x, y, w, h, mpp)
    return out


def _label_image(text: str, barcode: str, width: int, height: int) -> np.ndarray:
    """A printed slide label: white, the text, and a barcode-like stripe pattern (no real data)."""
    image = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(image)
    size = max(12, width // 8)
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    margin = width // 12
    y = margin
    for line in text.split("\n") + ["H&E"]:
        draw.text((margin, y), line, fill=(20, 20, 60), font=font)
        y += int(size * 1.4)
    # Bars from the barcode value's hash: 1 to 3 modules wide, alternating dark and light
    bits = "".join(f"{b:08b}" for b in hashlib.sha256(barcode.encode()).digest())
    module = max(1, width // 160)
    x, top, bottom = margin, height - height // 3, height - margin
    for i in range(0, len(bits) - 1, 2):
        w = (1 + int(bits[i : i + 2], 2) % 3) * module
        if x + w > width - margin:
            break
        if (i // 2) % 2 == 0:
            draw.rectangle((x, top, x + w - 1, bottom), fill=(0, 0, 0))
        x += w
    return np.asarray(image)


@dataclass(frozen=True)
class _Layout:
    """Where the scanned area and the label lie on the glass (mm, slide coordinates)."""

    glass_length: float  # along Y
    glass_width: float  # along X
    scan_top_mm: float  # from the glass edge at X = glass_width, along -X
    scan_left_mm: float  # from the glass edge at Y = glass_length, along -Y

    @property
    def origin(self) -> tuple[float, float]:
        return self.glass_width - self.scan_top_mm, self.glass_length - self.scan_left_mm

    @property
    def glass_origin(self) -> tuple[float, float]:
        return self.glass_width, self.glass_length


def _layout(scene: SlideScene) -> _Layout:
    w_mm, h_mm = scene.width_um / 1000, scene.height_um / 1000
    step = MACRO_SPACING_MM
    length = max(SLIDE_LENGTH_MM, SCAN_START_MM + w_mm + 1.0)
    width = max(SLIDE_WIDTH_MM, h_mm + 2.0)
    # Centred across the slide, on the overview's pixel grid so that the tissue lands on whole pixels
    top = round(max(1.0, (width - h_mm) / 2) / step) * step
    return _Layout(round(length, 3), round(width, 3), round(top, 6), SCAN_START_MM)


def write_slide(
    scene: SlideScene,
    folder: Path,
    *,
    base_mpp: float = 0.5,
    tile: int = 256,
    compression: str = "jpeg",
    sparse: bool = False,
    min_level_size: int | None = None,
    skip_levels: Sequence[int] = (),
    single_level: bool = False,
    extras: Sequence[str] = ("label", "overview", "thumbnail"),
    seed_uids: str | int | None = None,
    patient: tuple[str, str] = ("SYNTHETIC^SLIDE", "SLIDE0001"),
    jpeg_quality: int = 90,
) -> SlideFiles:
    """Write ``scene`` as a DICOM VL Whole Slide Microscopy pyramid, tile by tile.

    Parameters
    ----------
    scene : SlideScene
        The slide; every level is rendered from it at that level's resolution.
    folder : Path
        Created if missing; files are ``level-<k>.dcm``, ``label.dcm``, ``overview.dcm``, ``thumbnail.dcm``.
    base_mpp : float
        Micrometres per pixel of level 0; level k has ``base_mpp * 2**k``.
    tile : int
        Frame size (square).
    compression : {"jpeg", "jpeg2000", "none"}
        JPEG baseline 4:2:2 (YBR_FULL_422), lossless JPEG 2000 (YBR_RCT), or native RGB.
    sparse : bool
        TILED_SPARSE with per-frame Plane Position (Slide); tiles of glass only are left out.
    min_level_size : int, optional
        Levels are added until both sides are at most this; default ``tile`` (the top level is one tile).
    skip_levels : sequence of int
        Level indices (0 = base) not written, to make a pyramid with a missing level.
    single_level : bool
        Only the base level.
    extras : sequence of str
        Any of "label", "overview", "thumbnail".
    seed_uids : str or int, optional
        UID namespace; default ``scene.seed``.
    patient : tuple of str
        Patient's Name and Patient ID (synthetic).
    jpeg_quality : int
        Pillow JPEG quality, 1-100.

    Returns
    -------
    SlideFiles

    Raises
    ------
    ValueError
        On an unknown compression or extra, a bad size or quality, every level skipped, or native
        pixel data that would not fit a 32-bit element length.
    """
    try:
        codec = Compression(compression)
    except ValueError:
        raise ValueError(
            f"compression must be one of {', '.join(c.value for c in Compression)}, got {compression!r}"
        ) from None
    unknown = set(extras) - {"label", "overview", "thumbnail"}
    if unknown:
        raise ValueError(f"extras must be among label, overview, thumbnail; got {sorted(unknown)}")
    if tile < 16 or tile % 2:
        raise ValueError(f"tile must be an even number of pixels >= 16, got {tile}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1-100, got {jpeg_quality}")
    if base_mpp <= 0:
        raise ValueError(f"base_mpp must be positive, got {base_mpp}")
    min_size = tile if min_level_size is None else int(min_level_size)
    if min_size < 1:
        raise ValueError(f"min_level_size must be positive, got {min_level_size}")

    sizes = _level_sizes(scene, base_mpp, min_size)
    if single_level:
        sizes = sizes[:1]
    bad = [k for k in skip_levels if not 0 <= k < len(sizes)]
    if bad:
        raise ValueError(f"skip_levels {bad} out of range: this pyramid has levels 0-{len(sizes) - 1}")
    wanted = [k for k in range(len(sizes)) if k not in set(skip_levels)]
    if not wanted:
        raise ValueError("every pyramid level is skipped: nothing to write")

    namespace = str(scene.seed if seed_uids is None else seed_uids)
    series_key = "/".join(
        str(p) for p in (scene.seed, scene.width_um, scene.height_um, base_mpp, tile, codec.value, sparse, jpeg_quality)
    )
    identity = SlideIdentity.derived(namespace, series_key=series_key, patient=patient)
    layout = _layout(scene)
    imaged = (scene.width_um / 1000, scene.height_um / 1000)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    levels: list[LevelInfo] = []
    number = 0

    for k in wanted:
        mpp, cols, rows = sizes[k]
        across, down = math.ceil(cols / tile), math.ceil(rows / tile)
        if sparse:
            present = _tissue_tiles(scene, mpp, tile, across, down)
            if not present.any():
                present[0, 0] = True  # an instance needs one frame; an empty slide keeps its first tile
        else:
            present = np.ones((down, across), bool)
        grid = [(r, c) for r in range(down) for c in range(across) if present[r, c]]
        uid = identity.uid("instance", "volume", k)
        number += 1
        header = slide_header(
            identity,
            sop_instance_uid=uid,
            instance_number=number,
            total_columns=cols,
            total_rows=rows,
            tile_columns=tile,
            tile_rows=tile,
            frames=len(grid),
            spacing_mm=mpp / 1000,
            origin_mm=layout.origin,
            imaged_size_mm=imaged,
            flavour=ImageFlavour.VOLUME,
            resampled=k > 0,
            compression=codec,
            sparse=sparse,
        )
        path = folder / f"level-{k}.dcm"

        def tiles(mpp: float = mpp, grid: list[tuple[int, int]] = grid) -> Iterator[bytes]:
            for r, c in grid:
                yield _encode(scene.render(c * tile, r * tile, tile, tile, mpp), codec, jpeg_quality)

        per_frame = (
            (_per_frame_item(c * tile, r * tile, layout.origin, mpp / 1000) for r, c in grid) if sparse else None
        )
        _write_instance(
            path,
            header,
            tiles(),
            count=len(grid),
            encapsulated=codec is not Compression.NONE,
            frame_bytes=tile * tile * 3,
            per_frame=per_frame,
        )
        logger.debug("wrote level %d: %dx%d px, %d frames", k, cols, rows, len(grid))
        paths.append(path)
        levels.append(LevelInfo(path, mpp, cols, rows, tile, len(grid), uid))

    def single(
        name: str,
        flavour: ImageFlavour,
        pixels: np.ndarray,
        spacing_mm: float,
        origin_mm: tuple[float, float],
        size_mm: tuple[float, float],
        resampled: bool = False,
    ) -> None:
        nonlocal number
        number += 1
        path = folder / f"{name}.dcm"
        uid = identity.uid("instance", name)
        _write_single(
            path,
            identity,
            uid,
            number,
            flavour,
            pixels,
            spacing_mm,
            codec,
            jpeg_quality,
            origin_mm=origin_mm,
            size_mm=size_mm,
            resampled=resampled,
        )
        paths.append(path)

    if {"label", "overview"} & set(extras):
        label_px = (round(LABEL_LENGTH_MM / MACRO_SPACING_MM), round(layout.glass_width / MACRO_SPACING_MM))
        label = _label_image(identity.label_text, identity.barcode, *label_px)
        if "label" in extras:
            label_mm = (LABEL_LENGTH_MM, layout.glass_width)
            single("label", ImageFlavour.LABEL, label, MACRO_SPACING_MM, layout.glass_origin, label_mm)
        if "overview" in extras:
            glass_mm = (layout.glass_length, layout.glass_width)
            overview = _overview(scene, layout, label)
            single("overview", ImageFlavour.OVERVIEW, overview, MACRO_SPACING_MM, layout.glass_origin, glass_mm)
    if "thumbnail" in extras:
        # The whole scanned area at <= THUMBNAIL_MAX_PX a side, rendered directly at that resolution,
        # and at most half the coarsest level: a thumbnail between two levels makes viewers that
        # stack every flavour by resolution (OHIF's microscopy viewer) see two levels at one zoom.
        t_mpp = max(base_mpp, max(scene.width_um, scene.height_um) / THUMBNAIL_MAX_PX)
        if levels:
            t_mpp = max(t_mpp, 2 * max(level.mpp for level in levels))
        tw = min(THUMBNAIL_MAX_PX, math.ceil(scene.width_um / t_mpp))
        th = min(THUMBNAIL_MAX_PX, math.ceil(scene.height_um / t_mpp))
        thumbnail = _render_region(scene, tw, th, t_mpp, tile)
        single("thumbnail", ImageFlavour.THUMBNAIL, thumbnail, t_mpp / 1000, layout.origin, imaged, resampled=True)

    return SlideFiles(
        folder=folder,
        paths=paths,
        levels=levels,
        study_uid=identity.study_uid,
        series_uid=identity.series_uid,
        frame_of_reference_uid=identity.frame_of_reference_uid,
        base_mpp=base_mpp,
        origin_mm=layout.origin,
    )


def _write_single(
    path: Path,
    identity: SlideIdentity,
    sop_instance_uid: str,
    number: int,
    flavour: ImageFlavour,
    pixels: np.ndarray,
    spacing_mm: float,
    codec: Compression,
    quality: int,
    *,
    origin_mm: tuple[float, float],
    size_mm: tuple[float, float],
    resampled: bool = False,
) -> None:
    """A one-frame image (label, overview, thumbnail): the frame is the whole total pixel matrix."""
    h, w = pixels.shape[:2]
    header = slide_header(
        identity,
        sop_instance_uid=sop_instance_uid,
        instance_number=number,
        total_columns=w,
        total_rows=h,
        tile_columns=w,
        tile_rows=h,
        frames=1,
        spacing_mm=spacing_mm,
        origin_mm=origin_mm,
        imaged_size_mm=size_mm,
        flavour=flavour,
        resampled=resampled,
        compression=codec,
    )
    frame = _encode(pixels, codec, quality)
    _write_instance(
        path, header, iter([frame]), count=1, encapsulated=codec is not Compression.NONE, frame_bytes=w * h * 3
    )


def _overview(scene: SlideScene, layout: _Layout, label: np.ndarray) -> np.ndarray:
    """The whole glass slide from the macro camera: glass, the label at one end, the tissue where it lies."""
    step = MACRO_SPACING_MM
    w, h = round(layout.glass_length / step), round(layout.glass_width / step)
    # Bare glass as the scene renders it (background transmission through the gamma), so the scanned area
    # does not stand out as a box
    glass = np.asarray(scene.stain.background) ** scene.stain.gamma * 255.0
    out = np.empty((h, w, 3), np.uint8)
    out[:] = np.clip(glass, 0, 255).astype(np.uint8)
    lh, lw = label.shape[:2]
    out[:lh, :lw] = label
    # The scanned area at the overview's resolution, rendered from the scene
    x0, y0 = round(layout.scan_left_mm / step), round(layout.scan_top_mm / step)
    mpp = step * 1000
    sw, sh = math.ceil(scene.width_um / mpp), math.ceil(scene.height_um / mpp)
    sw, sh = min(sw, w - x0), min(sh, h - y0)
    out[y0 : y0 + sh, x0 : x0 + sw] = _render_region(scene, sw, sh, mpp)
    return out

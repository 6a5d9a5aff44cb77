"""Results to DICOM: a derived copy of each source image, in a new series that references nothing private."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.contract import RunContext, derived_series_number

__all__ = ["inverted_image"]

#: This pipeline's result digit in the Series Number (source 7 gives 79).
SERIES_OFFSET = 9


def inverted_image(
    src: Dataset, pixels: np.ndarray, max_value: int, index: int, ctx: RunContext, source_uid: str
) -> Dataset:
    """``src`` with ``pixels`` (inverted against ``max_value``) and the identity of a derived image of a new series."""
    ds = src
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ctx.uid(f"instance/{source_uid}")
    ds.SeriesInstanceUID = ctx.uid("series")
    ds.SeriesNumber = derived_series_number(src.get("SeriesNumber"), SERIES_OFFSET)
    ds.SeriesDescription = f"INVERTED {ds.get('SeriesDescription', '')}"[:64]
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]  # the MR IOD wants a third value (C.8.3.1.1.1)
    ds.InstanceNumber = index + 1
    bits = max_value.bit_length()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    if "WindowCenter" in ds:
        # The source's window, mirrored with the pixels; as it was, the viewer showed white.
        centres = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
        ds.WindowCenter = [f"{max_value - float(c):g}" for c in centres]
    ds.Manufacturer = ctx.identity.manufacturer
    ds.SoftwareVersions = ctx.identity.software_version
    return ds

"""Pixel and geometry reading of stored instances (re-exported by :mod:`gateway.contract`).

Kept apart from the contract so that the contract reads as the list of what a
pipeline implements and receives; the classes here are how a pipeline gets
pixels and plane geometry out of the stored files, for classic and enhanced
multi-frame images alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = ["Frame", "Geometry", "Instance"]


@dataclass(frozen=True)
class Geometry:
    """Position of a 2D image plane in the patient coordinate system (PS3.3 C.7.6.2)."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the plane (row direction x column direction)."""
        o = np.asarray(self.orientation, dtype=float)
        n = np.cross(o[:3], o[3:])
        return n / (np.linalg.norm(n) or 1.0)

    @property
    def slice_location(self) -> float:
        """Signed distance of the plane along its normal, for sorting slices."""
        return float(np.dot(self.normal, np.asarray(self.position, dtype=float)))


def _geometry(ds: Mapping[str, Any]) -> Geometry | None:
    try:
        pos = ds["ImagePositionPatient"]
        ori = ds["ImageOrientationPatient"]
        spacing = ds["PixelSpacing"]
        if len(pos) != 3 or len(ori) != 6 or len(spacing) != 2:
            return None
        thickness = ds.get("SliceThickness")
        return Geometry(
            tuple(float(v) for v in pos),  # type: ignore[arg-type]
            tuple(float(v) for v in ori),  # type: ignore[arg-type]
            (float(spacing[0]), float(spacing[1])),
            float(thickness) if thickness not in (None, "") else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Frame:
    """One 2D frame of an instance: pixels with the modality LUT applied, and where it lies.

    ``group(name)`` returns a functional group macro of the frame (per-frame
    first, then shared; PS3.3 C.7.6.16) of enhanced multi-frame images, and
    None for classic images; ``header`` is the instance's data set.
    """

    index: int
    pixels: np.ndarray
    geometry: Geometry | None
    group: Callable[[str], Dataset | None]
    header: Dataset


def _no_groups(name: str) -> Dataset | None:
    return None


def _group_lookup(item: Dataset, shared: Dataset | None) -> Callable[[str], Dataset | None]:
    def group(name: str) -> Dataset | None:
        for src in (item, shared):
            if src is not None and name in src and src[name].value:
                return src[name].value[0]  # type: ignore[no-any-return]
        return None

    return group


def _frame_geometry(group: Callable[[str], Dataset | None]) -> Geometry | None:
    pos, ori, meas = (group(n) for n in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
    if pos is None or ori is None or meas is None:
        return None
    return _geometry(
        {
            "ImagePositionPatient": pos.get("ImagePositionPatient"),
            "ImageOrientationPatient": ori.get("ImageOrientationPatient"),
            "PixelSpacing": meas.get("PixelSpacing"),
            "SliceThickness": meas.get("SliceThickness"),
        }
    )


@dataclass(frozen=True)
class Instance:
    """One stored instance of a series: its file and the headers the index kept.

    ``headers`` maps DICOM keywords (and ``ggggeeee`` hex tags for private
    elements) to values; nested functional-group values of multi-frame images
    are gathered as lists of distinct values.
    """

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    headers: Mapping[str, Any]

    def dataset(self, pixels: bool = True) -> Dataset:
        """Read the instance from disk (headers only when ``pixels`` is False)."""
        return dcmread(self.path, stop_before_pixels=not pixels)

    def pixel_array(self) -> np.ndarray:
        """Stored pixels with the modality LUT (rescale slope and intercept) applied, as float32.

        Shape is ``(rows, columns)``, ``(frames, rows, columns)`` or with a
        trailing samples axis for colour images, as pydicom returns it.
        """
        ds = self.dataset()
        arr = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0 or intercept != 0.0:
            arr = arr * np.float32(slope) + np.float32(intercept)
        return arr

    @property
    def geometry(self) -> Geometry | None:
        """Plane geometry for single-frame cross-sectional images, else None."""
        return _geometry(self.headers)

    def frames(self) -> Iterator[Frame]:
        """Every frame with its geometry, for classic and enhanced multi-frame images alike.

        Pixels are float32 with rescale applied, ``(rows, columns)`` for
        grayscale or ``(rows, columns, samples)`` for colour.
        """
        ds = self.dataset()
        arr = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame:
            shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
            n = int(ds.get("NumberOfFrames", 1) or 1)
            frames = arr if n > 1 else arr[None]
            for i, item in enumerate(per_frame):
                group = _group_lookup(item, shared)
                trans = group("PixelValueTransformationSequence")
                s = float(trans.get("RescaleSlope", 1) or 1) if trans is not None else slope
                b = float(trans.get("RescaleIntercept", 0) or 0) if trans is not None else intercept
                yield Frame(i, frames[i] * np.float32(s) + np.float32(b), _frame_geometry(group), group, ds)
            return
        pixels = arr * np.float32(slope) + np.float32(intercept)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if n > 1:  # multi-frame without functional groups: no per-frame geometry
            for i in range(n):
                yield Frame(i, pixels[i], None, _no_groups, ds)
        else:
            yield Frame(0, pixels, self.geometry, _no_groups, ds)

"""How the harness shows each kind of series: an OHIF route, or the fallback picture where OHIF 3.13 cannot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydicom.uid import ParametricMapStorage, SegmentationStorage, VLWholeSlideMicroscopyImageStorage

if TYPE_CHECKING:
    from gateway.apps.viewer.orthanc import Orthanc

__all__ = ["ViewerMode", "choose_mode", "image_flavour", "series_instances", "series_modality"]


class ViewerMode(str, Enum):
    """How a series is shown: an OHIF route, or a picture made without OHIF."""

    #: OHIF's basic viewer (``/viewer``): images, derived series, SEG over its
    #: source, Parametric Maps, SR with spatial coordinates.
    VIEWER = "viewer"
    #: OHIF's microscopy mode (``/microscopy``): VL Whole Slide Microscopy.
    MICROSCOPY = "microscopy"
    #: No OHIF: Orthanc's own rendering of one frame (``/preview``), or where
    #: Orthanc has none (float pixels, SR) the harness's rendering with pydicom.
    FALLBACK = "fallback"


def choose_mode(orthanc: Orthanc, series_uid: str, use_cpu_rendering: bool = False) -> tuple[ViewerMode, str]:
    """How to show a series, and why: by its SOP class, its references and its content.

    Known limits of OHIF 3.13 send a series to the fallback instead of
    into a viewport that would never finish (see :mod:`gateway.apps.viewer`).

    Parameters
    ----------
    orthanc : Orthanc
        The Orthanc that holds the series and the series it references.
    series_uid : str
        The series' SeriesInstanceUID.
    use_cpu_rendering : bool
        OHIF renders with cornerstone's CPU path (no labelmaps, no volume viewports).

    Returns
    -------
    tuple of ViewerMode and str
        The mode and the reason for it, in words.
    """
    series = orthanc.get(f"/series/{orthanc.series_id(series_uid)}")
    first = orthanc.get(f"/instances/{series['Instances'][0]}/simplified-tags")
    sop_class = str(first.get("SOPClassUID", ""))
    modality = str(series["MainDicomTags"].get("Modality", ""))
    if sop_class == VLWholeSlideMicroscopyImageStorage or modality == "SM":
        conflict = _pyramid_conflict(series_instances(orthanc, series_uid))
        if conflict:
            return ViewerMode.FALLBACK, conflict
        return ViewerMode.MICROSCOPY, "VL Whole Slide Microscopy: OHIF's microscopy mode"
    if use_cpu_rendering and sop_class in (SegmentationStorage, ParametricMapStorage):
        return ViewerMode.FALLBACK, "cornerstone's CPU rendering draws no labelmaps and no volume viewports"
    referenced = [str(r["SeriesInstanceUID"]) for r in first.get("ReferencedSeriesSequence") or []]
    if sop_class == SegmentationStorage and any(series_modality(orthanc, uid) == "SM" for uid in referenced):
        return ViewerMode.FALLBACK, "OHIF 3.13 shows no SEG over a slide (no SEG handler in its microscopy mode)"
    if sop_class == ParametricMapStorage:
        frames = int(first.get("NumberOfFrames") or 1)
        for uid in referenced:
            with_source = _instance_count(orthanc, uid)
            if with_source > frames:
                return ViewerMode.FALLBACK, (
                    f"OHIF 3.13 loads a Parametric Map only onto a source with one image per map frame "
                    f"({frames} frames, source series {with_source} images)"
                )
    if modality == "SR" and not _has_spatial_coordinates(orthanc, series["Instances"][0]):
        return ViewerMode.FALLBACK, "OHIF draws an SR only from SCOORD/SCOORD3D content; this report has none"
    return ViewerMode.VIEWER, f"{modality or sop_class}: OHIF's basic viewer"


def series_modality(orthanc: Orthanc, series_uid: str) -> str:
    """The Modality of a series Orthanc holds; "" when it holds no such series."""
    try:
        return str(orthanc.get(f"/series/{orthanc.series_id(series_uid)}")["MainDicomTags"]["Modality"])
    except KeyError:
        return ""


def _instance_count(orthanc: Orthanc, series_uid: str) -> int:
    try:
        return len(orthanc.get(f"/series/{orthanc.series_id(series_uid)}")["Instances"])
    except KeyError:
        return 0


def _has_spatial_coordinates(orthanc: Orthanc, instance_id: str) -> bool:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(orthanc.file(instance_id)), stop_before_pixels=True)
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        if item.get("ValueType") in ("SCOORD", "SCOORD3D"):
            return True
        stack.extend(item.get("ContentSequence", []))
    return False


def series_instances(orthanc: Orthanc, series_uid: str) -> list[tuple[str, dict[str, Any]]]:
    """(Orthanc id, simplified tags) of a series' instances by Instance Number."""
    out = []
    for item in orthanc.get(f"/series/{orthanc.series_id(series_uid)}/instances"):
        out.append((str(item["ID"]), dict(orthanc.get(f"/instances/{item['ID']}/simplified-tags"))))
    out.sort(key=lambda it: int(it[1].get("InstanceNumber") or 0))
    return out


def image_flavour(tags: dict[str, Any]) -> str:
    """Image Type value 3 of a VL Whole Slide Microscopy image (PS3.3 C.8.12.4.1.1)."""
    value = tags.get("ImageType") or ""
    parts = value.split("\\") if isinstance(value, str) else list(value)
    return str(parts[2]) if len(parts) > 2 else ""


def _pyramid_conflict(instances: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Why dicom-microscopy-viewer would refuse a slide's pyramid; "" when it takes it.

    It builds one OpenLayers tile grid from the VOLUME and THUMBNAIL images,
    each at the zoom factor round(base columns / columns), and throws
    "`resolutions` must be sorted in descending order" when two sizes round
    to one factor (a thumbnail larger than the second level does).
    """
    sizes = {
        (int(t.get("TotalPixelMatrixColumns") or 0), image_flavour(t))
        for _, t in instances
        if image_flavour(t) in ("VOLUME", "THUMBNAIL") and t.get("TotalPixelMatrixColumns")
    }
    base = max((cols for cols, _ in sizes), default=0)
    by_factor: dict[int, list[str]] = {}
    for cols, flavour in sorted(sizes, reverse=True):
        by_factor.setdefault(round(base / cols), []).append(f"{flavour} {cols} px")
    clashes = [names for names in by_factor.values() if len(names) > 1]
    if not clashes:
        return ""
    return "dicom-microscopy-viewer in OHIF 3.13 needs one zoom factor per pyramid image; " + "; ".join(
        " and ".join(names) + " round to the same" for names in clashes
    )

"""Pictures without a browser, and what a picture looks like: the fallback renderings and grey-level statistics."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import SegmentationStorage, VLWholeSlideMicroscopyImageStorage

from gateway.apps.viewer.modes import image_flavour, series_instances, series_modality

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from gateway.apps.viewer.orthanc import Orthanc

__all__ = ["ImageStats", "fallback_picture", "image_stats"]


@dataclass(frozen=True)
class ImageStats:
    """Grey-level statistics of a picture region (luminance, 0-255).

    Attributes
    ----------
    width, height : int
        Size of the region in pixels.
    black_fraction : float
        Share of pixels at or below the dark threshold.
    white_fraction : float
        Share of pixels at or above the bright threshold.
    uniform_fraction : float
        Share of pixels at the most common grey level (``uniform_level``): an
        image of one value is blank whatever the value, and a viewer maps a
        constant image to whichever grey its window puts it at.
    uniform_level : int
        The most common grey level.
    grey_levels : int
        Number of distinct grey levels.
    mean, std : float
        Mean and standard deviation of the luminance.
    """

    width: int
    height: int
    black_fraction: float
    white_fraction: float
    uniform_fraction: float
    uniform_level: int
    grey_levels: int
    mean: float
    std: float

    def problems(
        self,
        max_black: float = 0.95,
        max_white: float = 0.5,
        max_uniform: float = 0.9,
        min_levels: int = 16,
        min_std: float = 4.0,
    ) -> list[str]:
        """Why the region does not look like a rendered image; empty when it does.

        Each entry starts with ``blank``, ``saturated`` or ``flat``. The
        defaults suit a radiology image area; a bright-field slide, mostly
        white glass, needs a higher ``max_white``.
        """
        out = []
        if self.black_fraction > max_black:
            out.append(f"blank: {self.black_fraction:.0%} near-black pixels (limit {max_black:.0%})")
        elif self.uniform_fraction > max_uniform:
            out.append(
                f"blank: {self.uniform_fraction:.0%} of the pixels at grey level {self.uniform_level} "
                f"(limit {max_uniform:.0%})"
            )
        if self.white_fraction > max_white:
            out.append(f"saturated: {self.white_fraction:.0%} near-white pixels (limit {max_white:.0%})")
        if self.grey_levels < min_levels:
            out.append(f"flat: {self.grey_levels} grey levels (need {min_levels})")
        if self.std < min_std:
            out.append(f"flat: grey-level standard deviation {self.std:.1f} (need {min_std})")
        return out


def image_stats(
    png: Path | bytes, box: tuple[int, int, int, int] | None = None, dark: int = 16, bright: int = 240
) -> ImageStats:
    """Grey-level statistics of a PNG, or of ``box`` (left, top, right, bottom) in it.

    Parameters
    ----------
    png : pathlib.Path or bytes
        The picture (colour is reduced to luminance, ITU-R 601).
    box : tuple of int or None
        Region in pixels, right and bottom exclusive; ``None`` for all of it.
    dark, bright : int
        Luminance at or below which a pixel counts as black, at or above which as white.

    Raises
    ------
    ValueError
        When the region is empty.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        grey = im.convert("L")
        if box is not None:
            grey = grey.crop(box)
        a = np.asarray(grey, dtype=np.uint8)
    if a.size == 0:
        raise ValueError(f"empty region {box} in the picture")
    counts = np.bincount(a.ravel(), minlength=256)
    return ImageStats(
        width=int(a.shape[1]),
        height=int(a.shape[0]),
        black_fraction=float(np.mean(a <= dark)),
        white_fraction=float(np.mean(a >= bright)),
        uniform_fraction=float(counts.max() / a.size),
        uniform_level=int(counts.argmax()),
        grey_levels=int(np.count_nonzero(counts)),
        mean=float(a.mean()),
        std=float(a.std()),
    )


def fallback_picture(orthanc: Orthanc, series_uid: str, min_size: int = 512) -> PILImage:
    """A picture of a series that ``orthanc`` holds, made without OHIF.

    * a SEG of a slide: its segments in red over the slide's pyramid level
      of at most 2048 columns, placed by the slide coordinates of both
      (PS3.3 C.8.12.9);
    * a slide: Orthanc's rendering of its THUMBNAIL, else of its largest
      one-frame level;
    * anything else: Orthanc's rendering of the middle instance's middle
      frame (``/instances/{id}/frames/{n}/preview``: full range, no VOI
      LUT); where Orthanc has none, for float pixel data (Parametric
      Maps) the frame through its own VOI window (PS3.3 C.7.6.16.2.10),
      for an SR its content tree as text.

    Small pictures (a slide SEG has a pixel per model tile) are enlarged
    without interpolation to ``min_size``.
    """
    from PIL import Image

    instances = series_instances(orthanc, series_uid)
    first = instances[0][1]
    picture: PILImage | None = None
    if first.get("SOPClassUID") == SegmentationStorage:
        slides = [str(r["SeriesInstanceUID"]) for r in first.get("ReferencedSeriesSequence") or []]
        slides = [uid for uid in slides if series_modality(orthanc, uid) == "SM"]
        if slides:
            level = _pick_level(series_instances(orthanc, slides[0]), max_columns=2048)
            picture = _seg_over_slide(orthanc.file(instances[0][0]), orthanc.file(level))
    if picture is None:
        if first.get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage:
            instance_id, frame = _pick_level(instances, single_frame=True), 0
        else:
            instance_id, tags = instances[len(instances) // 2]
            frame = int(tags.get("NumberOfFrames") or 1) // 2
        try:
            with Image.open(io.BytesIO(orthanc.rendered(instance_id, frame))) as png:
                picture = png.copy()
        except RuntimeError:
            # HTTP 415: Orthanc has no decoder for these pixels, or there are none.
            picture = _render_dataset(orthanc.file(instance_id), frame)
    if min(picture.size) < min_size:
        scale = -(-min_size // max(min(picture.size), 1))
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def _pick_level(
    instances: Sequence[tuple[str, dict[str, Any]]], max_columns: int | None = None, single_frame: bool = False
) -> str:
    """The slide image to draw: the THUMBNAIL or largest one-frame level, or the largest level up to a width."""

    def columns(tags: dict[str, Any]) -> int:
        return int(tags.get("TotalPixelMatrixColumns") or tags.get("Columns") or 0)

    if single_frame:
        thumbnails = [i for i, t in instances if image_flavour(t) == "THUMBNAIL"]
        if thumbnails:
            return thumbnails[0]
    volumes = [(i, t) for i, t in instances if image_flavour(t) == "VOLUME"]
    if single_frame:
        candidates = [(i, t) for i, t in volumes if int(t.get("NumberOfFrames") or 1) == 1]
    else:
        candidates = [(i, t) for i, t in volumes if columns(t) <= (max_columns or 1 << 30)]
    # Nothing fits: the smallest level.
    candidates = candidates or sorted(volumes, key=lambda it: columns(it[1]))[:1]
    if not candidates:
        raise RuntimeError("the slide has no VOLUME image to draw")
    return max(candidates, key=lambda it: columns(it[1]))[0]


def _slide_grid(ds: Any) -> tuple[Any, Any, Any]:
    """Origin and the two pixel steps (mm, slide coordinates) of a total pixel matrix (PS3.3 C.8.12.9)."""
    import numpy as np

    origin = ds.TotalPixelMatrixOriginSequence[0]
    o = np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem)])
    cosines = np.array([float(v) for v in ds.ImageOrientationSlide])
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    # Along a row (next column) is the first direction; down a column the second.
    return o, cosines[:2] * float(spacing[1]), cosines[3:5] * float(spacing[0])


def _total_pixel_matrix(ds: Any) -> Any:
    """The stitched total pixel matrix of a tiled slide image, as stored (RGB)."""
    import numpy as np

    frames = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames") or 1) == 1:
        frames = frames[None]
    rows, cols = int(ds.Rows), int(ds.Columns)
    total = np.zeros((int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns), *frames.shape[3:]), frames.dtype)
    per_row = -(-total.shape[1] // cols)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    for k, tile in enumerate(frames):
        if per_frame is not None and "PlanePositionSlideSequence" in per_frame[k]:
            pos = per_frame[k].PlanePositionSlideSequence[0]
            top, left = (
                int(pos.RowPositionInTotalImagePixelMatrix) - 1,
                int(pos.ColumnPositionInTotalImagePixelMatrix) - 1,
            )
        else:
            # TILED_FULL (PS3.3 C.7.6.17.3): row by row, one focal plane and optical path.
            top, left = (k // per_row) * rows, (k % per_row) * cols
        h, w = min(rows, total.shape[0] - top), min(cols, total.shape[1] - left)
        if h > 0 and w > 0:
            total[top : top + h, left : left + w] = tile[:h, :w]
    return total


def _seg_over_slide(seg_file: bytes, level_file: bytes) -> PILImage:
    """A slide SEG's segments (max over segments, as probability) in red over one pyramid level."""
    import highdicom as hd
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    seg = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(seg_file)))
    level = dcmread(io.BytesIO(level_file))
    slide = _total_pixel_matrix(level).astype(np.float64)
    if slide.ndim == 2:
        slide = np.repeat(slide[..., None], 3, axis=2)
    prob = (
        np.asarray(seg.get_total_pixel_matrix(combine_segments=False, rescale_fractional=True), dtype=np.float64)
        .reshape(int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns), -1)
        .max(axis=2)
    )
    if seg.SegmentationType == "FRACTIONAL" and prob.max() > 1:
        prob = prob / float(seg.MaximumFractionalValue)
    # Every level pixel's centre in slide coordinates, then in SEG pixels.
    o, du, dv = _slide_grid(level)
    so, su, sv = _slide_grid(seg)
    r, c = np.mgrid[0 : slide.shape[0], 0 : slide.shape[1]]
    points = o + c[..., None] * du + r[..., None] * dv - so
    sc = np.rint(points @ su / (su @ su)).astype(int)
    sr = np.rint(points @ sv / (sv @ sv)).astype(int)
    inside = (sr >= 0) & (sr < prob.shape[0]) & (sc >= 0) & (sc < prob.shape[1])
    alpha = np.zeros(slide.shape[:2])
    alpha[inside] = 0.6 * np.clip(prob[sr[inside], sc[inside]], 0, 1)
    red = np.array([255.0, 0.0, 0.0])
    out = slide * (1 - alpha[..., None]) + red * alpha[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def _render_dataset(data: bytes, frame: int) -> PILImage:
    """One frame of a data set as 8-bit grey through its VOI window, or an SR as text."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    if "ContentSequence" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return _render_sr(ds)
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        pixels = pixels[frame]
    # The frame's own functional groups first, then the shared ones (PS3.3 C.7.6.16).
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    groups.extend(ds.get("SharedFunctionalGroupsSequence") or [])
    # The window applies to the Modality LUT's output (PS3.3 C.11.2.1.2).
    rescale = [g.PixelValueTransformationSequence[0] for g in groups if "PixelValueTransformationSequence" in g]
    source = rescale[0] if rescale else ds
    if "RescaleSlope" in source:
        pixels = pixels * float(source.RescaleSlope) + float(source.get("RescaleIntercept", 0))
    windows = [g.FrameVOILUTSequence[0] for g in groups if "FrameVOILUTSequence" in g]
    centre = width = None
    if windows:
        centre, width = float(np.ravel(windows[0].WindowCenter)[0]), float(np.ravel(windows[0].WindowWidth)[0])
    elif "WindowCenter" in ds:
        centre, width = float(np.ravel(ds.WindowCenter)[0]), float(np.ravel(ds.WindowWidth)[0])
    if centre is None or not width:
        lo, hi = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        centre, width = (lo + hi) / 2, max(hi - lo, 1e-12)
    grey = np.clip((pixels - (centre - width / 2)) / width * 255.0, 0, 255)
    return Image.fromarray(np.nan_to_num(grey).astype(np.uint8), mode="L")


def _render_sr(ds: Any, size: tuple[int, int] = (1024, 768)) -> PILImage:
    """An SR's content tree as white text on black, one content item a line."""
    from PIL import Image, ImageDraw, ImageFont

    lines = [f"{ds.get('SeriesDescription', '')}".strip() or "Structured Report"]

    def walk(items: Sequence[Any], depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            value = ""
            if "TextValue" in item:
                value = str(item.TextValue)
            elif "ConceptCodeSequence" in item:
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif "MeasuredValueSequence" in item and item.MeasuredValueSequence:
                measured = item.MeasuredValueSequence[0]
                unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
                value = f"{measured.NumericValue} {unit}"
            elif "ReferencedSOPSequence" in item:
                value = f"-> {item.ReferencedSOPSequence[0].ReferencedSOPClassUID.name}"
            if item.get("RelationshipType") in ("CONTAINS", "HAS PROPERTIES") or value:
                lines.append("  " * depth + (f"{name}: {value}" if value else name))
            walk(item.get("ContentSequence", []), depth + 1)

    walk(ds.get("ContentSequence", []), 1)
    try:
        font: Any = ImageFont.truetype("DejaVuSans.ttf", 16)
    except OSError:
        font = ImageFont.load_default()
    picture = Image.new("L", size, 0)
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(lines[: size[1] // 20]):
        draw.text((12, 10 + 20 * k), line, fill=255, font=font)
    return picture

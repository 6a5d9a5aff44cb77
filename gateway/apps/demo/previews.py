"""The report's preview pictures of a demo series: the pipeline's own, or the middle input and first output."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread

from gateway.apps.demo.series import SeriesRun

if TYPE_CHECKING:
    from PIL import Image

    from gateway.contract import Pipeline

__all__ = ["PREVIEW_SIZE", "make_previews"]

log = logging.getLogger(__name__)


#: Longest side of a preview picture in the report, in pixels.
PREVIEW_SIZE = 256


def _to_image(ds: Any) -> Image.Image:
    """Render a data set's pixels (middle frame) as an 8-bit picture for the report."""
    from PIL import Image

    arr = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if samples > 1:
        # pydicom hands colour as RGB; stretch data of more than 8 bits to 0-255.
        rgb = arr.astype(np.float32)
        if arr.dtype != np.uint8:
            rgb *= 255.0 / (float(rgb.max()) or 1.0)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    else:
        # Stored values, no modality LUT: a percentile window is the same
        # picture either way, as the rescale is linear.
        grey = arr.astype(np.float32)
        lo, hi = (float(v) for v in np.percentile(grey, [1, 99]))
        if hi <= lo:
            hi = lo + 1.0
        scaled = np.clip((grey - lo) / (hi - lo), 0.0, 1.0) * 255.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            scaled = 255.0 - scaled  # PS3.3 C.7.6.3.1.2: minimum value is white
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    scale = PREVIEW_SIZE / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize(size, resample)


def _has_pixels(path: Path) -> Any:
    """The data set at ``path`` if it holds pixel data, else None (values over 1 KB read on access)."""
    ds = dcmread(path, defer_size="1 KB")
    return ds if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) else None


def _by_instance_number(paths: Sequence[Path]) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        try:
            return (int(dcmread(p, stop_before_pixels=True).get("InstanceNumber") or 0), p.name)
        except Exception:
            # Only the order of the preview suffers; reading the file for the
            # picture reports a real problem.
            return (0, p.name)

    return sorted(paths, key=key)


def _default_preview(inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Image.Image]]:
    """Middle input image and first output image with pixels, windowed 1st-99th percentile."""
    pictures = []
    ordered = _by_instance_number(inputs)
    if ordered:
        mid = ordered[len(ordered) // 2]
        pictures.append((f"input: {mid.name}", _to_image(dcmread(mid))))
    for path in _by_instance_number(outputs):
        ds = _has_pixels(path)
        if ds is not None:
            pictures.append((f"output: {str(ds.get('SeriesDescription', '') or path.name)}", _to_image(ds)))
            break
    return pictures


def _png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_previews(run: SeriesRun, pipeline: Pipeline | None) -> None:
    outputs = [r.path for r in run.outputs]
    hook = getattr(pipeline, "demo_preview", None)
    try:
        if callable(hook):
            pictures = list(hook(run.files, outputs))
        else:
            pictures = _default_preview(run.files, outputs)
            if outputs and len(pictures) < 2:
                run.preview_error = "the outputs hold no pixel data (for example structured reports)"
        run.previews = [(str(title), _png(img)) for title, img in pictures]
    except Exception as exc:
        log.exception("preview of demo series %s failed", run.ref)
        run.preview_error = f"{type(exc).__name__}: {exc}"

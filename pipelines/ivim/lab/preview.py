"""Report pictures for ``aigw demo``: a b = 0 input slice and the maps with colour bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread

from pipelines.ivim.dicom import PARAMETERS

_PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
# Real-unit display ranges and labels for the colour bars.
_RANGES = {"d": (0.0, 3e-3, "D [mm2/s]"), "dstar": (0.0, 0.1, "D* [mm2/s]"), "f": (0.0, 0.6, "f")}


def _viridis_like(t: np.ndarray) -> np.ndarray:
    """A perceptually ordered colour map (dark blue, teal, yellow) without matplotlib."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    w = (x - i)[..., None]
    return (stops[i] * (1 - w) + stops[i + 1] * w).astype(np.uint8)


def _panel(values: np.ndarray, lo: float, hi: float, label: str, size: int = 256) -> Image.Image:
    colours = _viridis_like((values - lo) / (hi - lo or 1.0))
    img = Image.fromarray(colours).resize((size, size), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size + 70, size + 20), "white")
    canvas.paste(img, (0, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), label, fill="black")
    bar = _viridis_like(np.linspace(1, 0, size)[:, None].repeat(12, axis=1))
    canvas.paste(Image.fromarray(bar), (size + 6, 20))
    draw.text((size + 22, 20), f"{hi:.3g}", fill="black")
    draw.text((size + 22, size + 8), f"{lo:.3g}", fill="black")
    return canvas


def preview(inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
    """Pictures: the lowest-b middle slice of the input, then D, D* and f of the middle slice."""
    pictures: list[tuple[str, Any]] = []
    heads = [(p, dcmread(p, stop_before_pixels=True)) for p in inputs]
    singles = [(p, h) for p, h in heads if "DiffusionBValue" in h]
    if singles:
        zs = sorted({float(h.ImagePositionPatient[2]) for _, h in singles})
        mid = zs[len(zs) // 2]
        lowest = min((float(h.DiffusionBValue), p) for p, h in singles if float(h.ImagePositionPatient[2]) == mid)
        arr = dcmread(lowest[1]).pixel_array.astype(float)
        hi = np.percentile(arr, 99) or 1.0
        gray = Image.fromarray((np.clip(arr / hi, 0, 1) * 255).astype(np.uint8)).resize((256, 256))
        pictures.append((f"input, b = {lowest[0]:g} s/mm2", gray))
    maps = {}
    for path in outputs:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == _PM_SOP_CLASS:
            label = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel
            maps[str(label)] = path
    for p in PARAMETERS:
        if p.key not in _RANGES or p.label not in maps:
            continue
        lo, hi, label = _RANGES[p.key]
        ds = dcmread(maps[p.label])
        frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))  # one frame per slice
        pictures.append((f"{label} (Parametric Map)", _panel(frames[len(frames) // 2], lo, hi, label)))
    return pictures

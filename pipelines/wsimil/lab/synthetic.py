"""The demo slide and its picture for the demo report.

``write_demo_slide`` writes a synthetic tumour-positive H&E slide as a DICOM
whole-slide pyramid (:func:`pipelines.wsimil.lab.wsi.write_slide`) and keeps the
true tumour mask next to it (not sent), so the report can draw the truth
outline over the model's probability map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from scipy import ndimage

__all__ = ["TRUTH_FILE", "TRUTH_MPP", "preview", "write_demo_slide"]

TRUTH_FILE = "truth_tumour.npz"
TRUTH_MPP = 8.0  # resolution of the stored truth mask
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def write_demo_slide(folder: Path, seed: int, *, width_um: float = 3200.0, height_um: float = 2400.0) -> list[Path]:
    """Write a tumour-positive slide (JPEG pyramid with label, overview and thumbnail); returns its files."""
    from pipelines.wsimil.lab.scene import SlideScene
    from pipelines.wsimil.lab.wsi import write_slide

    folder.mkdir(parents=True, exist_ok=True)
    scene = SlideScene(seed, width_um, height_um, tumour=True)
    slide = write_slide(scene, folder, base_mpp=1.0, tile=256, compression="jpeg")
    w, h = int(np.ceil(width_um / TRUTH_MPP)), int(np.ceil(height_um / TRUTH_MPP))
    np.savez_compressed(folder / TRUTH_FILE, tumour=scene.tumour_mask(0, 0, w, h, TRUTH_MPP), mpp=TRUTH_MPP)
    return list(slide.paths)


def _probability_map(outputs: Sequence[Path]) -> np.ndarray | None:
    import highdicom as hd

    for p in outputs:
        if str(dcmread(p, stop_before_pixels=True).SOPClassUID) == SEG_STORAGE:
            seg = hd.seg.segread(p)
            m = seg.get_total_pixel_matrix(segment_numbers=[1], combine_segments=False, rescale_fractional=True)
            return np.asarray(m, dtype=np.float32).reshape(m.shape[0], m.shape[1])
    return None


def preview(inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
    """Slide thumbnail; the same with the tumour probability in red and the true tumour outline in green."""
    from pipelines.wsimil.preprocess import open_slide

    if not inputs:
        return []
    reader = open_slide(list(inputs))
    try:
        thumb = reader.thumbnail(900)
        grid = reader.grid
    finally:
        reader.close()
    h, w = thumb.shape[:2]
    pictures: list[tuple[str, Any]] = [
        (f"slide thumbnail ({grid.level_size[0]}x{grid.level_size[1]} at model level)", Image.fromarray(thumb))
    ]
    overlay = thumb.astype(np.float32)
    prob = _probability_map(outputs)
    if prob is not None:
        # the map covers whole tiles: crop to the slide's extent before scaling to the thumbnail
        cover_w = grid.columns * grid.tile_level_px / grid.level_size[0]
        cover_h = grid.rows * grid.tile_level_px / grid.level_size[1]
        big = Image.fromarray((prob * 255).astype(np.uint8)).resize(
            (round(w * cover_w), round(h * cover_h)), Image.Resampling.BILINEAR
        )
        p = np.asarray(big, dtype=np.float32)[:h, :w, None] / 255.0
        red = np.array([230.0, 20.0, 20.0])
        overlay = overlay * (1 - 0.6 * p) + red * 0.6 * p
    truth_file = Path(inputs[0]).parent / TRUTH_FILE
    title = "tumour probability (red)"
    if truth_file.exists():
        truth = np.load(truth_file)["tumour"]
        t = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
        edge = t & ~ndimage.binary_erosion(t, iterations=2)
        overlay[edge] = (20, 200, 40)
        title += ", true tumour outline (green, synthetic truth, not sent)"
    pictures.append((title, Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8))))
    return pictures

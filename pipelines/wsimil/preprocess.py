"""Reading a whole slide as a stream of model tiles, through wsidicom, and the tile conventions.

The model sees square RGB tiles of :data:`TILE_PX` pixels at
:data:`MODEL_MPP` micrometres per pixel (a 64 um field, about a 5x
objective), which is enough to tell large pleomorphic nuclei from small
stromal and lymphoid ones and keeps a 100,000-pixel-wide 40x slide at some
40,000 tissue tiles. A tile counts as tissue when at least
:data:`MIN_TISSUE_FRACTION` of its pixels are coloured (stained), which is
how glass and tissue differ in brightfield whatever the stain strength.
Training, the held-out evaluation and the benchmark tile synthetic slides
with these same constants and functions
(:func:`pipelines.wsimil.lab.metrics.slide_tiles`).

The slide is never decoded whole. The steps:

1. open the series' instances with wsidicom (pyramid levels, thumbnails,
   label and overview images; TILED_FULL or TILED_SPARSE; JPEG, JPEG 2000 or
   uncompressed frames);
2. choose the pyramid level nearest the model's resolution
   (:data:`MODEL_MPP`); when that level is missing
   wsidicom reads the next finer one and downsamples, and when the pyramid's
   steps are not the model's, each chunk is resized so a model tile always
   covers an integer number of level pixels (the segmentation's geometry
   stays exact);
3. find tissue on a small stored level (at most :data:`DETECT_MAX_PIXELS`
   pixels a side) so glass is never read at full resolution; a slide with
   no such level (a single-level slide) is read everywhere;
4. yield chunks of 8 x 8 model tiles, one at a time, with the tiles that are
   tissue by the training rule (:func:`tissue_fraction`).

A region that cannot be decoded (a corrupt frame) is retried tile by tile;
what still fails is counted and left out, and the caller decides whether
enough of the slide was read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gateway.contract import InputError, Instance, RunContext, Series, SeriesInfo

__all__ = [
    "MIN_TISSUE_FRACTION",
    "MODEL_MPP",
    "SATURATION_THRESHOLD",
    "TILE_PX",
    "WSI_STORAGE",
    "Chunk",
    "ReadStats",
    "SlideReader",
    "TileGrid",
    "check_readable",
    "open_slide",
    "saturation",
    "slide_paths",
    "source_level",
    "tissue_fraction",
    "to_model_input",
    "volume_instances",
]

log = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage (PS3.4 B.5).
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"

# ---------------------------------------------------------------- tile conventions (the model's input)
MODEL_MPP = 2.0
TILE_PX = 32
MIN_TISSUE_FRACTION = 0.25
# max(R, G, B) - min(R, G, B) above this is stain, below is glass and noise
SATURATION_THRESHOLD = 25


def saturation(rgb: np.ndarray) -> np.ndarray:
    """Colourfulness of RGB uint8 pixels, ``[..., 3]`` -> ``[...]`` int16."""
    return rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Fraction of stained pixels per tile, ``[N, H, W, 3]`` uint8 -> ``[N]``."""
    return (saturation(tiles) > SATURATION_THRESHOLD).mean(axis=(1, 2))


def to_model_input(tiles: np.ndarray) -> np.ndarray:
    """RGB uint8 tiles ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in [0, 1], the encoder's input."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# ---------------------------------------------------------------- the series' instances


def _image_type(inst: Instance) -> list[str]:
    v = inst.headers.get("ImageType") or []
    return [str(x).upper() for x in (v if isinstance(v, list) else [v])]


def volume_instances(series: SeriesInfo) -> list[Instance]:
    """The pyramid levels of a slide series: whole-slide images whose Image Type is VOLUME (PS3.3 C.8.12.4.1.1).

    Thumbnails, labels and overviews are whole-slide images too; only a
    VOLUME image holds the tissue at a known resolution.
    """
    return [i for i in series.instances if i.sop_class_uid == WSI_STORAGE and "VOLUME" in _image_type(i)]


def slide_paths(series: Series) -> list[Path]:
    """Files of every whole-slide image of the series, all handed to wsidicom (it sorts levels and extras)."""
    return [i.path for i in series.instances if i.sop_class_uid == WSI_STORAGE]


def source_level(series: Series, size: tuple[int, int]) -> Instance:
    """The stored pyramid level instance of the given total pixel matrix size (columns, rows).

    The Segmentation and the report reference the level whose pixels were
    read; wsidicom names it by size only, so it is found again among the
    series' instances by its Total Pixel Matrix Columns and Rows.
    """
    for inst in volume_instances(series):
        try:
            cols = int(inst.headers.get("TotalPixelMatrixColumns") or 0)
            rows = int(inst.headers.get("TotalPixelMatrixRows") or 0)
        except (TypeError, ValueError):
            continue
        if (cols, rows) == size:
            return inst
    raise InputError("the pyramid level that was read is not among the series' instances")


# ---------------------------------------------------------------- reading the slide
CHUNK_TILES = 8  # a chunk is 8 x 8 model tiles (256 x 256 model pixels)
DETECT_MAX_PIXELS = 2048  # largest stored level side read whole for tissue detection
# Level mpp within this fraction of the model's is read as is (2.0 vs 2.02 um is no difference to the model).
SCALE_TOLERANCE = 0.08


@dataclass(frozen=True)
class TileGrid:
    """Where the model tiles lie on the slide.

    ``level`` is the wsidicom pyramid index read (a power of two below the
    base), ``tile_level_px`` the side of one model tile in that level's
    pixels, and ``tile_base_px`` in base-level pixels. The grid starts at the
    top-left pixel of the total pixel matrix.
    """

    level: int
    level_mpp: float
    level_size: tuple[int, int]  # columns, rows
    tile_level_px: int
    base_mpp: float
    rows: int
    columns: int

    @property
    def tile_base_px(self) -> int:
        return self.tile_level_px * (1 << self.level)

    @property
    def whole(self) -> tuple[int, int]:
        """Rows and columns of tiles that lie wholly inside the level: the only ones scored.

        The model was trained on whole tiles (a tile cut by the slide's edge
        would be partly white padding); the grid's last row and column may be
        partial and stay 0 in the map.
        """
        return self.level_size[1] // self.tile_level_px, self.level_size[0] // self.tile_level_px

    @property
    def tile_mpp(self) -> float:
        """Micrometres covered by one model tile (the segmentation's pixel size)."""
        return self.tile_level_px * self.level_mpp


@dataclass
class Chunk:
    """One block of the tile grid: its tissue tiles, ready for the encoder."""

    tiles: np.ndarray  # uint8 [n, TILE_PX, TILE_PX, 3]
    rc: np.ndarray  # int [n, 2] grid row and column of each tile


@dataclass
class ReadStats:
    """What reading a slide met: regions read and skipped as glass, tiles examined and undecodable."""

    chunks_total: int = 0
    chunks_read: int = 0
    chunks_skipped_glass: int = 0
    tiles_unreadable: int = 0
    tiles_examined: int = 0
    errors: list[str] = field(default_factory=list)


class SlideReader:
    """A whole slide opened for streaming; use :func:`open_slide`."""

    def __init__(self, wsi: Any) -> None:
        self.wsi = wsi
        self.stats = ReadStats()
        base = wsi.pyramid.base_level
        self.base_mpp = float(base.mpp.width)
        self.base_size = (int(base.size.width), int(base.size.height))
        if self.base_mpp <= 0:
            raise InputError("the slide's base level has no pixel spacing")
        self.grid = self._choose_grid()

    # ------------------------------------------------------------ geometry
    def _stored_levels(self) -> list[Any]:
        return list(self.wsi.pyramid.levels)

    def _choose_grid(self) -> TileGrid:
        if self.base_mpp > MODEL_MPP * (1 + SCALE_TOLERANCE):
            raise InputError(
                f"the slide was scanned at {self.base_mpp:.2f} um/pixel; "
                f"the model needs {MODEL_MPP:g} um/pixel or finer"
            )
        level = max(0, int(math.floor(math.log2(MODEL_MPP * (1 + SCALE_TOLERANCE) / self.base_mpp))))
        level = min(level, int(self.wsi.pyramid.highest_level))
        level_mpp = self.base_mpp * (1 << level)
        stored = {int(lv.level): lv for lv in self._stored_levels()}
        if level in stored:
            size = (int(stored[level].size.width), int(stored[level].size.height))
        else:  # wsidicom reads it from the next finer level; a virtual level's size rounds down
            size = (self.base_size[0] >> level, self.base_size[1] >> level)
        tile_level_px = max(1, round(TILE_PX * MODEL_MPP / level_mpp))
        return TileGrid(
            level=level,
            level_mpp=level_mpp,
            level_size=size,
            tile_level_px=tile_level_px,
            base_mpp=self.base_mpp,
            rows=math.ceil(size[1] / tile_level_px),
            columns=math.ceil(size[0] / tile_level_px),
        )

    @property
    def source_level_size(self) -> tuple[int, int]:
        """Size (columns, rows) of the stored level the pixels come from (the segmentation's source image)."""
        g = self.grid
        finer = [lv for lv in self._stored_levels() if int(lv.level) <= g.level]
        lv = max(finer, key=lambda v: int(v.level))
        return int(lv.size.width), int(lv.size.height)

    # ------------------------------------------------------------ tissue
    def candidate_chunks(self) -> np.ndarray:
        """Bool [chunk rows, chunk columns]: chunks that may hold tissue (glass-only chunks are False)."""
        g = self.grid
        crow, ccol = math.ceil(g.rows / CHUNK_TILES), math.ceil(g.columns / CHUNK_TILES)
        small = [
            lv
            for lv in self._stored_levels()
            if int(lv.level) >= g.level and max(int(lv.size.width), int(lv.size.height)) <= DETECT_MAX_PIXELS
        ]
        if not small:
            log.info("no stored level of at most %d pixels: every region is read", DETECT_MAX_PIXELS)
            return np.ones((crow, ccol), bool)
        lv = max(small, key=lambda v: int(v.size.width))  # the finest small level
        w, h = int(lv.size.width), int(lv.size.height)
        try:
            img = np.asarray(self.wsi.read_region((0, 0), int(lv.level), (w, h), as_array=True))[..., :3]
        except Exception as exc:  # a corrupt frame in the small level: read everything instead
            log.warning("tissue detection level unreadable (%s): every region is read", type(exc).__name__)
            return np.ones((crow, ccol), bool)
        stained = saturation(img) > _detect_threshold(img)
        # chunk extent in this level's pixels
        scale = (1 << g.level) / (1 << int(lv.level))  # detect-level pixels per grid-level pixel
        chunk_px = CHUNK_TILES * g.tile_level_px * scale
        out = np.zeros((crow, ccol), bool)
        for r in range(crow):
            y0, y1 = int(r * chunk_px), int(math.ceil((r + 1) * chunk_px)) + 1
            for c in range(ccol):
                x0, x1 = int(c * chunk_px), int(math.ceil((c + 1) * chunk_px)) + 1
                # one detect pixel of margin on each side: tissue at a chunk's border is not lost
                block = stained[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1]
                out[r, c] = bool(block.size) and float(block.mean()) > 0.002
        return out

    # ------------------------------------------------------------ reading
    def _read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 of a level region, padded with white beyond the level's edge."""
        g = self.grid
        W, H = g.level_size
        cw, ch = max(0, min(w, W - x)), max(0, min(h, H - y))
        out = np.full((h, w, 3), 255, np.uint8)
        if cw and ch:
            arr = np.asarray(self.wsi.read_region((x, y), g.level, (cw, ch), as_array=True))
            out[:ch, :cw] = arr[..., :3]
        return out

    def _to_model(self, img: np.ndarray, tiles: int) -> np.ndarray:
        """Resize a region to ``tiles`` model tiles a side when the level is not at the model's mpp."""
        side = tiles * TILE_PX
        if img.shape[0] == side and img.shape[1] == side:
            return img
        return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BOX))

    def chunks(self, candidates: np.ndarray | None = None) -> Iterator[Chunk]:
        """Tissue tiles chunk by chunk, in raster order."""
        g = self.grid
        if candidates is None:
            candidates = self.candidate_chunks()
        span = CHUNK_TILES * g.tile_level_px
        self.stats.chunks_total = int(candidates.size)
        for cr, cc in np.argwhere(np.ones_like(candidates)):
            if not candidates[cr, cc]:
                self.stats.chunks_skipped_glass += 1
                continue
            x, y = int(cc) * span, int(cr) * span
            try:
                img = self._to_model(self._read(x, y, span, span), CHUNK_TILES)
                tiles = img.reshape(CHUNK_TILES, TILE_PX, CHUNK_TILES, TILE_PX, 3).swapaxes(1, 2)
                tiles = tiles.reshape(-1, TILE_PX, TILE_PX, 3)
                local = np.stack(np.divmod(np.arange(CHUNK_TILES * CHUNK_TILES), CHUNK_TILES), 1)
                readable = np.ones(len(tiles), bool)
            except Exception as exc:
                tiles, local, readable = self._salvage(x, y, exc)
            self.stats.chunks_read += 1
            rc = local + np.array([cr * CHUNK_TILES, cc * CHUNK_TILES])
            inside = (rc[:, 0] < g.whole[0]) & (rc[:, 1] < g.whole[1])
            self.stats.tiles_examined += int(np.count_nonzero(inside & readable))
            keep = inside & readable & (tissue_fraction(tiles) >= MIN_TISSUE_FRACTION)
            if np.any(keep):
                yield Chunk(np.ascontiguousarray(tiles[keep]), rc[keep])

    def _salvage(self, x: int, y: int, exc: Exception) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read a chunk that failed tile by tile, keeping what decodes."""
        g = self.grid
        t = g.tile_level_px
        self.stats.errors.append(type(exc).__name__)
        n = CHUNK_TILES * CHUNK_TILES
        tiles = np.full((n, TILE_PX, TILE_PX, 3), 255, np.uint8)
        local = np.stack(np.divmod(np.arange(n), CHUNK_TILES), 1)
        readable = np.zeros(n, bool)
        for i, (r, c) in enumerate(local):
            try:
                tiles[i] = self._to_model(self._read(x + int(c) * t, y + int(r) * t, t, t), 1)
                readable[i] = True
            except Exception:
                pass
        inside = (local[:, 0] + y // t < g.whole[0]) & (local[:, 1] + x // t < g.whole[1])
        self.stats.tiles_unreadable += int(np.count_nonzero(inside & ~readable))
        return tiles, local, readable

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """RGB uint8 picture of the whole slide (from the smallest stored level that is big enough)."""
        levels = sorted(self._stored_levels(), key=lambda v: int(v.size.width))
        for lv in levels:
            w, h = int(lv.size.width), int(lv.size.height)
            if max(w, h) >= max_side or lv is levels[-1]:
                if max(w, h) > 4 * DETECT_MAX_PIXELS:
                    break
                img = Image.fromarray(
                    np.asarray(self.wsi.read_region((0, 0), int(lv.level), (w, h), as_array=True))[..., :3]
                )
                img.thumbnail((max_side, max_side), Image.Resampling.BOX)
                return np.asarray(img)
        raise InputError("the slide has no level small enough for a thumbnail")

    def close(self) -> None:
        try:
            self.wsi.close()
        except Exception:  # closing must never hide the real outcome
            pass


def _detect_threshold(img: np.ndarray) -> float:
    """Saturation threshold for tissue on a low-resolution level: Otsu, kept near the tile rule's."""
    sat = saturation(img).ravel()
    hist = np.bincount(np.clip(sat, 0, 255), minlength=256).astype(float)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    otsu = float(np.nanargmax(between)) if np.any(np.isfinite(between)) else 25.0
    # a slide that is all glass has no real split: never go below the noise floor
    return float(np.clip(otsu, 12.0, 25.0))


def check_readable(stats: ReadStats, max_unreadable_fraction: float, ctx: RunContext) -> None:
    """Report the tiles that could not be decoded, and fail the job when they are too many.

    A few corrupt frames leave holes in the map but not a wrong answer, so
    they are logged and counted (``ctx.flag("unreadable_tile", n)``) for
    operations to see; beyond ``max_unreadable_fraction`` of the examined
    tiles the slide image is called damaged, a permanent failure.

    Raises
    ------
    InputError
        More than ``max_unreadable_fraction`` of the examined tiles are unreadable.
    """
    if not stats.tiles_unreadable:
        return
    examined = stats.tiles_examined + stats.tiles_unreadable
    ctx.flag("unreadable_tile", stats.tiles_unreadable)
    ctx.log.warning(
        "%d of %d tiles could not be decoded (%s)",
        stats.tiles_unreadable,
        examined,
        ", ".join(sorted(set(stats.errors))),
    )
    if stats.tiles_unreadable > max_unreadable_fraction * max(examined, 1):
        raise InputError(
            f"{stats.tiles_unreadable} of {examined} tiles of the slide could not be decoded "
            f"(more than {max_unreadable_fraction:.0%}); the slide image is damaged"
        )


def open_slide(paths: Sequence[Path]) -> SlideReader:
    """Open the instances of one slide; unreadable or non-slide input raises InputError."""
    from wsidicom import WsiDicom

    try:
        wsi = WsiDicom.open([Path(p) for p in paths])
    except Exception as exc:
        # the message may quote file names (UIDs): only the kind of failure is reported
        raise InputError(f"the series is not a readable whole-slide image ({type(exc).__name__})") from None
    try:
        return SlideReader(wsi)
    except InputError:
        wsi.close()
        raise
    except Exception as exc:
        wsi.close()
        raise InputError(f"the slide's pyramid cannot be used ({type(exc).__name__})") from None

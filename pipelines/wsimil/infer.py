"""Run the exported tumour MIL models on a slide (numpy + onnxruntime, no torch).

A slide is scored in two passes: :func:`embed` runs the tile encoder
(``wsi-mil-encoder.onnx``) over its tissue tiles in batches, and
:func:`mil_head` runs the attention head (``wsi-mil-head.onnx``) once on all
the embeddings of the slide; :func:`score_slide` streams a slide through
both. Tiles come from :class:`~pipelines.wsimil.preprocess.SlideReader` or,
for synthetic slides, :func:`pipelines.wsimil.lab.metrics.slide_tiles`;
both follow the conventions of :mod:`pipelines.wsimil.preprocess`: RGB
uint8, 32 x 32 pixels at 2.0 um/pixel, the grid anchored at pixel (0, 0) of
that level, tissue tiles only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gateway.contract import InputError
from pipelines.wsimil.preprocess import TILE_PX, Chunk, ReadStats, SlideReader, TileGrid, to_model_input

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "ENCODER",
    "ENCODER_BATCH",
    "HEAD",
    "MilResult",
    "SlideResult",
    "SlideScore",
    "embed",
    "mil_head",
    "score_slide",
    "slide_result",
]

#: Manifest names of the two exported models.
ENCODER = "wsi-mil-encoder"
HEAD = "wsi-mil-head"
#: Tiles per encoder run unless ``[models] batch_sizes`` says otherwise: bounds the float copy to 3 MB.
ENCODER_BATCH = 256


def embed(session: onnxruntime.InferenceSession, tiles: np.ndarray, batch: int = ENCODER_BATCH) -> np.ndarray:
    """Embed RGB tiles with the tile encoder.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of ``wsi-mil-encoder.onnx``.
    tiles : numpy.ndarray
        ``[N, 32, 32, 3]`` uint8 RGB tiles (N may be 0).
    batch : int
        Tiles per encoder run; bounds the float copy to ``batch`` tiles.

    Returns
    -------
    numpy.ndarray
        ``[N, D]`` float32 embeddings.
    """
    if tiles.ndim != 4 or tiles.shape[1:] != (TILE_PX, TILE_PX, 3) or tiles.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles [N, {TILE_PX}, {TILE_PX}, 3], got {tiles.dtype} {tiles.shape}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    out_meta = session.get_outputs()[0]
    dim = out_meta.shape[1]
    if not isinstance(dim, int):
        raise ValueError(f"encoder output {out_meta.name} has no fixed embedding size: {out_meta.shape}")
    out = np.empty((len(tiles), dim), np.float32)
    name = session.get_inputs()[0].name
    for i in range(0, len(tiles), batch):
        out[i : i + batch] = session.run(None, {name: to_model_input(tiles[i : i + batch])})[0]
    return out


@dataclass(frozen=True)
class MilResult:
    """The head's answer for one slide.

    Attributes
    ----------
    slide_probability : float
        Probability that the slide contains tumour.
    attention : numpy.ndarray
        ``[N]`` float32 attention weights of the tiles (sum 1).
    tile_probability : numpy.ndarray
        ``[N]`` float32 tumour probability of each tile (the localisation).
    """

    slide_probability: float
    attention: np.ndarray
    tile_probability: np.ndarray


def mil_head(session: onnxruntime.InferenceSession, embeddings: np.ndarray) -> MilResult:
    """Pool the embeddings of one slide with the attention head.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of ``wsi-mil-head.onnx``.
    embeddings : numpy.ndarray
        ``[N, D]`` embeddings of all tissue tiles of the slide, N >= 1.

    Returns
    -------
    MilResult

    Raises
    ------
    ValueError
        No tiles (a slide without tissue has no score; the caller decides
        what to report), or embeddings of the wrong shape.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings [N, D], got shape {embeddings.shape}")
    if len(embeddings) == 0:
        raise ValueError("no tissue tiles: the MIL head needs at least one embedding")
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    slide, attention, tile = session.run(["slide_probability", "attention", "tile_probability"], {name: x})
    return MilResult(float(slide.reshape(-1)[0]), attention.reshape(-1), tile.reshape(-1))


@dataclass
class SlideScore:
    """The model's view of one slide: MIL outputs for its tissue tiles and where they lie.

    Attributes
    ----------
    grid : TileGrid
        Where the model tiles lie on the slide.
    stats : ReadStats
        What reading the slide met.
    rc : numpy.ndarray
        ``[N, 2]`` int grid row and column of each tissue tile.
    mil : MilResult or None
        None when the slide has no tissue.
    seconds : float
        Time spent reading, decoding and embedding.
    """

    grid: TileGrid
    stats: ReadStats
    rc: np.ndarray
    mil: MilResult | None
    seconds: float

    def probability_map(self) -> np.ndarray:
        """Tile probabilities on the grid, float32 [rows, columns], 0 off tissue."""
        prob = np.zeros((self.grid.rows, self.grid.columns), np.float32)
        if self.mil is not None:
            prob[self.rc[:, 0], self.rc[:, 1]] = self.mil.tile_probability
        return prob


def score_slide(
    reader: SlideReader,
    encoder: onnxruntime.InferenceSession,
    head: onnxruntime.InferenceSession,
    progress: Callable[[float, str], None] = lambda f, m: None,
    batch: int = ENCODER_BATCH,
) -> SlideScore:
    """Stream the slide's tissue tiles through the encoder in batches, then the MIL head once.

    Chunks are gathered until a batch is full, so memory holds one batch of
    tiles and the embeddings (256 bytes a tile) whatever the slide's size.
    """
    t0 = time.perf_counter()
    candidates = reader.candidate_chunks()
    todo = max(1, int(np.count_nonzero(candidates)))
    parts: list[np.ndarray] = []
    where: list[np.ndarray] = []
    pending: list[Chunk] = []
    n_pending = 0
    for i, chunk in enumerate(reader.chunks(candidates)):
        pending.append(chunk)
        n_pending += len(chunk.tiles)
        if n_pending >= batch:
            parts.append(embed(encoder, np.concatenate([c.tiles for c in pending]), batch=batch))
            where.extend(c.rc for c in pending)
            pending, n_pending = [], 0
        if i % 16 == 0:
            progress(0.05 + 0.8 * min(1.0, reader.stats.chunks_read / todo), "tiles embedded")
    if pending:
        parts.append(embed(encoder, np.concatenate([c.tiles for c in pending]), batch=batch))
        where.extend(c.rc for c in pending)
    if not parts:
        return SlideScore(reader.grid, reader.stats, np.zeros((0, 2), int), None, time.perf_counter() - t0)
    mil = mil_head(head, np.concatenate(parts))
    return SlideScore(reader.grid, reader.stats, np.concatenate(where), mil, time.perf_counter() - t0)


@dataclass(frozen=True)
class SlideResult:
    """What the model said about a slide, with the thresholds the report applies.

    Attributes
    ----------
    probability : float
        Slide-level tumour probability.
    threshold : float
        Slide called positive at or above this.
    tile_probability : numpy.ndarray
        float32 ``[grid rows, grid columns]``, 0 off tissue.
    tissue_tiles : int
        Tiles the head pooled.
    tile_threshold : float
        Tiles at or above this count as tumour area.
    """

    probability: float
    threshold: float
    tile_probability: np.ndarray
    tissue_tiles: int
    tile_threshold: float

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


def slide_result(score: SlideScore, slide_threshold: float, tile_threshold: float) -> SlideResult:
    """The result the DICOM writers take, from a scored slide.

    Raises
    ------
    InputError
        The slide has no tissue: there is nothing to score, which no rerun changes.
    """
    if score.mil is None:
        raise InputError(
            f"no tissue found on the slide ({score.stats.chunks_read} regions read, "
            f"{score.stats.chunks_skipped_glass} glass-only regions skipped)"
        )
    return SlideResult(
        probability=float(score.mil.slide_probability),
        threshold=slide_threshold,
        tile_probability=score.probability_map(),
        tissue_tiles=len(score.rc),
        tile_threshold=tile_threshold,
    )

"""Run the exported tumour MIL models (numpy + onnxruntime, no torch).

A slide is scored in two passes: :func:`embed` runs the tile encoder
(``wsi-mil-encoder.onnx``) over its tissue tiles in batches, and
:func:`mil_head` runs the attention head (``wsi-mil-head.onnx``) once on all
the embeddings of the slide. Tiles come from
:func:`pipelines.wsimil.metrics.slide_tiles` or any reader that follows the
same convention (:mod:`pipelines.wsimil.tiles`): RGB uint8, 32 x 32 pixels at
2.0 um/pixel, the grid anchored at pixel (0, 0) of that level, tissue tiles
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.wsimil.tiles import TILE_PX, to_model_input

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["MilResult", "embed", "make_session", "mil_head"]


def make_session(path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """Open an exported model on the CPU.

    Parameters
    ----------
    path : pathlib.Path
        The ``.onnx`` file.
    threads : int or None
        Intra-op threads; None leaves onnxruntime's default (all cores).

    Returns
    -------
    onnxruntime.InferenceSession
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(session: onnxruntime.InferenceSession, tiles: np.ndarray, batch: int = 256) -> np.ndarray:
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

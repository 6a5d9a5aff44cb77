"""From a DWI series to an IVIM-ready volume: b-values, trace images, slices, mask.

* b-values come from Diffusion b-value (0018,9087), at top level or in the MR
  Diffusion functional group of enhanced images, else from the vendors'
  private attributes: Siemens (0019,100C), GE (0043,1039, first value),
  Philips (2001,1003);
* images with several diffusion directions at one b-value are combined into
  the trace image (geometric mean over directions); repeats of the same
  b-value and direction are averaged;
* slices are grouped by their position along the slice normal, keeping the
  source geometry;
* voxels whose lowest-b signal is background are masked out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

from gateway.contract import Geometry, InputError, Instance, Series

__all__ = ["DwiVolume", "background_mask", "bvalues_from_headers", "load_dwi"]

# (tag as stored in routing headers, description) in the order they are tried.
_PRIVATE_B = (("0019100C", "Siemens (0019,100C)"), ("00431039", "GE (0043,1039)"), ("20011003", "Philips (2001,1003)"))
_GE_OFFSET = 1_000_000_000  # some GE software adds 1e9 to the b-value


@dataclass
class DwiVolume:
    """Trace-weighted signals ``[slices, b, rows, cols]`` on sorted distinct b-values."""

    bvalues: np.ndarray
    signals: np.ndarray
    geometry: list[Geometry]
    sources: list[Dataset]  # header of one source image per slice (lowest b), slice order
    all_sources: list[Dataset] = field(default_factory=list)  # every source header, for references
    enhanced: bool = False


def _clean_b(value: Any) -> float | None:
    if isinstance(value, (list, tuple, MultiValue)):  # GE: first value is the b-value
        value = value[0] if len(value) else None
    try:
        b = float(value)
    except (TypeError, ValueError):
        return None
    if b >= _GE_OFFSET:
        b -= _GE_OFFSET
    return b if 0 <= b < 100_000 else None


def bvalues_from_headers(headers: Mapping[str, Any]) -> list[float]:
    """Distinct b-values an instance's routing headers reveal (any source)."""
    std = headers.get("DiffusionBValue")
    if std is not None:
        values = std if isinstance(std, list) else [std]
        return sorted({b for b in (_clean_b(v) for v in values) if b is not None})
    for key, _ in _PRIVATE_B:
        if key in headers:
            b = _clean_b(headers[key])
            return [] if b is None else [b]
    return []


def _bvalue(ds: Dataset) -> float | None:
    if "DiffusionBValue" in ds:
        return _clean_b(ds.DiffusionBValue)
    for group, elem in ((0x0019, 0x100C), (0x0043, 0x1039), (0x2001, 0x1003)):
        if (group, elem) in ds:
            raw = ds[group, elem].value
            if isinstance(raw, bytes):  # UN in implicit VR without a private dictionary
                try:
                    raw = raw.decode("ascii").strip("\0 ").split("\\")
                except UnicodeDecodeError:
                    continue
            return _clean_b(raw)
    return None


def _direction(ds: Dataset) -> tuple[float, ...]:
    g = ds.get("DiffusionGradientOrientation")
    if g is None and "DiffusionGradientDirectionSequence" in ds and ds.DiffusionGradientDirectionSequence:
        g = ds.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation")
    return tuple(round(float(v), 3) for v in g) if g is not None else ()


def _frames(inst: Instance) -> Iterator[tuple[float | None, tuple[float, ...], Geometry, np.ndarray]]:
    """(b, direction, geometry, image) for every frame of an instance."""
    for frame in inst.frames():
        if frame.pixels.ndim != 2:
            raise InputError("colour images are not diffusion-weighted MR")
        if frame.geometry is None:
            raise InputError("an image lacks position, orientation or pixel spacing")
        diff = frame.group("MRDiffusionSequence")
        if diff is not None:  # enhanced MR: the MR Diffusion functional group
            b = _clean_b(diff.DiffusionBValue) if "DiffusionBValue" in diff else None
            yield b, _direction(diff), frame.geometry, frame.pixels
        else:
            yield _bvalue(frame.header), _direction(frame.header), frame.geometry, frame.pixels


def load_dwi(series: Series, max_b: float = 1000.0) -> DwiVolume:
    """Read the series into a trace-weighted volume (streaming, one image at a time).

    Raises
    ------
    InputError
        If b-values cannot be found, images disagree in size or orientation,
        or fewer than 4 distinct b-values (at most ``max_b``) remain.
    """
    # (slice key, b) -> direction -> (sum, count); slice key -> geometry
    acc: dict[tuple[float, float], dict[tuple[float, ...], list[Any]]] = defaultdict(dict)
    geoms: dict[float, Geometry] = {}
    lowest: dict[float, tuple[float, Dataset]] = {}
    headers: list[Dataset] = []
    shape: tuple[int, ...] | None = None
    normal: np.ndarray | None = None
    enhanced = False
    for inst in series.instances:
        header = inst.dataset(pixels=False)
        enhanced = enhanced or "PerFrameFunctionalGroupsSequence" in header
        headers.append(header)
        for b, direction, geom, img in _frames(inst):
            if b is None:
                raise InputError(
                    "no b-value found in Diffusion b-value (0018,9087), its functional group, or the Siemens, "
                    "GE or Philips private attributes"
                )
            if shape is None:
                shape = img.shape
                o = np.asarray(geom.orientation)
                normal = np.cross(o[:3], o[3:])
            elif img.shape != shape:
                raise InputError(f"images differ in size ({img.shape} and {shape})")
            key = round(float(np.dot(normal, geom.position)), 2)  # type: ignore[arg-type]
            geoms.setdefault(key, geom)
            if key not in lowest or b < lowest[key][0]:
                lowest[key] = (b, header)
            cell = acc[(key, b)].setdefault(direction, [np.zeros(shape, np.float64), 0])
            cell[0] += img
            cell[1] += 1
    if shape is None:
        raise InputError("series has no images")
    slices = sorted(geoms)
    bvals = sorted({b for (_, b) in acc if b <= max_b})
    dropped = sorted({b for (_, b) in acc if b > max_b})
    if len(bvals) < 4:
        raise InputError(
            f"IVIM needs at least 4 distinct b-values <= {max_b:g} s/mm2; found {len(bvals)}"
            + (f" (ignored above the range: {dropped})" if dropped else "")
        )
    signals = np.zeros((len(slices), len(bvals), *shape), dtype=np.float32)
    for zi, z in enumerate(slices):
        for bi, b in enumerate(bvals):
            cells = acc.get((z, b))
            if not cells:
                raise InputError(f"slice {zi + 1} has no image at b = {b:g} s/mm2")
            means = [s / n for s, n in cells.values()]  # repeats of one direction: arithmetic mean
            # Trace image: geometric mean over directions (b = 0 has a single "direction").
            logs = [np.log(np.maximum(m, 1e-6)) for m in means]
            signals[zi, bi] = np.exp(np.mean(logs, axis=0)).astype(np.float32)
    return DwiVolume(
        np.asarray(bvals, dtype=np.float32),
        signals,
        [geoms[z] for z in slices],
        [lowest[z][1] for z in slices],
        headers,
        enhanced,
    )


def background_mask(volume: DwiVolume, fraction: float) -> np.ndarray:
    """True where the lowest-b signal exceeds ``fraction`` of its 99th percentile."""
    s_low = volume.signals[:, 0]
    ref = float(np.percentile(s_low, 99)) if s_low.size else 0.0
    return np.isfinite(s_low) & (s_low > fraction * ref) if ref > 0 else np.zeros(s_low.shape, bool)

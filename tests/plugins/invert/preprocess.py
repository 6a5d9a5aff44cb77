"""Series to arrays: the stored pixels in slice order, with the header each came from."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset

from gateway.contract import InputError, Series

__all__ = ["read_images"]


def read_images(series: Series) -> list[tuple[Dataset, np.ndarray]]:
    """Each instance's data set and its stored pixels as float32, sorted along the slice normal."""
    out = []
    for inst in series.sorted_by_position():
        ds = inst.dataset()
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError("colour images cannot be inverted (SamplesPerPixel != 1)")
        out.append((ds, ds.pixel_array.astype(np.float32)))
    if not out:
        raise InputError("series has no images")
    return out

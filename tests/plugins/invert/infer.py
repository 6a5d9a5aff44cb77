"""Arrays to results: the model run through the session the gateway made for it."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MODEL_NAME", "invert"]

#: The manifest name of the model (``exported_models/<name>.json``).
MODEL_NAME = "test-invert"


def invert(session: Any, image: np.ndarray, max_value: int) -> np.ndarray:
    """``max_value - image`` computed by the model, clipped to the stored range, as uint16."""
    (inv,) = session.run(None, {"image": image.reshape((-1,) + image.shape[-2:])})
    # The model inverts against its own constant (4095); shift to the configured white.
    inv = inv.reshape(image.shape) + np.float32(max_value - 4095)
    return np.clip(inv, 0, max_value).astype(np.uint16)

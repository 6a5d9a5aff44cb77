"""Image-quality figures of the lf2hf benchmark and model test (numpy only).

All figures compare slices that were each divided by their own
:func:`~pipelines.lf2hf.preprocess.normalisation_scale` (the median within
the head, i.e. brain tissue, maps to 1); PSNR and SSIM use a data range of
1, that tissue level.
"""

from __future__ import annotations

import numpy as np

from pipelines.lf2hf.preprocess import box_mean

__all__ = ["gm_wm_contrast", "psnr_masked", "ssim_masked"]

#: SSIM window side and constants (Wang et al. 2004; skimage's defaults
#: with a uniform window).
SSIM_WINDOW: int = 7
_K1, _K2 = 0.01, 0.03


def psnr_masked(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) within ``mask``.

    Parameters
    ----------
    pred, truth : numpy.ndarray
        Normalised slices of the same shape.
    mask : numpy.ndarray
        bool, the pixels that count (the brain).
    data_range : float
        Peak value (1 after normalisation).

    Returns
    -------
    float
    """
    mse = float(np.mean((pred[mask].astype(np.float64) - truth[mask]) ** 2))
    return float(10.0 * np.log10(data_range**2 / max(mse, 1e-20)))


def ssim_masked(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity within ``mask``.

    The SSIM map uses a uniform 7 x 7 window with sample covariances, as
    ``skimage.metrics.structural_similarity`` does by default; its mean is
    taken over the mask instead of the whole image, so the background does
    not inflate it.

    Parameters
    ----------
    pred, truth : numpy.ndarray
        Normalised slices ``[H, W]``.
    mask : numpy.ndarray
        bool ``[H, W]``.
    data_range : float
        Dynamic range (1 after normalisation).

    Returns
    -------
    float
    """
    x = pred.astype(np.float64)
    y = truth.astype(np.float64)
    n = SSIM_WINDOW * SSIM_WINDOW
    cov = n / (n - 1.0)

    def mean(a: np.ndarray) -> np.ndarray:
        return box_mean(a, SSIM_WINDOW, np.float64)

    ux, uy = mean(x), mean(y)
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(np.mean(s[mask]))


def gm_wm_contrast(img: np.ndarray, gm_mask: np.ndarray, wm_mask: np.ndarray) -> float:
    """Grey/white matter contrast ``(GM - WM) / (GM + WM)`` of mean intensities.

    Parameters
    ----------
    img : numpy.ndarray
        Slice ``[H, W]``.
    gm_mask, wm_mask : numpy.ndarray
        bool high-probability GM and WM masks.

    Returns
    -------
    float
    """
    gm = float(np.mean(img[gm_mask]))
    wm = float(np.mean(img[wm_mask]))
    return (gm - wm) / (gm + wm) if gm + wm != 0 else 0.0

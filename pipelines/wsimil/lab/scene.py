"""Synthetic H&E slides: a scene in micrometres that renders any region at any resolution.

A :class:`SlideScene` is defined in slide coordinates (micrometres, origin at
the top-left corner of the scanned area, x to the right, y down) by a few
coarse fields and a deterministic cloud of nuclei:

* tissue: one to three fragments with irregular, smooth outlines;
* tumour (positive slides only): one to three irregular regions inside the
  tissue, with large (pleomorphic), dense, hyperchromatic nuclei and a more
  basophilic (purple) cytoplasm;
* lymphoid aggregates on any slide: small, very dense, dark nuclei, the
  hard negative that forces the model to look at nuclear size, not only at
  darkness or density;
* stroma everywhere else in the tissue: sparse small nuclei in eosin-pink
  fibrous texture.

Colours follow the Beer-Lambert model of brightfield absorption (optical
density is additive over the haematoxylin and eosin concentrations) with a
stain matrix, stain strengths, background, gamma and focus blur drawn per
slide: that is the stain and scanner variation that keeps a model from
learning one colour.

Rendering is local: nuclei are generated per 128 um block from a seed
derived from the block index, so any region at any micrometres-per-pixel
gives the same tissue, and a whole slide can be written tile by tile in
bounded memory (:mod:`pipelines.wsimil.lab.wsi`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SlideScene", "Stain"]

_GRID_UM = 16.0  # spacing of the coarse tissue / tumour / lymphoid fields
_BLOCK_UM = 128.0  # nuclei are seeded per block of this size
# Nuclei per square micrometre (about 1,500, 5,500 and 9,000 per mm2).
_DENSITY = {"stroma": 0.0015, "tumour": 0.0055, "lymph": 0.009}
_MAX_DENSITY = max(_DENSITY.values())
_KINDS = ("stroma", "tumour", "lymph")
# Radius mean / sd (um) and haematoxylin load per nucleus kind.
_RADIUS = {"stroma": (2.6, 0.4), "tumour": (4.6, 0.9), "lymph": (2.7, 0.25)}
_DARKNESS = {"stroma": 0.75, "tumour": 1.05, "lymph": 1.35}
_RADIUS_BINS = np.array([1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.75, 5.5, 6.5, 8.0])


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Stain:
    """Per-slide staining and scanner parameters."""

    haematoxylin: tuple[float, float, float]  # optical density per unit concentration, RGB
    eosin: tuple[float, float, float]
    background: tuple[float, float, float]  # transmitted light through glass, 0-1
    gamma: float
    blur_um: float  # focus blur (Gaussian sigma)
    noise: float  # pixel noise (sd, 0-255 scale)

    @classmethod
    def random(cls, rng: np.random.Generator) -> Stain:
        h = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.06, 3)
        e = np.array([0.07, 0.99, 0.11]) + rng.normal(0, 0.05, 3)
        h = np.clip(h, 0.05, None) / np.linalg.norm(np.clip(h, 0.05, None)) * rng.uniform(0.7, 1.35)
        e = np.clip(e, 0.02, None) / np.linalg.norm(np.clip(e, 0.02, None)) * rng.uniform(0.55, 1.3)
        bg = np.clip(rng.uniform(0.90, 0.99) + rng.normal(0, 0.015, 3), 0.8, 1.0)
        return cls(
            tuple(float(v) for v in h),  # type: ignore[arg-type]
            tuple(float(v) for v in e),  # type: ignore[arg-type]
            tuple(float(v) for v in bg),  # type: ignore[arg-type]
            float(rng.uniform(0.8, 1.25)),
            float(rng.uniform(0.0, 0.6)),
            float(rng.uniform(1.0, 4.0)),
        )


def _blobs(
    shape: tuple[int, int], rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray, roughness: float
) -> np.ndarray:
    """Union of irregular discs on the coarse grid (values ~1 inside, soft edge)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=6)
    noise /= float(noise.std()) or 1.0
    field = np.full(shape, -1.0, np.float32)
    for (cy, cx), r in zip(centres, radii):
        aspect = rng.uniform(0.6, 1.0)
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / aspect
        d = np.sqrt(u * u + v * v) / r
        field = np.maximum(field, 1.0 - d + roughness * noise * 0.35)
    return np.clip(field * 4 + 0.5, 0, 1)


class SlideScene:
    """One synthetic slide.

    Parameters
    ----------
    seed : int
        Everything about the slide follows from it.
    width_um, height_um : float
        Size of the scanned area.
    tumour : bool or None
        Force a positive or negative slide; None draws it (50 %).
    tissue : bool
        False gives an empty slide (glass only), for the bad-input tests.
    """

    def __init__(
        self,
        seed: int,
        width_um: float = 3000.0,
        height_um: float = 2400.0,
        tumour: bool | None = None,
        tissue: bool = True,
    ) -> None:
        rng = np.random.default_rng(_seed("scene", seed))
        self.seed = seed
        self.width_um, self.height_um = float(width_um), float(height_um)
        self.stain = Stain.random(rng)
        gh, gw = int(np.ceil(height_um / _GRID_UM)) + 2, int(np.ceil(width_um / _GRID_UM)) + 2
        shape = (gh, gw)
        if tissue:
            n = int(rng.integers(1, 4))
            centres = np.stack([rng.uniform(0.3, 0.7, n) * gh, (np.arange(n) + rng.uniform(0.3, 0.7, n)) / n * gw], 1)
            radii = np.minimum(rng.uniform(0.25, 0.42, n) * min(gh, gw), 0.45 * gw / n + 4)
            self._tissue = _blobs(shape, rng, centres, radii, roughness=1.0)
        else:
            self._tissue = np.zeros(shape, np.float32)
        self.has_tumour = bool(rng.random() < 0.5) if tumour is None else bool(tumour)
        self._tumour = np.zeros(shape, np.float32)
        inside = np.argwhere(self._tissue > 0.99)
        if self.has_tumour and len(inside):
            k = int(rng.integers(1, 4))
            centres = inside[rng.integers(0, len(inside), k)].astype(float)
            # from small foci (~100 um radius) to large masses (~900 um radius)
            radii = np.exp(rng.uniform(np.log(100 / _GRID_UM), np.log(900 / _GRID_UM), k))
            self._tumour = _blobs(shape, rng, centres, radii, roughness=0.7) * self._tissue
            if not np.any(self._tumour > 0.5):
                self.has_tumour = False
        elif self.has_tumour:
            self.has_tumour = False
        self._lymph = np.zeros(shape, np.float32)
        m = int(rng.integers(0, 3))
        if m and len(inside):
            centres = inside[rng.integers(0, len(inside), m)].astype(float)
            radii = rng.uniform(50, 160, m) / _GRID_UM
            self._lymph = _blobs(shape, rng, centres, radii, roughness=0.4) * self._tissue * (1 - self._tumour)
        # stromal fibre texture: a few plane waves, continuous everywhere
        n_waves = 14
        self._waves = (
            rng.uniform(0, np.pi, n_waves),
            rng.uniform(6.0, 40.0, n_waves),
            rng.uniform(0, 2 * np.pi, n_waves),
        )

    # ------------------------------------------------------------- fields
    def _field(self, grid: np.ndarray, y_um: np.ndarray, x_um: np.ndarray) -> np.ndarray:
        coords = np.stack([y_um / _GRID_UM, x_um / _GRID_UM])
        return ndimage.map_coordinates(grid, coords.reshape(2, -1), order=1, mode="nearest").reshape(y_um.shape)

    def _pixel_centres(self, x_px: int, y_px: int, w: int, h: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        ys = (y_px + np.arange(h) + 0.5) * mpp
        xs = (x_px + np.arange(w) + 0.5) * mpp
        return np.meshgrid(ys, xs, indexing="ij")

    def tissue_mask(self, x_px: int, y_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """True where the pixel centre lies in tissue."""
        yy, xx = self._pixel_centres(x_px, y_px, w, h, mpp)
        return self._field(self._tissue, yy, xx) > 0.5

    def tumour_mask(self, x_px: int, y_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """True where the pixel centre lies in tumour (the ground truth of the segmentation)."""
        yy, xx = self._pixel_centres(x_px, y_px, w, h, mpp)
        return (self._field(self._tumour, yy, xx) > 0.5) & (self._field(self._tissue, yy, xx) > 0.5)

    # ------------------------------------------------------------- nuclei
    def _nuclei(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, ...]:
        """Nuclei (x, y, radius, darkness) with centres in the rectangle (um), block-seeded."""
        out: list[np.ndarray] = []
        bx0, bx1 = int(np.floor(max(x0, 0) / _BLOCK_UM)), int(np.floor(min(x1, self.width_um) / _BLOCK_UM))
        by0, by1 = int(np.floor(max(y0, 0) / _BLOCK_UM)), int(np.floor(min(y1, self.height_um) / _BLOCK_UM))
        for by in range(by0, by1 + 1):
            for bx in range(bx0, bx1 + 1):
                rng = np.random.default_rng(_seed("nuclei", self.seed, bx, by))
                n = rng.poisson(_MAX_DENSITY * _BLOCK_UM**2)
                x = (bx + rng.random(n)) * _BLOCK_UM
                y = (by + rng.random(n)) * _BLOCK_UM
                u = rng.random(n)
                z = rng.standard_normal(n)
                out.append(np.stack([x, y, u, z]))
        if not out:
            return (np.empty(0),) * 4
        x, y, u, z = np.concatenate(out, axis=1)
        keep = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        x, y, u, z = x[keep], y[keep], u[keep], z[keep]
        tissue = self._field(self._tissue, y, x)
        tumour = self._field(self._tumour, y, x)
        lymph = self._field(self._lymph, y, x)
        kind = np.where(tumour > 0.5, 1, np.where(lymph > 0.5, 2, 0))
        density = np.array([_DENSITY[k] for k in _KINDS])[kind] * np.clip(tissue * 1.5 - 0.25, 0, 1)
        keep = u < density / _MAX_DENSITY
        kind, z, x, y = kind[keep], z[keep], x[keep], y[keep]
        mean = np.array([_RADIUS[k][0] for k in _KINDS])[kind]
        sd = np.array([_RADIUS[k][1] for k in _KINDS])[kind]
        radius = np.clip(mean + sd * z, 1.5, 8.0)
        darkness = np.array([_DARKNESS[k] for k in _KINDS])[kind] * (1 + 0.1 * np.tanh(z))
        return x, y, radius, darkness

    # ------------------------------------------------------------- render
    def render(self, x_px: int, y_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the region whose top-left pixel is (x_px, y_px) at ``mpp`` um/pixel."""
        st = self.stain
        blur_px = st.blur_um / mpp
        margin = int(np.ceil(3 * max(8.0 / mpp, blur_px))) + 1
        X, Y, W, H = x_px - margin, y_px - margin, w + 2 * margin, h + 2 * margin
        yy, xx = self._pixel_centres(X, Y, W, H, mpp)
        tissue = np.clip(self._field(self._tissue, yy, xx) * 1.5 - 0.25, 0, 1)
        tumour = self._field(self._tumour, yy, xx)
        # eosin: fibrous stroma, denser cytoplasm in tumour
        ang, lam, phase = self._waves
        fib = np.zeros_like(xx)
        for a, lm, ph in zip(ang, lam, phase):
            fib += np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / lm + ph)
        fib = 0.5 + 0.5 * np.tanh(fib / 3)
        eosin = tissue * (0.35 + 0.45 * fib * (1 - 0.6 * tumour) + 0.25 * tumour)
        haem = tissue * (0.05 + 0.18 * tumour)  # basophilic cytoplasm in tumour
        # nuclei, splatted per radius bin and spread by a Gaussian of that radius (mass preserving)
        x, y, radius, dark = self._nuclei(X * mpp, Y * mpp, (X + W) * mpp, (Y + H) * mpp)
        if len(x):
            b = np.clip(np.searchsorted(_RADIUS_BINS, radius), 0, len(_RADIUS_BINS) - 1)
            ix = np.clip(((x / mpp) - X).astype(int), 0, W - 1)
            iy = np.clip(((y / mpp) - Y).astype(int), 0, H - 1)
            mass = dark * np.pi * radius**2 / mpp**2
            nuc = np.zeros((H, W), np.float32)
            for k in np.unique(b):
                sel = b == k
                canvas = np.zeros((H, W), np.float32)
                np.add.at(canvas, (iy[sel], ix[sel]), mass[sel])
                sigma = _RADIUS_BINS[k] / mpp / np.sqrt(2)
                nuc += ndimage.gaussian_filter(canvas, sigma) if sigma > 0.3 else canvas
            haem = haem + 1.6 * (1 - np.exp(-nuc / 1.6))  # flat-topped nuclei, no overflow
        od = haem[..., None] * np.asarray(st.haematoxylin) + eosin[..., None] * np.asarray(st.eosin)
        if blur_px > 0.3:
            od = ndimage.gaussian_filter(od, (blur_px, blur_px, 0))
        rgb = np.asarray(st.background) * np.exp(-od)
        rgb = rgb[margin : margin + h, margin : margin + w] ** st.gamma * 255.0
        rng = np.random.default_rng(_seed("noise", self.seed, x_px, y_px, w, h, round(mpp * 1000)))
        rgb += rng.normal(0, st.noise, rgb.shape)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

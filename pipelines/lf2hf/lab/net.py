"""Conditioned residual U-Net for low-field to 3 T-like translation (torch; training and export only).

Input: the normalised low-field slice ``image`` ``[N, 1, H, W]`` (divided by
:func:`~pipelines.lf2hf.preprocess.normalisation_scale`) and the
conditioning vector ``cond`` ``[N, 4]``
(:func:`~pipelines.lf2hf.preprocess.encode_conditioning`: field strength,
contrast one-hot, noise level). Output: the normalised 3 T-like slice
``[N, 1, 2H, 2W]``, as a residual over bicubic upsampling of the input (so
the network only has to learn contrast change, denoising and detail).

Architecture: a three-level U-Net on the input grid (widths
:attr:`LF2HFNet.widths`, strided-convolution downsampling, pixel-shuffle
upsampling, additive skips) of residual blocks; every block is modulated by
FiLM (a per-channel scale and shift computed from ``cond``), so the same
weights adapt to field strength, weighting and noise. A pixel-shuffle head
brings the features to ``2H x 2W``. ``H`` and ``W`` must be multiples of
:data:`STRIDE`; the inference wrapper pads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.lf2hf.infer import PRIOR_COND_DIM, PRIOR_SIGMA_FLOOR, PRIOR_SIGMA_REF
from pipelines.lf2hf.preprocess import COND_DIM

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Input sides must be multiples of this (two stride-2 levels).
STRIDE: int = 4
#: Upsampling factor.
SCALE: int = 2


class FiLMResBlock(nn.Module):
    """Residual block ``x + conv(act(FiLM(conv(x))))`` with conditioning."""

    def __init__(self, ch: int, emb_dim: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * ch)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)  # type: ignore[arg-type]
        # Start close to the identity: the residual branch begins small.
        nn.init.normal_(self.c2.weight, std=1e-3)
        nn.init.zeros_(self.c2.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``[N, C, H, W]`` given ``emb`` ``[N, E]``."""
        gamma, beta = self.film(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = F.silu(self.c1(x))
        h = h * (1.0 + gamma) + beta
        return x + self.c2(F.silu(h))


class LF2HFNet(nn.Module):
    """Low-field slice plus conditioning to a 2x upsampled 3 T-like slice.

    Parameters
    ----------
    widths : tuple of int
        Channels at the three U-Net levels (input grid, 1/2, 1/4).
    blocks : tuple of int
        Residual blocks at each level on the way down (the bottom level's
        count is its total); one block per level on the way up.
    emb_dim : int
        Width of the conditioning embedding.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 48, 64), blocks: tuple[int, int, int] = (1, 2, 3),
                 emb_dim: int = 64) -> None:
        super().__init__()
        self.widths = widths
        w0, w1, w2 = widths
        self.embed = nn.Sequential(nn.Linear(COND_DIM, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.head = nn.Conv2d(1 + COND_DIM, w0, 3, padding=1)
        self.enc0 = nn.ModuleList(FiLMResBlock(w0, emb_dim) for _ in range(blocks[0]))
        self.down1 = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.enc1 = nn.ModuleList(FiLMResBlock(w1, emb_dim) for _ in range(blocks[1]))
        self.down2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(FiLMResBlock(w2, emb_dim) for _ in range(blocks[2]))
        self.up2 = nn.Sequential(nn.Conv2d(w2, 4 * w1, 3, padding=1), nn.PixelShuffle(2))
        self.dec1 = FiLMResBlock(w1, emb_dim)
        self.up1 = nn.Sequential(nn.Conv2d(w1, 4 * w0, 3, padding=1), nn.PixelShuffle(2))
        self.dec0 = FiLMResBlock(w0, emb_dim)
        w_sr = w0 // 2
        # Built in this order so that the seeded initialisation stays the same.
        sr_in = nn.Conv2d(w0, 4 * w_sr, 3, padding=1)
        sr_out = nn.Conv2d(w_sr, 1, 3, padding=1)
        self.sr = nn.Sequential(sr_in, nn.PixelShuffle(SCALE), nn.SiLU(), sr_out)
        nn.init.zeros_(sr_out.weight)
        nn.init.zeros_(sr_out.bias)  # type: ignore[arg-type]
        # Global gain and offset of the bicubic base from the conditioning:
        # most of the contrast change between low field and 3 T is a
        # per-slice intensity mapping, which this gets for free.
        self.base_affine = nn.Linear(emb_dim, 2)
        nn.init.zeros_(self.base_affine.weight)
        nn.init.zeros_(self.base_affine.bias)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Map ``image`` ``[N, 1, H, W]`` and ``cond`` ``[N, 4]`` to ``[N, 1, 2H, 2W]``."""
        emb = self.embed(cond)
        # The conditioning also enters as constant channels, so the first
        # convolution can use it directly.
        c = cond.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, image.shape[-2], image.shape[-1])
        x0 = F.silu(self.head(torch.cat([image, c], dim=1)))
        for b in self.enc0:
            x0 = b(x0, emb)
        x1 = F.silu(self.down1(x0))
        for b in self.enc1:
            x1 = b(x1, emb)
        x2 = F.silu(self.down2(x1))
        for b in self.mid:
            x2 = b(x2, emb)
        y1 = self.dec1(x1 + self.up2(x2), emb)
        y0 = self.dec0(x0 + self.up1(y1), emb)
        base = F.interpolate(image, scale_factor=SCALE, mode="bicubic", align_corners=False)
        gain, offset = self.base_affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return base * (1.0 + gain) + offset + self.sr(y0)


def count_parameters(net: nn.Module) -> int:
    """Number of parameters (trainable or not: the exported average has gradients off)."""
    return sum(p.numel() for p in net.parameters())


class PriorNet(nn.Module):
    """The learned prior of the contrast-preserving restoration: a small noise-conditioned residual denoiser.

    One step of :func:`pipelines.lf2hf.infer.restore`'s unrolled
    proximal-gradient loop: ``image`` ``[N, 1, H2, W2]`` (the iterate on the
    fine grid, normalised) and ``cond`` ``[N, 2]`` (noise level and
    iteration, :func:`pipelines.lf2hf.infer.restore_conditioning`) to the
    next iterate, as a residual over ``image``. ``H2`` and ``W2`` must be
    multiples of :data:`PRIOR_STRIDE` (the caller pads).

    A two-level U-Net on the half-resolution grid (pixel-unshuffle by 2):
    ``widths[0]`` channels at half resolution, ``widths[1]`` at a quarter,
    FiLM residual blocks modulated by the conditioning. It sees no
    contrast, field or anatomy label: it can only learn what restoring a
    k-space-truncated, noisy image means. Cheap on purpose (about 1 GFLOP for a
    256 x 256 iterate), because it runs once per iteration.
    """

    def __init__(self, widths: tuple[int, int] = (24, 32), blocks: tuple[int, int] = (1, 2), emb_dim: int = 32) -> None:
        super().__init__()
        w0, w1 = widths
        self.widths = widths
        self.embed = nn.Sequential(nn.Linear(PRIOR_COND_DIM, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
                                   nn.SiLU())
        self.unshuffle = nn.PixelUnshuffle(2)
        self.head = nn.Conv2d(4 + PRIOR_COND_DIM, w0, 3, padding=1)
        self.enc0 = nn.ModuleList(FiLMResBlock(w0, emb_dim) for _ in range(blocks[0]))
        self.down = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(FiLMResBlock(w1, emb_dim) for _ in range(blocks[1]))
        self.up = nn.Sequential(nn.Conv2d(w1, 4 * w0, 3, padding=1), nn.PixelShuffle(2))
        self.dec0 = FiLMResBlock(w0, emb_dim)
        self.tail = nn.Conv2d(w0, 4, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)  # type: ignore[arg-type]
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Map the iterate ``[N, 1, H2, W2]`` and ``cond`` ``[N, 2]`` to the next iterate."""
        emb = self.embed(cond)
        z = self.unshuffle(image)
        c = cond.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, z.shape[-2], z.shape[-1])
        h0 = F.silu(self.head(torch.cat([z, c], dim=1)))
        for b in self.enc0:
            h0 = b(h0, emb)
        h1 = F.silu(self.down(h0))
        for b in self.mid:
            h1 = b(h1, emb)
        h = self.dec0(h0 + self.up(h1), emb)
        return image + self.shuffle(self.tail(F.silu(h)))


def band_project(x: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """``Re(A+ A x)``: the part of ``x`` ``[..., H2, W2]`` in the acquired band (torch twin of the numpy loop)."""
    return torch.fft.ifft2(torch.fft.fft2(x) * band).real


def unrolled_restore(prior: PriorNet, x0: torch.Tensor, sigma_rel: torch.Tensor, band: torch.Tensor,
                     iterations: int, step: float, tau: float, nonneg_rounds: int = 0) -> torch.Tensor:
    """The loop of :func:`pipelines.lf2hf.infer.restore` in torch, for end-to-end training.

    ``x0`` ``[N, 1, H2, W2]`` is the zero-filled ``Re(A+ y)``, ``sigma_rel``
    ``[N]`` the estimated relative noise sigma, ``band`` the acquired band
    (bool ``[H2, W2]``, unshifted FFT order). Kept line by line the same as
    the numpy loop; the export test compares the two. Training runs it with
    ``nonneg_rounds = 0``; the run-time loop adds
    :data:`~pipelines.lf2hf.infer.RESTORE_NONNEG_ROUNDS` alternating
    projections onto non-negative images and the data ball, which the
    export check passes here too.
    """
    x = x0
    lsig = torch.log10(sigma_rel.clamp_min(PRIOR_SIGMA_FLOOR) / PRIOR_SIGMA_REF)
    for k in range(iterations):
        if k:
            x = x - step * (band_project(x, band) - x0)
        t = torch.full_like(lsig, k / max(iterations - 1, 1))
        x = prior(x, torch.stack([lsig, t], dim=1))
    for j in range(1 + nonneg_rounds):
        if j:
            x = x.clamp_min(0.0)
        r = band_project(x, band) - x0
        rms = r.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        shrink = (1.0 - tau * sigma_rel.view(-1, 1, 1, 1) / rms.clamp_min(1e-12)).clamp_min(0.0)
        x = x - shrink * r
    return x

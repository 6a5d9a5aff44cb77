"""Protocol-agnostic IVIM set network (torch; used by training and export only).

The network sees a voxel as a *set* of ``(b, signal)`` pairs, so one model
serves any protocol of :data:`~pipelines.ivim.infer.K_MIN` to
:data:`~pipelines.ivim.infer.K_MAX` b-values in ``[0, B_MAX]``, with or
without ``b = 0``, in any order. Inputs are padded to ``K_MAX`` and a mask
marks the valid entries.

Architecture (two-stage DeepSets, as in PointNet's segmentation branch):

1. preprocessing, inside the graph: ``ref = max(signal[valid])``,
   ``x = (b / B_SCALE, signal / ref)`` per valid entry;
2. ``phi1``: per-entry MLP, then masked mean and max pooling;
3. ``phi2``: per-entry MLP on ``[phi1(entry), pooled]`` so each entry is
   encoded in the context of the whole decay curve, then masked mean and max
   pooling again;
4. head MLP on ``[pooled2, K / K_MAX]``, then bounded sigmoids (as in
   IVIM-NET) give D, D*, f and S0 / ref; S0 is multiplied back by ``ref``.

The exported ONNX graph therefore takes raw signals and b-values in s/mm² and
returns physical units; the only preprocessing outside is padding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipelines.ivim.infer import K_MAX
from pipelines.ivim.lab.signal import TRAIN_RANGES

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: b-values are divided by this before entering the network.
B_SCALE: float = 1000.0
#: Lower clamp of the reference signal, so an all-zero voxel gives no NaN.
REF_EPS: float = 1e-6
#: Value that padded entries take before max pooling (below any activation).
MAX_POOL_FILL: float = -1e4


def _widen(lo: float, hi: float, frac: float = 0.05) -> tuple[float, float]:
    """Widen ``(lo, hi)`` by ``frac`` of its width on each side."""
    w = hi - lo
    return lo - frac * w, hi + frac * w


#: Output bounds of the sigmoid transforms, in output order (D, D*, f, S0/ref).
#: They are the training ranges widened by 5 % on each side so that the
#: training targets are never at a saturated sigmoid; D, D* and f are also
#: kept physical (non-negative).
OUTPUT_BOUNDS: tuple[tuple[float, float], ...] = (
    (max(0.0, _widen(*TRAIN_RANGES.d)[0]), _widen(*TRAIN_RANGES.d)[1]),
    (max(1e-3, _widen(*TRAIN_RANGES.dstar)[0]), _widen(*TRAIN_RANGES.dstar)[1]),
    (max(0.0, _widen(*TRAIN_RANGES.f)[0]), min(1.0, _widen(*TRAIN_RANGES.f)[1])),
    # S0 / max(signal): below 1 only through noise, above 1 when the lowest
    # b-value is already attenuated by perfusion (no b = 0 in the protocol).
    (0.5, 4.0),
)
#: Output column names, in order.
OUTPUT_NAMES: tuple[str, ...] = ("d", "dstar", "f", "s0")


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Build a SiLU MLP with an activation after every layer."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers)


class IvimSetNet(nn.Module):
    """Two-stage DeepSets network mapping ``(b, signal)`` sets to IVIM parameters.

    Parameters
    ----------
    width : int
        Width of the per-entry encoders.
    head_width : int
        Width of the head MLP.
    """

    out_lo: torch.Tensor
    out_span: torch.Tensor

    def __init__(self, width: int = 96, head_width: int = 192) -> None:
        super().__init__()
        self.width = width
        self.head_width = head_width
        self.phi1 = _mlp([2, width, width])
        self.phi2 = _mlp([3 * width, width, width])
        self.head = nn.Sequential(
            _mlp([2 * width + 1, head_width, head_width]),
            nn.Linear(head_width, len(OUTPUT_BOUNDS)),
        )
        lo = torch.tensor([b[0] for b in OUTPUT_BOUNDS], dtype=torch.float32)
        hi = torch.tensor([b[1] for b in OUTPUT_BOUNDS], dtype=torch.float32)
        self.register_buffer("out_lo", lo)
        self.register_buffer("out_span", hi - lo)

    @staticmethod
    def _pool(h: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Masked mean and max over the set axis, concatenated."""
        m = mask.unsqueeze(-1)
        mean = (h * m).sum(dim=1) / count
        mx = torch.where(m > 0, h, torch.full_like(h, MAX_POOL_FILL)).amax(dim=1)
        return torch.cat([mean, mx], dim=-1)

    def forward_unit(
        self, signal: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the sigmoid outputs in ``[0, 1]`` and the reference signal.

        Parameters
        ----------
        signal, bvalues, mask : torch.Tensor
            ``[N, K_MAX]`` each; b-values in s/mm², mask 1 for valid entries.

        Returns
        -------
        tuple of torch.Tensor
            ``(unit [N, 4], ref [N, 1])``: ``unit`` maps linearly onto
            :data:`OUTPUT_BOUNDS`.
        """
        valid = mask > 0
        ref = torch.where(valid, signal, torch.full_like(signal, MAX_POOL_FILL))
        ref = ref.amax(dim=1, keepdim=True).clamp_min(REF_EPS)
        x = torch.stack([bvalues / B_SCALE * mask, signal / ref * mask], dim=-1)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        h1 = self.phi1(x)
        g1 = self._pool(h1, mask, count)
        h2 = self.phi2(torch.cat([h1, g1.unsqueeze(1).expand(-1, h1.shape[1], -1)], dim=-1))
        g2 = self._pool(h2, mask, count)
        z = self.head(torch.cat([g2, count / K_MAX], dim=-1))
        return torch.sigmoid(z), ref

    def to_physical(self, unit: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Map sigmoid outputs to physical ``[D, D*, f, S0]``."""
        p = self.out_lo + self.out_span * unit
        return torch.cat([p[:, :3], p[:, 3:4] * ref], dim=-1)

    def forward(self, signal: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Estimate ``[D, D*, f, S0]`` in physical units, shape ``[N, 4]``."""
        unit, ref = self.forward_unit(signal, bvalues, mask)
        return self.to_physical(unit, ref)

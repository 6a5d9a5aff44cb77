"""Protocol-conditioned IVIM network (torch; used by training and export only).

All voxels of a series share one protocol, so the network is split in two:

1. a **protocol encoder**, a set network over the valid b-values (masked
   DeepSets: per-entry MLP, masked mean and max pooling, the number of
   b-values), runs once per call and *generates* the per-voxel network: the
   first-layer weights of every b-value entry (for four fixed functions of
   its normalised signal, so a signal vector on any protocol, in any order,
   is mapped by one matrix product) and FiLM scales and shifts of every
   hidden layer (folded into the layer weights);
2. a small **per-voxel MLP** on ``[x, log x, sqrt x, x²]`` of the normalised
   signal ``x = signal / max(signal)`` does the rest: per voxel it costs a
   few matrix products of width :data:`WIDTH` and a small uncertainty branch.

Outputs, as in IVIM-NET, are bounded sigmoids onto :data:`OUTPUT_BOUNDS`
(D, D*, f, S0 / ref; S0 is multiplied back by ``ref``), plus a
heteroscedastic standard deviation of D, D* and f: the uncertainty branch
predicts the log-variance of the error of the sigmoid output (in the unit
space of :data:`OUTPUT_BOUNDS`) from its own generated first layer, the
estimate's detached features and the misfit of the estimate's IVIM curve; it
is trained by Gaussian negative log-likelihood on detached inputs, so it
cannot change the estimate, and a per-parameter calibration factor (fitted
after training on a separate stream) multiplies the standard deviation in the
exported graph.

Padding entries (``mask = 0``) get zero weight, so the output depends neither
on the padding nor on the order of the b-values.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, cast

import torch
from torch import nn

from pipelines.ivim.infer import K_MAX
from pipelines.ivim.lab.signal import TRAIN_RANGES

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: b-values are divided by this before entering the protocol encoder.
B_SCALE: float = 1000.0
#: Low b-values are also given as ``log1p(b / B_LOG_SCALE) / log1p(B_LOG_MAX / B_LOG_SCALE)``,
#: which resolves the perfusion range (5-100 s/mm²) that a linear scale squeezes.
B_LOG_SCALE: float = 5.0
B_LOG_MAX: float = 1200.0
#: Lower clamp of the reference signal, so an all-zero voxel gives no NaN.
REF_EPS: float = 1e-6
#: Value that padded entries take before max pooling (below any activation).
MAX_POOL_FILL: float = -1e4
#: Floor of the normalised signal before its log (the log channel's range is [-1, 0]).
LOG_FLOOR: float = 0.01
#: Feature channels per b-value entry: the normalised signal x, log x, sqrt x and x².
CHANNELS: int = 4
#: Width of the per-voxel MLP.
WIDTH: int = 192
#: Hidden (residual) H x H layers of the per-voxel MLP after the generated first layer.
DEPTH: int = 2
#: Width of the uncertainty branch.
SD_WIDTH: int = 64
#: Log-variance clamp of the uncertainty branch (unit space).
LOGVAR_RANGE: tuple[float, float] = (-16.0, 1.0)


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
#: Columns that get a standard deviation (the first three of OUTPUT_NAMES).
SD_NAMES: tuple[str, ...] = ("d", "dstar", "f")


def _mlp(sizes: list[int], last_act: bool = True) -> nn.Sequential:
    """Build a SiLU MLP (an activation after every layer, optionally not the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ProtocolEncoder(nn.Module):
    """Set network over the valid b-values of a protocol: per-entry and pooled codes.

    Parameters
    ----------
    width : int
        Width of the per-entry MLP.
    context : int
        Size of the protocol code.
    """

    def __init__(self, width: int = 96, context: int = 128) -> None:
        super().__init__()
        self.phi = _mlp([2, width, width])
        self.rho = _mlp([2 * width + 1, context, context])

    def forward(self, bvalues: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(per-entry codes [P, K, width], protocol code [P, context])``."""
        b = bvalues * mask
        u = torch.stack(
            [b / B_SCALE, torch.log1p(b / B_LOG_SCALE) / math.log1p(B_LOG_MAX / B_LOG_SCALE)], dim=-1
        )
        h = self.phi(u)
        m = mask.unsqueeze(-1)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (h * m).sum(dim=1) / count
        mx = torch.where(m > 0, h, torch.full_like(h, MAX_POOL_FILL)).amax(dim=1)
        c = self.rho(torch.cat([mean, mx, count / K_MAX], dim=-1))
        return h, c


class Generated(NamedTuple):
    """The per-voxel network generated for each of ``P`` protocols.

    Attributes
    ----------
    weights, biases : list of torch.Tensor
        ``[P, in, out]`` and ``[P, 1, out]``: the generated first layer, the
        FiLM-folded hidden layers and the head of the estimate, in order.
    sd_w1, sd_b1 : torch.Tensor
        The generated first layer of the uncertainty branch.
    sd_bias : torch.Tensor
        ``[P, 1, 3]``: the protocol's offset of the log-variances.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    sd_w1: torch.Tensor
    sd_b1: torch.Tensor
    sd_bias: torch.Tensor

    def first(self) -> "Generated":
        """The network of the first protocol, as plain 2-D matrices (the exported graph's case, ``P = 1``)."""
        return Generated(
            [w[0] for w in self.weights], [b[0] for b in self.biases], self.sd_w1[0], self.sd_b1[0], self.sd_bias[0]
        )


def _entry_weights(per_entry: torch.Tensor, mask: torch.Tensor, channels: int) -> torch.Tensor:
    """``[P, K, channels * out]`` generated weights to a ``[P, channels * K, out]`` matrix, padding zeroed.

    Row ``c * K + k`` multiplies feature channel ``c`` of b-value entry ``k``,
    the order of :meth:`IvimFastNet.features`.
    """
    w = per_entry * mask.unsqueeze(-1)
    return torch.cat(w.chunk(channels, dim=-1), dim=-2)


class IvimFastNet(nn.Module):
    """Protocol encoder that generates a small per-voxel MLP (estimate and uncertainty).

    Parameters
    ----------
    width : int
        Width of the per-voxel MLP.
    depth : int
        Number of hidden ``width x width`` layers after the generated first layer.
    sd_width : int
        Width of the uncertainty branch.
    enc_width, context : int
        Per-entry and pooled widths of the protocol encoder.
    """

    out_lo: torch.Tensor
    out_span: torch.Tensor
    sd_calibration: torch.Tensor

    def __init__(
        self,
        width: int = WIDTH,
        depth: int = DEPTH,
        sd_width: int = SD_WIDTH,
        enc_width: int = 96,
        context: int = 128,
    ) -> None:
        super().__init__()
        self.width = width
        self.encoder = ProtocolEncoder(enc_width, context)
        # First-layer weights of each entry (one row per feature channel),
        # from the entry's own code and the protocol's.
        self.gen_w1 = _mlp([enc_width + context, context, CHANNELS * width], last_act=False)
        self.gen_b1 = nn.Linear(context, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        # FiLM of each hidden layer: scale 1 + gamma(c), shift beta(c).
        self.film = nn.ModuleList(nn.Linear(context, 2 * width) for _ in range(depth))
        self.head = nn.Linear(width, len(OUTPUT_BOUNDS))
        self.head_bias = nn.Linear(context, len(OUTPUT_BOUNDS))
        # The uncertainty branch has its own generated first layer, since the
        # estimate's last features need not keep what sets the error; it also
        # reads those features, detached, and the misfit of the estimate
        # (:meth:`misfit`), which measures the noise level, and rises where
        # the signal is one the estimate cannot represent.
        self.sd_gen_w1 = _mlp([enc_width + context, context, CHANNELS * sd_width], last_act=False)
        self.sd_gen_b1 = nn.Linear(context, sd_width)
        self.sd_hidden = nn.Linear(width + sd_width + 1, sd_width)
        self.sd_out = nn.Linear(sd_width, len(SD_NAMES))
        self.sd_bias = nn.Linear(context, len(SD_NAMES))
        for lin in [*self.film, self.head_bias, self.sd_bias]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        lo = torch.tensor([b[0] for b in OUTPUT_BOUNDS], dtype=torch.float32)
        hi = torch.tensor([b[1] for b in OUTPUT_BOUNDS], dtype=torch.float32)
        self.register_buffer("out_lo", lo)
        self.register_buffer("out_span", hi - lo)
        self.register_buffer("sd_calibration", torch.ones(len(SD_NAMES)))

    def sd_parameters(self) -> list[nn.Parameter]:
        """The parameters of the uncertainty branch (trained by the NLL only)."""
        mods = (self.sd_gen_w1, self.sd_gen_b1, self.sd_hidden, self.sd_out, self.sd_bias)
        return [q for m in mods for q in m.parameters()]

    def generate(self, bvalues: torch.Tensor, mask: torch.Tensor) -> Generated:
        """The per-voxel network of each protocol (``bvalues``, ``mask`` ``[P, K_MAX]``)."""
        h, c = self.encoder(bvalues, mask)
        p, k, _ = h.shape
        codes = torch.cat([h, c.unsqueeze(1).expand(p, k, c.shape[-1])], dim=-1)
        weights = [_entry_weights(self.gen_w1(codes), mask, CHANNELS)]
        biases = [self.gen_b1(c).unsqueeze(1)]
        for lin_module, film in zip(self.hidden, self.film):
            lin = cast(nn.Linear, lin_module)
            gamma, beta = film(c).chunk(2, dim=-1)
            scale = 1.0 + gamma  # [P, width]
            # gamma * (x W + b) + beta == x (W * gamma) + (gamma * b + beta)
            weights.append(lin.weight.t().unsqueeze(0) * scale.unsqueeze(1))
            biases.append((lin.bias * scale + beta).unsqueeze(1))
        weights.append(self.head.weight.t().unsqueeze(0).expand(p, -1, -1))
        biases.append((self.head.bias + self.head_bias(c)).unsqueeze(1))
        # Detached: the uncertainty branch must not train the encoder.
        codes_d, c_d = codes.detach(), c.detach()
        return Generated(
            weights,
            biases,
            _entry_weights(self.sd_gen_w1(codes_d), mask, CHANNELS),
            self.sd_gen_b1(c_d).unsqueeze(1),
            self.sd_bias(c_d).unsqueeze(1),
        )

    @staticmethod
    def features(signal: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-voxel input ``[x, log x, sqrt x, x²]`` (``[..., CHANNELS * K]``) and ``ref``.

        ``x = signal / ref``, with ``ref`` the largest valid signal (padding is
        set to 0 first). The first layer is linear in its input, so these
        fixed functions of each entry give it, at the cost of a few more
        input columns, what a per-entry encoder would: the log,
        ``log(max(x, LOG_FLOOR)) / -log(LOG_FLOOR)`` in ``[-1, 0]``, makes the
        exponential decays nearly linear; sqrt and square bend the small and
        the large signals.
        """
        s = signal * mask
        ref = s.amax(dim=-1, keepdim=True).clamp_min(REF_EPS)
        x = s / ref
        log_x = torch.log(x.clamp_min(LOG_FLOOR)) / -math.log(LOG_FLOOR)
        return torch.cat([x, log_x, torch.sqrt(x.clamp_min(0.0)), x * x], dim=-1), ref

    def misfit(self, unit: torch.Tensor, x: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Log RMS residual of the estimate's IVIM curve against the normalised signal ``x``.

        The residual sum of squares is divided by the degrees of freedom
        (b-values less the four parameters, at least 1), so for a good fit it
        estimates the noise variance relative to ``ref``. Scaled to about
        ``[-2, 0]`` (``log10`` of the RMS, halved).
        """
        p = self.out_lo + self.out_span * unit.detach()
        d, dstar, f, s0 = p[..., 0:1], p[..., 1:2], p[..., 2:3], p[..., 3:4]
        model = s0 * (f * torch.exp(-bvalues * dstar) + (1.0 - f) * torch.exp(-bvalues * d))
        rss = (((x - model) * mask) ** 2).sum(dim=-1, keepdim=True)
        dof = (mask.sum(dim=-1, keepdim=True) - 4.0).clamp_min(1.0)
        return torch.log10(rss / dof + 1e-8) / 4.0

    def _voxels(
        self, signal: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor, g: Generated
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-voxel network: ``(unit, logvar, ref)`` from signals and the generated layers."""
        feats, ref = self.features(signal, mask)
        h = nn.functional.silu(torch.matmul(feats, g.weights[0]) + g.biases[0])
        # Residual hidden layers: as deep but easier to train than a plain stack.
        for w, b in zip(g.weights[1:-1], g.biases[1:-1]):
            h = h + nn.functional.silu(torch.matmul(h, w) + b)
        unit = torch.sigmoid(torch.matmul(h, g.weights[-1]) + g.biases[-1])
        a = nn.functional.silu(torch.matmul(feats, g.sd_w1) + g.sd_b1)
        fit = self.misfit(unit, feats[..., : mask.shape[-1]], bvalues, mask)
        z = nn.functional.silu(self.sd_hidden(torch.cat([h.detach(), a, fit], dim=-1)))
        logvar = (self.sd_out(z) + g.sd_bias).clamp(*LOGVAR_RANGE)
        return unit, logvar, ref

    def forward_unit(
        self, signal: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sigmoid outputs, log-variances and reference of voxels grouped by protocol.

        Parameters
        ----------
        signal : torch.Tensor
            ``[P, M, K_MAX]``: ``M`` voxels on each of ``P`` protocols.
        bvalues, mask : torch.Tensor
            ``[P, K_MAX]``; b-values in s/mm², mask 1 for valid entries.

        Returns
        -------
        tuple of torch.Tensor
            ``(unit [P, M, 4], logvar [P, M, 3], ref [P, M, 1])``; ``unit``
            maps linearly onto :data:`OUTPUT_BOUNDS` and ``logvar`` is the
            log-variance of its first three columns' error.
        """
        return self._voxels(signal, bvalues.unsqueeze(1), mask.unsqueeze(1), self.generate(bvalues, mask))

    def to_physical(
        self, unit: torch.Tensor, logvar: torch.Tensor, ref: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical ``[D, D*, f, S0]`` and calibrated standard deviations ``[sd D, sd D*, sd f]``."""
        p = self.out_lo + self.out_span * unit
        params = torch.cat([p[..., :3], p[..., 3:4] * ref], dim=-1)
        sd = torch.exp(0.5 * logvar) * self.out_span[:3] * self.sd_calibration
        return params, sd

    def forward(
        self, signal: torch.Tensor, bvalues: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimates of one series: ``signal [N, K_MAX]``, ``bvalues`` and ``mask`` ``[1, K_MAX]``.

        Returns ``(params [N, 4], sd [N, 3])`` in physical units. This is the
        exported graph: the protocol part runs once per call, and the
        generated layers are plain ``[in, out]`` matrices, so each voxel
        costs a few 2-D matrix products.
        """
        unit, logvar, ref = self._voxels(signal, bvalues, mask, self.generate(bvalues, mask).first())
        return self.to_physical(unit, logvar, ref)

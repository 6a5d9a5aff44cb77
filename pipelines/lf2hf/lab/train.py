"""Train the lf2hf network on simulated slice pairs and export it to ONNX.

Usage::

    python -m pipelines.lf2hf.lab.train --seed 1 --out DIR [--steps N]

Training is deterministic for a given seed and step budget: one CPU thread,
``torch.use_deterministic_algorithms``, ``torch.manual_seed(seed)`` for the
weights and numpy generators seeded from the seed for the data. The data are
drawn fresh from :class:`pipelines.lf2hf.lab.simulator.PairSampler` (augmented
anatomy of :data:`~pipelines.lf2hf.lab.simulator.TRAIN_SLICES`, every
acquisition parameter random) into a pool of whole slices that is partly
replaced every step; each step trains on random input patches (48 x 48 ->
96 x 96) centred in the head. The prior the network is told is perturbed:
the field strength in the conditioning is off by up to
:attr:`TrainConfig.field_jitter` (uniform, relative), so that a slightly
wrong nominal field does not break it. Loss: L1 on normalised intensities,
weighted :attr:`TrainConfig.brain_weight` inside the brain and 1 elsewhere,
plus :attr:`TrainConfig.ssim_weight` times (1 - SSIM) in the brain.

Writes ``DIR/lf2hf-net.onnx`` (opset 17, dynamic batch, height and width),
``DIR/lf2hf-net.state.pt`` (the torch weights) and
``DIR/lf2hf-net.train.json`` (configuration, timing, validation curve on
training-slab slices and the onnxruntime-versus-torch check).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# One BLAS/OpenMP thread: training must be reproducible and share the
# machine. Set only when run as a script (BLAS reads these when numpy is
# imported), so that importing this module has no side effect.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipelines._lab import cpu_session, export_onnx  # noqa: E402
from pipelines._training import step_with_ema, training_main  # noqa: E402
from pipelines.lf2hf.lab.net import SCALE, STRIDE, LF2HFNet, count_parameters  # noqa: E402
from pipelines.lf2hf.lab.simulator import RESERVED_SEEDS, PairSampler, SlicePair  # noqa: E402
from pipelines.lf2hf.preprocess import COND_DIM, COND_FIELD_REF_T, head_mask, normalisation_scale, prepare_slice  # noqa: E402

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

ONNX_NAME = "lf2hf-net.onnx"
LOG_NAME = "lf2hf-net.train.json"
STATE_NAME = "lf2hf-net.state.pt"
INPUT_NAMES = ("image", "cond")
OUTPUT_NAME = "image_2x"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes
    ----------
    seed : int
        Seed of weights and data.
    steps : int
        Optimiser steps.
    batch : int
        Patches per step.
    patch : int
        Input patch side (the target patch is twice).
    lr : float
        Peak learning rate (Adam, linear warm-up then cosine decay).
    warmup : int
        Warm-up steps.
    pool : int
        Simulated slices held in the pool.
    refresh : int
        Slices replaced in the pool every step.
    field_jitter : float
        Relative error of the field strength told to the network (uniform).
    brain_weight : float
        L1 weight inside the brain (1 elsewhere).
    ssim_weight : float
        Weight of ``1 - SSIM`` within the brain.
    ema : float
        Decay of the exponential moving average of the weights; the average
        is what gets validated and exported.
    widths, blocks : tuple of int
        Network size, see :class:`pipelines.lf2hf.lab.net.LF2HFNet`.
    val_every : int
        Steps between validation evaluations.
    """

    seed: int = 1
    steps: int = 1700
    batch: int = 20
    patch: int = 40
    lr: float = 1.5e-3
    warmup: int = 100
    pool: int = 64
    refresh: int = 1
    field_jitter: float = 0.05
    brain_weight: float = 3.0
    ssim_weight: float = 0.2
    ema: float = 0.995
    widths: tuple[int, int, int] = (32, 48, 64)
    blocks: tuple[int, int, int] = (1, 2, 3)
    val_every: int = 200


@dataclass
class _Item:
    """A pooled training slice, normalised."""

    image: np.ndarray  # [H, W]
    cond: np.ndarray  # [COND_DIM], field component without jitter
    target: np.ndarray  # [2H, 2W]
    weight: np.ndarray  # [2H, 2W]
    brain: np.ndarray  # [2H, 2W] float 0/1
    centres: np.ndarray  # [K, 2] head pixels of the input grid
    field_t: float


def _item(pair: SlicePair, cfg: TrainConfig) -> _Item:
    p = prepare_slice(pair.input, pair.field_strength_t, pair.contrast)
    target = pair.target / normalisation_scale(pair.target)
    brain = pair.brain_mask.astype(np.float32)
    weight = 1.0 + (cfg.brain_weight - 1.0) * brain
    centres = np.argwhere(head_mask(pair.input, p.sigma))
    return _Item(p.image, p.cond, target.astype(np.float32), weight.astype(np.float32), brain, centres,
                 pair.field_strength_t)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 2 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _batch(pool: list[_Item], rng: np.random.Generator, cfg: TrainConfig) -> list[torch.Tensor]:
    """Random patches, centred on head pixels, with a jittered field in the conditioning."""
    p = cfg.patch
    xs, cs, ys, ws, bs = [], [], [], [], []
    for _ in range(cfg.batch):
        it = pool[int(rng.integers(len(pool)))]
        h, w = it.image.shape
        cy, cx = it.centres[int(rng.integers(len(it.centres)))]
        r0 = int(np.clip(cy - p // 2, 0, h - p))
        c0 = int(np.clip(cx - p // 2, 0, w - p))
        xs.append(it.image[r0 : r0 + p, c0 : c0 + p])
        sl = np.s_[SCALE * r0 : SCALE * (r0 + p), SCALE * c0 : SCALE * (c0 + p)]
        ys.append(it.target[sl])
        ws.append(it.weight[sl])
        bs.append(it.brain[sl])
        cond = it.cond.copy()
        told = it.field_t * (1.0 + rng.uniform(-cfg.field_jitter, cfg.field_jitter))
        cond[0] = math.log10(told / COND_FIELD_REF_T)
        cs.append(cond)
    return [torch.from_numpy(np.stack(a).astype(np.float32)) for a in (xs, cs, ys, ws, bs)]


def _ssim_map(x: torch.Tensor, y: torch.Tensor, win: int = 7) -> torch.Tensor:
    """SSIM map with a uniform window (as skimage's default), data range 1."""
    c1, c2 = 0.01**2, 0.03**2
    mu_x = F.avg_pool2d(x, win, 1)
    mu_y = F.avg_pool2d(y, win, 1)
    sxx = F.avg_pool2d(x * x, win, 1) - mu_x**2
    syy = F.avg_pool2d(y * y, win, 1) - mu_y**2
    sxy = F.avg_pool2d(x * y, win, 1) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def _loss(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor, brain: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    l1 = (w * (pred - y).abs()).sum() / w.sum()
    if cfg.ssim_weight <= 0:
        return l1
    s = _ssim_map(pred, y)
    m = F.avg_pool2d(brain, 7, 1)
    ssim = (s * m).sum() / m.sum().clamp_min(1.0)
    return l1 + cfg.ssim_weight * (1.0 - ssim)


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    h, w = x.shape[-2:]
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, (-h) % multiple), (0, (-w) % multiple)], mode="reflect")


def _validate(net: LF2HFNet, val: list[_Item]) -> dict[str, float]:
    """Mean PSNR in the brain of the network and of bicubic, on whole validation slices."""
    net.eval()
    x = torch.from_numpy(_pad_to(np.stack([v.image for v in val])[:, None], STRIDE))
    c = torch.from_numpy(np.stack([v.cond for v in val]))
    with torch.no_grad():
        pred = net(x, c).numpy()[:, 0]
        base = F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False).numpy()[:, 0]
    net.train()
    h2, w2 = val[0].target.shape

    def psnr(a: np.ndarray, v: _Item) -> float:
        m = v.brain > 0
        return float(10 * np.log10(1.0 / np.mean((a[:h2, :w2][m] - v.target[m]) ** 2)))

    return {
        "psnr_net": float(np.mean([psnr(p, v) for p, v in zip(pred, val)])),
        "psnr_bicubic": float(np.mean([psnr(b, v) for b, v in zip(base, val)])),
    }


def train(cfg: TrainConfig) -> tuple[LF2HFNet, dict[str, object]]:
    """Train a network from scratch.

    Parameters
    ----------
    cfg : TrainConfig
        Hyper-parameters, including the seed.

    Returns
    -------
    tuple
        The trained network (eval mode) and a log dict.
    """
    if cfg.seed in RESERVED_SEEDS:
        raise ValueError(f"seed {cfg.seed} is reserved for held-out data; pick another")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    t0 = time.perf_counter()
    sampler = PairSampler(cfg.seed, stream=0)
    # Validation: training-slab slices from a separate stream (never the
    # held-out slab or seeds); only for monitoring.
    val_sampler = PairSampler(cfg.seed, stream=1)
    val = [_item(next(val_sampler), cfg) for _ in range(16)]
    pool = [_item(next(sampler), cfg) for _ in range(cfg.pool)]
    # channels-last is ~15 % faster for these convolutions on CPU.
    net = LF2HFNet(cfg.widths, cfg.blocks).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    curve: list[dict[str, float]] = []
    running = 0.0
    sim_seconds = 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        ts = time.perf_counter()
        for _ in range(cfg.refresh):
            pool[int(rng.integers(len(pool)))] = _item(next(sampler), cfg)
        x, c, y, w, b = _batch(pool, rng, cfg)
        sim_seconds += time.perf_counter() - ts
        pred = net(x.unsqueeze(1).contiguous(memory_format=torch.channels_last), c)
        loss = _loss(pred, y.unsqueeze(1), w.unsqueeze(1), b.unsqueeze(1), cfg)
        step_with_ema(loss, net, ema, opt, step, cfg.ema)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            v = _validate(ema, val)
            v.update(step=step + 1, loss=running, seconds=round(time.perf_counter() - t0, 1))
            curve.append(v)
            logger.info("step %d loss %.4f val psnr net %.2f bicubic %.2f (%.0f s)", step + 1, running,
                        v["psnr_net"], v["psnr_bicubic"], v["seconds"])
    net = ema.to(memory_format=torch.contiguous_format).eval()
    log: dict[str, object] = {
        "config": asdict(cfg),
        "parameters": count_parameters(net),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "simulation_seconds": round(sim_seconds, 1),
        "torch": torch.__version__,
        "curve": curve,
    }
    return net, log


def export_checked(net: LF2HFNet, path: Path) -> float:
    """Export to ONNX (dynamic batch, height, width) and check onnxruntime against torch.

    Parameters
    ----------
    net : LF2HFNet
        Trained network.
    path : pathlib.Path
        Destination ``.onnx`` file.

    Returns
    -------
    float
        Largest absolute difference of the normalised outputs between
        onnxruntime and torch over simulated slices at two matrix sizes.
    """
    import onnx

    from pipelines.lf2hf.lab.simulator import simulate_series

    dummy = (torch.rand(2, 1, 32, 40), torch.rand(2, COND_DIM))
    export_onnx(
        net,
        dummy,
        path,
        input_names=INPUT_NAMES,
        output_names=[OUTPUT_NAME],
        dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}, "cond": {0: "N"}, OUTPUT_NAME: {0: "N", 2: "H2", 3: "W2"}},
    )
    # The exporter loses the static channel axis of the output after the
    # residual Add; declare it so the graph documents itself.
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    sess = cpu_session(path, threads=1)
    worst = 0.0
    for matrix, contrast in (((120, 112), "T1w"), ((128, 128), "T2w")):
        series = simulate_series([60, 80], matrix, 0.1, contrast, seed=12345)
        prepared = [prepare_slice(s, 0.1, contrast) for s in series.input]
        x = _pad_to(np.stack([p.image for p in prepared])[:, None], STRIDE)
        c = np.stack([p.cond for p in prepared])
        with torch.no_grad():
            ref = net(torch.from_numpy(x), torch.from_numpy(c)).numpy()
        out = sess.run(None, {"image": x, "cond": c})[0]
        worst = max(worst, float(np.max(np.abs(out - ref))))
    return worst


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: train, save the weights, export and check; 1 if the export disagrees."""
    return training_main(
        argv,
        module="pipelines.lf2hf.lab.train",
        description=(__doc__ or "").split("\n")[0],
        default_seed=1,
        make_config=lambda seed: TrainConfig(seed=seed),
        train=train,
        export_checked=export_checked,
        names=(STATE_NAME, ONNX_NAME, LOG_NAME),
    )


if __name__ == "__main__":
    raise SystemExit(main())

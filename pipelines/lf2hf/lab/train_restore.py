"""Train the contrast-preserving restoration (unrolled proximal gradient + learned prior) and export its prior.

Usage::

    python -m pipelines.lf2hf.lab.train_restore --seed 3 --out DIR [--steps N]

The whole loop of :func:`pipelines.lf2hf.infer.restore` (gradient steps
through the acquisition operator ``A``, the prior
:class:`~pipelines.lf2hf.lab.net.PriorNet` shared by the iterations, the
final projection onto the noise ball) is trained end to end in torch
(:func:`~pipelines.lf2hf.lab.net.unrolled_restore`); only the prior is
exported (``DIR/lf2hf-dc.onnx``), the loop being numpy in ``infer.py``.

Data, drawn fresh from the seed into a pool that is partly replaced every
step (80 x 80 fine-grid scenes, 40 x 40 acquired):

* :data:`TrainConfig.brain_fraction` of the scenes: crops of the MNI152
  brain of the simulator (training slab only, random acquisition, imaged
  with its own low-field contrast: :func:`~pipelines.lf2hf.lab.anatomy.brain_crop`);
* the rest: domain-randomised anatomy (:func:`~pipelines.lf2hf.lab.anatomy.random_scene`);
* both with field-map perturbations (B0 off-resonance shift and gradient
  non-linearity), then :func:`~pipelines.lf2hf.lab.anatomy.degrade`
  (``A``, complex Gaussian noise of log-uniform tissue SNR, magnitude).

The noise level the loop is conditioned on is estimated from each acquired
image (:func:`~pipelines.lf2hf.preprocess.robust_noise_sigma`), as at
run time, never the true one. Loss: L1 of the output against the
noiseless fine-grid scene, both divided by the acquired image's
normalisation scale, plus :attr:`TrainConfig.ssim_weight` x (1 - SSIM) over
the scene's foreground. Deterministic for a seed and step count (one thread,
deterministic algorithms, seeded generators).

Writes ``DIR/lf2hf-dc.onnx``, ``DIR/lf2hf-dc.state.pt`` and
``DIR/lf2hf-dc.train.json``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines._lab import cpu_session, export_onnx  # noqa: E402
from pipelines._training import step_with_ema, training_main  # noqa: E402
from pipelines.lf2hf.infer import (  # noqa: E402
    PRIOR_COND_DIM,
    RESTORE_ITERATIONS,
    RESTORE_NONNEG_ROUNDS,
    RESTORE_STEP,
    RESTORE_TAU,
    SCALE,
    _band,
    restore,
)
from pipelines.lf2hf.lab.anatomy import (  # noqa: E402
    PHANTOM_SEED,
    SNR_RANGE,
    TEST_PHANTOM_SEED,
    brain_crop,
    degrade,
    random_scene,
)
from pipelines.lf2hf.lab.net import PriorNet, count_parameters, unrolled_restore  # noqa: E402
from pipelines.lf2hf.lab.simulator import RESERVED_SEEDS, TRAIN_SLICES, draw_acquisition, load_anatomy  # noqa: E402
from pipelines.lf2hf.preprocess import kspace_upsample, normalisation_scale, robust_noise_sigma  # noqa: E402

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

ONNX_NAME = "lf2hf-dc.onnx"
LOG_NAME = "lf2hf-dc.train.json"
STATE_NAME = "lf2hf-dc.state.pt"
INPUT_NAMES = ("image", "cond")
OUTPUT_NAME = "image_next"
#: Fine-grid side of the training scenes.
SCENE: int = 80


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (see the module docstring)."""

    seed: int = 3
    steps: int = 1700
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 50
    pool: int = 192
    refresh: int = 2
    ssim_weight: float = 0.0
    brain_fraction: float = 0.5
    ema: float = 0.99
    widths: tuple[int, int] = (24, 32)
    blocks: tuple[int, int] = (1, 2)
    val_every: int = 100


class _Sampler:
    """Seeded stream of (x0, target, sigma_rel) training scenes."""

    def __init__(self, seed: int, stream: int, brain_fraction: float) -> None:
        if seed in RESERVED_SEEDS or seed in (PHANTOM_SEED, TEST_PHANTOM_SEED):
            raise ValueError(f"seed {seed} is reserved for held-out data")
        self.rng = np.random.default_rng([seed, stream, 0xDC])
        self.brain_fraction = brain_fraction
        self.anatomy = load_anatomy() if brain_fraction > 0 else None

    def __call__(self) -> tuple[np.ndarray, np.ndarray, float]:
        rng = self.rng
        if self.anatomy is not None and rng.random() < self.brain_fraction:
            acq = draw_acquisition(rng)
            z = int(TRAIN_SLICES[int(rng.integers(len(TRAIN_SLICES)))])
            truth = brain_crop(self.anatomy, z, acq, rng, (SCENE, SCENE))
            snr = float(np.clip(acq.snr, *SNR_RANGE))
        else:
            truth = random_scene(rng, (SCENE, SCENE))
            snr = float(np.exp(rng.uniform(math.log(SNR_RANGE[0]), math.log(SNR_RANGE[1]))))
        y = degrade(truth, snr, rng)
        s = normalisation_scale(y)
        y = y / s
        x0 = kspace_upsample(y, (SCALE * y.shape[0], SCALE * y.shape[1])).real.astype(np.float32)
        return x0, (truth / s).astype(np.float32), robust_noise_sigma(y)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _loss(pred: torch.Tensor, t: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """L1 over the scene plus ``ssim_weight`` x (1 - SSIM) over its foreground (the tissue, not the air)."""
    from pipelines.lf2hf.lab.train import _ssim_map

    l1 = (pred - t).abs().mean()
    if cfg.ssim_weight <= 0:
        return l1
    fg = torch.nn.functional.avg_pool2d((t > 0.05).float(), 7, 1)
    return l1 + cfg.ssim_weight * (1.0 - (_ssim_map(pred, t) * fg).sum() / fg.sum().clamp_min(1.0))


def _tensors(items: list[tuple[np.ndarray, np.ndarray, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = torch.from_numpy(np.stack([i[0] for i in items])[:, None])
    t = torch.from_numpy(np.stack([i[1] for i in items])[:, None])
    s = torch.tensor([i[2] for i in items], dtype=torch.float32)
    return x0, t, s


def train(cfg: TrainConfig) -> tuple[PriorNet, dict[str, object]]:
    """Train the prior through the unrolled loop; returns the (EMA) prior in eval mode and a log."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    t0 = time.perf_counter()
    sampler = _Sampler(cfg.seed, 0, cfg.brain_fraction)
    # Monitoring only, from its own stream: it changes nothing in the training trajectory.
    val_sampler = _Sampler(cfg.seed, 1, cfg.brain_fraction)
    val = _tensors([val_sampler() for _ in range(48)])
    pool = [sampler() for _ in range(cfg.pool)]
    band = torch.from_numpy(_band((SCENE, SCENE), (SCENE // SCALE, SCENE // SCALE)))
    net = PriorNet(cfg.widths, cfg.blocks)
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    curve: list[dict[str, float]] = []
    running = 0.0

    def run(model: PriorNet, x0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return unrolled_restore(model, x0, s, band, RESTORE_ITERATIONS, RESTORE_STEP, RESTORE_TAU)

    def psnr(a: torch.Tensor, t: torch.Tensor) -> float:
        mse = (a - t).pow(2).mean(dim=(1, 2, 3))
        return float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean())

    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        for _ in range(cfg.refresh):
            pool[int(rng.integers(len(pool)))] = sampler()
        x0, t, s = _tensors([pool[int(rng.integers(len(pool)))] for _ in range(cfg.batch)])
        loss = _loss(run(net, x0, s), t, cfg)
        step_with_ema(loss, net, ema, opt, step, cfg.ema)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            with torch.no_grad():
                v = {"psnr_restored": psnr(run(ema, val[0], val[2]), val[1]), "psnr_zero_filled": psnr(val[0], val[1])}
            v.update(step=step + 1, loss=running, seconds=round(time.perf_counter() - t0, 1))
            curve.append(v)
            logger.info("step %d loss %.4f val psnr %.2f (zero-filled %.2f) %.0f s", step + 1, running,
                        v["psnr_restored"], v["psnr_zero_filled"], v["seconds"])
    prior = ema.eval()
    log: dict[str, object] = {
        "config": asdict(cfg),
        "parameters": count_parameters(prior),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "curve": curve,
    }
    return prior, log


def export_checked(prior: PriorNet, path: Path) -> float:
    """Export the prior and check the numpy/onnxruntime loop against the torch loop.

    Returns the largest absolute difference (normalised intensity) of the
    whole restoration (:func:`pipelines.lf2hf.infer.restore` versus
    :func:`~pipelines.lf2hf.lab.net.unrolled_restore`) on two scenes of
    other sizes than in training.
    """
    dummy = (torch.rand(2, 1, 32, 40), torch.rand(2, PRIOR_COND_DIM))
    export_onnx(prior, dummy, path, input_names=INPUT_NAMES, output_names=[OUTPUT_NAME],
                dynamic_axes={"image": {0: "N", 2: "H2", 3: "W2"}, "cond": {0: "N"},
                              OUTPUT_NAME: {0: "N", 2: "H2", 3: "W2"}})
    sess = cpu_session(path, threads=1)
    rng = np.random.default_rng(12345)
    worst = 0.0
    for shape in ((96, 128), (128, 128)):
        truth = random_scene(rng, shape)
        y = degrade(truth, 30.0, rng)
        y = y / normalisation_scale(y)
        out = restore(sess, y[None])[0]
        x0 = torch.from_numpy(kspace_upsample(y, shape).real[None, None].astype(np.float32))
        band = torch.from_numpy(_band(shape, (shape[0] // SCALE, shape[1] // SCALE)))
        with torch.no_grad():
            ref = unrolled_restore(prior, x0, torch.tensor([robust_noise_sigma(y)], dtype=torch.float32), band,
                                   RESTORE_ITERATIONS, RESTORE_STEP, RESTORE_TAU,
                                   RESTORE_NONNEG_ROUNDS)[0, 0].clamp_min(0.0).numpy()
        worst = max(worst, float(np.max(np.abs(out - ref))))
    return worst


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: train, save the weights, export and check; 1 if the export disagrees."""
    return training_main(
        argv,
        module="pipelines.lf2hf.lab.train_restore",
        description=(__doc__ or "").split("\n")[0],
        default_seed=3,
        make_config=lambda seed: TrainConfig(seed=seed),
        train=train,
        export_checked=export_checked,
        names=(STATE_NAME, ONNX_NAME, LOG_NAME),
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the IVIM network on synthetic data, calibrate its standard deviations and export it to ONNX.

Usage::

    python -m pipelines.ivim.lab.train --seed 1 --out DIR [--steps N]

Training is deterministic for a given seed and step budget: a single CPU
thread, ``torch.manual_seed(seed)`` for the weights and a numpy
``Generator`` seeded from ``(seed, 0)`` for the simulated data, which is
drawn fresh every step from :class:`pipelines.ivim.lab.signal.TrainingDistribution`
(so there is no fixed training set to overfit). The loss is supervised: mean
squared error of the parameters normalised to the output bounds (IVIM-NET's
sigmoid ranges), which on simulated data gives a better estimator than the
unsupervised signal-reconstruction loss, since the posterior mean of each
parameter is what minimises it. The uncertainty branch learns the variance of
that error by Gaussian negative log-likelihood, on detached inputs, and one
factor per parameter, fitted after training on the calibration stream
``(seed, 7)``, makes its 90 % intervals cover 90 %.

Writes ``DIR/ivim-net.onnx`` (opset 17, dynamic batch axis) and
``DIR/ivim-net.train.json`` (configuration, timing, validation curve,
calibration factors and the onnxruntime-versus-torch check).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
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

from pipelines._lab import cpu_session, export_onnx  # noqa: E402
from pipelines.ivim.infer import K_MAX  # noqa: E402
from pipelines.ivim.lab.calibration import (  # noqa: E402
    SD_PARAMS,
    calibration_factors,
    calibration_sets,
    errors,
)
from pipelines.ivim.lab.net import DEPTH, OUTPUT_BOUNDS, OUTPUT_NAMES, WIDTH, IvimFastNet  # noqa: E402
from pipelines.ivim.lab.signal import (  # noqa: E402
    BENCH_TEST_SEED,
    MODEL_TEST_SEED,
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
    SimulatedBatch,
    TrainingDistribution,
    pad_protocol,
    sample_random_protocol,
    simulate_protocol,
    simulate_training_batch,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Seeds that generate held-out data and so must never train a model: the
#: benchmark's test seed and the model test's seed.
RESERVED_SEEDS: frozenset[int] = frozenset({BENCH_TEST_SEED, MODEL_TEST_SEED})
#: Voxels per setting, noise and SNR of the calibration of the standard
#: deviations (stream ``(seed, 7, ...)``, disjoint from training and validation).
CALIBRATION_VOXELS: int = 4000
#: File names written into the output directory.
ONNX_NAME = "ivim-net.onnx"
LOG_NAME = "ivim-net.train.json"


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
        Voxels per step.
    lr : float
        Peak learning rate (AdamW, linear warm-up then cosine decay).
    warmup : int
        Warm-up steps.
    weight_decay : float
        AdamW weight decay.
    width, depth : int
        Per-voxel MLP, see :class:`pipelines.ivim.lab.net.IvimFastNet`.
    loss_weights : tuple of float
        Weights of the normalised squared errors of D, D*, f, S0.
    voxels_per_protocol : int
        Voxels sharing a protocol within a batch.
    val_every : int
        Steps between validation evaluations.
    """

    seed: int = 1
    steps: int = 12000
    batch: int = 1024
    lr: float = 2e-3
    warmup: int = 400
    weight_decay: float = 1e-5
    width: int = WIDTH
    depth: int = DEPTH
    loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.2)
    # 32 voxels per protocol: the protocol encoder costs more per protocol
    # than the per-voxel network per voxel, so fewer, larger groups make a step
    # about 3x cheaper and buy more steps in the same time.
    voxels_per_protocol: int = 32
    val_every: int = 1000


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 2 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _to_torch(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]


def _unit_targets(d: np.ndarray, dstar: np.ndarray, f: np.ndarray, s0_rel: np.ndarray) -> np.ndarray:
    """Map true parameters onto the ``[0, 1]`` sigmoid scale of the outputs."""
    cols = [d, dstar, f, s0_rel]
    out = [(c - lo) / (hi - lo) for c, (lo, hi) in zip(cols, OUTPUT_BOUNDS)]
    return np.stack(out, axis=1)


def _validation_set(
    seed: int, random_protocols: bool, n: int = 4000, block: int = 100
) -> tuple[list[torch.Tensor], np.ndarray]:
    """SNR 20 Gaussian voxels in the test ranges from a validation stream, grouped by protocol.

    Setting A protocol, or (``random_protocols``) a random protocol per
    block of ``block`` voxels. The streams ``(seed, 1)`` and ``(seed, 2)``
    are disjoint from the training stream ``(seed, 0)`` and from the
    benchmark's test seed.

    Returns
    -------
    tuple
        ``([signal [P, block, K_MAX], bvalues [P, K_MAX], mask [P, K_MAX]], truth [P * block, 3])``.
    """
    rng = np.random.default_rng([seed, 2 if random_protocols else 1])
    p = n // block
    s = np.zeros((p, block, K_MAX))
    b = np.zeros((p, K_MAX))
    m = np.zeros((p, K_MAX))
    truth = []
    for i in range(p):
        prot = sample_random_protocol(rng) if random_protocols else SETTING_A_BVALUES
        sig, d, f, dstar, _ = simulate_protocol(rng, prot, block, 20.0, NoiseType.GAUSSIAN, TEST_RANGES)
        s[i, :, : prot.size] = sig
        b[i], m[i] = pad_protocol(prot)
        truth.append(np.stack([d, dstar, f], axis=1))
    return _to_torch(s, b, m), np.concatenate(truth)


def _grouped(batch: SimulatedBatch, per: int) -> list[torch.Tensor]:
    """A batch whose consecutive ``per`` voxels share a protocol: ``[P, per, K]`` signals, ``[P, K]`` protocols."""
    n = batch.signal.shape[0]
    s = batch.signal.reshape(n // per, per, K_MAX)
    return _to_torch(s, batch.bvalues_told[::per], batch.mask[::per])


def _nrmse(est: np.ndarray, true: np.ndarray) -> list[float]:
    return (np.sqrt(np.mean((est - true) ** 2, axis=0)) / np.mean(true, axis=0)).tolist()


def train(cfg: TrainConfig, dist: TrainingDistribution | None = None) -> tuple[IvimFastNet, dict[str, object]]:
    """Train a network from scratch.

    The estimate is trained by the weighted MSE of the sigmoid outputs
    against the normalised true parameters; the uncertainty branch, which
    sees only detached features and the detached estimate, by the Gaussian
    negative log-likelihood of that error. The two losses therefore touch
    disjoint parameters, and each parameter set has its own gradient clip,
    so adding the uncertainty leaves the estimate's training unchanged.

    Parameters
    ----------
    cfg : TrainConfig
        Hyper-parameters, including the seed.
    dist : TrainingDistribution, optional
        Synthetic data distribution; the default if omitted.

    Returns
    -------
    tuple
        The trained network (eval mode, calibration factors still 1) and a log dict.
    """
    if cfg.seed in RESERVED_SEEDS:
        raise ValueError(f"seed {cfg.seed} is reserved for held-out data; pick another")
    if cfg.batch % cfg.voxels_per_protocol:
        raise ValueError(f"batch {cfg.batch} is not a multiple of voxels_per_protocol {cfg.voxels_per_protocol}")
    dist = dist or TrainingDistribution()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    net = IvimFastNet(cfg.width, cfg.depth)
    sd_params = net.sd_parameters()
    sd_ids = {id(q) for q in sd_params}
    est_params = [q for q in net.parameters() if id(q) not in sd_ids]
    opt = torch.optim.AdamW(
        [{"params": est_params}, {"params": sd_params}], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    w = torch.tensor(cfg.loss_weights, dtype=torch.float32)
    val_sets = {
        "a": _validation_set(cfg.seed, random_protocols=False),
        "b": _validation_set(cfg.seed, random_protocols=True),
    }
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    running = [0.0, 0.0]
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = simulate_training_batch(rng, cfg.batch, dist, cfg.voxels_per_protocol)
        ref = np.maximum(np.max(np.where(batch.mask > 0, batch.signal, -np.inf), axis=1), 1e-6)
        target = _unit_targets(batch.d, batch.dstar, batch.f, batch.s0 / ref)
        s, b, m = _grouped(batch, cfg.voxels_per_protocol)
        y, inside = _to_torch(target.reshape(s.shape[0], s.shape[1], -1), batch.inside.reshape(s.shape[:2]))
        net.train()
        unit, logvar, _ = net.forward_unit(s, b, m)
        # The estimate learns from the voxels inside the training ranges only.
        mse = ((((unit - y) ** 2) * w).mean(dim=-1) * inside).sum() / inside.sum().clamp_min(1.0)
        # Outside voxels' targets leave [0, 1]; the clip bounds their pull on the NLL.
        resid2 = (unit[..., :3].detach() - y[..., :3].clamp(-1.0, 2.0)) ** 2
        nll = 0.5 * (logvar + resid2 * torch.exp(-logvar)).mean()
        opt.zero_grad(set_to_none=True)
        (mse + nll).backward()
        torch.nn.utils.clip_grad_norm_(est_params, 1.0)
        torch.nn.utils.clip_grad_norm_(sd_params, 1.0)
        opt.step()
        running[0] += mse.detach().item()
        running[1] += nll.detach().item()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            net.eval()
            done = (step + 1) - (step // cfg.val_every) * cfg.val_every
            entry: dict[str, float] = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - t0, 1),
                "train_loss": running[0] / done,
                "train_nll": running[1] / done,
            }
            for key, (val_x, val_true) in val_sets.items():
                with torch.no_grad():
                    u, lv, r = net.forward_unit(*val_x)
                    est = net.to_physical(u, lv, r)[0].reshape(-1, 4).numpy().astype(np.float64)[:, :3]
                nr = _nrmse(est, val_true)
                for i, name in enumerate(("d", "dstar", "f")):
                    entry[f"val_{key}_nrmse_{name}"] = nr[i]
            curve.append(entry)
            running = [0.0, 0.0]
            logger.info(
                "step %d  %.0fs  loss %.5f nll %.3f  val A (SNR 20) NRMSE D %.3f f %.3f D* %.3f"
                " | random protocols D %.3f f %.3f D* %.3f",
                entry["step"],
                entry["seconds"],
                entry["train_loss"],
                entry["train_nll"],
                entry["val_a_nrmse_d"],
                entry["val_a_nrmse_f"],
                entry["val_a_nrmse_dstar"],
                entry["val_b_nrmse_d"],
                entry["val_b_nrmse_f"],
                entry["val_b_nrmse_dstar"],
            )
    net.eval()
    log: dict[str, object] = {
        "config": asdict(cfg),
        "distribution": dist.as_dict(),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "curve": curve,
        "torch_version": torch.__version__,
        "parameters": sum(q.numel() for q in net.parameters()),
    }
    return net, log


def torch_predictor(net: IvimFastNet) -> Callable[[np.ndarray, np.ndarray], tuple[dict, dict]]:
    """A :data:`~pipelines.ivim.lab.calibration.Predictor` running ``net`` in torch on one protocol."""

    def predict(signals: np.ndarray, bvalues: np.ndarray) -> tuple[dict, dict]:
        k = bvalues.size
        s = np.zeros((signals.shape[0], K_MAX))
        s[:, :k] = signals
        b, m = pad_protocol(bvalues)
        x, bt, mt = _to_torch(s, b[None, :], m[None, :])
        with torch.no_grad():
            params, sd = net(x, bt, mt)
        est = {name: params[:, i].numpy() for i, name in enumerate(OUTPUT_NAMES)}
        return est, {name: sd[:, i].numpy() for i, name in enumerate(SD_PARAMS)}

    return predict


def calibrate(net: IvimFastNet, seed: int, n: int = CALIBRATION_VOXELS) -> dict[str, float]:
    """Fit and set the network's per-parameter factor of the standard deviation.

    The factor makes ``estimate ± Z90 · sd`` cover 90 % of the calibration
    voxels (:func:`pipelines.ivim.lab.calibration.calibration_sets` from the
    training seed: setting A and random protocols, Gaussian and Rician, SNR
    10, 20 and 50, all pooled). Returns the factors.
    """
    net.sd_calibration.fill_(1.0)
    sets = [vs for _, vs in calibration_sets(seed, n)]
    factors = calibration_factors(errors(torch_predictor(net), sets))
    net.sd_calibration.copy_(torch.tensor([factors[p] for p in SD_PARAMS]))
    return factors


def export_and_check(net: IvimFastNet, path: Path) -> float:
    """Export to ONNX (:func:`pipelines._lab.export_onnx`) and check onnxruntime against torch.

    Parameters
    ----------
    net : IvimFastNet
        Trained network.
    path : pathlib.Path
        Destination ``.onnx`` file.

    Returns
    -------
    float
        Maximum absolute difference of the normalised outputs (D, D* and
        their standard deviations in units of 1e-3 mm²/s, f and its standard
        deviation, S0) between onnxruntime and torch on 16 protocols of 128
        simulated voxels each.
    """
    dummy = (torch.rand(4, K_MAX), torch.rand(1, K_MAX) * 1000, torch.ones(1, K_MAX))
    names = ["signal", "bvalues", "mask"]
    outputs = ["params", "params_sd"]
    export_onnx(net, dummy, path, names, outputs, {k: {0: "N"} for k in ["signal", *outputs]})
    sess = cpu_session(path, threads=1)
    batch = simulate_training_batch(np.random.default_rng([0, 9]), 2048, voxels_per_protocol=128)
    s, b, m = _grouped(batch, 128)
    scale = np.array([1e3, 1e3, 1.0, 1.0, 1e3, 1e3, 1.0], dtype=np.float32)
    worst = 0.0
    for i in range(s.shape[0]):
        with torch.no_grad():
            ref = torch.cat(net(s[i], b[i : i + 1], m[i : i + 1]), dim=1).numpy()
        feed = {"signal": s[i].numpy(), "bvalues": b[i : i + 1].numpy(), "mask": m[i : i + 1].numpy()}
        out = np.concatenate(sess.run(None, feed), axis=1)
        worst = max(worst, float(np.max(np.abs((out - ref) * scale))))
    return worst


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, required=True, help="training seed (not 2 or the bench test seed)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps")
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="voxels per step")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch=args.batch)
    net, log = train(cfg)
    t0 = time.perf_counter()
    factors = calibrate(net, cfg.seed)
    log["sd_calibration"] = factors
    log["calibration"] = {
        "seed_stream": [cfg.seed, 7],
        "voxels_per_setting_noise_snr": CALIBRATION_VOXELS,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / ONNX_NAME
    diff = export_and_check(net, onnx_path)
    log["onnx_max_abs_diff"] = diff
    log["onnx_bytes"] = onnx_path.stat().st_size
    log["command"] = " ".join(["python -m pipelines.ivim.lab.train"] + (argv if argv is not None else sys.argv[1:]))
    (args.out / LOG_NAME).write_text(json.dumps(log, indent=2))
    print(f"trained in {log['train_seconds']} s; wrote {onnx_path} ({log['onnx_bytes']} bytes)")
    print(f"onnxruntime vs torch max abs diff (D, D* in 1e-3 mm2/s): {diff:.2e}")
    print("sd calibration factors: " + ", ".join(f"{k} {v:.3f}" for k, v in factors.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

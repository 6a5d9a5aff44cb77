"""Train the IVIM set network on synthetic data and export it to ONNX.

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
parameter is what minimises it.

Writes ``DIR/ivim-net.onnx`` (opset 17, dynamic batch axis) and
``DIR/ivim-net.train.json`` (configuration, timing, validation curve and the
onnxruntime-versus-torch check).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
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

from pipelines._lab import cpu_session, export_onnx  # noqa: E402
from pipelines.ivim.infer import K_MAX  # noqa: E402
from pipelines.ivim.lab.net import OUTPUT_BOUNDS, IvimSetNet  # noqa: E402
from pipelines.ivim.lab.signal import (  # noqa: E402
    BENCH_TEST_SEED,
    MODEL_TEST_SEED,
    SETTING_A_BVALUES,
    TEST_RANGES,
    NoiseType,
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
    width, head_width : int
        Network widths, see :class:`pipelines.ivim.lab.net.IvimSetNet`.
    loss_weights : tuple of float
        Weights of the normalised squared errors of D, D*, f, S0.
    voxels_per_protocol : int
        Voxels sharing a protocol within a batch.
    val_every : int
        Steps between validation evaluations.
    """

    seed: int = 1
    steps: int = 6000
    batch: int = 512
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 1e-5
    width: int = 96
    head_width: int = 192
    loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.2)
    voxels_per_protocol: int = 8
    val_every: int = 500


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
    """SNR 20 Gaussian voxels in the test ranges from a validation stream.

    Setting A protocol, or (``random_protocols``) a random protocol per
    block of ``block`` voxels. The streams ``(seed, 1)`` and ``(seed, 2)``
    are disjoint from the training stream ``(seed, 0)`` and from the
    benchmark's test seed.
    """
    rng = np.random.default_rng([seed, 2 if random_protocols else 1])
    s = np.zeros((n, K_MAX))
    b = np.zeros((n, K_MAX))
    m = np.zeros((n, K_MAX))
    truth = []
    for start in range(0, n, block):
        prot = sample_random_protocol(rng) if random_protocols else SETTING_A_BVALUES
        sig, d, f, dstar, _ = simulate_protocol(rng, prot, block, 20.0, NoiseType.GAUSSIAN, TEST_RANGES)
        bp, mp = pad_protocol(prot)
        s[start : start + block, : prot.size] = sig
        b[start : start + block] = bp
        m[start : start + block] = mp
        truth.append(np.stack([d, dstar, f], axis=1))
    return _to_torch(s, b, m), np.concatenate(truth)


def _nrmse(est: np.ndarray, true: np.ndarray) -> list[float]:
    return (np.sqrt(np.mean((est - true) ** 2, axis=0)) / np.mean(true, axis=0)).tolist()


def train(cfg: TrainConfig, dist: TrainingDistribution | None = None) -> tuple[IvimSetNet, dict[str, object]]:
    """Train a network from scratch.

    Parameters
    ----------
    cfg : TrainConfig
        Hyper-parameters, including the seed.
    dist : TrainingDistribution, optional
        Synthetic data distribution; the default if omitted.

    Returns
    -------
    tuple
        The trained network (eval mode) and a log dict.
    """
    if cfg.seed in RESERVED_SEEDS:
        raise ValueError(f"seed {cfg.seed} is reserved for held-out data; pick another")
    dist = dist or TrainingDistribution()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    net = IvimSetNet(cfg.width, cfg.head_width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    w = torch.tensor(cfg.loss_weights, dtype=torch.float32)
    val_sets = {
        "a": _validation_set(cfg.seed, random_protocols=False),
        "b": _validation_set(cfg.seed, random_protocols=True),
    }
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    running = 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = simulate_training_batch(rng, cfg.batch, dist, cfg.voxels_per_protocol)
        ref = np.maximum(np.max(np.where(batch.mask > 0, batch.signal, -np.inf), axis=1), 1e-6)
        target = _unit_targets(batch.d, batch.dstar, batch.f, batch.s0 / ref)
        s, b, m, y = _to_torch(batch.signal, batch.bvalues_told, batch.mask, target)
        net.train()
        unit, _ = net.forward_unit(s, b, m)
        loss = (((unit - y) ** 2) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        running += loss.detach().item()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            net.eval()
            entry: dict[str, float] = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - t0, 1),
                "train_loss": running / cfg.val_every,
            }
            for key, (val_x, val_true) in val_sets.items():
                with torch.no_grad():
                    est = net(*val_x).numpy().astype(np.float64)[:, :3]
                nr = _nrmse(est, val_true)
                for i, name in enumerate(("d", "dstar", "f")):
                    entry[f"val_{key}_nrmse_{name}"] = nr[i]
            curve.append(entry)
            running = 0.0
            logger.info(
                "step %d  %.0fs  loss %.5f  val A (SNR 20) NRMSE D %.3f f %.3f D* %.3f"
                " | random protocols D %.3f f %.3f D* %.3f",
                entry["step"],
                entry["seconds"],
                entry["train_loss"],
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
    }
    return net, log


def export_and_check(net: IvimSetNet, path: Path) -> float:
    """Export to ONNX (:func:`pipelines._lab.export_onnx`) and check onnxruntime against torch.

    Parameters
    ----------
    net : IvimSetNet
        Trained network.
    path : pathlib.Path
        Destination ``.onnx`` file.

    Returns
    -------
    float
        Maximum absolute difference of the normalised outputs (D and D* in
        units of 1e-3 mm²/s, f, S0) between onnxruntime and torch on a mixed
        batch of 2048 simulated voxels.
    """
    n = 4
    dummy = (torch.rand(n, K_MAX), torch.rand(n, K_MAX) * 1000, torch.ones(n, K_MAX))
    names = ["signal", "bvalues", "mask"]
    export_onnx(net, dummy, path, names, ["params"], {k: {0: "N"} for k in names + ["params"]})
    batch = simulate_training_batch(np.random.default_rng([0, 9]), 2048)
    s, b, m = _to_torch(batch.signal, batch.bvalues_told, batch.mask)
    with torch.no_grad():
        ref = net(s, b, m).numpy()
    sess = cpu_session(path, threads=1)
    out = sess.run(None, {"signal": s.numpy(), "bvalues": b.numpy(), "mask": m.numpy()})[0]
    scale = np.array([1e3, 1e3, 1.0, 1.0], dtype=np.float32)
    return float(np.max(np.abs((out - ref) * scale)))


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
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / ONNX_NAME
    diff = export_and_check(net, onnx_path)
    log["onnx_max_abs_diff"] = diff
    log["onnx_bytes"] = onnx_path.stat().st_size
    log["command"] = " ".join(["python -m pipelines.ivim.lab.train"] + (argv if argv is not None else sys.argv[1:]))
    (args.out / LOG_NAME).write_text(json.dumps(log, indent=2))
    print(f"trained in {log['train_seconds']} s; wrote {onnx_path} ({log['onnx_bytes']} bytes)")
    print(f"onnxruntime vs torch max abs diff (D, D* in 1e-3 mm2/s): {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

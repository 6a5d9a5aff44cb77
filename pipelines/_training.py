"""Training steps and the command line shared by the pipelines' trainers (torch only; never imported at run time)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["step_with_ema", "training_main"]

_Model = TypeVar("_Model", bound=torch.nn.Module)


def step_with_ema(
    loss: torch.Tensor,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    ema_decay: float,
) -> None:
    """One optimiser step with gradient clipping at norm 1, then update the moving average of the weights.

    The average's decay is warmed up, ``min(ema_decay, (1 + step) / (10 + step))``,
    so that the first steps are not frozen in it.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        for pe, pn in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pn, alpha=1.0 - decay)


def training_main(
    argv: Sequence[str] | None,
    *,
    module: str,
    description: str,
    default_seed: int,
    make_config: Callable[[int], Any],
    train: Callable[[Any], tuple[_Model, dict[str, Any]]],
    export_checked: Callable[[_Model, Path], float],
    names: tuple[str, str, str],
) -> int:
    """``python -m <module> --seed S --out DIR [--steps N]``: train, save, export and check; 1 if the export disagrees.

    ``names`` are the weights', the ONNX file's and the training log's file
    names in ``--out``; ``export_checked`` returns the largest difference
    between onnxruntime and torch on the trainer's own check inputs.
    """
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    ap.add_argument("--seed", type=int, default=default_seed)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    cfg = make_config(args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    state_name, onnx_name, log_name = names
    args.out.mkdir(parents=True, exist_ok=True)
    model, log = train(cfg)
    # The weights first, so that a failed export does not lose the run.
    torch.save(model.state_dict(), args.out / state_name)
    onnx_path = args.out / onnx_name
    diff = export_checked(model, onnx_path)
    log["onnx_max_abs_diff"] = diff
    log["onnx_bytes"] = onnx_path.stat().st_size
    log["command"] = f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / log_name).write_text(json.dumps(log, indent=2))
    print(f"trained in {log['train_seconds']} s; wrote {onnx_path} ({log['onnx_bytes']} bytes)")
    print(f"onnxruntime vs torch max abs diff (normalised intensity): {diff:.2e}")
    return 0 if diff < 1e-3 else 1

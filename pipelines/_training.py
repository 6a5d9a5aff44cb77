"""Training steps shared by the pipelines' trainers (torch only; never imported at run time)."""

from __future__ import annotations

import torch

__all__ = ["step_with_ema"]


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

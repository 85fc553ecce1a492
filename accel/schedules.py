"""Keep-rate schedules, as functions of the training iteration.

EViT (Liang et al., ICLR 2022, Sec. 4 "Training"; youweiliang/evit helpers.adjust_keep_rate): keep
every token until ``start_epoch``, then lower the keep rate from 1 to the target along a half-cosine
over ``epochs`` epochs, updated every iteration, then hold the target. Linear and step shapes are
offered besides."""
from __future__ import annotations

import math

from accel.errors import UserInputError

SHAPES = ("cosine", "linear", "step")


def keep_rate_at(iteration: int, iters_per_epoch: int, target: float, start_epoch: int = 0, epochs: int = 0,
                 shape: str = "cosine", initial: float = 1.0) -> float:
    """The keep rate for global ``iteration`` (0-based) of a run with ``iters_per_epoch``."""
    if shape not in SHAPES:
        raise UserInputError(f"keep-rate schedule shape={shape!r} is unknown; expected one of {SHAPES}.")
    epoch = iteration // max(iters_per_epoch, 1)
    if epoch < start_epoch:
        return initial
    if epoch >= start_epoch + epochs or shape == "step":
        return target
    progress = (iteration - start_epoch * iters_per_epoch) / (epochs * iters_per_epoch)
    if shape == "linear":
        return initial + (target - initial) * progress
    return target + (initial - target) * (math.cos(progress * math.pi) + 1) * 0.5

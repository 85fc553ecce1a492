"""No checkpoint of diverged weights: a save with a NaN or infinite parameter stops the run instead.

The module checks the loss only on logging steps (every ``trainer.log_every_n_steps``, where Lightning
reads it back anyway), so a save can fall between the step that diverged and the step that notices.
Checking the weights at the save costs one read-back where the save copies every weight to the host
anyway, and it keeps ``last.ckpt`` (and the best checkpoint) from before the divergence."""
from __future__ import annotations

from typing import Any, Dict

import pytorch_lightning as pl
import torch


class FiniteWeights(pl.Callback):
    """Raise FloatingPointError from ``on_save_checkpoint`` (before the file is written) when a
    parameter is not finite; the entry point prints its sentence (exit code 2)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]) -> None:
        flags = [p.detach().isfinite().all() for p in pl_module.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            raise FloatingPointError(f"The weights are not finite at step {trainer.global_step} (training diverged), so "
                                     "no checkpoint was written over the last good one; lower the learning rate or "
                                     "enable gradient clipping (trainer.gradient_clip_val).")

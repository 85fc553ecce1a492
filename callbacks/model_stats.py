"""Log the model's size and cost once at the start of training: parameters (millions) and forward
GMACs (multiply-accumulates for one image, torch.utils.flop_counter with attention counted on CPUs)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from accel.flops import count_flops


class ModelStats(pl.Callback):
    """Logs ``model/params_M`` and ``model/gmacs`` (at the reducer's configured keep rate)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        size = getattr(trainer.datamodule, "image_size", None)
        stats = {"model/params_M": pl_module.num_parameters / 1e6}
        if size:
            image = torch.zeros(1, 3, size, size, device=pl_module.device)
            stats["model/gmacs"] = count_flops(pl_module, image) / 2e9  # the module's forward is the network's
        for lg in trainer.loggers:
            lg.log_metrics(stats, step=0)

"""Log the model's size and cost: parameters (millions) and forward GMACs (multiply-accumulates for one
image, torch.utils.flop_counter with attention counted on CPUs), at the start of training and again at
the start of testing, for the weights tested: training can change the cost (a DiffRate search settles on
its schedule, a keep-rate schedule moves the keep rate), and the last value logged is the cost of the
network whose accuracy the run reports."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from accel.flops import count_flops


class ModelStats(pl.Callback):
    """Logs ``model/params_M`` and ``model/gmacs`` (at the network's keep rate or schedule of the moment)
    when training starts and when testing starts (the tested checkpoint is loaded by then)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, step=0)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, step=trainer.global_step)

    @staticmethod
    def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        size = getattr(trainer.datamodule, "image_size", None)
        stats = {"model/params_M": pl_module.num_parameters / 1e6}
        if size:
            image = torch.zeros(1, 3, size, size, device=pl_module.device)
            stats["model/gmacs"] = count_flops(pl_module, image) / 2e9  # the module's forward is the network's
        for lg in trainer.loggers:
            lg.log_metrics(stats, step=step)

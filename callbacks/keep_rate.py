"""Lightning callback that drives a token reducer's keep rate (and Evo-ViT's training mode) during
training: EViT's keep-rate warm-up (ICLR 2022, Sec. 4) and Evo-ViT's layer-to-stage switch
(AAAI 2022, Sec. 3.4)."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl

from accel.errors import UserInputError
from accel.reducers.base import check_keep_rate
from accel.schedules import SHAPES, keep_rate_at


class KeepRateSchedule(pl.Callback):
    """Set the module's keep rate (``pl_module.set_keep_rate``: the network and its EMA copy) before
    every training batch and log ``train/keep_rate``.

    The value is a function of the global step and of the settings below, so the callback keeps no
    state of its own: a resumed run (global step restored by Lightning, settings from the run's
    config) continues on the same curve. Validation uses the keep rate reached so far (as EViT's
    training loop evaluates). Epochs count optimizer steps (``pl_module.steps_per_epoch``), as the
    learning-rate warm-up does.

    Args:
        target: keep rate after the schedule (usually ``${keep_rate}``).
        start_epoch: epochs trained with every token before reduction starts.
        epochs: length of the transition (0 = jump to ``target`` at ``start_epoch``).
        shape: ``cosine`` (EViT), ``linear`` or ``step``.
        evo_stage_epoch: for Evo-ViT, the epoch from which stage-wise selection replaces
            layer-wise selection in training (200 in the paper's recipe); ``None`` leaves it alone.
    """

    def __init__(self, target: float, start_epoch: int = 10, epochs: int = 100, shape: str = "cosine",
                 evo_stage_epoch: Optional[int] = None) -> None:
        self.target = check_keep_rate(target)
        if shape not in SHAPES:
            raise UserInputError(f"keep-rate schedule shape={shape!r} is unknown; expected one of {SHAPES}.")
        if start_epoch < 0 or epochs < 0:
            raise UserInputError(f"keep-rate schedule start_epoch={start_epoch}, epochs={epochs}: expected values ≥ 0.")
        self.start_epoch, self.epochs, self.shape = int(start_epoch), int(epochs), shape
        self.evo_stage_epoch = evo_stage_epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before any training: a network that cannot follow the schedule (no reducer; ToMe with an
        # explicit r) refuses here in one sentence. on_train_start then sets the step's value.
        pl_module.set_keep_rate(self.target)
        end = self.start_epoch + self.epochs
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and end > trainer.max_epochs:
            raise UserInputError(f"The keep-rate schedule ends at epoch {end} (start_epoch={self.start_epoch} + "
                                 f"epochs={self.epochs}) but trainer.max_epochs={trainer.max_epochs}; "
                                 "expected start_epoch + epochs ≤ max_epochs.")
        if self.evo_stage_epoch is not None and pl_module.layerwise is None:
            raise UserInputError(f"The keep-rate schedule's evo_stage_epoch={self.evo_stage_epoch} switches Evo-ViT's "
                                 "layer-wise/stage-wise selection, but the model has no such mode; expected "
                                 "reducer=evo or an Evo-LeViT model, or evo_stage_epoch=null.")

    def value(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        return keep_rate_at(trainer.global_step, pl_module.steps_per_epoch, self.target, self.start_epoch,
                            self.epochs, self.shape)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run starts where the curve was at the restored step.
        pl_module.set_keep_rate(self.value(trainer, pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evo_stage_epoch is not None:
            pl_module.set_layerwise(trainer.current_epoch < self.evo_stage_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        keep_rate = self.value(trainer, pl_module)
        pl_module.set_keep_rate(keep_rate)
        pl_module.log("train/keep_rate", keep_rate, on_step=True, on_epoch=False, prog_bar=True)

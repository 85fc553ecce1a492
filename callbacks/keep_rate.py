"""Lightning callback that drives a token reducer's keep rate (and Evo-ViT's training mode) during
training: EViT's keep-rate warm-up (ICLR 2022, Sec. 4) and Evo-ViT's layer-to-stage switch
(AAAI 2022, Sec. 3.4)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl

from accel.errors import UserInputError
from accel.reducers.base import check_keep_rate
from accel.schedules import SHAPES, keep_rate_at


class KeepRateSchedule(pl.Callback):
    """Set ``module.net.set_keep_rate(r)`` before every training batch and log ``train/keep_rate``.

    The value is a function of the global step, so a resumed run continues on the same curve.
    Validation uses the keep rate reached so far (as EViT's training loop evaluates).

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
        self.current = 1.0

    @staticmethod
    def _net(module: pl.LightningModule):
        net = getattr(module, "net", None)
        if not hasattr(net, "set_keep_rate"):
            raise UserInputError("The keep-rate schedule needs a token reducer (reducer=evit|evo|tome); "
                                 "the model has none.")
        return net

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._net(pl_module)
        end = self.start_epoch + self.epochs
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and end > trainer.max_epochs:
            raise UserInputError(f"The keep-rate schedule ends at epoch {end} (start_epoch={self.start_epoch} + "
                                 f"epochs={self.epochs}) but trainer.max_epochs={trainer.max_epochs}; "
                                 "expected start_epoch + epochs ≤ max_epochs.")

    def value(self, trainer: pl.Trainer) -> float:
        ipe = max(int(trainer.num_training_batches) // max(trainer.accumulate_grad_batches, 1), 1)
        return keep_rate_at(trainer.global_step, ipe, self.target, self.start_epoch, self.epochs, self.shape)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._net(pl_module)
        reducer = getattr(net, "reducer", net)  # Evo-LeViT is its own reducer
        if self.evo_stage_epoch is not None and hasattr(reducer, "set_layerwise"):
            reducer.set_layerwise(trainer.current_epoch < self.evo_stage_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.current = self.value(trainer)
        self._net(pl_module).set_keep_rate(self.current)
        pl_module.log("train/keep_rate", self.current, on_step=True, on_epoch=False, prog_bar=True)

    def state_dict(self) -> Dict[str, Any]:
        return {"current": self.current, "target": self.target, "start_epoch": self.start_epoch,
                "epochs": self.epochs, "shape": self.shape}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.current = state_dict.get("current", self.current)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run starts where the curve was at the saved step.
        self.current = self.value(trainer)
        self._net(pl_module).set_keep_rate(self.current)

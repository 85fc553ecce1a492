"""The training progress bar: one line that fits an 80-column terminal, with the four numbers that say
how a run goes (loss, val top-1, keep rate, images per second) and nothing else."""
from __future__ import annotations

import time
from typing import Any, Dict

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn
from rich.progress import TextColumn, TimeRemainingColumn
from rich.table import Column


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar with its metrics chosen and named (``get_metrics``):
    ``loss`` (the training step's), ``val top-1`` (%), ``keep`` (the network's keep rate, when it
    reduces tokens) and ``img/s`` (training images per second of the whole job, this epoch). No
    ``v_num``: the run directory, not a logger version, names a run.

    Only values already on the host are shown: the loss and val top-1 come from Lightning's own
    progress-bar metrics (which it reads back for the bar anyway), the keep rate is a Python float on
    the module, and the images are counted from batch shapes against the host clock.

    The bar gives way on a narrow terminal: the text columns do not wrap, the bar is shortened instead.
    """

    def __init__(self, bar_width: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bar_width = bar_width
        self._images = 0
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def configure_columns(self, trainer: pl.Trainer) -> list:
        fixed = dict(table_column=Column(no_wrap=True))
        return [
            TextColumn("[progress.description]{task.description}", **fixed),
            CustomBarColumn(bar_width=self.bar_width, complete_style=self.theme.progress_bar,
                            finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            TimeRemainingColumn(compact=True, elapsed_when_finished=True, **fixed),
        ]

    def _init_progress(self, trainer: pl.Trainer) -> None:
        super()._init_progress(trainer)
        if self._metric_component is not None:
            # Rich narrows the widest column that may wrap; the metrics are to stay on one line.
            self._metric_component._table_column = Column(no_wrap=True, overflow="ellipsis")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._epoch_start = 0, time.perf_counter()
        self._last_batch_end = self._epoch_start
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += len(images) * trainer.world_size  # a shape, not a value: no read-back
        self._last_batch_end = time.perf_counter()  # validation time is not training time
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Dict[str, Any]:
        logged = trainer.progress_bar_metrics
        shown: Dict[str, Any] = {}
        loss = logged.get("train/loss_step", logged.get("train/loss"))
        if loss is not None:
            shown["loss"] = f"{float(loss):.3f}"
        if "val/acc1" in logged:
            shown["val top-1"] = f"{100 * float(logged['val/acc1']):.1f}%"
        keep_rate = getattr(pl_module, "keep_rate", None)
        if isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool):
            shown["keep"] = f"{keep_rate:.2f}"
        seconds = self._last_batch_end - self._epoch_start
        if self._images and seconds > 0:
            shown["img/s"] = f"{self._images / seconds:.0f}"
        return shown

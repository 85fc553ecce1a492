"""Lightning's model summary with the FLOPs counted (``Total FLOPs`` and the per-layer column), not 0."""
from __future__ import annotations

from typing import Any, List, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichModelSummary

from accel.flops import register_cpu_sdpa


class ModelSummary(RichModelSummary):
    """RichModelSummary that gives Lightning's FLOP counter one image at the data's size (Lightning counts
    only with an ``example_input_array``), with attention counted on CPUs too (accel.flops), so
    ``Total FLOPs`` is the forward's FLOPs per image at the configured keep rate: twice the GMACs that
    callbacks/model_stats.py logs. The example input is the summary's alone: it is removed again."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        size = getattr(trainer.datamodule, "image_size", None)
        if not size or pl_module.example_input_array is not None:
            return super().on_fit_start(trainer, pl_module)
        register_cpu_sdpa()
        pl_module.example_input_array = torch.zeros(1, 3, size, size)
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            pl_module.example_input_array = None

    @staticmethod
    def summarize(summary_data: List[Tuple[str, List[str]]], *args: Any, **kwargs: Any) -> None:
        # The example input adds its In/Out sizes columns, which would widen the table past 80 columns.
        kept = [(name, values) for name, values in summary_data if name not in ("In sizes", "Out sizes")]
        RichModelSummary.summarize(kept, *args, **kwargs)

"""Log what the token reducer keeps, fuses and merges on a fixed set of validation images: EViT's
kept patches per reduction block, Evo-ViT's (and Evo-LeViT's) global class attention and kept set,
ToMe's merge groups (papers' Fig. "visualisation of token selection"). To W&B as images, to TensorBoard with
``add_image``, and otherwise as PNG files in the run directory."""
from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from accel.visualize import denormalize, grid_image, panels


class TokenSelectionLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, draw the reducer's selection for ``num_images``
    fixed validation images (the first ones of the val set)."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 6, dirname: str = "token_selection") -> None:
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self.num_images = int(num_images)
        self.dirname = dirname
        self.images: Optional[torch.Tensor] = None
        self.written: list[str] = []

    def _fixed_images(self, trainer: pl.Trainer) -> torch.Tensor:
        if self.images is None:
            dataset = trainer.datamodule.val_set
            step = max(len(dataset) // self.num_images, 1)  # spread over classes in a sorted folder
            self.images = torch.stack([dataset[i * step][0] for i in range(self.num_images)])
        return self.images

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.reduces_tokens or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        hp = getattr(trainer.datamodule, "hparams", {})
        mean, std = hp.get("mean", (0.485, 0.456, 0.406)), hp.get("std", (0.229, 0.224, 0.225))
        images = self._fixed_images(trainer).to(pl_module.device)
        # The validation loop's eval mode and no-grad hold here; trace only this forward.
        was_tracing = pl_module.tracing
        pl_module.set_tracing(True)
        try:
            pl_module(images)
            selections = pl_module.selections
        finally:
            pl_module.set_tracing(was_tracing)
        picture = grid_image(panels(denormalize(images, mean, std), selections))
        key = f"{self.dirname}/epoch_{trainer.current_epoch:03d}"
        logged = False
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key=self.dirname, images=[picture], step=trainer.global_step,
                             caption=[f"epoch {trainer.current_epoch}, keep rate {pl_module.keep_rate:g}"])
                logged = True
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image(self.dirname, picture, trainer.global_step, dataformats="HWC")
                logged = True
        if not logged:
            out = os.path.join(trainer.default_root_dir, f"{key}.png")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            Image.fromarray(picture).save(out)
            self.written.append(out)

"""Log what the token reducer keeps, fuses and merges on a fixed set of validation images: EViT's
kept patches per reduction block, Evo-ViT's (and Evo-LeViT's) global class attention and kept set,
ToMe's merge groups (papers' Fig. "visualisation of token selection"), each panel titled (block, tokens
kept or left; the image's label and prediction) with a legend. To W&B as captioned images at the
training step (the media slider steps through the epochs), to TensorBoard with ``add_image``, and
otherwise as PNG files in the run directory."""
from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from accel.heads import Heads
from accel.visualize import caption, denormalize, selection_figure, to_array


class TokenSelectionLogger(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, draw the reducer's selection for ``num_images``
    fixed validation images (the first ones of the val set)."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 6, dirname: str = "token_selection") -> None:
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self.num_images = int(num_images)
        self.dirname = dirname
        self.images: Optional[torch.Tensor] = None
        self.labels: list = []
        self.class_names: Optional[list] = None   # ImageFolder's, where the val set has them
        self.written: list[str] = []

    def _fixed_images(self, trainer: pl.Trainer) -> torch.Tensor:
        if self.images is None:
            dataset = trainer.datamodule.val_set
            step = max(len(dataset) // self.num_images, 1)  # spread over classes in a sorted folder
            samples = [dataset[i * step] for i in range(self.num_images)]
            self.images = torch.stack([x for x, _ in samples])
            self.class_names = getattr(dataset, "classes", None)
            self.labels = [self._name(int(y)) for _, y in samples]
        return self.images

    def _name(self, index: int):
        return self.class_names[index] if self.class_names else index

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
            logits = Heads.of(pl_module(images)).eval_logits()
            selections = pl_module.selections
        finally:
            pl_module.set_tracing(was_tracing)
        preds = [self._name(p) for p in logits.argmax(-1).tolist()]
        title = (f"epoch {trainer.current_epoch}, step {trainer.global_step}, keep rate {pl_module.keep_rate:g}")
        fig = selection_figure(denormalize(images, mean, std), selections,
                               [caption(None, p, label) for p, label in zip(preds, self.labels)], title)
        picture = to_array(fig)
        key = f"{self.dirname}/epoch_{trainer.current_epoch:03d}"
        logged = False
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key=self.dirname, images=[picture], step=trainer.global_step, caption=[title])
                logged = True
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image(self.dirname, picture, trainer.global_step, dataformats="HWC")
                logged = True
        if not logged:
            out = os.path.join(trainer.default_root_dir, f"{key}.png")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            fig.savefig(out)
            self.written.append(out)

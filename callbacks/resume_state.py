"""What a Lightning checkpoint does not hold but a resumed run needs: the random-number generators'
states and the W&B run id (so the resumed run continues the same W&B run)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import pytorch_lightning as pl
# Lightning's own collectors (torch, CUDA, NumPy, Python), as its spawn launcher uses them.
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.loggers import WandbLogger

WANDB_ID_KEY = "wandb_run_id"


def wandb_run_id(checkpoint: Dict[str, Any]) -> Optional[str]:
    """The W&B run id stored in a checkpoint written with :class:`ResumeState`, if any."""
    return checkpoint.get(WANDB_ID_KEY)


class ResumeState(pl.Callback):
    """Stores the RNG states and the W&B run id in every checkpoint and restores the RNG states on
    resume. The checkpoint is written by global rank 0; every rank restores those states (with
    ``seed_everything`` all ranks start from the same seed, so their streams coincide)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=True)
        # NumPy's state holds an ndarray; as plain lists the checkpoint still loads with weights_only=True.
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]
        checkpoint["rng_states"] = states
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                checkpoint[WANDB_ID_KEY] = lg.version

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            name, keys, pos, has_gauss, gauss = states["numpy"]
            _set_rng_states({**states, "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)})

"""Test-only callbacks for tests/test_recipes_ddp.py, loaded into `python train.py` runs through
`+callbacks.<name>._target_=ddp_probes.<Class>` with tests/ on PYTHONPATH: each rank writes what it
evaluated and what it restored, for the test to read after the processes have ended."""
from __future__ import annotations

import json
import os

import pytorch_lightning as pl
import torch


class RecordEvalSamplers(pl.Callback):
    """Write the dataset indices each rank evaluates to ``<out>/<stage>_rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _record(self, trainer: pl.Trainer, stage: str, loaders) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"{stage}_rank{trainer.global_rank}.json"), "w") as f:
            json.dump([int(i) for i in loaders.sampler], f)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val", trainer.val_dataloaders)

    def on_test_start(self, trainer, pl_module) -> None:
        self._record(trainer, "test", trainer.test_dataloaders)


class RecordEmaAtTrainStart(pl.Callback):
    """Save the EMA copy's state as training starts (after a resume restored it) to
    ``<out>/ema_step<global step>_rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        os.makedirs(self.out, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.ema.state_dict().items()}
        torch.save(state, os.path.join(self.out, f"ema_step{trainer.global_step}_rank{trainer.global_rank}.pt"))


class RecordTrainStart(pl.Callback):
    """Write, as training starts, this rank's world size and training sampler to
    ``<out>/train_start_step<global step>_rank<r>.json`` (one file per launch and rank: both
    processes of each launch trained)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        os.makedirs(self.out, exist_ok=True)
        record = {"world": trainer.world_size, "sampler": type(trainer.train_dataloader.sampler).__name__}
        with open(os.path.join(self.out, f"train_start_step{trainer.global_step}_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)

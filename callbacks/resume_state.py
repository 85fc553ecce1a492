"""What a Lightning checkpoint does not hold but a resumed run needs: the random-number generators'
states and the W&B run id (so the resumed run continues the same W&B run); and the checkpoint
callbacks' paths rebased when the run directory was moved or copied."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import pytorch_lightning as pl
# Lightning's own collectors (torch, CUDA, NumPy, Python), as its spawn launcher uses them.
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import ModelCheckpoint
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
        rebase_checkpoint_paths(trainer, checkpoint)
        states = checkpoint.get("rng_states")
        if states:
            name, keys, pos, has_gauss, gauss = states["numpy"]
            _set_rng_states({**states, "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)})


def rebase_checkpoint_paths(trainer: pl.Trainer, checkpoint: Dict[str, Any]) -> None:
    """Point the saved ModelCheckpoint states (best, k-th best, last and top-k paths, ``dirpath``) at
    the callbacks' directories of this launch when the run directory was moved or copied, so that the
    best checkpoint is found (and tested), and kept or replaced by score as in the original place.
    Lightning restores these states only when ``dirpath`` is unchanged, except ``best_model_path``,
    which then names a file in the old place. A state is rebased only when the files it names exist
    in the new place (the same run, moved), not when a checkpoint of another run seeds a new one."""
    states = checkpoint.get("callbacks") or {}
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        state = states.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
        old, new = (state or {}).get("dirpath"), callback.dirpath if state else None
        if not old or not new or os.path.abspath(old) == os.path.abspath(new):
            continue

        def moved(path: str) -> str:
            return os.path.join(new, os.path.relpath(path, old)) if path and path.startswith(old + os.sep) else path
        named = [p for p in [state.get("best_model_path"), state.get("last_model_path"),
                             *state.get("best_k_models", {})] if p]
        if not named or not all(os.path.isfile(moved(p)) for p in named):
            continue
        state["dirpath"] = new
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key):
                state[key] = moved(state[key])
        state["best_k_models"] = {moved(p): v for p, v in state.get("best_k_models", {}).items()}

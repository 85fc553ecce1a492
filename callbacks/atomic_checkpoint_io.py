"""Checkpoint writing that never leaves a partial file under a checkpoint's name.

Lightning's own ``_atomic_save`` stages the bytes in the system temp directory and moves them into
place; when that directory is on another file system than the run directory (``/tmp`` on a node,
the run on NFS/Lustre), the move is a copy into the final name, so a kill during the copy leaves a
truncated ``last.ckpt`` where a good one was. This plugin writes next to the target and renames.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from accel.atomic import atomic_path, leftovers


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden temporary in the checkpoint's own directory, ``fsync``, then
    ``os.replace`` onto the final name (:func:`accel.atomic.atomic_path`): readers and a resumed run
    see the old checkpoint or the new one, never a mixture."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        # A temporary left by a process killed mid-write (SIGKILL) is garbage; only global rank 0
        # writes a given checkpoint, so no other writer can own one.
        for stale in leftovers(path):
            os.remove(stale)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

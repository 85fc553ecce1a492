"""Save ``last.ckpt`` when the job is told to stop (SIGTERM, SIGUSR1), then let it exit cleanly.

Lightning already turns SIGTERM into a stop at a consistent point: its signal connector sets
``trainer.received_sigterm`` (and forwards the signal to DDP workers), and the loops raise
``SIGTERMException`` after the current training batch, on every rank at the same batch. This
callback only adds the save (on that exception alone, not on crashes, whose state may be broken)
and routes SIGUSR1 the same way when nothing else owns it. Under SLURM, SIGUSR1 belongs to
Lightning's ``SLURMEnvironment`` (auto-requeue), so it is left alone there.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _sigusr1_as_sigterm(signum: int, frame: Any) -> None:
    # Re-deliver as SIGTERM so that Lightning's handler (stop at the batch end, tell DDP workers) runs.
    os.kill(os.getpid(), signal.SIGTERM)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (or SIGUSR1 outside SLURM), write ``<dirpath>/<filename>.ckpt`` after the training
    batch in flight, then exit with the state of that batch: global step, optimizer, LR scheduler,
    EMA, callbacks (keep rate, RNG, W&B run id) — everything a resume needs.

    Args:
        dirpath: checkpoint directory (the run's ``checkpoints/``).
        filename: name without ``.ckpt``; ``last`` so that a resume finds it like the periodic one.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = os.path.join(dirpath, filename + ".ckpt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has registered its handlers by now and restores the previous ones at teardown,
        # which removes this one too. An occupied SIGUSR1 (SLURM auto-requeue, NCCL, the user's own)
        # is not touched: that is the signal-handling fight this avoids.
        if not SLURMEnvironment.detect() and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, _sigusr1_as_sigterm)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning("Stopped by a signal at global step %d; saved %s. Resume with ckpt_path=last in the same run "
                        "directory (hydra.run.dir=%s).", trainer.global_step, self.path,
                        os.path.dirname(os.path.dirname(self.path)))

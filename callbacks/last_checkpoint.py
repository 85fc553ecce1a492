"""``checkpoints/last.ckpt``, the file a resume starts from, written by one callback on three triggers:
the end of every epoch, every N training steps, and a stop by signal (SIGTERM, SIGUSR1, Ctrl-C).

Lightning already turns SIGTERM into a stop at a consistent point: its signal connector sets
``trainer.received_sigterm`` (and forwards the signal to DDP workers), and the loops raise
``SIGTERMException`` after the current training batch, on every rank at the same batch. This
callback adds the save (on that exception alone, not on crashes, whose state may be broken) and
routes SIGUSR1 the same way when nothing else owns it. Under SLURM, SIGUSR1 belongs to
Lightning's ``SLURMEnvironment`` (auto-requeue), so it is left alone there. The first Ctrl-C (SIGINT)
takes the SIGTERM path too, instead of a KeyboardInterrupt that would drop the work since the last
save; a second Ctrl-C stops at once. Every stop that leaves a checkpoint prints the resume command.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _sigusr1_as_sigterm(signum: int, frame: Any) -> None:
    # Re-deliver as SIGTERM so that Lightning's handler (stop at the batch end, tell DDP workers) runs.
    os.kill(os.getpid(), signal.SIGTERM)


def _sigint_as_sigterm(signum: int, frame: Any) -> None:
    # A second Ctrl-C is Python's KeyboardInterrupt again: the user asked to stop now, without the save.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log.warning("Ctrl-C: stopping after the training batch in flight and saving a checkpoint "
                "(press Ctrl-C again to stop at once without saving).")
    os.kill(os.getpid(), signal.SIGTERM)


def resume_command(run_dir: str) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"python train.py ckpt_path=last hydra.run.dir={run_dir}"


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` after every epoch, every ``every_n_train_steps`` training steps, and after
    the training batch in flight when SIGTERM, Ctrl-C (or SIGUSR1 outside SLURM) stops the run, which
    then exits with the state of that batch: global step, optimizer, LR scheduler, EMA, callbacks
    (keep rate, RNG, W&B run id) — everything a resume needs. One file, overwritten in place (written
    beside and renamed by the trainer's checkpoint IO), at most once per global step.

    Args:
        dirpath: checkpoint directory (the run's ``checkpoints/``).
        every_n_train_steps: also save every this many steps (mid-epoch); 0 or None: only at epoch ends.
        filename: name without ``.ckpt``; ``last`` is where a resume looks.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = 500, filename: str = "last") -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, save_last=False,
                         every_n_train_steps=every_n_train_steps or 0, enable_version_counter=False)
        # ModelCheckpoint accepts one trigger (steps or epochs) in its constructor; its saving hooks
        # handle both at once (each checks its own trigger, and a step already saved is not saved twice).
        self._every_n_epochs = 1
        self.path = os.path.join(self.dirpath, filename + self.FILE_EXTENSION)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning has registered its handlers by now and restores the previous ones at teardown,
        # which removes these too. An occupied SIGUSR1 (SLURM auto-requeue, NCCL, the user's own)
        # is not touched: that is the signal-handling fight this avoids.
        if not SLURMEnvironment.detect() and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, _sigusr1_as_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _sigint_as_sigterm)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        stopped = isinstance(exception, SIGTERMException)
        if stopped and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        if not trainer.is_global_zero:
            return
        # Imported here: pipeline imports this module.
        from pipeline import newest_run_checkpoint
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(self.path)))
        found = newest_run_checkpoint(run_dir)
        if found:
            what = f"Stopped by a signal at global step {trainer.global_step}; saved {self.path}" if stopped else \
                f"Training stopped ({type(exception).__name__}); the newest checkpoint is {found}"
            log.warning("%s. Resume with: %s", what, resume_command(run_dir))

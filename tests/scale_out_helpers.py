"""Test-only callbacks for tests/test_scale_out.py and tests/test_resume.py, loaded into
`python train.py` runs through `+callbacks.<name>._target_=scale_out_helpers.<Class>` with tests/ on
PYTHONPATH, and the launcher that pauses such a run for a signal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytorch_lightning as pl

from conftest import child_env


class PauseAtStep(pl.Callback):
    """After training step ``step``, write ``marker`` and wait (up to a minute) for a signal, so that
    a test can send SIGTERM from outside at a known point in the middle of an epoch."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        open(self.marker, "w").write(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class RecordSampler(pl.Callback):
    """Write each rank's training sampler (class and the indices of epoch 0) to ``<out>/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        sampler.set_epoch(0)
        record = {"type": type(sampler).__name__, "indices": [int(i) for i in sampler],
                  "world": trainer.world_size, "batches": trainer.num_training_batches}
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


TESTS = os.path.dirname(os.path.abspath(__file__))


def start_paused(args, step, marker, env_extra=None) -> subprocess.Popen:
    """``python train.py *args``, paused after training step ``step`` (waiting for a signal); its
    stdout goes to ``<marker>.stdout`` (a pipe nobody reads could fill up and block the run)."""
    stdout = open(f"{marker}.stdout", "w")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "+callbacks.pause._target_=scale_out_helpers.PauseAtStep",
                             f"+callbacks.pause.step={step}", f"+callbacks.pause.marker={marker}"],
                            cwd=os.path.dirname(TESTS),
                            env=child_env(PYTHONPATH=TESTS, WANDB_MODE="offline", **(env_extra or {})),
                            stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(marker), proc.stderr.read()[-3000:] if proc.poll() is not None else "no pause"
    return proc

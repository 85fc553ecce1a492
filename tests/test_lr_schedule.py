"""The learning rate the optimizer uses: DeiT's linear scaling (lr × batch × world × accumulate /
lr_base_batch) and a warm-up counted in epochs of optimizer steps, whatever ends the run (max_epochs
or max_steps). Read from LearningRateMonitor's log, i.e. what the optimizer actually ran with."""
import csv
import math
import os

import pytest

from conftest import FAST, make_cfg
from pipeline import run

RUN = [*FAST, "trainer.max_epochs=30", "trainer.limit_val_batches=1", "test=false", "trainer.log_every_n_steps=1",
       "callbacks.model_checkpoint.save_top_k=0"]


def logged_lrs(out_dir):
    """The learning rate of each optimizer step (LearningRateMonitor, logging_interval=step; both
    parameter groups, with and without weight decay, run at the same rate)."""
    rows = csv.DictReader(open(os.path.join(out_dir, "csv", "metrics.csv")))
    by_step = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.parametrize("accumulate, batches, steps_per_epoch", [(1, 4, 4), (2, 3, 2)])
def test_warmup_lasts_its_epochs_when_max_steps_ends_the_run(tmp_path, accumulate, batches, steps_per_epoch):
    # One warm-up epoch of a run that max_steps ends long before max_epochs=30. With accumulation an
    # epoch of 3 batches has ceil(3 / 2) = 2 optimizer steps (Lightning steps on the partial one).
    total = 6
    cfg = make_cfg(tmp_path, [*RUN, f"trainer.max_steps={total}", f"trainer.limit_train_batches={batches}",
                              f"trainer.accumulate_grad_batches={accumulate}", "module.warmup_epochs=1"])
    run(cfg)
    m = cfg.module
    base = m.lr * m.batch_size * accumulate / m.lr_base_batch
    init, floor = m.scheduler.warmup_lr_init, m.scheduler.lr_min
    lrs = logged_lrs(tmp_path)
    assert len(lrs) == total
    warmup = steps_per_epoch
    assert lrs[:warmup] == pytest.approx([init + t * (base - init) / warmup for t in range(warmup)])
    # Then timm's cosine of the whole run's steps (DeiT's schedule: the warm-up is not a prefix).
    assert lrs[warmup:] == pytest.approx([floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / total))
                                          for t in range(warmup, total)])


def test_lr_is_scaled_by_gradient_accumulation(tmp_path):
    cfg = make_cfg(tmp_path, [*RUN, "trainer.max_steps=1", "trainer.limit_train_batches=2",
                              "trainer.accumulate_grad_batches=2", "module.warmup_epochs=0"])
    run(cfg)
    m = cfg.module
    # digits: 8e-3 × 64 × 1 process × 2 batches per step / 512 = 2e-3
    assert logged_lrs(tmp_path) == [pytest.approx(m.lr * m.batch_size * 2 / m.lr_base_batch)]
    assert logged_lrs(tmp_path) == [pytest.approx(2e-3)]

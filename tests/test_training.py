"""Training through pipeline.run: fits, resumes, evaluates, schedules, EMA."""
import csv
import math
import glob
import os

import pytest
import torch

from conftest import FAST, QUIET, make_cfg
from pipeline import run


def read_metrics(out_dir):
    rows = list(csv.DictReader(open(os.path.join(out_dir, "csv", "metrics.csv"))))
    return rows


def test_fast_dev_run_on_digits_runs_one_batch_and_writes_no_checkpoint(tmp_path):
    metrics = run(make_cfg(tmp_path, ["debug=fdr", *FAST]))
    # The final evaluation reads the validation split (digits has no other labelled split) with the
    # weights just trained, no checkpoint being saved: named last/val_*, the same single batch of 64,
    # the same loss and accuracy.
    assert metrics["last/val_loss"] == metrics["val/loss"] and metrics["last/val_acc1"] == metrics["val/acc1"]
    assert (metrics["last/val_acc1"] * 64).is_integer()
    assert not any(k.startswith(("test/", "best/")) for k in metrics)
    assert not glob.glob(str(tmp_path / "checkpoints" / "*")), "fast_dev_run writes no checkpoint"
    assert "name: deit_tiny_patch16_224" in open(tmp_path / "config_tree.log").read(), "the resolved config is saved"


def test_fast_dev_run_on_synthetic(tmp_path):
    metrics = run(make_cfg(tmp_path, ["debug=fdr", "data=synthetic", "data.image_size=32", "data.num_classes=5",
                                      "model=deit_t", *FAST]))
    assert "last/val_acc1" in metrics


def test_short_run_learns_digits_and_logs_throughput(tmp_path):
    cfg = make_cfg(tmp_path, [*QUIET, "trainer.max_epochs=3", "module.warmup_epochs=1"])
    metrics = run(cfg)
    # 10 classes: chance is 0.1; three epochs of the default model and recipe get well beyond it.
    # The final evaluation scores the checkpoint selected on the validation split, on that split.
    assert metrics["best/val_acc1"] > 0.5 and "best/val_loss" in metrics
    rows = read_metrics(tmp_path)
    speeds = [float(r["train/images_per_sec"]) for r in rows if r.get("train/images_per_sec")]
    assert len(speeds) == 3 and min(speeds) > 0
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")


def test_resume_continues_from_saved_step_with_optimizer_scheduler_and_ema(tmp_path):
    common = [*FAST, "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "test=false",
              "module.ema_decay=0.9", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
              "callbacks.model_checkpoint.save_top_k=-1"]
    whole = tmp_path / "whole"
    run(make_cfg(whole, common))
    first_epoch = whole / "checkpoints" / "epoch_000.ckpt"
    ckpt = torch.load(first_epoch, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"][0]["state"], "optimizer moments are saved"

    resumed_dir = tmp_path / "resumed"
    run(make_cfg(resumed_dir, [*common, f"ckpt_path={first_epoch}"]))
    resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 8 and resumed["epoch"] == 1

    def lr_by_step(out):
        return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in read_metrics(out) if r.get("lr-AdamW/pg1")}
    whole_lr, resumed_lr = lr_by_step(whole), lr_by_step(resumed_dir)
    assert min(resumed_lr) == 4, "the resumed run starts at the saved step"
    assert resumed_lr == pytest.approx({s: lr for s, lr in whole_lr.items() if s >= 4}), \
        "the LR schedule continues on the uninterrupted run's curve"
    # EMA weights continue from the saved EMA, not from a fresh copy of the network.
    ema_key = next(k for k in resumed["state_dict"] if k.startswith("ema.") and k.endswith("head.weight"))
    net_key = ema_key.replace("ema.module.", "net.")
    assert not torch.equal(resumed["state_dict"][ema_key], resumed["state_dict"][net_key])
    assert any(r.get("val/ema_acc1") for r in read_metrics(resumed_dir))


def test_evaluate_checkpoint_without_training(tmp_path):
    trained = tmp_path / "trained"
    m1 = run(make_cfg(trained, [*FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=3"]))
    best = glob.glob(str(trained / "checkpoints" / "epoch_*.ckpt"))[0]
    m2 = run(make_cfg(tmp_path / "eval", [*FAST, "train=false", f"ckpt_path={best}"]))
    # Evaluating a given checkpoint is named eval/, not best/: nothing was selected in this launch.
    assert m2["eval/val_acc1"] == pytest.approx(m1["best/val_acc1"])
    assert not any(k.startswith(("test/", "best/")) for k in m2)
    assert not os.path.exists(tmp_path / "eval" / "checkpoints")


def test_learning_rate_is_scaled_and_warmed_up_per_iteration(tmp_path):
    cfg = make_cfg(tmp_path, [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=5",
                              "trainer.limit_val_batches=1", "test=false", "module.lr=0.004",
                              "module.warmup_epochs=1", "data.batch_size=32", "trainer.log_every_n_steps=1"])
    run(cfg)
    rows = read_metrics(tmp_path)
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    peak, warm, total, lr_min = 0.004 * 32 / 512, 5, 10, 1e-5

    def expected(t):  # timm CosineLRScheduler, stepped per iteration, as DeiT (warm-up inside the cosine)
        if t < warm:
            return 1e-6 + t * (peak - 1e-6) / warm
        return lr_min + 0.5 * (peak - lr_min) * (1 + math.cos(math.pi * t / total))
    assert lrs == pytest.approx([expected(t) for t in range(total)], rel=1e-6)


@pytest.mark.parametrize("reducer", ["evit reducer.locations=[0,1]", "evo reducer.start=1 reducer.stages=[1]", "tome reducer.r=null"])
def test_fast_dev_run_with_each_reducer(tmp_path, reducer):
    name, *extra = reducer.split()
    metrics = run(make_cfg(tmp_path, ["debug=fdr", *FAST, f"reducer={name}", "keep_rate=0.5", *extra]))
    assert "last/val_acc1" in metrics

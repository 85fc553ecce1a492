"""Keep-rate schedules: EViT's per-iteration cosine, resume on the same curve, Evo-ViT's switch."""
import csv
import math
import os

import pytest
import torch

from accel.errors import UserInputError
from accel.schedules import keep_rate_at
from callbacks.keep_rate import KeepRateSchedule
from conftest import FAST, make_cfg
from pipeline import build, run
from pytorch_lightning import Callback


def test_evit_schedule_values():
    # The released recipe: 1 for 10 epochs, cosine to 0.7 over 100 epochs, then 0.7 (1000 iters/epoch).
    kr = lambda it: keep_rate_at(it, 1000, 0.7, start_epoch=10, epochs=100)  # noqa: E731
    assert kr(0) == 1.0 and kr(9_999) == 1.0
    assert kr(10_000) == pytest.approx(1.0)
    assert kr(60_000) == pytest.approx(0.85)          # half-way down the cosine
    assert kr(35_000) == pytest.approx(0.7 + 0.3 * (math.cos(math.pi / 4) + 1) / 2)
    assert kr(110_000) == 0.7 and kr(299_999) == 0.7
    assert keep_rate_at(60_000, 1000, 0.7, 10, 100, shape="linear") == pytest.approx(0.85)
    assert keep_rate_at(10_000, 1000, 0.7, 10, 100, shape="step") == 0.7
    assert keep_rate_at(5, 10, 0.7, start_epoch=0, epochs=0) == 0.7   # fine-tuning: target from the start


def keep_rates(out_dir):
    rows = csv.DictReader(open(os.path.join(out_dir, "csv", "metrics.csv")))
    return {int(r["step"]): float(r["train/keep_rate"]) for r in rows if r.get("train/keep_rate")}


SCHEDULED = [*FAST, "reducer=evit", "reducer.locations=[0,1]", "keep_rate=0.5", "callbacks=keep_rate",
             "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
             "callbacks.keep_rate_schedule.start_epoch=1", "callbacks.keep_rate_schedule.epochs=1",
             "trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
             "trainer.log_every_n_steps=1", "test=false", "callbacks.model_checkpoint.save_top_k=-1"]


def test_schedule_in_training_and_after_resume(tmp_path):
    whole = tmp_path / "whole"
    run(make_cfg(whole, SCHEDULED))
    got = keep_rates(whole)
    expected = {s: 1.0 for s in range(4)}
    expected.update({s: 0.5 + 0.5 * (math.cos(math.pi * (s - 4) / 4) + 1) / 2 for s in range(4, 8)})
    expected.update({s: 0.5 for s in range(8, 12)})
    assert got == pytest.approx(expected)
    ckpt = torch.load(whole / "checkpoints" / "epoch_001.ckpt", map_location="cpu", weights_only=True)
    assert any("KeepRateSchedule" in k for k in ckpt["callbacks"])

    resumed = tmp_path / "resumed"
    run(make_cfg(resumed, [*SCHEDULED, f"ckpt_path={whole / 'checkpoints' / 'epoch_000.ckpt'}"]))
    assert keep_rates(resumed) == pytest.approx({s: v for s, v in expected.items() if s >= 4})


def test_schedule_longer_than_training_is_rejected(tmp_path):
    cfg = make_cfg(tmp_path, [*SCHEDULED, "callbacks.keep_rate_schedule.epochs=5"])
    with pytest.raises(UserInputError, match=r"ends at epoch 6 \(start_epoch=1 \+ epochs=5\) but trainer.max_epochs=3"):
        run(cfg)


def test_schedule_without_reducer_is_rejected(tmp_path):
    cfg = make_cfg(tmp_path, [*FAST, "callbacks=keep_rate", "debug=fdr"])
    with pytest.raises(UserInputError, match="needs a token reducer"):
        run(cfg)


def test_evo_switches_from_layerwise_to_stagewise(tmp_path):
    cfg = make_cfg(tmp_path, [*FAST, "reducer=evo", "reducer.start=1", "reducer.stages=[1]", "keep_rate=0.5",
                              "callbacks=keep_rate", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
                              "callbacks.keep_rate_schedule.start_epoch=0", "callbacks.keep_rate_schedule.epochs=0",
                              "callbacks.keep_rate_schedule.evo_stage_epoch=1", "trainer.max_epochs=2",
                              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"])
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, pl_module.net.reducer.layerwise))
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(Spy())
    trainer.fit(module, datamodule=datamodule)
    assert seen == [(0, True), (0, True), (1, False), (1, False)]


def test_bad_schedule_settings():
    with pytest.raises(UserInputError, match="shape='exp' is unknown"):
        KeepRateSchedule(0.7, shape="exp")
    with pytest.raises(UserInputError, match=r"keep_rate=1.7 is outside"):
        KeepRateSchedule(1.7)

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


def test_evo_switches_from_layerwise_to_stagewise_in_the_network_and_its_ema(tmp_path):
    cfg = make_cfg(tmp_path, [*FAST, "reducer=evo", "reducer.start=1", "reducer.stages=[1]", "keep_rate=0.5",
                              "callbacks=keep_rate", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
                              "callbacks.keep_rate_schedule.start_epoch=0", "callbacks.keep_rate_schedule.epochs=0",
                              "callbacks.keep_rate_schedule.evo_stage_epoch=1", "trainer.max_epochs=2",
                              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                              "module.ema_decay=0.9"])
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, pl_module.net.reducer.layerwise, pl_module.ema.module.reducer.layerwise))
    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(Spy())
    trainer.fit(module, datamodule=datamodule)
    assert seen == [(0, True, True), (0, True, True), (1, False, False), (1, False, False)]


def test_ema_is_validated_at_the_scheduled_keep_rate(tmp_path):
    # val/ema_acc1 and val/acc1 must measure the same thing: the EMA copy follows the schedule too.
    seen = []

    class Spy(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append((pl_module.net.keep_rate, pl_module.ema.module.keep_rate))
    datamodule, module, trainer = build(make_cfg(tmp_path, [*SCHEDULED, "module.ema_decay=0.9"]))
    trainer.callbacks.append(Spy())
    trainer.fit(module, datamodule=datamodule)
    # Validation after epochs 0, 1, 2 sees the keep rate of their last step (3, 7, 11).
    last = [1.0, 0.5 + 0.5 * (math.cos(math.pi * 3 / 4) + 1) / 2, 0.5]
    assert seen == [pytest.approx((r, r)) for r in last]


@pytest.mark.parametrize("model", ["evo_deit_t", "evo_levit_128s"])
def test_module_sets_keep_rate_and_selection_mode_of_network_and_ema(tmp_path, model):
    import hydra
    cfg = make_cfg(tmp_path, [f"model={model}", "data=synthetic", "data.image_size=64", "data.num_classes=10",
                              "module.ema_decay=0.99"])
    module = hydra.utils.instantiate(cfg.module)
    module.set_keep_rate(0.7)
    module.set_layerwise(True)
    assert module.keep_rate == module.ema.module.keep_rate == 0.7
    assert module.layerwise is module.ema.module.layerwise is True
    module.set_layerwise(False)
    assert module.layerwise is module.ema.module.layerwise is False


def test_schedule_refuses_at_fit_start_a_reducer_that_cannot_follow_it(tmp_path):
    # ToMe with an explicit r cannot merge to a keep rate: refused before the first step, not when the
    # schedule first goes below 1 (start_epoch=1).
    tome = [o for o in SCHEDULED if not o.startswith(("reducer", "keep_rate"))]
    cfg = make_cfg(tmp_path, [*tome, "reducer=tome", "reducer.r=2", "callbacks.keep_rate_schedule.target=0.5"])
    datamodule, module, trainer = build(cfg)
    with pytest.raises(UserInputError, match="explicit r fixes how many tokens merge"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_stage_switch_without_evo_vit_is_rejected(tmp_path):
    cfg = make_cfg(tmp_path, [*SCHEDULED, "callbacks.keep_rate_schedule.evo_stage_epoch=1"])
    with pytest.raises(UserInputError, match=r"evo_stage_epoch=1 switches Evo-ViT's layer-wise/stage-wise selection, but the model has no such mode"):
        run(cfg)


def test_bad_schedule_settings():
    with pytest.raises(UserInputError, match="shape='exp' is unknown"):
        KeepRateSchedule(0.7, shape="exp")
    with pytest.raises(UserInputError, match=r"keep_rate=1.7 is outside"):
        KeepRateSchedule(1.7)

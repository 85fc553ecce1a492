"""Every config in conf/ composes and its objects instantiate (no training)."""
import os

import hydra
import pytest
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from accel.heads import Heads
from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from conftest import CONF, make_cfg, write_jpeg_folder
from pipeline import build, instantiate_list


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds_a_classifier(tmp_path, model):
    small = [] if model == "vit_digits" else ["data=synthetic", "data.image_size=32", "data.num_classes=7"]
    if model.startswith("tome"):
        small.append("reducer.r=1")  # 32 px → 4 patches: r=13 cannot be merged
    if model.startswith("slide_swin"):
        small[1] = "data.image_size=64"  # Swin: patch 4 and three merges
    cfg = make_cfg(tmp_path, [f"model={model}", *small])
    module = hydra.utils.instantiate(cfg.module).eval()
    size = cfg.data.image_size
    with torch.no_grad():
        out = module(torch.randn(2, 3, size, size))
    assert out.shape == (2, cfg.data.num_classes)
    train_out = module.train()(torch.randn(2, 3, size, size))   # a training step's forward and backward
    sum(h.float().mean() for h in Heads.of(train_out).tensors()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# What each trainer config gives (README "Config groups"): strategy, processes per node, precision,
# synchronised BatchNorm. gpu and ddp are instantiated on one device (a CPU where there is no GPU).
TRAINERS = {"default": (SingleDeviceStrategy, 1, "32-true", False),
            "cpu": (SingleDeviceStrategy, 1, "32-true", False),
            "gpu": (SingleDeviceStrategy, 1, "bf16-mixed", False),
            "ddp": (DDPStrategy, 4, "bf16-mixed", True),
            "ddp_sim": (DDPStrategy, 2, "32-true", False)}


def test_trainer_table_covers_every_trainer_config():
    assert sorted(TRAINERS) == options("trainer")


@pytest.mark.parametrize("model, params", [("slide_swin_t", 28_348_834), ("slide_pvt_v2_b1", 13_005_406)])
def test_slide_model_configs_build_the_documented_networks(tmp_path, model, params):
    """At ImageNet's 1000 classes and 224 px: the Slide-Swin-T reference model's count, and Slide-PVTv2-B1
    as the README gives it (paper 13.0M)."""
    net = hydra.utils.instantiate(make_cfg(tmp_path, [f"model={model}", "data=synthetic"]).module).net
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_gives_its_strategy_and_writes_checkpoints_atomically(tmp_path, trainer):
    strategy, devices, precision, sync_bn = TRAINERS[trainer]
    on_one = ["trainer.devices=1"] + ([] if torch.cuda.is_available() else ["trainer.accelerator=cpu"])
    cfg = make_cfg(tmp_path, [f"trainer={trainer}", *(on_one if trainer in ("gpu", "ddp") else [])])
    trainer_obj = hydra.utils.instantiate(cfg.trainer)
    assert type(trainer_obj.strategy) is strategy and trainer_obj.precision == precision
    assert make_cfg(tmp_path, [f"trainer={trainer}"]).trainer.devices == devices
    if trainer in ("cpu", "ddp_sim"):
        assert isinstance(trainer_obj.accelerator, CPUAccelerator) and trainer_obj.num_devices == devices
    assert isinstance(getattr(trainer_obj.strategy, "_layer_sync", None), TorchSyncBatchNorm) == sync_bn
    # A kill during a save never leaves a partial last.ckpt, whatever the trainer.
    assert isinstance(trainer_obj.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_and_callback_config_instantiates(tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_cfg(tmp_path, [f"logger={logger}"])
    _, _, trainer = build(cfg)
    names = {type(c).__name__ for c in trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor"} <= names
    if logger != "none":
        assert trainer.logger is not None


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_instantiates(tmp_path, data):
    extra = []
    if data == "imagenet":
        extra = [f"data.root={write_jpeg_folder(tmp_path / 'in')}", "data.num_classes=2"]
    if data == "imagenet_ffcv":
        from data.ffcv_writer import ImageFieldOptions, write_split
        beton = str(tmp_path / "in.beton")
        write_split(f"{write_jpeg_folder(tmp_path / 'in', splits=('train',))}/train", beton, ImageFieldOptions(), 1)
        extra = [f"data.train_path={beton}", f"data.val_path={beton}", "data.num_classes=2", "data.num_workers=1"]
    cfg = make_cfg(tmp_path, [f"data={data}", *extra])
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, cfg.data.image_size, cfg.data.image_size)
    assert labels.max() < cfg.data.num_classes


# Each recipe as its file's header describes it: network (parameters at its own class count, 1000
# on ImageNet, as the papers count them), reducer, keep-rate schedule, global batch, epochs, EMA,
# distillation. A recipe that trains something else fails here, not after days on a cluster.
RECIPES = {
    "deit_s_in1k": dict(params=22_050_664, reducer=None, batch=1024, epochs=300, ema=0.99996, teacher=None,
                        schedule=None),
    "evit_deit_s_in1k": dict(params=22_050_664, reducer="EViT", batch=2048, epochs=300, ema=None, teacher=None,
                             schedule=(0.7, 10, 100, None)),
    "evit_deit_s_finetune": dict(params=22_050_664, reducer="EViT", batch=2048, epochs=30, ema=None, teacher=None,
                                 schedule=(0.7, 0, 0, None)),
    "evo_deit_s_in1k": dict(params=22_436_432, reducer="EvoViT", batch=1024, epochs=300, ema=None, teacher=None,
                            schedule=(0.5, 0, 0, 200)),
    "tome_deit_s_in1k": dict(params=22_050_664, reducer="ToMe", batch=1024, epochs=300, ema=None, teacher=None,
                             schedule=None),
    "levit_256_in1k": dict(params=18_893_876, reducer=None, batch=2048, epochs=1000, ema=0.99996,
                           teacher="regnety_160", schedule=None),
    "evo_levit_256_in1k": dict(params=20_035_278, reducer=None, batch=2048, epochs=300, ema=0.99996,
                               teacher="regnety_160", schedule=(0.5, 0, 0, 200)),
    "digits_quick": dict(params=2_712_010, reducer=None, batch=64, epochs=5, ema=None, teacher=None, schedule=None),
    "evit_digits": dict(params=2_712_010, reducer="EViT", batch=64, epochs=30, ema=None, teacher=None,
                        schedule=(0.7, 5, 10, None)),
}


def test_recipe_table_covers_every_experiment():
    assert sorted(RECIPES) == options("experiment")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_builds_its_recipe(tmp_path, experiment):
    expected = RECIPES[experiment]
    cfg = make_cfg(tmp_path, [f"experiment={experiment}", *([] if "digits" in experiment else ["data.root=/x"])])
    net = hydra.utils.instantiate(cfg.module).net
    assert sum(p.numel() for p in net.parameters()) == expected["params"]
    reducer = getattr(net, "reducer", None)
    assert (type(reducer).__name__ if reducer is not None else None) == expected["reducer"]
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.get("num_nodes", 1) == expected["batch"]
    assert cfg.trainer.max_epochs == expected["epochs"] and cfg.module.ema_decay == expected["ema"]
    callbacks = {type(c).__name__: c for c in instantiate_list(cfg.callbacks)}
    assert getattr(callbacks.get("Distillation"), "teacher_name", None) == expected["teacher"]
    schedule = callbacks.get("KeepRateSchedule")
    assert (None if schedule is None else (schedule.target, schedule.start_epoch, schedule.epochs,
                                           schedule.evo_stage_epoch)) == expected["schedule"]


def test_deit_s_in1k_is_the_paper_recipe(tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=deit_s_in1k", "data.root=/x"])
    assert cfg.data.batch_size * cfg.trainer.devices == 1024
    assert cfg.trainer.max_epochs == 300 and cfg.module.warmup_epochs == 5
    assert cfg.module.lr == 5e-4 and cfg.module.optimizer.weight_decay == 0.05
    assert cfg.model.drop_path_rate == 0.1 and cfg.module.smoothing == 0.1
    assert cfg.module.mixup.mixup_alpha == 0.8 and cfg.module.mixup.cutmix_alpha == 1.0
    assert cfg.data.repeated_aug == 3 and cfg.module.ema_decay == 0.99996
    assert cfg.data.train_transform.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.train_transform.re_prob == 0.25


@pytest.mark.parametrize("model, reducer, keep_rate", [
    ("evit_deit_s", "EViT", 0.7), ("evo_deit_s", "EvoViT", 0.5), ("tome_deit_s", "ToMe", 1.0), ("deit_s", None, 1.0)])
def test_model_files_choose_their_reducer(tmp_path, model, reducer, keep_rate):
    cfg = make_cfg(tmp_path, [f"model={model}"])
    assert (cfg.reducer._target_.rsplit(".", 1)[1] if cfg.reducer else None) == reducer
    assert cfg.keep_rate == keep_rate and (cfg.reducer is None or cfg.reducer.keep_rate == keep_rate)


def test_any_backbone_with_any_reducer_and_keep_rate(tmp_path):
    cfg = make_cfg(tmp_path, ["model=deit_t_distilled", "reducer=evit", "keep_rate=0.5", "data=synthetic",
                              "data.image_size=64", "data.num_classes=3"])
    net = hydra.utils.instantiate(cfg.module).net
    assert type(net.reducer).__name__ == "EViT" and net.keep_rate == 0.5
    cfg = make_cfg(tmp_path, ["model=evit_deit_s", "reducer=tome", "reducer.r=[8,8,8]"])
    assert cfg.reducer._target_.endswith("ToMe") and list(cfg.reducer.r) == [8, 8, 8]

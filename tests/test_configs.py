"""Every config in conf/ composes and its objects instantiate (no training)."""
import os

import hydra
import pytest
import torch

from conftest import CONF, make_cfg, write_jpeg_folder
from pipeline import build


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
    outputs = train_out if isinstance(train_out, tuple) else (train_out,)
    sum(o.float().mean() for o in outputs).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_instantiates(tmp_path, trainer):
    extra = [] if torch.cuda.is_available() else ["trainer.accelerator=cpu", "trainer.devices=1"]
    cfg = make_cfg(tmp_path, [f"trainer={trainer}", *extra])
    trainer_obj = hydra.utils.instantiate(cfg.trainer)
    assert trainer_obj.max_epochs == cfg.trainer.max_epochs


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


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(tmp_path, experiment):
    extra = [] if "digits" in experiment else [f"data.root={write_jpeg_folder(tmp_path / 'in')}", "data.num_classes=2"]
    cfg = make_cfg(tmp_path, [f"experiment={experiment}", *extra])
    assert cfg.trainer.max_epochs >= 1


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

"""Every config in conf/ composes and its objects instantiate, and the tree keeps its shape: data configs
set only data, model configs only the model, one file per callback, one writer of last.ckpt."""
import inspect
import os

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from conftest import CONF, FAST, QUIET, make_cfg, write_jpeg_folder
from pipeline import build, instantiate_list, run


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


BY_NAME = {"deit": "deit_tiny_patch16_224", "evo_levit": "evo_levit_128", "levit": "levit_128s"}


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds_a_classifier_and_takes_a_bf16_mixed_training_step(tmp_path, model):
    """Eval logits of the right shape, then one Lightning training step at trainer.precision=bf16-mixed
    (bfloat16 autocast on the CPU, as on a GPU) that updates the weights with a finite loss."""
    small = [] if model == "vit_digits" else ["data=synthetic", "data.image_size=32", "data.num_classes=7",
                                              "data.batch_size=4", "data.train_samples=4", "data.val_samples=4"]
    if model in BY_NAME:
        small.append(f"model.name={BY_NAME[model]}")  # the parameterised files the sizes are named on
    if model.startswith("tome"):
        small.append("reducer.r=1")  # 32 px → 4 patches: r=13 cannot be merged
    if model.startswith("slide_swin"):
        small[1] = "data.image_size=64"  # Swin: patch 4 and three merges
    cfg = make_cfg(tmp_path, [f"model={model}", *small, *QUIET, "trainer=cpu", "trainer.precision=bf16-mixed",
                              "trainer.max_steps=1", "trainer.limit_val_batches=0", "logger=csv",
                              # no checkpoint files: a ViT-B's weights and AdamW state are 1 GB
                              "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
                              "+trainer.enable_checkpointing=false"])
    datamodule, module, trainer = build(cfg)
    size = cfg.data.image_size
    with torch.no_grad():
        out = module.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, cfg.data.num_classes)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule)
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: the weights stay float32


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
    "digits": dict(params=2_712_010, reducer=None, batch=64, epochs=30, ema=None, teacher=None, schedule=None),
    "digits_quick": dict(params=2_712_010, reducer=None, batch=64, epochs=5, ema=None, teacher=None, schedule=None),
    "evit_digits": dict(params=2_712_010, reducer="EViT", batch=64, epochs=30, ema=None, teacher=None,
                        schedule=(0.7, 5, 10, None)),
    "ats_digits": dict(params=2_712_010, reducer="ATS", batch=64, epochs=30, ema=None, teacher=None, schedule=None),
    # Haurum et al.'s methods at a fixed keep rate; DPC-KNN adds a C→1 score layer per location, PatchMerger a
    # LayerNorm and 11 (then 7) learned queries.
    "topk_digits": dict(params=2_712_010, reducer="TopK", batch=64, epochs=30, ema=None, teacher=None, schedule=None),
    "kmedoids_digits": dict(params=2_712_010, reducer="KMedoids", batch=64, epochs=30, ema=None, teacher=None,
                            schedule=None),
    "dpcknn_digits": dict(params=2_712_010 + 2 * (192 + 1), reducer="DPCKNN", batch=64, epochs=30, ema=None,
                          teacher=None, schedule=None),
    "patchmerger_digits": dict(params=2_712_010 + 2 * 2 * 192 + (11 + 7) * 192, reducer="PatchMerger", batch=64,
                               epochs=30, ema=None, teacher=None, schedule=None),
    # DiffRate's search: the network plus 2 × 49 kept-number logits per block 1..11 (only those train).
    "diffrate_deit_s_search": dict(params=22_051_742, reducer="DiffRate", batch=1024, epochs=3, ema=None,
                                   teacher=None, schedule=None),
    "diffrate_digits": dict(params=2_712_170, reducer="DiffRate", batch=64, epochs=30, ema=None, teacher=None,
                            schedule=None),
    # DynamicViT: the network plus its three keep-score predictors (under reducer.), teacher = the pretrained student.
    "dynamicvit_deit_s_in1k": dict(params=22_774_414, reducer="DynamicViT", batch=1024, epochs=30, ema=0.9999,
                                   teacher="deit_small_patch16_224", schedule=None),
    "dynamicvit_digits": dict(params=2_894_176, reducer="DynamicViT", batch=64, epochs=30, ema=None,
                              teacher="deit_tiny_patch16_224", schedule=None),
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


# --- the shape of the config tree (README "Config groups") -------------------------------------------------
def load_yaml(group, name):
    return OmegaConf.load(os.path.join(CONF, group, f"{name}.yaml"))


def nodes(cfg, skip=("hydra",)):
    return {k: OmegaConf.to_container(cfg[k], resolve=False) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k not in skip}


@pytest.mark.parametrize("data", options("data"))
def test_a_data_config_sets_only_data(tmp_path, data):
    """Choosing a data set changes nothing but ``data``; a recipe that suits it is an experiment."""
    chosen = nodes(make_cfg(tmp_path, [f"data={data}", "~experiment"]), skip=("hydra", "data"))
    assert chosen == nodes(make_cfg(tmp_path, ["data=synthetic", "~experiment"]), skip=("hydra", "data"))


def test_the_default_run_is_the_digits_experiment_and_other_data_keeps_the_deit_recipe(tmp_path):
    default = make_cfg(tmp_path)
    assert default.module.lr == 8e-3 and default.module.mixup is None and default.trainer.max_epochs == 30
    assert nodes(default) == nodes(make_cfg(tmp_path, ["experiment=digits"]))
    imagenet = make_cfg(tmp_path, ["data=imagenet", "data.root=/x"])
    assert imagenet.module.lr == 5e-4 and imagenet.module.mixup.cutmix_alpha == 1.0 and imagenet.trainer.max_epochs == 300


@pytest.mark.parametrize("model", options("model"))
def test_a_model_config_sets_only_the_model_and_the_reducer_groups_choice(tmp_path, model):
    """No model file is ``_global_``: everything outside ``model`` (the reducer, the keep rate) is what the
    reducer group's option it chooses gives on its own."""
    assert not open(os.path.join(CONF, "model", f"{model}.yaml")).readline().startswith("# @package")
    cfg = make_cfg(tmp_path, [f"model={model}"])
    reducer = cfg.hydra.runtime.choices.reducer
    assert nodes(cfg, skip=("hydra", "model")) == nodes(make_cfg(tmp_path, [f"reducer={reducer}"]), skip=("hydra", "model"))


@pytest.mark.parametrize("reducer", options("reducer"))
def test_a_reducer_config_sets_only_the_reducer_and_its_keep_rate(tmp_path, reducer):
    cfg = nodes(make_cfg(tmp_path, [f"reducer={reducer}"]), skip=("hydra", "reducer", "keep_rate"))
    assert cfg == nodes(make_cfg(tmp_path), skip=("hydra", "reducer", "keep_rate"))


def callback_files():
    return [name for name in options("callbacks") if "defaults" not in load_yaml("callbacks", name)]


@pytest.mark.parametrize("name", options("callbacks"))
def test_a_callback_file_defines_one_callback_by_its_name_or_only_lists_others(name):
    """conf/callbacks/<name>.yaml holds callbacks.<name> alone; default.yaml and the bundles
    (keep_rate, distill, token_selection) only compose those files."""
    cfg = load_yaml("callbacks", name)
    if "defaults" in cfg:
        assert set(cfg) == {"defaults"} and all(isinstance(d, str) for d in cfg.defaults)
        assert set(cfg.defaults) - {"_self_"} <= set(callback_files()) | {"default"}
    elif name != "none":
        assert list(cfg) == [name] and "_target_" in cfg[name]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_an_experiment_takes_its_callbacks_from_their_files(tmp_path, experiment):
    """An experiment adds a callback through its defaults list and tunes it; it never declares one."""
    for node in (load_yaml("experiment", experiment).get("callbacks") or {}).values():
        assert "_target_" not in node
    cfg = make_cfg(tmp_path, [f"experiment={experiment}", *([] if "digits" in experiment else ["data.root=/x"])])
    for name, node in cfg.callbacks.items():
        assert node._target_ == load_yaml("callbacks", name)[name]._target_


class SigtermAtStep(pl.Callback):
    """Lightning's SIGTERM path (stop after the batch in flight) at a known step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets


def test_last_ckpt_has_one_writer_at_epoch_ends_every_n_steps_and_on_sigterm(tmp_path, monkeypatch):
    """2 epochs of 3 steps, every_n_train_steps=2, SIGTERM after step 5: last.ckpt at steps 2, 3 (epoch
    end), 4 and 5, each time written by the same callback."""
    writes = []
    save = pl.Trainer.save_checkpoint

    def recording(trainer, path, *args, **kwargs):
        caller = inspect.currentframe().f_back
        while caller and not isinstance(caller.f_locals.get("self"), pl.Callback):
            caller = caller.f_back
        writes.append((os.path.basename(path), trainer.global_step, id(caller.f_locals["self"]) if caller else None))
        return save(trainer, path, *args, **kwargs)
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", recording)
    cfg = make_cfg(tmp_path, [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                              "test=false", "callbacks.last_checkpoint.every_n_train_steps=2",
                              "+callbacks.sigterm._target_=test_configs.SigtermAtStep", "+callbacks.sigterm.step=5"])
    with pytest.raises(SIGTERMException):  # a SystemExit: the process ends with status 0
        run(cfg)
    last = [(step, writer) for name, step, writer in writes if name == "last.ckpt"]
    assert [step for step, _ in last] == [2, 3, 4, 5]
    assert len({writer for _, writer in last}) == 1 and None not in {writer for _, writer in last}
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5

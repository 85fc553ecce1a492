"""Every paper recipe (conf/experiment/*_in1k, *_finetune) as a user launches it on a cluster, but on
2 CPU processes (trainer=ddp_sim): its EMA, repeated augmentation and sampler, callbacks (distillation
from a local teacher file), reducer and model at their real architecture. Only the batch size, image
size, class count and step count are shrunk. It trains, validates and saves, then a second launch
resumes the run in place and continues from the saved step."""
import csv
import glob
import os
import re

import pytest
import timm
import torch

from conftest import CONF, QUIET, make_cfg, run_train, write_jpeg_folder

RECIPES = ["deit_s_in1k", "evit_deit_s_in1k", "evit_deit_s_finetune", "evo_deit_s_in1k", "tome_deit_s_in1k",
           "levit_256_in1k", "evo_levit_256_in1k"]
CLASSES = 4
# The smallest image a recipe's model accepts: LeViT needs a multiple of 16 (64 px leaves a 1×1 map
# after its third stage), DeiT-S sees 16 patches. ToMe's r=13 merges 13 tokens in each of 12 blocks,
# which needs 13×13 patches and [CLS] (the last block merges 13 of its 27 tokens): 208 px.
IMAGE_SIZE = {"tome_deit_s_in1k": 208}
BATCH = 4
# Two optimizer steps make an epoch (validated and checkpointed), so the resume starts a new epoch.
STEPS_PER_EPOCH = 2


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """An ImageNet-layout folder of 4 classes. The repeated-augmentation sampler draws
    ``len // 256 * 256`` images per epoch (DeiT's count), so train/ holds exactly 256."""
    root = tmp_path_factory.mktemp("tiny_in1k")
    write_jpeg_folder(root, classes=CLASSES, per_class=256 // CLASSES, size=(72, 72), splits=("train",))
    write_jpeg_folder(root, classes=CLASSES, per_class=2, size=(72, 72), splits=("val",), seed=1)
    return str(root)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """Random-weight teachers saved locally, one per architecture a recipe distils from, at the tiny
    class count (built on first use)."""
    folder = tmp_path_factory.mktemp("teachers")
    made = {}

    def teacher(name):
        if name not in made:
            torch.manual_seed(0)
            made[name] = str(folder / f"{name}.pth")
            torch.save(timm.create_model(name, num_classes=CLASSES).state_dict(), made[name])
        return made[name]
    return teacher


def test_every_paper_recipe_is_run_here():
    shipped = {f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml")}
    assert set(RECIPES) == {name for name in shipped if "digits" not in name}


def shrunk(experiment, data_root):
    """The recipe, shrunk in batch, image size, classes and steps, on 2 CPU processes."""
    return [f"experiment={experiment}", f"data.root={data_root}", f"data.num_classes={CLASSES}",
            f"data.image_size={IMAGE_SIZE.get(experiment, 64)}", f"data.batch_size={BATCH}", "trainer=ddp_sim",
            "trainer.devices=2",
            f"trainer.limit_train_batches={STEPS_PER_EPOCH}", "trainer.log_every_n_steps=1", *QUIET]


def csv_rows(run_dir):
    """Metric rows of every launch in the run directory, oldest launch first."""
    files = sorted(glob.glob(os.path.join(run_dir, "csv", "**", "metrics.csv"), recursive=True), key=os.path.getmtime)
    return [list(csv.DictReader(open(f))) for f in files]


def ranks_started(stderr):
    return set(re.findall(r"GLOBAL_RANK: (\d), MEMBER: \d/2", stderr))


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_trains_under_ddp_and_resumes(tmp_path, tiny_imagenet, teacher_files, experiment):
    recipe = make_cfg(tmp_path / "compose", shrunk(experiment, tiny_imagenet))
    args = shrunk(experiment, tiny_imagenet)
    distillation = (recipe.get("callbacks") or {}).get("distillation")
    if distillation is not None:
        args.append(f"callbacks.distillation.teacher_path={teacher_files(distillation.teacher)}")
    ema = recipe.module.ema_decay is not None
    run_dir = tmp_path / "run"

    first = run_train([*args, f"trainer.max_steps={STEPS_PER_EPOCH}", f"hydra.run.dir={run_dir}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert ranks_started(first.stderr) == {"0", "1"}, "both processes ran"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == STEPS_PER_EPOCH
    assert any(k.startswith("ema.") for k in saved["state_dict"]) == ema
    (rows,) = csv_rows(run_dir)
    assert any(r.get("val/acc1") for r in rows) and any(r.get("best/val_acc1") for r in rows)
    assert any(r.get("val/ema_acc1") for r in rows) == ema

    # Training a finished run further is a deliberate change of its saved config: resume.allow names it.
    resumed = run_train(["ckpt_path=last", f"hydra.run.dir={run_dir}", f"trainer.max_steps={2 * STEPS_PER_EPOCH}",
                         "resume.allow=[trainer.max_steps]"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ranks_started(resumed.stderr) == {"0", "1"}
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    assert any(k.startswith("ema.") for k in last["state_dict"]) == ema
    _, resumed_rows = csv_rows(run_dir)
    # Two new steps, none before the saved one. Not their exact numbers: Lightning 2.6 replays the saved
    # epoch's end when a max_steps run resumes and logs one step late (Lightning issue #19403).
    steps = [int(r["step"]) for r in resumed_rows if r.get("train/loss_step")]
    assert len(steps) == STEPS_PER_EPOCH and min(steps) >= STEPS_PER_EPOCH, "the resumed launch continues from the saved step"
    assert any(r.get("val/acc1") for r in resumed_rows)
    assert any(r.get("val/ema_acc1") for r in resumed_rows) == ema

"""Every paper recipe (conf/experiment/*_in1k, *_finetune, *_search) as a user launches it on a
cluster, but on 2 CPU processes (trainer=ddp_sim): its EMA, repeated augmentation and sampler,
callbacks (distillation from a local teacher file), reducer and model at their real architecture. Only
the batch size, image size, class count and step count are shrunk. It trains, validates and saves,
then a second launch resumes the run in place and continues from the saved step.

The DeiT-S recipe also shows what a DDP run computes (gradient accumulation 2 added):

- the EMA trains under DDP, is validated (val/ema_acc1), saved (ema.*) and restored on resume, on
  each rank exactly as saved;
- validation and test are sharded over the ranks (each evaluates its half), while the training
  sampler stays the repeated-augmentation one, and the synced metrics equal a single-process
  evaluation of the same checkpoint;
- the optimizer runs at lr × batch × world × accumulate / lr_base_batch.

All launches (two per recipe) run one after another under one pair of processes
(tests/ddp_launches.py): each is ``python train.py ...`` with its own command line, but the
interpreters and the process group start once (a separate launch spends most of its 15 s there)."""
import csv
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List

import pytest
import timm
import torch

from conftest import CONF, QUIET, ROOT, make_cfg, write_jpeg_folder
from ddp_launches import LAUNCH_LINE, PLAN_ENV
from pipeline import build

TESTS = os.path.dirname(os.path.abspath(__file__))
RECIPES = ["deit_s_in1k", "evit_deit_s_in1k", "evit_deit_s_finetune", "evo_deit_s_in1k", "tome_deit_s_in1k",
           "levit_256_in1k", "evo_levit_256_in1k", "dynamicvit_deit_s_in1k", "diffrate_deit_s_search"]
# Recipes that start from pretrained DeiT-S weights (a local file; random weights here).
PRETRAINED = {"dynamicvit_deit_s_in1k": "deit_small_patch16_224", "diffrate_deit_s_search": "deit_small_patch16_224"}
CLASSES = 4
# The smallest image a recipe's model accepts: LeViT needs a multiple of 16 (64 px leaves a 1×1 map
# after its third stage), DeiT-S sees 16 patches. ToMe's r=13 merges 13 tokens in each of 12 blocks,
# which needs 13×13 patches and [CLS] (the last block merges 13 of its 27 tokens): 208 px.
IMAGE_SIZE = {"tome_deit_s_in1k": 208}
BATCH, WORLD = 4, 2
# Two optimizer steps make an epoch (validated and checkpointed), so the resume starts a new epoch.
STEPS_PER_EPOCH = 2
# The recipe whose run also carries the probes of what DDP computes, with gradient accumulation.
PROBED, ACCUMULATE = "deit_s_in1k", 2
VAL_IMAGES = CLASSES * 2  # divisible by WORLD: no padded duplicates


def test_every_paper_recipe_is_run_here():
    shipped = {f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml")}
    assert set(RECIPES) == {name for name in shipped if "digits" not in name}


def shrunk(experiment, data_root):
    """The recipe, shrunk in batch, image size, classes and steps, on 2 CPU processes."""
    accumulate = ACCUMULATE if experiment == PROBED else 1
    return [f"experiment={experiment}", f"data.root={data_root}", f"data.num_classes={CLASSES}",
            f"data.image_size={IMAGE_SIZE.get(experiment, 64)}", f"data.batch_size={BATCH}", "trainer=ddp_sim",
            f"trainer.devices={WORLD}", f"trainer.accumulate_grad_batches={accumulate}",
            f"trainer.limit_train_batches={STEPS_PER_EPOCH * accumulate}", "trainer.log_every_n_steps=1", *QUIET]


def probes(experiment, out):
    """Test-only callbacks (tests/ddp_probes.py) the first launch adds; the resume keeps them (they are
    in the run's saved config)."""
    names = {"train_start": "RecordTrainStart"}
    if experiment == PROBED:
        names.update(eval_samplers="RecordEvalSamplers", ema_probe="RecordEmaAtTrainStart")
    return [arg for name, cls in names.items()
            for arg in (f"+callbacks.{name}._target_=ddp_probes.{cls}", f"+callbacks.{name}.out={out}")]


@dataclass
class Run:
    dir: str
    probes: str
    data: str
    codes: List[str]     # "rank r: code" of the first launch and of the resume, both ranks
    log: str             # the launches' stderr, for failure messages


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Run]:
    tmp = tmp_path_factory.mktemp("recipes")
    # An ImageNet-layout folder of 4 classes. The repeated-augmentation sampler draws
    # len // 256 * 256 images per epoch (DeiT's count), so train/ holds exactly 256.
    data = str(tmp / "data")
    write_jpeg_folder(data, classes=CLASSES, per_class=256 // CLASSES, size=(72, 72), splits=("train",))
    write_jpeg_folder(data, classes=CLASSES, per_class=VAL_IMAGES // CLASSES, size=(72, 72), splits=("val",), seed=1)
    weights = {}

    def weights_file(name):
        """Random weights of timm's ``name`` at the tiny class count, saved locally (teachers, and
        the pretrained backbone of fine-tuning recipes)."""
        if name not in weights:
            torch.manual_seed(0)
            weights[name] = str(tmp / f"{name}.pth")
            torch.save(timm.create_model(name, num_classes=CLASSES).state_dict(), weights[name])
        return weights[name]

    launches, found = [], {}
    for experiment in RECIPES:
        args = shrunk(experiment, data)
        recipe = make_cfg(tmp / "compose", args)
        distillation = (recipe.get("callbacks") or {}).get("distillation")
        if distillation is not None and distillation.get("teacher_module") is None:
            args.append(f"callbacks.distillation.teacher_path={weights_file(distillation.teacher)}")
        if experiment in PRETRAINED:
            args.append(f"model.pretrained_path={weights_file(PRETRAINED[experiment])}")
        run_dir, out = tmp / experiment, tmp / f"{experiment}_probes"
        launches.append([*args, *probes(experiment, out), f"trainer.max_steps={STEPS_PER_EPOCH}",
                         f"hydra.run.dir={run_dir}"])
        # Training a finished run further is a deliberate change of its saved config: resume.allow names it.
        launches.append(["ckpt_path=last", f"hydra.run.dir={run_dir}", f"trainer.max_steps={2 * STEPS_PER_EPOCH}",
                         "resume.allow=[trainer.max_steps]"])
        found[experiment] = (run_dir, out)
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"launches": launches, "signals": str(tmp / "signals")}))
    env = dict(os.environ, PYTHONPATH=TESTS, **{PLAN_ENV: str(plan)})
    done = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_launches.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    codes: Dict[int, List[str]] = {}
    for k, rank, code in LAUNCH_LINE.findall(done.stderr):
        codes.setdefault(int(k), []).append(f"rank {rank}: {code}")
    return {experiment: Run(str(run_dir), str(out), data, sorted(codes.get(2 * i, [])) + sorted(codes.get(2 * i + 1, [])),
                            done.stderr[-6000:])
            for i, (experiment, (run_dir, out)) in enumerate(found.items())}


def csv_rows(run_dir):
    """Metric rows of every launch in the run directory, oldest launch first."""
    files = sorted(glob.glob(os.path.join(run_dir, "csv", "**", "metrics.csv"), recursive=True), key=os.path.getmtime)
    return [list(csv.DictReader(open(f))) for f in files]


def logged(rows, name):
    return [float(r[name]) for r in rows if r.get(name)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_trains_under_ddp_and_resumes(runs, experiment):
    run = runs[experiment]
    both = [f"rank {r}: 0" for r in range(WORLD)]
    assert run.codes == both * 2, f"{experiment}: first launch and resume {run.codes}\n{run.log}"
    ema = make_cfg(os.path.join(run.dir, "compose"), shrunk(experiment, run.data)).module.ema_decay is not None
    for step in (0, STEPS_PER_EPOCH):  # the first launch and the resume: both processes trained
        for rank in range(WORLD):
            record = json.load(open(os.path.join(run.probes, f"train_start_step{step}_rank{rank}.json")))
            assert record["world"] == WORLD, (step, rank)

    first, resumed = csv_rows(run.dir)
    saved = load(os.path.join(run.dir, "checkpoints", "epoch_000.ckpt"))
    assert saved["global_step"] == STEPS_PER_EPOCH
    assert any(k.startswith("ema.") for k in saved["state_dict"]) == ema
    assert logged(first, "val/acc1") and logged(first, "best/val_acc1")
    assert bool(logged(first, "val/ema_acc1")) == ema

    last = load(os.path.join(run.dir, "checkpoints", "last.ckpt"))
    assert last["global_step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 1
    assert any(k.startswith("ema.") for k in last["state_dict"]) == ema
    # Two new steps, none before the saved one. Not their exact numbers: Lightning 2.6 replays the saved
    # epoch's end when a max_steps run resumes and logs one step late (Lightning issue #19403).
    steps = [int(r["step"]) for r in resumed if r.get("train/loss_step")]
    assert len(steps) == STEPS_PER_EPOCH and min(steps) >= STEPS_PER_EPOCH, "the resumed launch continues from the saved step"
    assert logged(resumed, "val/acc1")
    assert bool(logged(resumed, "val/ema_acc1")) == ema


@pytest.fixture(scope="module")
def probed(runs):
    run = runs[PROBED]
    if run.codes != [f"rank {r}: 0" for r in range(WORLD)] * 2:
        pytest.fail(f"the {PROBED} launches failed: {run.codes}\n{run.log}")
    return run


def test_ema_is_validated_saved_and_restored_under_ddp(probed):
    first, resumed = csv_rows(probed.dir)
    assert logged(first, "val/ema_acc1") and logged(resumed, "val/ema_acc1") and logged(first, "best/val_ema_acc1")
    saved = {k[len("ema."):]: v for k, v in load(os.path.join(probed.dir, "checkpoints", "epoch_000.ckpt"))["state_dict"].items()
             if k.startswith("ema.")}
    assert saved, "the EMA is in the checkpoint's state dict"
    for rank in range(WORLD):
        restored = torch.load(os.path.join(probed.probes, f"ema_step{STEPS_PER_EPOCH}_rank{rank}.pt"), weights_only=True)
        assert restored.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
    last = load(os.path.join(probed.dir, "checkpoints", "last.ckpt"))
    moved = [k for k, v in saved.items() if v.is_floating_point() and not torch.equal(last["state_dict"]["ema." + k], v)]
    assert moved, "the resumed launch went on averaging"


def test_eval_is_sharded_and_the_train_sampler_kept(probed):
    for stage in ("val", "test"):
        shares = [json.load(open(os.path.join(probed.probes, f"{stage}_rank{r}.json"))) for r in range(WORLD)]
        assert [len(s) for s in shares] == [VAL_IMAGES // WORLD] * WORLD, f"{stage}: each rank evaluates its half"
        assert sorted(shares[0] + shares[1]) == list(range(VAL_IMAGES))
    for rank in range(WORLD):
        record = json.load(open(os.path.join(probed.probes, f"train_start_step0_rank{rank}.json")))
        assert record == {"world": WORLD, "sampler": "RankedRepeatAugSampler"}


def test_sharded_metrics_equal_a_single_process_evaluation_of_the_checkpoint(probed, tmp_path):
    first, _ = csv_rows(probed.dir)
    # The first launch validated after its epoch (step 2, the weights of epoch_000.ckpt) and tested
    # its best checkpoint, the same file.
    ckpt = os.path.join(probed.dir, "checkpoints", "epoch_000.ckpt")
    cfg = make_cfg(tmp_path, [*shrunk(PROBED, probed.data), "trainer=cpu", "trainer.devices=1", "logger=none"])
    datamodule, module, trainer = build(cfg)
    single = {}
    for evaluate in (trainer.validate, trainer.test):
        evaluate(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=False, verbose=False)
        single.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    # The launch's final evaluation of its best checkpoint (best/val_*) against this evaluation of the
    # given file (eval/val_*).
    for launch, here in (("val/", "val/"), ("best/val_", "eval/val_")):
        for name in ("acc1", "acc5", "ema_acc1", "ema_acc5", "loss"):
            assert logged(first, launch + name)[-1] == pytest.approx(single[here + name], rel=1e-5), launch + name


def test_lr_is_scaled_by_world_size_and_accumulation(probed):
    last = load(os.path.join(probed.dir, "checkpoints", "last.ckpt"))
    # DeiT-S recipe: 5e-4 × 4 images × 2 processes × 2 accumulated batches / 512, the rate the
    # scheduler warms up to (timm keeps it as each group's initial_lr).
    groups = last["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([5e-4 * BATCH * WORLD * ACCUMULATE / 512] * len(groups))
